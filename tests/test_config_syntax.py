# Twisted's assertions are not annotated.
# mypy: allow-untyped-calls
"""
Tests for the nginx configuration syntax: L{tlsrelay._config._parser} and
L{tlsrelay._config._units}.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from tlsrelay._config._errors import ConfigError
from tlsrelay._config._parser import MAX_INCLUDE_DEPTH, parseFile, parseString
from tlsrelay._config._tree import Directive
from tlsrelay._config._units import parseFlag, parseInt, parseSize, parseTime


def _simple(
    name: str, *args: str, file: str = "relay.conf", line: int = 1
) -> Directive:
    """
    A simple directive, for comparisons.
    """
    return Directive(name, args, None, file, line)


def _shape(
    directives: tuple[Directive, ...],
) -> list[tuple[str, tuple[str, ...], int, object]]:
    """
    Names, arguments, lines and nested blocks, without file names.
    """
    return [
        (d.name, d.args, d.line, None if d.block is None else _shape(d.block))
        for d in directives
    ]


class ParseStringTests(SynchronousTestCase):
    """
    Tokens, blocks, comments, quotes and line numbers, as nginx reads them.
    """

    def parse(self, text: str) -> tuple[Directive, ...]:
        """
        Parse C{text} as C{relay.conf}, in a directory with nothing to include.
        """
        return parseString(text, "relay.conf", self.mktemp())

    def test_empty(self) -> None:
        """
        Empty text, whitespace and comments alone hold no directives.
        """
        self.assertEqual(self.parse(""), ())
        self.assertEqual(self.parse(" \t\r\n\n"), ())
        self.assertEqual(self.parse("# only a comment"), ())
        self.assertEqual(self.parse("# one\n   # two\n"), ())

    def test_simpleDirectives(self) -> None:
        """
        Words separated by spaces, tabs and newlines; C{;} ends a directive, with or
        without space before it, and several may share a line.
        """
        self.assertEqual(
            self.parse("worker_processes 4;\ndaemon\toff ;a;b c\n d;"),
            (
                _simple("worker_processes", "4", line=1),
                _simple("daemon", "off", line=2),
                _simple("a", line=2),
                _simple("b", "c", "d", line=2),
            ),
        )

    def test_crlf(self) -> None:
        """
        Carriage returns are whitespace; lines are counted by line feeds.
        """
        self.assertEqual(
            self.parse("a 1;\r\nb 2;\r\n"),
            (_simple("a", "1", line=1), _simple("b", "2", line=2)),
        )

    def test_onlyNginxWhitespace(self) -> None:
        """
        Only space, tab, CR and LF separate words: a form feed is part of a word.
        """
        self.assertEqual(self.parse("a b\fc;"), (_simple("a", "b\fc"),))

    def test_blocks(self) -> None:
        """
        C{{} opens a block and C{}} closes it; blocks nest, may be empty, and the
        C{{} needs no space before it.
        """
        result = self.parse(
            "stream {\n"
            "    upstream backend{\n"
            "        server 127.0.0.1:8443;\n"
            "    }\n"
            "    server {}\n"
            "}\n"
            "events{}"
        )
        self.assertEqual(
            _shape(result),
            [
                (
                    "stream",
                    (),
                    1,
                    [
                        (
                            "upstream",
                            ("backend",),
                            2,
                            [("server", ("127.0.0.1:8443",), 3, None)],
                        ),
                        ("server", (), 5, []),
                    ],
                ),
                ("events", (), 7, []),
            ],
        )
        self.assertEqual(result[0].file, "relay.conf")
        self.assertEqual(result[0].block[0].block[0].file, "relay.conf")  # type: ignore[index]

    def test_closingBraceRightAfterSemicolon(self) -> None:
        """
        C{;} and C{}} need no space between them.
        """
        self.assertEqual(
            _shape(self.parse("a {b;c;}d;")),
            [
                ("a", (), 1, [("b", (), 1, None), ("c", (), 1, None)]),
                ("d", (), 1, None),
            ],
        )

    def test_closingBraceInsideWord(self) -> None:
        """
        As in nginx, a C{}} in the middle or at the end of a word is part of it.
        """
        self.assertEqual(self.parse("a b}c d};"), (_simple("a", "b}c", "d}"),))

    def test_deepNesting(self) -> None:
        """
        Deeply nested blocks do not exhaust Python's stack.
        """
        depth = 5000
        result = self.parse("a {" * depth + "}" * depth)
        for _ in range(depth - 1):
            self.assertEqual(len(result), 1)
            assert result[0].block is not None
            result = result[0].block
        self.assertEqual(result, (Directive("a", (), (), "relay.conf", 1),))

    def test_multiLineDirectiveLine(self) -> None:
        """
        A directive's line is the line of its name, however many lines it spans.
        """
        result = self.parse("\n\n  listen\n 443\n ssl\n;\nserver\n\n{\n}\n")
        self.assertEqual(
            _shape(result),
            [("listen", ("443", "ssl"), 3, None), ("server", (), 7, [])],
        )

    def test_missingSemicolonKeepsFirstLine(self) -> None:
        """
        A missing C{;} makes one directive of two lines, located at the first
        name's line, so the arity check names the directive that lacks the C{;}.
        """
        result = self.parse(
            "location /upstream {\n"
            "    proxy_ssl_certificate_key     /etc/nginx/client.key\n"
            "    proxy_ssl_protocols           TLSv1 TLSv1.1 TLSv1.2;\n"
            "}\n"
        )
        assert result[0].block is not None
        self.assertEqual(
            result[0].block,
            (
                _simple(
                    "proxy_ssl_certificate_key",
                    "/etc/nginx/client.key",
                    "proxy_ssl_protocols",
                    "TLSv1",
                    "TLSv1.1",
                    "TLSv1.2",
                    line=2,
                ),
            ),
        )

    def test_comments(self) -> None:
        """
        C{#} at the start of a word comments out the rest of the line, even in the
        middle of a directive; C{;}, C{{} and quotes inside a comment do nothing.
        """
        result = self.parse(
            '# header ; { } "\n'
            "a 1; # trailing ' comment\n"
            "b # inside\n"
            "  2 #;\n"
            ";\n"
            "c 3;# no space\n"
            "d 4;#at the end without newline"
        )
        self.assertEqual(
            _shape(result),
            [
                ("a", ("1",), 2, None),
                ("b", ("2",), 3, None),
                ("c", ("3",), 6, None),
                ("d", ("4",), 7, None),
            ],
        )

    def test_hashInsideWord(self) -> None:
        """
        A C{#} that does not start a word is part of the word.
        """
        self.assertEqual(
            self.parse("ssl_ciphers HIGH#x a#;"),
            (_simple("ssl_ciphers", "HIGH#x", "a#"),),
        )

    def test_quotedWords(self) -> None:
        """
        Double and single quotes make one word of text with spaces, newlines, C{;},
        C{{}, C{}} and C{#}, and of the empty string.
        """
        self.assertEqual(
            self.parse('a "x y;{}#" \'p q"\' "" \'\';'),
            (_simple("a", "x y;{}#", 'p q"', "", ""),),
        )

    def test_quotedName(self) -> None:
        """
        A directive's name may be quoted too.
        """
        self.assertEqual(self.parse('"a b" c;'), (_simple("a b", "c"),))

    def test_quoteFollowedBy(self) -> None:
        """
        A closing quote may be followed by whitespace, C{;} or C{{}.
        """
        result = self.parse('a "1"\t\'2\'\n"3";b \'4\'{c "5";}')
        self.assertEqual(
            _shape(result),
            [
                ("a", ("1", "2", "3"), 1, None),
                ("b", ("4",), 2, [("c", ("5",), 2, None)]),
            ],
        )

    def test_parenthesisAfterQuote(self) -> None:
        """
        nginx lets C{)} follow a closing quote (for C{if ($x = "y")}); it starts a
        new word.
        """
        self.assertEqual(
            self.parse('if ($a = "b") {}'),
            (Directive("if", ("($a", "=", "b", ")"), (), "relay.conf", 1),),
        )

    def test_quoteInsideWord(self) -> None:
        """
        A quote that does not start a word is an ordinary character.
        """
        self.assertEqual(self.parse("a b\"c d';"), (_simple("a", 'b"c', "d'"),))

    def test_quotedNewlineCountsLines(self) -> None:
        """
        Newlines inside quotes count towards later directives' lines.
        """
        result = self.parse('a "1\n2\n3";\nb;')
        self.assertEqual(result, (_simple("a", "1\n2\n3"), _simple("b", line=4)))

    def test_escapesInQuotes(self) -> None:
        """
        Inside quotes, C{\\"}, C{\\'}, C{\\\\}, C{\\t}, C{\\r} and C{\\n} are
        replaced; any other backslash stays with the character after it.
        """
        result = self.parse(
            r"""a "q\"d" 'q\'s' "b\\s" "t\tr\rn\n" "\x\$\;\{" 'x\"y';"""
        )
        self.assertEqual(
            result,
            (
                _simple(
                    "a",
                    'q"d',
                    "q's",
                    "b\\s",
                    "t\tr\rn\n",
                    "\\x\\$\\;\\{",
                    'x"y',
                ),
            ),
        )

    def test_escapesOutsideQuotes(self) -> None:
        """
        Escapes work in unquoted words too, and an escaped space, C{;} or quote does
        not end or start anything.
        """
        result = self.parse(r"""a b\ c d\;e \"f \\ g\n;""")
        self.assertEqual(result, (_simple("a", "b\\ c", "d\\;e", '"f', "\\", "g\n"),))

    def test_escapedNewlineInWord(self) -> None:
        """
        A backslash before a newline keeps the newline in the word, and the line is
        still counted.
        """
        self.assertEqual(
            self.parse("a b\\\nc;\nd;"),
            (_simple("a", "b\\\nc"), _simple("d", line=3)),
        )

    def test_variableBraces(self) -> None:
        """
        A C{{} right after C{$} is part of the word, not a block: C{${var}} works
        at the start of a word, in its middle and inside quotes.
        """
        result = self.parse(
            'log_format x "${remote_addr}" ${a}b c${d}e $ok;\nmap $x$y {}'
        )
        self.assertEqual(
            _shape(result),
            [
                (
                    "log_format",
                    ("x", "${remote_addr}", "${a}b", "c${d}e", "$ok"),
                    1,
                    None,
                ),
                ("map", ("$x$y",), 2, []),
            ],
        )

    def test_braceAfterVariableNameOpensBlock(self) -> None:
        """
        A C{{} after a variable's name (not right after C{$}) opens a block.
        """
        self.assertEqual(
            _shape(self.parse("a $b{c;}")),
            [("a", ("$b",), 1, [("c", (), 1, None)])],
        )

    def test_notUtf8(self) -> None:
        """
        Text decoded with C{surrogateescape} (as files are) parses.
        """
        text = b"a \xff\xfe;".decode("utf-8", "surrogateescape")
        self.assertEqual(self.parse(text), (_simple("a", "\udcff\udcfe"),))


class SyntaxErrorTests(SynchronousTestCase):
    """
    Syntax errors carry nginx's message, the file and the line nginx reports.
    """

    def assertSyntaxError(self, text: str, message: str, line: int) -> ConfigError:
        """
        Parsing C{text} as C{relay.conf} fails with C{message} at C{line}.
        """
        error: ConfigError = self.assertRaises(
            ConfigError, parseString, text, "relay.conf", self.mktemp()
        )
        self.assertEqual(
            (error.message, error.file, error.line), (message, "relay.conf", line)
        )
        self.assertEqual(str(error), f"{message} in relay.conf:{line}")
        return error

    def test_unexpectedClosingBraceAtTop(self) -> None:
        """
        A C{}} with no open block is C{unexpected "}"} on the brace's line.
        """
        self.assertSyntaxError("a;\n\n}", 'unexpected "}"', 3)
        self.assertSyntaxError("a {\n}\n}\nb;", 'unexpected "}"', 3)

    def test_closingBraceAfterArguments(self) -> None:
        """
        A C{}} ending a directive that lacks its C{;} is C{unexpected "}"}.
        """
        self.assertSyntaxError("server {\n  listen 443\n}\n", 'unexpected "}"', 3)

    def test_semicolonWithoutName(self) -> None:
        """
        A C{;} with no directive before it is C{unexpected ";"}.
        """
        self.assertSyntaxError(";", 'unexpected ";"', 1)
        self.assertSyntaxError("a;\n  ;", 'unexpected ";"', 2)
        self.assertSyntaxError("a {\n;}", 'unexpected ";"', 2)

    def test_braceWithoutName(self) -> None:
        """
        A C{{} with no directive before it is C{unexpected "{"}.
        """
        self.assertSyntaxError("{}", 'unexpected "{"', 1)
        self.assertSyntaxError("a;\n# x\n{\n}", 'unexpected "{"', 3)

    def test_endOfFileInDirective(self) -> None:
        """
        A directive cut off by the end of the file is C{unexpected end of file,
        expecting ";" or "}"} on the last line (after a final newline, the line
        after it, as nginx counts).
        """
        message = 'unexpected end of file, expecting ";" or "}"'
        self.assertSyntaxError("a", message, 1)
        self.assertSyntaxError("a b", message, 1)
        self.assertSyntaxError("a;\nb c\n", message, 3)
        self.assertSyntaxError('a "b"', message, 1)
        self.assertSyntaxError("a {\n b\n", message, 3)
        self.assertSyntaxError("a b # comment", message, 1)
        self.assertSyntaxError("a \\", message, 1)

    def test_endOfFileInBlock(self) -> None:
        """
        An unclosed block is C{unexpected end of file, expecting "}"} where the file
        ends.
        """
        message = 'unexpected end of file, expecting "}"'
        self.assertSyntaxError("a {", message, 1)
        self.assertSyntaxError("a {\n  b {\n  }\n", message, 4)
        self.assertSyntaxError("a {\n  b;\n  # }", message, 3)

    def test_seedMissingBrace(self) -> None:
        """
        The documentation example with a missing C{}} (seed 003) fails at the end
        of the file, as nginx does.
        """
        text = (
            "http {\n"
            "    server {\n"
            "        location /yourapp {\n"
            "            proxy_pass http://url_to_app.com;\n"
            "        }\n"
            "\n"
            "    server {\n"
            "        listen      443 ssl;\n"
            "    }\n"
            "}\n"
        )
        self.assertSyntaxError(text, 'unexpected end of file, expecting "}"', 11)

    def test_characterAfterQuote(self) -> None:
        """
        A closing quote followed by anything but whitespace, C{;}, C{{} (or C{)})
        is C{unexpected "x"} on that character's line.
        """
        self.assertSyntaxError('a "b"c;', 'unexpected "c"', 1)
        self.assertSyntaxError("a;\nb 'c''d';", 'unexpected "\'"', 2)
        self.assertSyntaxError('a "b"#c;', 'unexpected "#"', 1)
        self.assertSyntaxError('a {\n  b "c"}', 'unexpected "}"', 2)
        self.assertSyntaxError('a "multi\nline"x;', 'unexpected "x"', 2)

    def test_endOfFileInQuotes(self) -> None:
        """
        An unterminated quote is an unexpected end of file, reported at the line
        where the quoted word starts.
        """
        self.assertSyntaxError(
            'a;\nb "c;\nd;\ne;\n',
            'unexpected end of file, probably missing terminating """ character',
            2,
        )
        self.assertSyntaxError(
            "a {\n  b 'c\\'}\n}\n",
            'unexpected end of file, probably missing terminating "\'" character',
            2,
        )

    def test_errorInsideBlockNamesLine(self) -> None:
        """
        Errors deep in nested blocks carry their own line.
        """
        self.assertSyntaxError(
            "stream {\n  server {\n    listen 443;\n    ;\n  }\n}\n",
            'unexpected ";"',
            4,
        )


class IncludeTests(SynchronousTestCase):
    """
    C{include} is expanded by the parser, relative to the main file's directory.
    """

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.base, "conf.d"))

    def write(self, name: str, text: str | bytes) -> str:
        """
        Write C{text} to C{name} under the base directory; return its path.
        """
        path = os.path.join(self.base, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = text.encode("utf-8") if isinstance(text, str) else text
        with open(path, "wb") as f:
            f.write(data)
        return path

    def parse(self, text: str) -> tuple[Directive, ...]:
        """
        Parse C{text} as C{relay.conf} in the base directory.
        """
        return parseString(text, "relay.conf", self.base)

    def assertIncludeError(
        self, text: str, message: str, file: str, line: int
    ) -> ConfigError:
        """
        Parsing C{text} fails with C{message} at C{file}:C{line}.
        """
        error: ConfigError = self.assertRaises(ConfigError, self.parse, text)
        self.assertEqual((error.message, error.file, error.line), (message, file, line))
        return error

    def test_relative(self) -> None:
        """
        A relative name is resolved against the base directory; the included
        directives carry that file's name and their own lines, in place of the
        C{include}.
        """
        path = self.write("conf.d/a.conf", "\n\nb 2;\nc {\n  d;\n}\n")
        result = self.parse("a 1;\ninclude conf.d/a.conf;\ne 3;")
        self.assertEqual(
            result,
            (
                _simple("a", "1"),
                _simple("b", "2", file=path, line=3),
                Directive("c", (), (_simple("d", file=path, line=5),), path, 4),
                _simple("e", "3", line=3),
            ),
        )

    def test_absolute(self) -> None:
        """
        An absolute name is used as it is, even with another base directory.
        """
        path = self.write("elsewhere.conf", "x;")
        result = parseString(f'include "{path}";', "relay.conf", self.mktemp())
        self.assertEqual(result, (_simple("x", file=path),))

    def test_insideBlock(self) -> None:
        """
        An C{include} inside a block puts the included directives in that block.
        """
        path = self.write("servers.conf", "server {\n  listen 443;\n}\n")
        result = self.parse("stream {\n  include servers.conf;\n  x;\n}")
        self.assertEqual(
            _shape(result),
            [
                (
                    "stream",
                    (),
                    1,
                    [
                        ("server", (), 1, [("listen", ("443",), 2, None)]),
                        ("x", (), 3, None),
                    ],
                )
            ],
        )
        assert result[0].block is not None
        self.assertEqual(result[0].block[0].file, path)
        self.assertEqual(result[0].block[1].file, "relay.conf")

    def test_glob(self) -> None:
        """
        A pattern with C{*}, C{?} or C{[...]} includes every match in sorted order;
        hidden files are not matched by C{*}.
        """
        for name in [
            "20-b.conf",
            "10-a.conf",
            "30-c.conf",
            "ignored.txt",
            ".hidden.conf",
        ]:
            self.write(f"conf.d/{name}", f"n {name};")
        self.assertEqual(
            [d.args[0] for d in self.parse("include conf.d/*.conf;")],
            ["10-a.conf", "20-b.conf", "30-c.conf"],
        )
        self.assertEqual(
            [d.args[0] for d in self.parse("include conf.d/?0-[ab].conf;")],
            ["10-a.conf", "20-b.conf"],
        )
        result = self.parse("include conf.d/1*;")
        self.assertEqual(
            result,
            (
                _simple(
                    "n", "10-a.conf", file=os.path.join(self.base, "conf.d/10-a.conf")
                ),
            ),
        )

    def test_globNoMatch(self) -> None:
        """
        A pattern that matches nothing includes nothing, without error.
        """
        self.assertEqual(
            self.parse("a;\ninclude conf.d/*.conf;\ninclude nowhere/*;\nb;"),
            (_simple("a"), _simple("b", line=4)),
        )

    def test_globMatchesDirectory(self) -> None:
        """
        As in nginx, a pattern that matches a directory fails to read it.
        """
        os.makedirs(os.path.join(self.base, "conf.d", "sub"))
        sub = os.path.join(self.base, "conf.d", "sub")
        error = self.assertRaises(ConfigError, self.parse, "\ninclude conf.d/*;")
        self.assertTrue(error.message.startswith(f'open() "{sub}" failed ('))
        self.assertEqual((error.file, error.line), ("relay.conf", 2))

    def test_globCharactersInBaseDirectory(self) -> None:
        """
        Glob characters in the base directory's name are taken literally.
        """
        base = os.path.join(self.base, "we[ir]d*")
        os.makedirs(base)
        path = os.path.join(base, "a.conf")
        with open(path, "w") as f:
            f.write("a;")
        self.assertEqual(
            parseString("include *.conf;", "relay.conf", base),
            (_simple("a", file=path),),
        )

    def test_missingFile(self) -> None:
        """
        A name without glob characters must exist: C{open() "..." failed (2: No
        such file or directory)} at the C{include}.
        """
        path = os.path.join(self.base, "missing.conf")
        error = self.assertIncludeError(
            "a;\n\ninclude missing.conf;",
            f'open() "{path}" failed (2: No such file or directory)',
            "relay.conf",
            3,
        )
        self.assertEqual(
            str(error),
            f'open() "{path}" failed (2: No such file or directory) in relay.conf:3',
        )

    def test_nestedIncludesResolveAgainstBase(self) -> None:
        """
        A relative C{include} inside an included file is resolved against the main
        file's directory, not the including file's.
        """
        self.write("conf.d/outer.conf", "include conf.d/inner.conf;\n")
        inner = self.write("conf.d/inner.conf", "\ninner;")
        self.write("conf.d/conf.d/inner.conf", "wrong;")
        self.assertEqual(
            self.parse("include conf.d/outer.conf;"),
            (_simple("inner", file=inner, line=2),),
        )

    def test_missingFileInIncludedFile(self) -> None:
        """
        A missing file named in an included file is reported at that file's line.
        """
        outer = self.write("outer.conf", "a;\ninclude nothing.conf;")
        path = os.path.join(self.base, "nothing.conf")
        self.assertIncludeError(
            "include outer.conf;",
            f'open() "{path}" failed (2: No such file or directory)',
            outer,
            2,
        )

    def test_syntaxErrorInIncludedFile(self) -> None:
        """
        A syntax error in an included file names that file and its line.
        """
        path = self.write("bad.conf", "a;\n\nb c\n")
        self.assertIncludeError(
            "x;\ninclude bad.conf;",
            'unexpected end of file, expecting ";" or "}"',
            path,
            4,
        )

    def test_blocksDoNotSpanFiles(self) -> None:
        """
        As in nginx, each file's blocks are balanced within it: a block left open in
        an included file, or closed by one, is an error there.
        """
        opened = self.write("open.conf", "server {\n")
        self.assertIncludeError(
            "stream {\ninclude open.conf;\n}\n}",
            'unexpected end of file, expecting "}"',
            opened,
            2,
        )
        closing = self.write("close.conf", "a;\n}\n")
        self.assertIncludeError(
            "stream {\ninclude close.conf;\n",
            'unexpected "}"',
            closing,
            2,
        )

    def test_wrongArity(self) -> None:
        """
        C{include} takes exactly one argument.
        """
        message = 'invalid number of arguments in "include" directive'
        self.assertIncludeError("a;\ninclude;", message, "relay.conf", 2)
        self.assertIncludeError(
            "a {\n  include a.conf\n    b.conf;\n}", message, "relay.conf", 2
        )

    def test_includeBlock(self) -> None:
        """
        C{include} cannot have a block.
        """
        self.write("a.conf", "a;")
        self.assertIncludeError(
            "\ninclude a.conf {\n}\n",
            'directive "include" is not terminated by ";"',
            "relay.conf",
            2,
        )

    def test_quotedInclude(self) -> None:
        """
        The name may be quoted, for names with spaces; a quoted name is still a
        pattern.
        """
        path = self.write("with space.conf", "a;")
        self.assertEqual(
            self.parse('"include" "with space.conf";'), (_simple("a", file=path),)
        )
        self.assertEqual(
            self.parse("include 'with*.conf';"), (_simple("a", file=path),)
        )

    def test_recursion(self) -> None:
        """
        An include loop stops after L{MAX_INCLUDE_DEPTH} levels with an error at
        the C{include} that would go deeper.
        """
        path = self.write("loop.conf", "a;\ninclude loop.conf;\n")
        error = self.assertIncludeError(
            "include loop.conf;",
            f'cannot include "{path}": includes nested more than '
            f"{MAX_INCLUDE_DEPTH} deep, probably an include loop",
            path,
            2,
        )
        self.assertIn("include loop", str(error))

    def test_deepButFinite(self) -> None:
        """
        A chain of exactly L{MAX_INCLUDE_DEPTH} includes is allowed.
        """
        for level in range(1, MAX_INCLUDE_DEPTH):
            self.write(f"l{level}.conf", f"include l{level + 1}.conf;")
        last = self.write(f"l{MAX_INCLUDE_DEPTH}.conf", "bottom;")
        self.assertEqual(
            self.parse("include l1.conf;"), (_simple("bottom", file=last),)
        )
        self.write(f"l{MAX_INCLUDE_DEPTH}.conf", "include one-more.conf;")
        self.write("one-more.conf", "bottom;")
        self.assertRaises(ConfigError, self.parse, "include l1.conf;")

    def test_notUtf8(self) -> None:
        """
        Included files that are not UTF-8 are read without error; the odd bytes
        survive as surrogates, which C{os.fsencode} turns back into the bytes.
        """
        path = self.write("latin1.conf", b"ssl_certificate /etc/caf\xe9.pem;")
        result = self.parse("include latin1.conf;")
        self.assertEqual(
            result, (_simple("ssl_certificate", "/etc/caf\udce9.pem", file=path),)
        )
        self.assertEqual(os.fsencode(result[0].args[0]), b"/etc/caf\xe9.pem")


class ParseFileTests(SynchronousTestCase):
    """
    L{parseFile} reads the main file and resolves includes against its directory.
    """

    def test_parseFile(self) -> None:
        """
        The main file's directives carry its name as given; relative includes are
        resolved against its directory, not the working directory.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "conf.d"))
        main = os.path.join(base, "relay.conf")
        with open(main, "w") as f:
            f.write("a;\ninclude conf.d/*.conf;\n")
        included = os.path.join(base, "conf.d", "x.conf")
        with open(included, "w") as f:
            f.write("\nx 1;\n")
        self.assertEqual(
            parseFile(main),
            (_simple("a", file=main), _simple("x", "1", file=included, line=2)),
        )

    def test_relativeMainFile(self) -> None:
        """
        A relative main file name is kept as given in locations, and its includes
        are still found relative to its directory.
        """
        base = self.mktemp()
        os.makedirs(base)
        main = os.path.join(base, "relay.conf")
        with open(main, "w") as f:
            f.write("include other.conf;\nb;")
        with open(os.path.join(base, "other.conf"), "w") as f:
            f.write("o;")
        result = parseFile(main)
        self.assertEqual(
            result,
            (
                _simple("o", file=os.path.join(os.path.abspath(base), "other.conf")),
                _simple("b", file=main, line=2),
            ),
        )

    def test_missing(self) -> None:
        """
        A main file that cannot be opened is a L{ConfigError} naming it, with no
        location (as nginx reports it).
        """
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(ConfigError, parseFile, path)
        self.assertEqual(
            str(error), f'open() "{path}" failed (2: No such file or directory)'
        )
        self.assertIsNone(error.file)
        self.assertIsNone(error.line)

    def test_directory(self) -> None:
        """
        A main file that cannot be read (here, a directory) is a L{ConfigError}
        naming it.
        """
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        error = self.assertRaises(ConfigError, parseFile, path)
        self.assertEqual(str(error), f'open() "{path}" failed (21: Is a directory)')

    def test_syntaxError(self) -> None:
        """
        Syntax errors in the main file name it as given.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("a {\n")
        error = self.assertRaises(ConfigError, parseFile, path)
        self.assertEqual(
            str(error), f'unexpected end of file, expecting "}}" in {path}:2'
        )

    def test_notUtf8(self) -> None:
        """
        Bytes that are not UTF-8 do not stop parsing.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"# \xff\xfe comment\na \x80;\n")
        result = parseFile(path)
        self.assertEqual(result, (_simple("a", "\udc80", file=path, line=2),))


class SizeTests(SynchronousTestCase):
    """
    L{parseSize} reads nginx sizes.
    """

    def test_units(self) -> None:
        """
        No unit is bytes; C{k}, C{m} and C{g}, in either case, are powers of 1024.
        """
        for text, expected in [
            ("0", 0),
            ("1024", 1024),
            ("007", 7),
            ("8k", 8192),
            ("8K", 8192),
            ("20m", 20 * 1024 * 1024),
            ("1M", 1024 * 1024),
            ("2g", 2 * 1024**3),
            ("1G", 1024**3),
            ("0k", 0),
        ]:
            self.assertEqual(parseSize(text), expected, text)

    def test_invalid(self) -> None:
        """
        Anything but digits and one unit letter is C{invalid value "..."}.
        """
        for text in [
            "",
            "k",
            "m",
            "1.5m",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1kb",
            "1t",
            "1b",
            "1mk",
            "0x10",
            "\u0661",
            "1e3",
        ]:
            error = self.assertRaises(ValueError, parseSize, text)
            self.assertEqual(str(error), f'invalid value "{text}"')

    def test_overflow(self) -> None:
        """
        Sizes past C{2**63 - 1} bytes are invalid.
        """
        self.assertEqual(parseSize(str(2**63 - 1)), 2**63 - 1)
        self.assertRaises(ValueError, parseSize, str(2**63))
        self.assertEqual(parseSize("8589934591g"), 8589934591 * 1024**3)
        self.assertRaises(ValueError, parseSize, "8589934592g")


class TimeTests(SynchronousTestCase):
    """
    L{parseTime} reads nginx times.
    """

    def test_units(self) -> None:
        """
        C{ms}, C{s}, C{m}, C{h}, C{d} and C{w}; a bare number is seconds.
        """
        for text, expected in [
            ("0", 0.0),
            ("60", 60.0),
            ("30s", 30.0),
            ("500ms", 0.5),
            ("1ms", 0.001),
            ("5m", 300.0),
            ("4h", 14400.0),
            ("1d", 86400.0),
            ("2w", 14 * 86400.0),
        ]:
            self.assertEqual(parseTime(text), expected, text)

    def test_combinations(self) -> None:
        """
        Units from the largest to the smallest combine, with or without spaces;
        a trailing bare number is seconds.
        """
        for text, expected in [
            ("1h30m", 5400.0),
            ("1h 30m", 5400.0),
            ("1h  30m ", 5400.0),
            ("1d2h3m4s5ms", 86400 + 7200 + 180 + 4 + 0.005),
            ("1m 500ms", 60.5),
            ("1h30", 3630.0),
        ]:
            self.assertEqual(parseTime(text), expected, text)

    def test_seconds(self) -> None:
        """
        At seconds resolution (nginx's C{sec} slots) C{M} is 30 days and C{y} 365,
        and C{ms} is refused.
        """
        for text, expected in [
            ("300", 300.0),
            ("4h", 14400.0),
            ("1M", 30 * 86400.0),
            ("1y", 365 * 86400.0),
            ("1y 2M 1w", (365 + 60 + 7) * 86400.0),
            ("10s", 10.0),
        ]:
            self.assertEqual(parseTime(text, "s"), expected, text)
        error = self.assertRaises(ValueError, parseTime, "500ms", "s")
        self.assertEqual(str(error), 'invalid value "500ms"')

    def test_monthsAndYearsNeedSeconds(self) -> None:
        """
        As in nginx, millisecond-resolution times (the timeouts) refuse C{M} and
        C{y}.
        """
        for text in ["1M", "1y"]:
            error = self.assertRaises(ValueError, parseTime, text)
            self.assertEqual(str(error), f'invalid value "{text}"')

    def test_order(self) -> None:
        """
        Units must be written from the largest to the smallest, each once.
        """
        for text in ["30m1h", "1h1h", "1s1m", "1ms1s", "1ms1ms", "1 2 3"]:
            error = self.assertRaises(ValueError, parseTime, text)
            self.assertEqual(str(error), f'invalid value "{text}"')
        self.assertRaises(ValueError, parseTime, "1M1y", "s")

    def test_invalid(self) -> None:
        """
        Unknown units, signs, fractions and empty values are invalid.
        """
        for text in ["", " ", "s", "h", "1x", "-1s", "+1s", "1.5s", "1H", "1S", "1D"]:
            error = self.assertRaises(ValueError, parseTime, text)
            self.assertEqual(str(error), f'invalid value "{text}"')

    def test_limits(self) -> None:
        """
        Milliseconds stop at C{2**31 - 1} (about 24.8 days), seconds at C{2**31 - 1}
        (about 68 years).
        """
        self.assertEqual(parseTime("24d"), 24 * 86400.0)
        self.assertEqual(parseTime("2147483647ms"), 2147483.647)
        self.assertEqual(parseTime("2147483"), 2147483.0)
        for text in ["25d", "2147483648ms", "2147484", "4w"]:
            error = self.assertRaises(ValueError, parseTime, text)
            self.assertEqual(
                str(error),
                f'invalid value "{text}", it must not exceed 2147483647ms '
                "(about 24.8 days)",
            )
        self.assertEqual(parseTime("68y", "s"), 68 * 365 * 86400.0)
        error = self.assertRaises(ValueError, parseTime, "69y", "s")
        self.assertEqual(
            str(error),
            'invalid value "69y", it must not exceed 2147483647s (about 68 years)',
        )
        self.assertRaises(ValueError, parseTime, "2147483648", "s")


class FlagTests(SynchronousTestCase):
    """
    L{parseFlag} reads C{on} and C{off}.
    """

    def test_values(self) -> None:
        """
        C{on} and C{off} in any case.
        """
        for text in ["on", "ON", "On"]:
            self.assertIs(parseFlag(text), True)
        for text in ["off", "OFF", "oFf"]:
            self.assertIs(parseFlag(text), False)

    def test_invalid(self) -> None:
        """
        Anything else is C{invalid value "x", it must be "on" or "off"}.
        """
        for text in ["", "yes", "1", "true", " on", "on "]:
            error = self.assertRaises(ValueError, parseFlag, text)
            self.assertEqual(
                str(error), f'invalid value "{text}", it must be "on" or "off"'
            )


class IntTests(SynchronousTestCase):
    """
    L{parseInt} reads non-negative decimal numbers.
    """

    def test_values(self) -> None:
        """
        Digits, with leading zeros allowed.
        """
        self.assertEqual(parseInt("0"), 0)
        self.assertEqual(parseInt("42"), 42)
        self.assertEqual(parseInt("0010"), 10)
        self.assertEqual(parseInt(str(2**63 - 1)), 2**63 - 1)

    def test_invalid(self) -> None:
        """
        Signs, spaces, fractions, other digits and overflow are C{invalid number}.
        """
        for text in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1.0",
            "x",
            "1k",
            "\u0661",
            str(2**63),
        ]:
            error = self.assertRaises(ValueError, parseInt, text)
            self.assertEqual(str(error), f'invalid number "{text}"')

    def test_bounds(self) -> None:
        """
        C{minimum} and C{maximum} bound the value, inclusively.
        """
        self.assertEqual(parseInt("1", minimum=1), 1)
        error = self.assertRaises(ValueError, parseInt, "0", minimum=1)
        self.assertEqual(
            str(error), 'invalid value "0", it must be equal or more than 1'
        )
        self.assertEqual(parseInt("10", minimum=1, maximum=10), 10)
        error = self.assertRaises(ValueError, parseInt, "11", minimum=1, maximum=10)
        self.assertEqual(str(error), 'invalid value "11", it must be between 1 and 10')
        self.assertRaises(ValueError, parseInt, "0", 1, 10)
