"""
What the relay changes in Twisted's epoll reactor, and only there: the same
behaviour for fewer Python calls per connection (docs/performance.md).

L{tuneReactor} installs both changes: the dispatch without a legacy log
context per event (L{tlsrelay._log.dispatchWithoutLogContext}) and
L{leanRegistration}.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from select import EPOLLIN, EPOLLOUT
from types import MethodType
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.posixbase import PosixReactorBase
from twisted.python.failure import Failure

from tlsrelay._log import Logger, dispatchWithoutLogContext

log = Logger()

# What _disconnectSelectable tells a transport whose peer ended the stream
# (one failure for every one, as Twisted's).
_DONE = Failure(ConnectionDone())


def tuneReactor(reactor: Any) -> bool:
    """
    Install L{dispatchWithoutLogContext}, L{leanRegistration} and
    L{leanMainLoop} on C{reactor} if it is Twisted's epoll reactor.

    @return: whether they were installed.
    """
    return (
        dispatchWithoutLogContext(reactor)
        and leanRegistration(reactor)
        and leanMainLoop(reactor)
    )


def leanMainLoop(reactor: Any) -> bool:
    """
    Give C{reactor}, if it is Twisted's epoll reactor, a main loop that runs
    its timed and threaded calls only when one may be due: Twisted's asks for
    them twice per turn (C{runUntilCurrent}, then C{timeout}) inside a new
    failure handler each turn, which costs more Python calls than the turn's
    I/O often does.  What runs, and in which order, is the same.

    @return: whether the loop was replaced.
    """
    from twisted.internet.epollreactor import EPollReactor

    if not isinstance(reactor, EPollReactor):
        return False
    reactor._callsSoon = []  # type: ignore[attr-defined]
    reactor.mainLoop = MethodType(_mainLoop, reactor)  # type: ignore[method-assign]
    reactor.iterate = MethodType(_iterate, reactor)  # type: ignore[method-assign]
    return True


def _iterate(self: Any, delay: float = 0.0) -> None:
    # ReactorBase.iterate, with the calls made soon.
    soon = self._callsSoon
    calls = _takeSoon(soon) if soon else None
    self.runUntilCurrent()
    if calls:
        _runSoon(calls)
    self.doIteration(0 if soon else delay)


def callSoon(reactor: Any, f: Callable[..., object], *args: object) -> None:
    """
    Call C{f(*args)} on C{reactor}'s next turn, as C{reactor.callLater(0, f,
    *args)} does: on a reactor with L{leanMainLoop}, from a list the loop
    empties each turn instead of through a timed call (whose creation and
    two passes through the reactor's heap cost a dozen Python calls); an
    exception is logged and the other calls still run.
    """
    soon = getattr(reactor, "_callsSoon", None)
    if soon is None:
        reactor.callLater(0, f, *args)
    else:
        soon.append((f, args))


_Calls = list[tuple[Callable[..., object], tuple[object, ...]]]


def _takeSoon(soon: _Calls) -> _Calls:
    calls = soon[:]
    del soon[:]
    return calls


def _runSoon(calls: _Calls) -> None:
    for f, args in calls:
        try:
            f(*args)
        except Exception:
            log.failure("while handling a call made soon: {call!r}", call=f)


# The longest epoll_wait(2) timeout, as Twisted's ReactorBase.timeout caps it.
_LONGEST = 2147483


def _mainLoop(self: Any) -> None:
    from twisted.internet.base import _log, _topHandler

    soon = self._callsSoon
    while self._started:
        with _topHandler:
            while self._started:
                # The timed calls due, then what was called soon during the
                # last turn (as callLater(0) calls would run: in the turn
                # after the one that made them, after older timed calls).
                calls = _takeSoon(soon) if soon else None
                pending = self._pendingTimedCalls
                if (
                    self.threadCallQueue
                    or self._newTimedCalls
                    or self._justStopped
                    or (pending and pending[0].time <= self.seconds())
                ):
                    self.runUntilCurrent()
                    if self._newTimedCalls:
                        self._insertNewDelayedCalls()
                    pending = self._pendingTimedCalls
                if calls:
                    _runSoon(calls)
                    if self._newTimedCalls:
                        self._insertNewDelayedCalls()
                        pending = self._pendingTimedCalls
                timeout = None
                if soon:
                    timeout = 0
                elif pending:
                    timeout = max(0, min(_LONGEST, pending[0].time - self.seconds()))
                self.doIteration(self.running and timeout)
    _log.info("Main loop terminated.")


def leanRegistration(reactor: Any) -> bool:
    """
    Give C{reactor}, if it is Twisted's epoll reactor, C{addReader},
    C{addWriter}, C{removeReader} and C{removeWriter} that do what its own do
    in one Python call instead of two or three: a transport starts and stops
    reading or writing several times per connection.

    @return: whether the methods were replaced.
    """
    from twisted.internet.epollreactor import EPollReactor

    if not isinstance(reactor, EPollReactor):
        return False
    reactor.addReader = MethodType(_adder(True), reactor)  # type: ignore[method-assign]
    reactor.addWriter = MethodType(_adder(False), reactor)  # type: ignore[method-assign]
    reactor.removeReader = MethodType(_remover(True), reactor)  # type: ignore[method-assign]
    reactor.removeWriter = MethodType(_remover(False), reactor)  # type: ignore[method-assign]
    reactor.forget = MethodType(_forget, reactor)  # type: ignore[attr-defined]
    reactor._disconnectSelectable = MethodType(_disconnectSelectable, reactor)  # type: ignore[method-assign]
    return True


def _disconnectSelectable(
    self: Any, selectable: Any, why: Any, isRead: bool, faildict: Any = None
) -> None:
    # PosixReactorBase._disconnectSelectable, except for a read that found the
    # end of the stream on a descriptor that stops reading itself when told
    # (tlsrelay's socket transports): it is told at once, and, if it closes,
    # its descriptor is forgotten with the close rather than with an
    # epoll_ctl(2) first.
    if (
        isRead
        and type(why) is ConnectionDone
        and getattr(selectable, "readEndStopsReading", False)
    ):
        selectable.readConnectionLost(_DONE)
        return
    PosixReactorBase._disconnectSelectable(self, selectable, why, isRead)


def forget(reactor: Any, xer: Any, closing: bool = False) -> None:
    """
    C{reactor.removeReader(xer)} and C{reactor.removeWriter(xer)}, in one
    Python call on a reactor with L{leanRegistration}: a transport stops both
    when it closes.

    @param closing: C{xer}'s descriptor is closed right after, and nothing
        else holds what it refers to (a socket of this process, made with
        C{CLOEXEC}): epoll forgets it with the close, without an
        C{epoll_ctl(2)} of its own (as nginx closes its connections).
    """
    lean = getattr(reactor, "forget", None)
    if lean is None:
        reactor.removeReader(xer)
        reactor.removeWriter(xer)
    else:
        lean(xer, closing)


def _forget(self: Any, xer: Any, closing: bool = False) -> None:
    # removeReader and removeWriter of _remover, together.
    polling = self._continuousPolling
    fd = xer.fileno()
    if fd == -1 or (
        (polling._readers or polling._writers)
        and (xer in polling._readers or xer in polling._writers)
    ):
        self.removeReader(xer)
        self.removeWriter(xer)
        return
    reads, writes = self._reads, self._writes
    if fd in reads or fd in writes:
        reads.discard(fd)
        writes.discard(fd)
        del self._selectables[fd]
        if not closing:
            self._poller.unregister(fd)


def _adder(read: bool) -> Callable[[Any, Any], None]:
    # EPollReactor.addReader (or addWriter) with its _add inlined.
    event, antievent = (EPOLLIN, EPOLLOUT) if read else (EPOLLOUT, EPOLLIN)

    def add(self: Any, xer: Any) -> None:
        fd = xer.fileno()
        primary, other = (
            (self._reads, self._writes) if read else (self._writes, self._reads)
        )
        if fd in primary:
            return
        try:
            if fd in other:
                self._poller.modify(fd, event | antievent)
            else:
                self._poller.register(fd, event)
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            # epoll(7) refuses some descriptors (regular files): polled
            # continuously instead, as Twisted does.
            polling = self._continuousPolling
            (polling.addReader if read else polling.addWriter)(xer)
            return
        primary.add(fd)
        self._selectables[fd] = xer

    return add


def _remover(read: bool) -> Callable[[Any, Any], None]:
    # EPollReactor.removeReader (or removeWriter) with the continuous polling
    # check and _remove inlined.
    antievent = EPOLLOUT if read else EPOLLIN

    def remove(self: Any, xer: Any) -> None:
        polling = self._continuousPolling
        polled = polling._readers if read else polling._writers
        if polled and xer in polled:
            (polling.removeReader if read else polling.removeWriter)(xer)
            return
        fd = xer.fileno()
        primary, other = (
            (self._reads, self._writes) if read else (self._writes, self._reads)
        )
        if fd == -1:
            # The descriptor went away: Twisted's own search by object.
            from twisted.internet.epollreactor import EPollReactor

            twisted = EPollReactor.removeReader if read else EPollReactor.removeWriter
            twisted(self, xer)  # type: ignore[no-untyped-call]
            return
        if fd not in primary:
            return
        if fd in other:
            self._poller.modify(fd, antievent)
        else:
            del self._selectables[fd]
            self._poller.unregister(fd)
        primary.remove(fd)

    return remove
