"""
Tests for L{tlsrelay._reactor}: Twisted's epoll reactor with leaner reader and
writer registration behaves as it did.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from tests._realreactor import RealReactor
from tlsrelay._reactor import (
    callSoon,
    forget,
    leanMainLoop,
    leanRegistration,
    tuneReactor,
)


class Descriptor:
    """
    The least a reactor needs of a file descriptor.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reads = 0
        self.writes = 0

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.reads += 1

    def doWrite(self) -> None:
        self.writes += 1

    def logPrefix(self) -> str:
        return "Descriptor"

    def connectionLost(self, reason: Any) -> None:
        pass


class LeanRegistrationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.real = RealReactor(self)
        self.reactor: Any = self.real.reactor
        self.assertTrue(tuneReactor(self.reactor))
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.descriptor = Descriptor(self.ours.fileno())

    def test_otherReactors(self) -> None:
        """
        Reactors other than the epoll reactor are left alone.
        """
        reactor = MemoryReactor()
        self.assertFalse(leanRegistration(reactor))
        self.assertFalse(tuneReactor(reactor))
        self.assertNotIn("addReader", vars(reactor))

    def test_readAndWrite(self) -> None:
        """
        A descriptor is registered for reading, writing or both, once however
        often it is added, gets the events it asked for, and is forgotten
        once it is removed for both.
        """
        reactor, descriptor = self.reactor, self.descriptor
        reactor.addReader(descriptor)
        reactor.addReader(descriptor)
        self.assertEqual(reactor.getReaders().count(descriptor), 1)
        self.assertIn(descriptor, reactor.getReaders())
        self.theirs.sendall(b"x")
        reactor.doIteration(0.5)
        self.assertEqual((descriptor.reads, descriptor.writes), (1, 0))
        reactor.addWriter(descriptor)
        self.assertIn(descriptor, reactor.getWriters())
        reactor.doIteration(0.5)
        self.assertEqual((descriptor.reads, descriptor.writes), (2, 1))
        reactor.removeReader(descriptor)
        reactor.removeReader(descriptor)
        self.assertNotIn(descriptor, reactor.getReaders())
        reactor.doIteration(0.5)
        self.assertEqual((descriptor.reads, descriptor.writes), (2, 2))
        reactor.addReader(descriptor)
        reactor.removeWriter(descriptor)
        self.assertNotIn(descriptor, reactor.getWriters())
        self.assertIn(descriptor, reactor.getReaders())
        reactor.removeReader(descriptor)
        self.assertNotIn(descriptor.fd, reactor._selectables)
        # Unregistered from epoll too: registering again works.
        reactor.addWriter(descriptor)
        reactor.doIteration(0.5)
        self.assertEqual(descriptor.writes, 3)
        reactor.removeWriter(descriptor)
        self.assertNotIn(descriptor.fd, reactor._selectables)

    def test_regularFile(self) -> None:
        """
        A descriptor epoll refuses (a regular file) is polled continuously, as
        Twisted does, and removed from there.
        """
        handle, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        self.addCleanup(os.close, handle)
        reactor, descriptor = self.reactor, Descriptor(handle)
        reactor.addReader(descriptor)
        reactor.addWriter(descriptor)
        polling = reactor._continuousPolling
        self.assertTrue(polling.isReading(descriptor))
        self.assertTrue(polling.isWriting(descriptor))
        self.assertNotIn(handle, reactor._selectables)
        reactor.removeReader(descriptor)
        reactor.removeWriter(descriptor)
        self.assertFalse(polling.isReading(descriptor))
        self.assertFalse(polling.isWriting(descriptor))

    def test_forget(self) -> None:
        """
        C{forget} removes a descriptor for reading and writing at once
        (whichever it was registered for, or none), on the tuned reactor as on
        any other; on the tuned one with a single call, also for one that is
        polled continuously or whose descriptor is gone.
        """
        handle, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        self.addCleanup(os.close, handle)
        other = RealReactor(self).reactor
        for reactor, tuned in ((self.reactor, True), (other, False)):
            self.assertEqual(hasattr(reactor, "forget"), tuned)
            for reading, writing in ((1, 1), (1, 0), (0, 1), (0, 0)):
                descriptor = Descriptor(self.ours.fileno())
                if reading:
                    reactor.addReader(descriptor)
                if writing:
                    reactor.addWriter(descriptor)
                forget(reactor, descriptor)
                self.assertNotIn(descriptor, reactor.getReaders())
                self.assertNotIn(descriptor, reactor.getWriters())
                self.assertNotIn(descriptor.fd, reactor._selectables)
                # Unregistered from epoll too: registering again works.
                reactor.addWriter(descriptor)
                reactor.doIteration(0.5)
                self.assertEqual(descriptor.writes, 1)
                forget(reactor, descriptor)
            polled = Descriptor(handle)
            reactor.addReader(polled)
            reactor.addWriter(polled)
            forget(reactor, polled)
            self.assertFalse(reactor._continuousPolling.isReading(polled))
            self.assertFalse(reactor._continuousPolling.isWriting(polled))
            gone = Descriptor(self.ours.fileno())
            reactor.addReader(gone)
            reactor.addWriter(gone)
            gone.fd = -1
            forget(reactor, gone)
            self.assertEqual(reactor.getReaders(), [reactor.waker])
            self.assertEqual(reactor.getWriters(), [])

    def test_forgetClosing(self) -> None:
        """
        C{forget(..., closing=True)} forgets a descriptor about to be closed
        without telling epoll, which drops it with the close: a new socket
        given the same descriptor is registered and served as any other.
        """
        reactor = self.reactor
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        closing = Descriptor(ours.fileno())
        reactor.addReader(closing)
        reactor.addWriter(closing)
        forget(reactor, closing, True)
        self.assertNotIn(closing.fd, reactor._selectables)
        ours.close()
        reused, peer = socket.socketpair()
        self.addCleanup(reused.close)
        self.addCleanup(peer.close)
        fresh = Descriptor(reused.fileno())
        reactor.addReader(fresh)
        reactor.doIteration(0.1)
        self.assertEqual((closing.reads, closing.writes, fresh.reads), (0, 0, 0))
        peer.sendall(b"y")
        reactor.doIteration(0.5)
        self.assertEqual((closing.reads, fresh.reads), (0, 1))
        forget(reactor, fresh)

    def test_readEnd(self) -> None:
        """
        A read that found the end of the stream is told at once to a
        descriptor that stops reading itself (C{readEndStopsReading}), while
        it is still registered; anything else is disconnected as Twisted does
        (reader removed first, then C{readConnectionLost} for a half-closeable
        descriptor or C{connectionLost}).
        """
        reactor = self.reactor
        told: list[tuple[str, bool, Any]] = []

        class Lean(Descriptor):
            readEndStopsReading = True

            def readConnectionLost(self, reason: Any) -> None:
                told.append(("read", self in reactor.getReaders(), reason.value))
                forget(reactor, self)

            def connectionLost(self, reason: Any) -> None:
                told.append(("lost", self in reactor.getReaders(), reason.value))
                forget(reactor, self)

        lean = Lean(self.ours.fileno())
        for why, isRead, expected in (
            (ConnectionDone(), True, ("read", True, ConnectionDone)),
            (ConnectionDone(), False, ("lost", False, ConnectionDone)),
            (ConnectionLost(), True, ("lost", False, ConnectionLost)),
        ):
            reactor.addReader(lean)
            reactor._disconnectSelectable(lean, why, isRead)
            what, registered, value = told.pop()
            self.assertEqual((what, registered, type(value)), expected)
            self.assertNotIn(lean, reactor.getReaders())
        plain = Descriptor(self.ours.fileno())
        reactor.addReader(plain)
        reactor._disconnectSelectable(plain, ConnectionDone(), True)
        self.assertNotIn(plain, reactor.getReaders())

    def test_descriptorGone(self) -> None:
        """
        A descriptor whose C{fileno} is already -1 is found by object and
        removed.
        """
        reactor, descriptor = self.reactor, self.descriptor
        reactor.addReader(descriptor)
        fd = descriptor.fd
        descriptor.fd = -1
        reactor.removeReader(descriptor)
        self.assertNotIn(fd, reactor._selectables)
        self.assertNotIn(descriptor, reactor.getReaders())


class LeanMainLoopTests(SynchronousTestCase):
    """
    The main loop that asks for timed calls only when one may be due runs
    timed calls, calls from threads and I/O as Twisted's does, survives a
    failing call, and stops.
    """

    def scenario(self, tune: bool) -> list[str]:
        """
        Run a reactor through timed calls (one failing, one cancelled, one
        scheduled by another), a read, a call from a thread and a stop, and
        say what happened in which order.
        """
        real = RealReactor(self)
        reactor: Any = real.reactor
        if tune:
            self.assertTrue(tuneReactor(reactor))
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        happened: list[str] = []

        class Reader(Descriptor):
            def doRead(self) -> None:
                happened.append("read " + ours.recv(10).decode())
                reactor.removeReader(self)

        def fail() -> None:
            raise ZeroDivisionError("timed call failed")

        def later() -> None:
            happened.append("later")
            theirs.sendall(b"data")
            reactor.callLater(0, lambda: happened.append("nested"))
            callSoon(reactor, happened.append, "soon")

        def threaded() -> None:
            thread = threading.Thread(
                target=reactor.callFromThread, args=(happened.append, "thread")
            )
            thread.start()
            thread.join()

        reactor.addReader(Reader(ours.fileno()))
        reactor.callLater(0.02, later)
        reactor.callLater(0.01, fail)
        reactor.callLater(0, happened.append, "first")
        cancelled = reactor.callLater(0.005, happened.append, "cancelled")
        cancelled.cancel()
        reactor.callLater(0.03, threaded)
        reactor.callLater(0.04, callSoon, reactor, fail)
        reactor.callLater(0.05, callSoon, reactor, happened.append, "after failure")
        reactor.callLater(0.2, reactor.stop)
        reactor.addSystemEventTrigger(
            "during", "shutdown", lambda: happened.append("shutdown")
        )
        reactor.run(installSignalHandlers=False)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        return happened

    def test_run(self) -> None:
        """
        The same things happen in the same order as with Twisted's loop.
        """
        lean = self.scenario(True)
        self.assertEqual(
            sorted(lean),
            sorted(
                [
                    "first",
                    "later",
                    "nested",
                    "soon",
                    "read data",
                    "thread",
                    "after failure",
                    "shutdown",
                ]
            ),
        )
        self.assertEqual(lean, self.scenario(False))

    def test_otherReactors(self) -> None:
        """
        Reactors other than the epoll reactor keep their main loop.
        """
        reactor = MemoryReactor()
        self.assertFalse(leanMainLoop(reactor))


class CallSoonTests(SynchronousTestCase):
    """
    L{callSoon} on a reactor without the lean main loop is C{callLater(0)}.
    """

    def test_otherReactors(self) -> None:
        clock = Clock()
        called: list[int] = []
        callSoon(clock, called.append, 1)
        self.assertEqual(called, [])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual(called, [1])

    def test_iterate(self) -> None:
        """
        C{iterate} on a tuned reactor runs what was called soon.
        """
        real = RealReactor(self)
        self.assertTrue(tuneReactor(real.reactor))
        called: list[int] = []
        callSoon(real.reactor, called.append, 1)
        real.reactor.iterate(0)
        self.assertEqual(called, [1])
