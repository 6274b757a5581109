"""
A L{twisted.logger.Logger} that drops events below a process-wide level before
they are built, so per-connection C{debug} events cost one comparison unless
C{error_log ... debug} asks for them; and L{dispatchWithoutLogContext}, which
spares the reactor the legacy log context it builds for every I/O event.
"""

from __future__ import annotations

import errno
import sys
from types import MethodType
from typing import Any

from twisted.internet.error import ConnectionFdescWentAway
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger as _TwistedLogger
from twisted.logger import LogLevel
from twisted.python import log as _legacyLog

_ORDER = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}

_threshold = [_ORDER[LogLevel.info]]


class _Levels:
    """
    What hot paths test before building a debug event: an attribute, not a
    call.

    @ivar debug: C{debug} events are emitted now.
    """

    debug = False


levels = _Levels()


def setLevel(level: LogLevel) -> None:
    """
    Emit events at C{level} and above from every tlsrelay module.
    """
    _threshold[0] = _ORDER[level]
    levels.debug = _ORDER[level] <= _ORDER[LogLevel.debug]


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


def dispatchWithoutLogContext(reactor: Any) -> bool:
    """
    Make C{reactor}, if it is Twisted's epoll reactor, dispatch its I/O events
    without a legacy log context per event.

    Twisted's reactor runs every read or write event inside
    C{twisted.python.log.callWithLogger}: it asks the transport for its log
    prefix and copies a context dictionary, about ten Python calls per event,
    so that a legacy C{log.msg} or C{log.err} during the event carries the
    connection as its C{system}.  tlsrelay logs through L{Logger}, which does
    not use that context, so the dispatch here skips it and keeps the rest:
    the same handling of each event as C{_doReadOrWrite}, and an exception is
    logged (with the transport's log prefix as C{system}, as before) and
    disconnects that transport only.

    @return: whether the reactor's dispatch was replaced.
    """
    from twisted.internet.epollreactor import EPollReactor

    if not isinstance(reactor, EPollReactor):
        return False
    reactor.doIteration = MethodType(_doPoll, reactor)  # type: ignore[method-assign]
    return True


def _doPoll(self: Any, timeout: float | None) -> None:
    # EPollReactor.doPoll, with _PollLikeMixin._doReadOrWrite inlined, and
    # log.callWithLogger only where something is logged.
    if timeout is None:
        timeout = -1
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as e:
        if e.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    reads = self._reads
    disconnected = self._POLL_DISCONNECTED
    readable = self._POLL_IN
    writable = self._POLL_OUT
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            why: Any = None
            inRead = False
            if event & disconnected and not event & readable:
                if fd in reads:
                    inRead = True
                    why = CONNECTION_DONE
                else:
                    why = CONNECTION_LOST
            else:
                try:
                    if selectable.fileno() == -1:
                        why = _NO_FILEDESC
                    else:
                        if event & readable:
                            why = selectable.doRead()
                            inRead = True
                        if not why and event & writable:
                            why = selectable.doWrite()
                            inRead = False
                except BaseException:
                    why = sys.exc_info()[1]
                    _legacyLog.callWithLogger(selectable, _legacyLog.err)
            if why:
                self._disconnectSelectable(selectable, why, inRead)
        except KeyboardInterrupt:
            raise
        except BaseException:
            _legacyLog.callWithLogger(selectable, _legacyLog.err)


_NO_FILEDESC = ConnectionFdescWentAway("File descriptor lost")
