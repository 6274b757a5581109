"""
Tests for L{tlsrelay._log.dispatchWithoutLogContext}.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactor
from twisted.python import log as legacyLog
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests._realreactor import RealReactor, listeningSocket
from tlsrelay._log import dispatchWithoutLogContext


class Echo(Protocol):
    """
    Echoes; raises on C{b"boom"}; keeps what ended the connection.
    """

    lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        if data == b"boom":
            raise ValueError("boom")
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class DispatchTests(SynchronousTestCase):
    """
    The epoll reactor's dispatch without a legacy log context per event
    handles events as Twisted's does.
    """

    def setUp(self) -> None:
        self.real = RealReactor(self)
        self.assertTrue(dispatchWithoutLogContext(self.real.reactor))
        self.built: list[Echo] = []

        def build() -> Echo:
            protocol = Echo()
            self.built.append(protocol)
            return protocol

        listener = listeningSocket()
        self.port = self.real.reactor.adoptStreamPort(
            listener.fileno(), socket.AF_INET, Factory.forProtocol(build)
        )
        self.addCleanup(self.real.stopListening, self.port)
        self.client = socket.create_connection(listener.getsockname(), timeout=5)
        self.addCleanup(self.client.close)
        listener.close()
        self.real.spin(lambda: self.built)

    def test_otherReactors(self) -> None:
        """
        Other reactors are left alone.
        """
        self.assertFalse(dispatchWithoutLogContext(MemoryReactor()))

    def test_events(self) -> None:
        """
        Reads, writes and the peer's close reach the protocol.
        """
        self.client.sendall(b"ping")
        data = b""
        while len(data) < 4:
            self.real.reactor.iterate(0.01)
            self.client.setblocking(False)
            try:
                data += self.client.recv(10)
            except BlockingIOError:
                pass
        self.assertEqual(data, b"ping")
        self.client.close()
        [protocol] = self.built
        self.real.spin(lambda: protocol.lost is not None)
        assert protocol.lost is not None
        self.assertTrue(protocol.lost.check(ConnectionDone))

    def test_error(self) -> None:
        """
        An exception from the protocol is logged, with the connection's log
        prefix as its system, and disconnects that connection only.
        """
        [protocol] = self.built
        transport: Any = protocol.transport
        events: list[dict[str, Any]] = []
        legacyLog.addObserver(events.append)
        self.addCleanup(legacyLog.removeObserver, events.append)
        self.client.sendall(b"boom")
        self.real.spin(lambda: protocol.lost is not None)
        [failure] = self.flushLoggedErrors(ValueError)
        [event] = [e for e in events if e.get("isError")]
        self.assertIs(event["failure"].value, failure.value)
        self.assertEqual(event["system"], transport.logPrefix())
        self.assertFalse(self.port.disconnected)
