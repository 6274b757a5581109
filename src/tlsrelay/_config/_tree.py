"""
The parsed configuration tree: directives with their arguments, optional blocks and
the place they were written.
"""

from __future__ import annotations

from attrs import frozen

from tlsrelay._config._errors import ConfigError


@frozen
class Directive:
    """
    One directive: C{name arg ...;} or C{name arg ... { block }}.

    @ivar args: the arguments, unquoted and unescaped.
    @ivar block: the directives inside C{{ }}, or L{None} for a simple directive.
    @ivar file: the file the directive was read from (as given, or resolved for
        includes).
    @ivar line: the 1-based line of the directive's name.
    """

    name: str
    args: tuple[str, ...]
    block: tuple[Directive, ...] | None
    file: str
    line: int

    def error(self, message: str) -> ConfigError:
        """
        A L{ConfigError} located at this directive.
        """
        return ConfigError(message, self.file, self.line)
