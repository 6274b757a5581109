"""
Configuration errors that name the file and line, as C{nginx -t} does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from tlsrelay._config._model import Where


class ConfigError(Exception):
    """
    A configuration problem at a known place.

    C{str(error)} reads like nginx: C{unknown directive "ssl_foo" in relay.conf:12}.
    """

    def __init__(self, message: str, file: str | None = None, line: int | None = None):
        super().__init__(message, file, line)
        self.message = message
        self.file = file
        self.line = line

    @classmethod
    def at(cls, message: str, where: Where | None) -> Self:
        """
        An error about the setting written at C{where}, or about no place in
        particular when C{where} is L{None}.
        """
        if where is None:
            return cls(message)
        return cls(message, where.file, where.line)

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        if self.line is None:
            return f"{self.message} in {self.file}"
        return f"{self.message} in {self.file}:{self.line}"
