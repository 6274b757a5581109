"""
A L{twisted.logger.Logger} that drops events below a process-wide level before
they are built, so per-connection C{debug} events cost one comparison unless
C{error_log ... debug} asks for them.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import LogLevel

_ORDER = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}

_threshold = [_ORDER[LogLevel.info]]


def setLevel(level: LogLevel) -> None:
    """
    Emit events at C{level} and above from every tlsrelay module.
    """
    _threshold[0] = _ORDER[level]


def enabled(level: LogLevel) -> bool:
    """
    Whether events at C{level} are emitted now.
    """
    return _ORDER[level] >= _threshold[0]


class Logger(_TwistedLogger):
    """
    Twisted's logger, gated by L{setLevel}.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if _ORDER.get(level, 4) < _threshold[0]:
            return
        super().emit(level, format, **kwargs)
