# mypy: allow-untyped-calls
"""
Tests for L{tlsrelay._health}.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import trustme
from OpenSSL import SSL
from twisted.application.service import IService
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests._iosim import FakeTransport, IOPump
from tests._iosim import connect as iosimConnect
from tests.test_pool import accept, makePool, refuse, targets, tcp
from tlsrelay._config._model import (
    Address,
    HealthCheck,
    UpstreamServer,
    UpstreamTLS,
)
from tlsrelay._health import HealthChecker, JitterSource, _Probe
from tlsrelay._pool import UpstreamPool
from tlsrelay._tls import ServerContextFactory
from tlsrelay._upstreamtls import tlsForServer
from tlsrelay.testing import writeCertificates

THREE = (
    UpstreamServer(tcp(9001)),
    UpstreamServer(tcp(9002)),
    UpstreamServer(tcp(9003)),
)


class Scripted:
    """
    A random source that answers from a script.
    """

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def checking(
    *servers: UpstreamServer,
    check: HealthCheck | None = None,
    source: JitterSource | None = None,
    tlsFor: Any = None,
) -> tuple[HealthChecker, UpstreamPool, MemoryReactorClock]:
    """
    A checker (not started) of a pool of C{servers} on a memory reactor.
    """
    pool, reactor = makePool(*(servers or THREE), tlsFor=tlsFor)
    checker = HealthChecker(
        pool, check or HealthCheck(), reactor, source or random.Random(0)
    )
    return checker, pool, reactor


def pending(reactor: MemoryReactorClock) -> list[int]:
    """
    The ports of the connection attempts neither stopped nor answered.
    """
    return [
        client[1]
        for client, connector in zip(reactor.tcpClients, reactor.connectors)
        if not connector.stoppedConnecting and not getattr(connector, "answered", 0)
    ]


def answer(reactor: MemoryReactorClock, index: int = -1) -> StringTransport:
    reactor.connectors[index].answered = True  # type: ignore[attr-defined]
    return accept(reactor, index)


def fail(reactor: MemoryReactorClock, index: int = -1) -> None:
    reactor.connectors[index].answered = True  # type: ignore[attr-defined]
    refuse(reactor, index)


def healthy(pool: UpstreamPool) -> list[bool]:
    return [peer.healthy for peer in pool.peers.peers()]


def changes(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The state-change events of L{UpstreamPool.markHealthy}.
    """
    return [
        e
        for e in events
        if "healthy again" in e["log_format"] or "unhealthy" in e["log_format"]
    ]


class InterfaceTests(SynchronousTestCase):
    def test_service(self) -> None:
        """
        The checker is an L{IService}; its probe protocol an L{IProtocol}.
        """
        checker, _, _ = checking()
        self.assertTrue(verifyObject(IService, checker))
        self.assertTrue(verifyObject(IProtocol, _Probe(set())))


class TimingTests(SynchronousTestCase):
    def test_firstRoundAtStart(self) -> None:
        """
        Nothing happens until the service starts; then every peer is checked at
        once (no jitter), with C{interval} as the connect timeout, and the next
        round is due C{interval} later.
        """
        checker, _, reactor = checking(check=HealthCheck(interval=2.5))
        self.assertEqual(reactor.tcpClients, [])
        checker.startService()
        self.assertEqual(targets(reactor), [9001, 9002, 9003])
        self.assertEqual([client[3] for client in reactor.tcpClients], [2.5] * 3)
        for index in range(3):
            answer(reactor, index)
        self.assertEqual([c.getTime() for c in reactor.getDelayedCalls()], [2.5])
        reactor.advance(2.5)
        self.assertEqual(targets(reactor), [9001, 9002, 9003] * 2)

    def test_jitter(self) -> None:
        """
        Each check of a round is delayed by its own draw in C{[0, jitter)} from
        the injected random source; rounds begin every C{interval}.
        """
        check = HealthCheck(interval=5.0, jitter=2.0)
        checker, _, reactor = checking(check=check, source=random.Random(42))
        expected = random.Random(42)
        checker.startService()
        delays = [expected.random() * 2.0 for _ in range(3)]
        self.assertEqual(
            sorted(c.getTime() for c in reactor.getDelayedCalls()),
            sorted([*delays, 5.0]),
        )
        self.assertEqual(reactor.tcpClients, [])
        order = [port for _, port in sorted(zip(delays, [9001, 9002, 9003]))]
        reactor.advance(2.0)
        self.assertEqual(targets(reactor), order)
        for index in range(3):
            answer(reactor, index)
        reactor.advance(3.0)
        later = [5.0 + expected.random() * 2.0 for _ in range(3)]
        self.assertEqual(
            sorted(c.getTime() for c in reactor.getDelayedCalls()),
            sorted([*later, 10.0]),
        )

    def test_timeout(self) -> None:
        """
        A check that does not connect within C{interval} is stopped and fails
        ("timed out"); the next round checks the peer again, never while the
        previous check still runs.
        """
        checker, pool, reactor = checking(
            UpstreamServer(tcp(9001)), check=HealthCheck(interval=3.0)
        )
        checker.startService()
        reactor.advance(2.9)
        self.assertEqual(pending(reactor), [9001])
        with capturedLogs() as events:
            reactor.advance(0.1)
        self.assertTrue(reactor.connectors[0].stoppedConnecting)
        self.assertEqual(pending(reactor), [9001])
        self.assertEqual(len(reactor.tcpClients), 2)
        self.assertEqual(healthy(pool), [False])
        self.assertIn("health check failed: timed out", changes(events)[0]["reason"])

    def test_noOverlap(self) -> None:
        """
        A round that begins while a peer's check (delayed by jitter) still runs
        does not start another: the peer is checked again, after a new delay,
        once that check ends.
        """
        check = HealthCheck(interval=5.0, jitter=4.0)
        checker, _, reactor = checking(
            UpstreamServer(tcp(9001)), check=check, source=Scripted([0.75, 0.5, 0.25])
        )
        checker.startService()
        reactor.advance(3.0)
        self.assertEqual(targets(reactor), [9001])
        reactor.advance(2.0)
        # The round at 5 found the check of 3 under way.
        self.assertEqual(targets(reactor), [9001])
        reactor.advance(2.0)
        fail(reactor)
        # It ended at 7: the next one is 2 (0.5 * 4) later, not at once.
        self.assertEqual(targets(reactor), [9001])
        reactor.advance(1.9)
        self.assertEqual(targets(reactor), [9001])
        reactor.advance(0.1)
        self.assertEqual(targets(reactor), [9001, 9001])
        answer(reactor)
        # The round at 10 finds nothing under way: 1 (0.25 * 4) later.
        reactor.advance(2.0)
        self.assertEqual(targets(reactor), [9001, 9001])
        reactor.advance(1.0)
        self.assertEqual(targets(reactor), [9001, 9001, 9001])

    def test_timeoutAtRound(self) -> None:
        """
        Without jitter, a check that times out ends as the next round begins:
        one new check follows, whichever of the two the clock runs first.
        """
        checker, _, reactor = checking(
            UpstreamServer(tcp(9001)), check=HealthCheck(interval=1.0)
        )
        checker.startService()
        for _ in range(3):
            reactor.advance(1.0)
            self.assertEqual(pending(reactor), [9001])
        self.assertEqual(len(reactor.tcpClients), 4)


class ThresholdTests(SynchronousTestCase):
    def test_fails(self) -> None:
        """
        C{fails} failed checks in a row mark the peer unhealthy, with what the
        last check found; a passed check in between starts the count again.
        """
        checker, pool, reactor = checking(
            UpstreamServer(tcp(9001)),
            UpstreamServer(tcp(9002)),
            check=HealthCheck(interval=1.0, fails=2),
        )
        checker.startService()
        fail(reactor, 0)
        answer(reactor, 1)
        reactor.advance(1.0)
        answer(reactor, 2)
        answer(reactor, 3)
        reactor.advance(1.0)
        fail(reactor, 4)
        answer(reactor, 5)
        self.assertEqual(healthy(pool), [True, True])
        reactor.advance(1.0)
        with capturedLogs() as events:
            fail(reactor, 6)
            answer(reactor, 7)
        self.assertEqual(healthy(pool), [False, True])
        [event] = changes(events)
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["peer"], "127.0.0.1:9001")
        self.assertEqual(event["upstream"], "backend")
        self.assertTrue(
            event["reason"].startswith(
                "2 health checks failed: Connection was refused"
            ),
            event["reason"],
        )

    def test_passes(self) -> None:
        """
        An unhealthy peer is marked healthy again after C{passes} passed checks
        in a row; a failure in between starts the count again.
        """
        checker, pool, reactor = checking(
            UpstreamServer(tcp(9001)), check=HealthCheck(interval=1.0, passes=2)
        )
        checker.startService()
        fail(reactor)
        self.assertEqual(healthy(pool), [False])
        for step in [answer, fail, answer]:
            reactor.advance(1.0)
            step(reactor)
        self.assertEqual(healthy(pool), [False])
        reactor.advance(1.0)
        with capturedLogs() as events:
            answer(reactor)
        self.assertEqual(healthy(pool), [True])
        [event] = changes(events)
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["reason"], "2 health checks passed")

    def test_oneEach(self) -> None:
        """
        With the defaults (C{fails=1 passes=1}) one check changes the state
        either way, and the log says which check did.
        """
        checker, pool, reactor = checking(
            UpstreamServer(tcp(9001)), check=HealthCheck(interval=1.0)
        )
        with capturedLogs() as events:
            checker.startService()
            fail(reactor)
            reactor.advance(1.0)
            answer(reactor)
        self.assertEqual(healthy(pool), [True])
        reasons = [event["reason"] for event in changes(events)]
        self.assertEqual(len(reasons), 2)
        self.assertTrue(reasons[0].startswith("health check failed: "), reasons)
        self.assertEqual(reasons[1], "health check passed")

    def test_startsHealthy(self) -> None:
        """
        A peer is healthy before its first check (nginx without C{mandatory}),
        and a passing check of a healthy peer logs no change.
        """
        checker, pool, reactor = checking()
        self.assertEqual(healthy(pool), [True] * 3)
        with capturedLogs() as events:
            checker.startService()
            for index in range(3):
                answer(reactor, index)
        self.assertEqual(changes(events), [])
        self.assertEqual(healthy(pool), [True] * 3)

    def test_nothingCounted(self) -> None:
        """
        Checks count nothing for passive health or for connections: an unhealthy
        peer is skipped by the balancer, not disabled for C{fail_timeout}.
        """
        checker, pool, reactor = checking(check=HealthCheck(interval=1.0))
        checker.startService()
        fail(reactor, 0)
        answer(reactor, 1)
        self.assertEqual(
            [(peer.fails, peer.conns) for peer in pool.peers.peers()], [(0, 0)] * 3
        )
        self.assertEqual(healthy(pool), [False, True, True])


class ConnectionTests(SynchronousTestCase):
    def test_closes(self) -> None:
        """
        A connected check writes nothing and closes the connection at once.
        """
        checker, _, reactor = checking(UpstreamServer(tcp(9001)))
        checker.startService()
        transport = answer(reactor)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)

    def test_port(self) -> None:
        """
        C{port=} is connected to instead of each peer's port, on the peer's
        host.
        """
        checker, _, reactor = checking(
            UpstreamServer(tcp(9001)),
            UpstreamServer(tcp(9002, "::1")),
            check=HealthCheck(port=8080),
        )
        checker.startService()
        self.assertEqual(
            [client[:2] for client in reactor.tcpClients],
            [("127.0.0.1", 8080), ("::1", 8080)],
        )

    def test_unix(self) -> None:
        """
        A UNIX peer is checked on its socket; C{port=} does not apply to it.
        """
        checker, _, reactor = checking(
            UpstreamServer(Address("unix", path="/run/up.sock")),
            check=HealthCheck(interval=4.0, port=8080),
        )
        checker.startService()
        self.assertEqual(
            [client[::2] for client in reactor.unixClients], [("/run/up.sock", 4.0)]
        )

    def test_downSkipped(self) -> None:
        """
        Peers marked C{down} are never checked; backup peers are.
        """
        checker, pool, reactor = checking(
            UpstreamServer(tcp(9001), down=True),
            UpstreamServer(tcp(9002)),
            UpstreamServer(tcp(9003), backup=True),
            check=HealthCheck(interval=1.0),
        )
        checker.startService()
        fail(reactor, 0)
        fail(reactor, 1)
        reactor.advance(1.0)
        self.assertEqual(targets(reactor), [9002, 9003] * 2)
        self.assertEqual(healthy(pool), [True, False, False])


class StopTests(SynchronousTestCase):
    def test_stop(self) -> None:
        """
        Stopping cancels the next round, the jitter delays and the checks under
        way (which count for nothing), and aborts connections still closing.
        """
        check = HealthCheck(interval=5.0, jitter=1.0)
        checker, pool, reactor = checking(check=check, source=Scripted([0.1, 0.2, 0.9]))
        checker.startService()
        reactor.advance(0.5)
        closing = answer(reactor, 0)
        self.assertEqual(pending(reactor), [9002])
        with capturedLogs() as events:
            checker.stopService()
        self.assertFalse(checker.running)
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertTrue(reactor.connectors[1].stoppedConnecting)
        self.assertTrue(closing.disconnected)
        self.assertEqual(changes(events), [])
        self.assertEqual(healthy(pool), [True] * 3)
        reactor.advance(10.0)
        self.assertEqual(targets(reactor), [9001, 9002])

    def test_restart(self) -> None:
        """
        A stopped checker can start again: a new first round at once.
        """
        checker, _, reactor = checking(UpstreamServer(tcp(9001)))
        checker.startService()
        checker.stopService()
        checker.startService()
        self.assertEqual(targets(reactor), [9001, 9001])
        self.assertEqual(pending(reactor), [9001])


class PeersChangeTests(SynchronousTestCase):
    def test_resolved(self) -> None:
        """
        Each round checks the pool's peers as they are then: once names are
        resolved, the resolved peers are checked and the name no longer is.
        """
        checker, pool, reactor = checking(
            UpstreamServer(tcp(9001)),
            UpstreamServer(tcp(80, "backend.example")),
            check=HealthCheck(interval=1.0),
        )
        checker.startService()
        # Before resolution the name is connected through the reactor's
        # resolver, which answers 127.0.0.1 for every name.
        self.assertEqual(targets(reactor), [9001, 80])
        # MemoryReactorClock's resolver answers at once.
        self.successResultOf(pool.resolveAll())
        resolved = pool.peers.primary[1]
        self.assertEqual(resolved.name, "127.0.0.1:80")
        answer(reactor, 0)
        reactor.advance(1.0)
        # The check of the name, still under way, was cancelled.
        self.assertTrue(reactor.connectors[1].stoppedConnecting)
        self.assertEqual(targets(reactor), [9001, 80, 9001, 80])
        fail(reactor, 3)
        self.assertFalse(resolved.healthy)


class Server(Protocol):
    """
    An upstream application: greets, and records how its connection ended.
    """

    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class TLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.files = writeCertificates(self.dir)

    def tlsChecker(
        self, **check: Any
    ) -> tuple[HealthChecker, UpstreamPool, MemoryReactorClock]:
        tls = tlsForServer(
            UpstreamTLS(
                enabled=True, verify=True, trustedCertificate=self.files.caFile
            ),
            "localhost",
            None,
        )
        check.setdefault("interval", 2.0)
        return checking(
            UpstreamServer(tcp(9001)), check=HealthCheck(**check), tlsFor=tls
        )

    def serve(
        self, reactor: MemoryReactorClock, ca: trustme.CA | None = None
    ) -> tuple[IOPump, Server]:
        """
        Answer the last attempt with an in-memory TLS upstream whose certificate
        C{ca} issued.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        (ca or self.files.ca).issue_cert("localhost").configure_cert(context)
        server = Server()
        reactor.connectors[-1].answered = True  # type: ignore[attr-defined]
        host, port, clientFactory, _, _ = reactor.tcpClients[-1]
        client = clientFactory.buildProtocol(IPv4Address("TCP", host, port))
        upstream = TLSMemoryBIOFactory(
            ServerContextFactory(context), False, Factory.forProtocol(lambda: server)
        ).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        pump = iosimConnect(
            upstream,
            FakeTransport(upstream, isServer=True),
            client,
            FakeTransport(client, isServer=False),
            greet=False,
            clock=reactor,
        )
        return pump, server

    def test_handshake(self) -> None:
        """
        With upstream TLS, TCP connect is not enough: the check passes when the
        handshake completes, then closes with a close_notify the upstream sees
        as a clean close.
        """
        checker, pool, reactor = self.tlsChecker(passes=1)
        pool.markHealthy(pool.peers.primary[0], False)
        checker.startService()
        pump, server = self.serve(reactor)
        self.assertEqual(healthy(pool), [False])
        pump.flush()
        self.assertEqual(healthy(pool), [True])
        self.assertEqual(len(server.lost), 1)
        self.assertTrue(server.lost[0].check(ConnectionDone))

    def test_untrusted(self) -> None:
        """
        An upstream whose certificate does not verify fails the check, with the
        verification's reason.
        """
        checker, pool, reactor = self.tlsChecker()
        checker.startService()
        with capturedLogs() as events:
            self.serve(reactor, trustme.CA())[0].flush()
        self.assertEqual(healthy(pool), [False])
        reason = changes(events)[0]["reason"]
        self.assertIn("upstream SSL certificate verify error", reason)

    def test_handshakeTimeout(self) -> None:
        """
        An upstream that accepts TCP but never answers the ClientHello times out
        at C{interval}, and the connection is aborted.
        """
        checker, pool, reactor = self.tlsChecker()
        checker.startService()
        transport = answer(reactor)
        self.assertEqual(transport.value()[:1], b"\x16")
        reactor.advance(1.9)
        self.assertEqual(healthy(pool), [True])
        with capturedLogs() as events:
            reactor.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(healthy(pool), [False])
        self.assertIn("timed out", changes(events)[0]["reason"])
