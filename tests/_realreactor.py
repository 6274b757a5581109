"""
A private epoll reactor for the few unit tests of code that only runs on a
real POSIX reactor (socket transports, the reactor's dispatch): loopback
sockets only, stepped by hand with a time limit, never run.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.trial.unittest import SynchronousTestCase


class RealReactor:
    """
    An L{EPollReactor} of one test, cleaned up with it.
    """

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.reactor = EPollReactor()
        testCase.addCleanup(self.close)

    def spin(self, until: Callable[[], object], timeout: float = 5.0) -> None:
        """
        Step the reactor until C{until()} is true, for C{timeout} seconds at
        most.
        """
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("the reactor did not get there in time")
            self.reactor.iterate(0.01)

    def stopListening(self, port: Any) -> None:
        """
        Stop C{port} and let the reactor close its socket.
        """
        stopped = port.stopListening()
        self.spin(lambda: stopped is None or stopped.called)

    def close(self) -> None:
        for selectable in self.reactor.removeAll():
            close = getattr(selectable, "connectionLost", None)
            if close is not None:
                try:
                    selectable.socket.close()  # type: ignore[union-attr]
                except AttributeError:
                    pass
        waker = self.reactor.waker
        if waker is not None:
            self.reactor.removeReader(waker)
            waker.connectionLost(None)  # type: ignore[arg-type]
        self.reactor._poller.close()


def listeningSocket(backlog: int = 50) -> socket.socket:
    """
    A non-blocking TCP socket listening on a free loopback port.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
