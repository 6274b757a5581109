"""
The nginx configuration syntax: text to a tree of L{Directive}s.

The lexer follows C{ngx_conf_read_token} in nginx's C{src/core/ngx_conf_file.c}
character for character, so a file nginx accepts is read the same way and a file
it rejects is rejected with nginx's message.  C{include} is expanded here, in every
context, as C{ngx_conf_include} does.  Which directives exist, where they are allowed
and how many arguments they take is the directive table's business, not this
module's.
"""

from __future__ import annotations

import enum
import glob
import os

from attrs import define, field, frozen

from tlsrelay._config._errors import ConfigError
from tlsrelay._config._tree import Directive

MAX_INCLUDE_DEPTH = 32
"""
How deeply files may include files; an include loop stops here with an error.
"""

# nginx's whitespace: nothing else (not form feed, not vertical tab) separates tokens.
_SPACE = frozenset(" \t\r\n")
_GLOB_CHARACTERS = frozenset("*?[")
_UNESCAPED = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "r": "\r", "n": "\n"}


class _End(enum.Enum):
    """
    What ended a statement: the return values of C{ngx_conf_read_token}.
    """

    SIMPLE = "NGX_OK"
    BLOCK_START = "NGX_CONF_BLOCK_START"
    BLOCK_DONE = "NGX_CONF_BLOCK_DONE"
    FILE_DONE = "NGX_CONF_FILE_DONE"


@frozen
class _Statement:
    """
    The tokens of one directive and what ended them.

    @ivar line: the line the first token started on.
    """

    end: _End
    words: tuple[str, ...] = ()
    line: int = 0


def _unescape(raw: str) -> str:
    """
    Undo backslash escapes as nginx does: C{\\"}, C{\\'}, C{\\\\}, C{\\t}, C{\\r} and
    C{\\n} are replaced; any other backslash is kept as it is.
    """
    if "\\" not in raw:
        return raw
    out: list[str] = []
    index = 0
    length = len(raw)
    while index < length:
        ch = raw[index]
        if ch == "\\" and index + 1 < length and raw[index + 1] in _UNESCAPED:
            out.append(_UNESCAPED[raw[index + 1]])
            index += 2
            continue
        out.append(ch)
        index += 1
    return "".join(out)


@define
class _Lexer:
    """
    Split one file's text into statements, keeping the current line.
    """

    text: str
    file: str
    position: int = 0
    line: int = 1

    def error(self, message: str, line: int | None = None) -> ConfigError:
        """
        A L{ConfigError} at C{line}, by default the line being read (as nginx
        reports lexical errors).
        """
        return ConfigError(message, self.file, self.line if line is None else line)

    def readStatement(self) -> _Statement:
        """
        Read the next statement: the words up to C{;} or C{{}, a C{}}, or the end of
        the file.
        """
        text = self.text
        length = len(text)
        words: list[str] = []
        firstLine = 0
        start = self.position
        startLine = self.line
        found = False
        needSpace = False
        lastSpace = True
        comment = False
        variable = False
        escaped = False
        singleQuoted = False
        doubleQuoted = False

        while True:
            if self.position >= length:
                if words or not lastSpace:
                    if singleQuoted or doubleQuoted:
                        quote = '"' if doubleQuoted else "'"
                        raise self.error(
                            "unexpected end of file, probably missing "
                            f'terminating "{quote}" character',
                            startLine,
                        )
                    raise self.error('unexpected end of file, expecting ";" or "}"')
                return _Statement(_End.FILE_DONE)

            ch = text[self.position]
            self.position += 1

            if ch == "\n":
                self.line += 1
                comment = False

            if comment:
                continue

            if escaped:
                escaped = False
                continue

            if needSpace:
                if ch in _SPACE:
                    lastSpace = True
                    needSpace = False
                    continue
                if ch == ";":
                    return _Statement(_End.SIMPLE, tuple(words), firstLine)
                if ch == "{":
                    return _Statement(_End.BLOCK_START, tuple(words), firstLine)
                if ch != ")":
                    raise self.error(f'unexpected "{ch}"')
                # nginx lets ")" follow a quoted word (for "if"); it starts a word.
                lastSpace = True
                needSpace = False

            if lastSpace:
                if ch in _SPACE:
                    continue

                start = self.position - 1
                startLine = self.line

                if ch in ";{":
                    if not words:
                        raise self.error(f'unexpected "{ch}"')
                    end = _End.BLOCK_START if ch == "{" else _End.SIMPLE
                    return _Statement(end, tuple(words), firstLine)
                if ch == "}":
                    if words:
                        raise self.error('unexpected "}"')
                    return _Statement(_End.BLOCK_DONE)
                if ch == "#":
                    comment = True
                    continue

                lastSpace = False
                if ch == "\\":
                    escaped = True
                elif ch == '"':
                    start += 1
                    doubleQuoted = True
                elif ch == "'":
                    start += 1
                    singleQuoted = True
                elif ch == "$":
                    variable = True
                continue

            # Inside a word.
            if ch == "{" and variable:
                continue
            variable = False

            if ch == "\\":
                escaped = True
                continue
            if ch == "$":
                variable = True
                continue

            if doubleQuoted:
                if ch == '"':
                    doubleQuoted = False
                    needSpace = True
                    found = True
            elif singleQuoted:
                if ch == "'":
                    singleQuoted = False
                    needSpace = True
                    found = True
            elif ch in _SPACE or ch == ";" or ch == "{":
                lastSpace = True
                found = True

            if found:
                if not words:
                    firstLine = startLine
                words.append(_unescape(text[start : self.position - 1]))
                if ch == ";":
                    return _Statement(_End.SIMPLE, tuple(words), firstLine)
                if ch == "{":
                    return _Statement(_End.BLOCK_START, tuple(words), firstLine)
                found = False


@define
class _Frame:
    """
    A block being read: its directive's name, arguments and line, and the
    directives read inside it so far.
    """

    name: str
    args: tuple[str, ...]
    line: int
    directives: list[Directive] = field(factory=list)


def _readText(path: str, where: Directive | None) -> str:
    """
    The text of the file at C{path}; bytes that are not UTF-8 are kept as lone
    surrogates rather than refused.

    @param where: the C{include} that names the file, or L{None} for the main file.
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as e:
        reason = f"{e.errno}: {e.strerror}" if e.errno is not None else str(e)
        message = f'open() "{path}" failed ({reason})'
        if where is None:
            raise ConfigError(message) from None
        raise where.error(message) from None
    return data.decode("utf-8", "surrogateescape")


def _includedFiles(include: Directive, baseDir: str) -> list[str]:
    """
    The files an C{include} names: the file itself, or the sorted matches of a glob
    pattern (which may match nothing; a matching directory fails to open later, as
    in nginx).  Relative names are relative to C{baseDir}.
    """
    pattern = include.args[0]
    if _GLOB_CHARACTERS.isdisjoint(pattern):
        return [os.path.join(baseDir, pattern)]
    if not os.path.isabs(pattern):
        pattern = os.path.join(glob.escape(baseDir), pattern)
    return sorted(glob.glob(pattern))


def _parse(text: str, file: str, baseDir: str, depth: int) -> tuple[Directive, ...]:
    """
    Parse one file's text, expanding includes.

    @param depth: how many includes led to this file.
    """
    lexer = _Lexer(text, file)
    stack: list[_Frame] = []
    current: list[Directive] = []

    while True:
        statement = lexer.readStatement()

        if statement.end is _End.BLOCK_DONE:
            if not stack:
                raise lexer.error('unexpected "}"')
            frame = stack.pop()
            block = Directive(frame.name, frame.args, tuple(current), file, frame.line)
            current = frame.directives
            current.append(block)
            continue

        if statement.end is _End.FILE_DONE:
            if stack:
                raise lexer.error('unexpected end of file, expecting "}"')
            return tuple(current)

        name, *rest = statement.words
        args = tuple(rest)

        if name == "include":
            include = Directive(name, args, None, file, statement.line)
            if statement.end is _End.BLOCK_START:
                raise include.error('directive "include" is not terminated by ";"')
            if len(args) != 1:
                raise include.error(
                    'invalid number of arguments in "include" directive'
                )
            for path in _includedFiles(include, baseDir):
                if depth >= MAX_INCLUDE_DEPTH:
                    raise include.error(
                        f'cannot include "{path}": includes nested more than '
                        f"{MAX_INCLUDE_DEPTH} deep, probably an include loop"
                    )
                current.extend(
                    _parse(_readText(path, include), path, baseDir, depth + 1)
                )
            continue

        if statement.end is _End.BLOCK_START:
            stack.append(_Frame(name, args, statement.line, current))
            current = []
        else:
            current.append(Directive(name, args, None, file, statement.line))


def parseString(text: str, file: str, baseDir: str) -> tuple[Directive, ...]:
    """
    Parse configuration text.

    @param file: the name the text came from, for directives' locations and errors.
    @param baseDir: the directory relative C{include} names are resolved against:
        the main configuration file's directory, also for includes in included files
        (nginx resolves them all against its configuration prefix).

    @raise ConfigError: for a syntax error or an C{include} that cannot be read.
    """
    return _parse(text, file, baseDir, 0)


def parseFile(path: str) -> tuple[Directive, ...]:
    """
    Parse the main configuration file at C{path}; its directory is the base of
    relative C{include} names.

    @raise ConfigError: if the file cannot be read, for a syntax error, or an
        C{include} that cannot be read.
    """
    baseDir = os.path.dirname(os.path.abspath(path))
    return _parse(_readText(path, None), path, baseDir, 0)
