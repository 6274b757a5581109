# mypy: allow-untyped-calls
"""
Tests for L{tlsrelay._pool}.
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any

import trustme
from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.error import (
    TimeoutError as ConnectTimeoutError,
)
from twisted.internet.interfaces import (
    IHandshakeListener,
    IHostnameResolver,
    IProtocol,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests._helpers import FakeResolver
from tests._iosim import FakeTransport, IOPump
from tests._iosim import connect as iosimConnect
from tests._realreactor import RealReactor, listeningSocket
from tlsrelay._config._model import (
    Address,
    Balancer,
    Proxy,
    UpstreamGroup,
    UpstreamServer,
    UpstreamTLS,
    Where,
)
from tlsrelay._pool import (
    HostNotFound,
    NoUpstreamAvailable,
    UpstreamConnection,
    UpstreamPool,
    _Addresses,
    _ConnectedConnector,
    _Handshaking,
    _UpstreamClient,
    groupForAddress,
)
from tlsrelay._tls import ServerContextFactory
from tlsrelay._upstreamtls import tlsForServer
from tlsrelay.testing import writeCertificates


def tcp(port: int, host: str = "127.0.0.1") -> Address:
    return Address("tcp", host, port)


def makePool(
    *servers: UpstreamServer,
    balancer: Balancer | None = None,
    tlsFor: Any = None,
) -> tuple[UpstreamPool, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    group = UpstreamGroup("backend", servers, balancer or Balancer())
    return UpstreamPool(group, reactor, random.Random(3), tlsFor), reactor


def threeServers(**kw: Any) -> tuple[UpstreamPool, MemoryReactorClock]:
    return makePool(
        UpstreamServer(tcp(9001)),
        UpstreamServer(tcp(9002)),
        UpstreamServer(tcp(9003)),
        **kw,
    )


def unanswering(testCase: SynchronousTestCase) -> tuple[str, int]:
    """
    A loopback address where connecting hangs: a listener whose accept queue
    is full (later SYNs are dropped).
    """
    full = listeningSocket(backlog=0)
    testCase.addCleanup(full.close)
    address: tuple[str, int] = full.getsockname()
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        testCase.addCleanup(filler.close)
    return address


def factory() -> Factory:
    return Factory.forProtocol(Protocol)


def accept(reactor: MemoryReactorClock, index: int = -1) -> StringTransport:
    """
    Let the C{index}th connection attempt succeed.
    """
    host, port, clientFactory, _, _ = reactor.tcpClients[index]
    protocol = clientFactory.buildProtocol(IPv4Address("TCP", host, port))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport


def refuse(reactor: MemoryReactorClock, index: int = -1) -> None:
    """
    Let the C{index}th connection attempt fail.
    """
    clientFactory = reactor.tcpClients[index][2]
    clientFactory.clientConnectionFailed(
        reactor.connectors[index], Failure(ConnectionRefusedError())
    )


def targets(reactor: MemoryReactorClock) -> list[int]:
    return [client[1] for client in reactor.tcpClients]


def connected(d: Deferred[UpstreamConnection]) -> UpstreamConnection:
    result: list[UpstreamConnection] = []
    d.addCallback(result.append)
    assert result, "not connected"
    return result[0]


class AddressesTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """
        The resolution receiver provides L{IResolutionReceiver}.
        """
        self.assertTrue(verifyObject(IResolutionReceiver, _Addresses()))


class ConnectTests(SynchronousTestCase):
    def test_connect(self) -> None:
        """
        The pool connects to a peer picked by the balancer, within
        C{proxy_connect_timeout}, and gives the connected protocol.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy(connectTimeout=7.0))
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 9001))
        self.assertEqual(reactor.tcpClients[0][3], 7.0)
        self.assertNoResult(d)
        reactor.advance(0.25)
        transport = accept(reactor)
        connection = connected(d)
        self.assertIsInstance(connection.protocol, Protocol)
        self.assertIs(connection.protocol.transport, transport)  # type: ignore[attr-defined]
        self.assertEqual(connection.peer, "127.0.0.1:9001")
        self.assertEqual(connection.addresses, ["127.0.0.1:9001"])
        self.assertEqual(connection.connectTime, 0.25)
        self.assertEqual(connection.connectTimes, [0.25])
        self.assertIs(connection.state, pool.peers.primary[0])
        self.assertEqual(pool.peers.primary[0].conns, 1)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_roundRobinAcrossConnections(self) -> None:
        """
        Successive connections follow the balancer.
        """
        pool, reactor = threeServers()
        for _ in range(4):
            pool.connect(factory(), b"", Proxy())
            accept(reactor)
        self.assertEqual(targets(reactor), [9001, 9002, 9003, 9001])

    def test_nextUpstream(self) -> None:
        """
        A failed connection is logged and counted against its peer, and the next
        peer is tried; C{addresses} lists both, as C{$upstream_addr} does.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy())
        with capturedLogs() as events:
            refuse(reactor)
        self.assertEqual(targets(reactor), [9001, 9002])
        reactor.advance(1)
        accept(reactor)
        connection = connected(d)
        self.assertEqual(connection.addresses, ["127.0.0.1:9001", "127.0.0.1:9002"])
        self.assertEqual(connection.upstreamAddr, "127.0.0.1:9001, 127.0.0.1:9002")
        self.assertEqual(connection.peer, "127.0.0.1:9002")
        self.assertEqual(connection.connectTimes, [None, 1.0])
        first = pool.peers.primary[0]
        self.assertEqual((first.fails, first.conns), (1, 0))
        failed = [e for e in events if e.get("peer") == "127.0.0.1:9001"]
        self.assertEqual(failed[0]["log_level"].name, "warn")
        self.assertEqual(failed[0]["upstream"], "backend")
        self.assertIn("refused", failed[0]["reason"])
        self.assertIn("temporarily disabled", failed[1]["log_format"])

    def test_allFail(self) -> None:
        """
        When every peer failed, the result fails with L{NoUpstreamAvailable}
        naming what was tried.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy())
        for _ in range(3):
            refuse(reactor)
        self.assertEqual(targets(reactor), [9001, 9002, 9003])
        failure = self.failureResultOf(d, NoUpstreamAvailable)
        error = failure.value
        assert isinstance(error, NoUpstreamAvailable)
        self.assertEqual(
            error.addresses, ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
        )
        self.assertEqual(error.peer, "127.0.0.1:9001, 127.0.0.1:9002, 127.0.0.1:9003")
        self.assertEqual(error.connectTimes, [None, None, None])
        self.assertTrue(str(error).startswith('upstream "backend" failed: tried '))
        self.assertIn("127.0.0.1:9003 (Connection was refused", str(error))
        self.assertEqual([peer.conns for peer in pool.peers.primary], [0, 0, 0])

    def test_nextUpstreamTries(self) -> None:
        """
        C{proxy_next_upstream_tries} bounds the tries.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy(nextUpstreamTries=2))
        refuse(reactor)
        refuse(reactor)
        self.assertEqual(targets(reactor), [9001, 9002])
        error = self.failureResultOf(d, NoUpstreamAvailable).value
        assert isinstance(error, NoUpstreamAvailable)
        self.assertEqual(error.addresses, ["127.0.0.1:9001", "127.0.0.1:9002"])

    def test_nextUpstreamOff(self) -> None:
        """
        With C{proxy_next_upstream off}, one failure ends the attempt.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy(nextUpstream=False))
        refuse(reactor)
        self.assertEqual(targets(reactor), [9001])
        self.failureResultOf(d, NoUpstreamAvailable)

    def test_nextUpstreamTimeout(self) -> None:
        """
        C{proxy_next_upstream_timeout} bounds the time from the first try.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy(nextUpstreamTimeout=5.0))
        reactor.advance(2)
        refuse(reactor)
        self.assertEqual(targets(reactor), [9001, 9002])
        reactor.advance(3)
        refuse(reactor)
        self.assertEqual(targets(reactor), [9001, 9002])
        self.failureResultOf(d, NoUpstreamAvailable)

    def test_connectTimeout(self) -> None:
        """
        A try that does not connect within C{proxy_connect_timeout} is stopped,
        counted as a failure, and the next peer is tried.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy(connectTimeout=3.0))
        reactor.advance(2.9)
        self.assertEqual(targets(reactor), [9001])
        reactor.advance(0.1)
        self.assertTrue(reactor.connectors[0].stoppedConnecting)
        self.assertEqual(targets(reactor), [9001, 9002])
        self.assertEqual(pool.peers.primary[0].fails, 1)
        reactor.advance(3.0)
        reactor.advance(3.0)
        error = self.failureResultOf(d, NoUpstreamAvailable).value
        self.assertIn("127.0.0.1:9001 (upstream timed out)", str(error))

    def test_cancel(self) -> None:
        """
        Cancelling the result stops the pending try, counts no failure and tries
        no other peer.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(reactor.connectors[0].stoppedConnecting)
        self.assertEqual(targets(reactor), [9001])
        self.assertEqual(
            [(peer.conns, peer.fails) for peer in pool.peers.primary], [(0, 0)] * 3
        )
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_cancelAfterFailure(self) -> None:
        """
        Cancelling during the second try keeps the first failure only.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy())
        refuse(reactor)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(targets(reactor), [9001, 9002])
        self.assertEqual(
            [(peer.conns, peer.fails) for peer in pool.peers.primary],
            [(0, 1), (0, 0), (0, 0)],
        )

    def test_noLiveUpstreams(self) -> None:
        """
        With no usable peer, the result fails at once; C{$upstream_addr} gets
        the group's name, as in nginx.
        """
        pool, reactor = makePool(
            UpstreamServer(tcp(9001), down=True), UpstreamServer(tcp(9002), down=True)
        )
        with capturedLogs() as events:
            d = pool.connect(factory(), b"", Proxy())
        error = self.failureResultOf(d, NoUpstreamAvailable).value
        assert isinstance(error, NoUpstreamAvailable)
        self.assertEqual(error.addresses, ["backend"])
        self.assertEqual(error.connectTimes, [None])
        self.assertEqual(str(error), 'no live upstreams in "backend"')
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(events[0]["upstream"], "backend")

    def test_unix(self) -> None:
        """
        UNIX servers are connected with C{connectUNIX}.
        """
        pool, reactor = makePool(UpstreamServer(Address("unix", path="/run/up.sock")))
        d = pool.connect(factory(), b"", Proxy(connectTimeout=4.0))
        path, clientFactory, timeout, _ = reactor.unixClients[0]
        self.assertEqual((path, timeout), ("/run/up.sock", 4.0))
        protocol = clientFactory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(StringTransport())
        self.assertEqual(connected(d).peer, "unix:/run/up.sock")

    def test_ipv6(self) -> None:
        """
        IPv6 literals are connected as such and named in brackets.
        """
        pool, reactor = makePool(UpstreamServer(tcp(9001, "::1")))
        d = pool.connect(factory(), b"", Proxy())
        host, port, clientFactory, _, _ = reactor.tcpClients[0]
        self.assertEqual((host, port), ("::1", 9001))
        protocol = clientFactory.buildProtocol(IPv6Address("TCP", host, port))
        assert protocol is not None
        protocol.makeConnection(StringTransport())
        self.assertEqual(connected(d).peer, "[::1]:9001")

    def test_hashKey(self) -> None:
        """
        The hash key picks the peer.
        """
        pool, reactor = threeServers(balancer=Balancer("hash", key="$remote_addr"))
        for _ in range(3):
            pool.connect(factory(), b"10.0.0.7", Proxy())
            accept(reactor)
        self.assertEqual(len(set(targets(reactor))), 1)


class ReuseTests(SynchronousTestCase):
    """
    What connecting to a peer needs is made once per peer, not per attempt.
    """

    def test_oncePerPeer(self) -> None:
        """
        The TLS connection creator (C{tlsFor}) and the endpoint of a peer are
        made at its first attempt and reused; a health check's other port gets
        its own endpoint.
        """
        asked: list[str] = []

        def tlsFor(peer: Any) -> None:
            asked.append(peer.name)

        pool, reactor = threeServers(tlsFor=tlsFor)
        for _ in range(6):
            d = pool.connect(factory(), b"", Proxy())
            accept(reactor)
            connected(d).release()
        self.assertEqual(targets(reactor), [9001, 9002, 9003] * 2)
        self.assertEqual(asked, ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"])
        peer = pool.peers.primary[0]
        self.assertIs(pool._endpoint(peer, 60.0), pool._endpoint(peer, 60.0))
        self.assertIsNot(pool._endpoint(peer, 60.0), pool._endpoint(peer, 60.0, 8080))
        pool.connectPeer(peer, factory(), 60.0, port=8080)
        self.assertEqual(targets(reactor)[-1], 8080)

    def test_forgottenWhenResolved(self) -> None:
        """
        A name's peer, replaced by its addresses once resolved, is forgotten; its
        addresses get their own.
        """
        asked: list[str] = []

        def tlsFor(peer: Any) -> None:
            asked.append(peer.name)

        pool, reactor = makePool(
            UpstreamServer(tcp(80, "backend.example")), tlsFor=tlsFor
        )
        d = pool.connect(factory(), b"", Proxy())
        accept(reactor)
        connected(d).release()
        resolver = FakeResolver(
            {"backend.example": [IPv4Address("TCP", "10.0.0.1", 80)]}
        )
        reactor.installNameResolver(resolver)
        resolved = pool.resolveAll()
        resolver.finish()
        self.successResultOf(resolved)
        d = pool.connect(factory(), b"", Proxy())
        self.assertEqual(reactor.tcpClients[-1][:2], ("10.0.0.1", 80))
        self.assertEqual(asked, ["backend.example:80", "10.0.0.1:80"])
        self.assertEqual(set(pool._creators), set(pool.peers.peers()))
        self.assertEqual({key[0] for key in pool._endpoints}, set(pool.peers.peers()))


class ConnectPeerTests(SynchronousTestCase):
    def test_connectPeer(self) -> None:
        """
        One attempt at a given peer, at another port if asked, counting nothing.
        """
        pool, reactor = threeServers()
        peer = pool.peers.primary[1]
        d = pool.connectPeer(peer, factory(), 2.0, port=8080)
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 8080))
        self.assertEqual(reactor.tcpClients[0][3], 2.0)
        transport = accept(reactor)
        protocol, reused = self.successResultOf(d)
        self.assertIs(protocol.transport, transport)  # type: ignore[attr-defined]
        self.assertIsNone(reused)
        self.assertEqual((peer.conns, peer.fails), (0, 0))
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """
        An attempt that does not connect in time is stopped and fails with
        L{twisted.internet.error.TimeoutError}; a refused one with the refusal;
        neither is counted.
        """
        pool, reactor = threeServers()
        peer = pool.peers.primary[0]
        d = pool.connectPeer(peer, factory(), 2.0)
        reactor.advance(2.0)
        self.assertTrue(reactor.connectors[0].stoppedConnecting)
        self.failureResultOf(d, ConnectTimeoutError)
        d = pool.connectPeer(peer, factory(), 2.0)
        refuse(reactor)
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual((peer.conns, peer.fails), (0, 0))
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """
        Cancelling stops the attempt and its timer.
        """
        pool, reactor = threeServers()
        d = pool.connectPeer(pool.peers.primary[0], factory(), 2.0)
        d.cancel()
        self.failureResultOf(d, CancelledError, ConnectingCancelledError)
        self.assertTrue(reactor.connectors[0].stoppedConnecting)
        self.assertEqual(reactor.getDelayedCalls(), [])


class ReleaseTests(SynchronousTestCase):
    def test_counts(self) -> None:
        """
        C{release} counts the connection out of its peer, once.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy())
        accept(reactor)
        connection = connected(d)
        peer = pool.peers.primary[0]
        self.assertEqual(peer.conns, 1)
        connection.release()
        connection.release()
        self.assertEqual(peer.conns, 0)

    def test_failed(self) -> None:
        """
        C{release(failed=True)} counts a failure against the peer.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy())
        accept(reactor)
        with capturedLogs() as events:
            connected(d).release(failed=True)
        peer = pool.peers.primary[0]
        self.assertEqual((peer.conns, peer.fails), (0, 1))
        self.assertIn("temporarily disabled", events[0]["log_format"])

    def test_leastConn(self) -> None:
        """
        With C{least_conn}, open connections steer new ones; released ones no
        longer count.
        """
        pool, reactor = threeServers(balancer=Balancer("least_conn"))
        connections = []
        for _ in range(3):
            d = pool.connect(factory(), b"", Proxy())
            accept(reactor)
            connections.append(connected(d))
        connections[1].release()
        pool.connect(factory(), b"", Proxy())
        self.assertEqual(targets(reactor), [9001, 9002, 9003, 9002])

    def test_maxConns(self) -> None:
        """
        A peer at C{max_conns} is skipped until a connection is released.
        """
        pool, reactor = makePool(
            UpstreamServer(tcp(9001), maxConns=1), UpstreamServer(tcp(9002))
        )
        d = pool.connect(factory(), b"", Proxy())
        accept(reactor)
        first = connected(d)
        for _ in range(2):
            pool.connect(factory(), b"", Proxy())
            accept(reactor)
        self.assertEqual(targets(reactor), [9001, 9002, 9002])
        first.release()
        for _ in range(2):
            pool.connect(factory(), b"", Proxy())
            accept(reactor)
        self.assertIn(9001, targets(reactor)[-2:])


class HealthTests(SynchronousTestCase):
    def test_passive(self) -> None:
        """
        A peer that failed C{max_fails} times is skipped until C{fail_timeout}
        has passed; a probe that ends well makes it available again.
        """
        pool, reactor = makePool(
            UpstreamServer(tcp(9001), maxFails=1, failTimeout=10.0),
            UpstreamServer(tcp(9002)),
        )
        d = pool.connect(factory(), b"", Proxy())
        refuse(reactor)
        accept(reactor)
        connected(d).release()
        for _ in range(3):
            reactor.advance(3)
            other = pool.connect(factory(), b"", Proxy())
            accept(reactor)
            connected(other).release()
        self.assertEqual(targets(reactor), [9001, 9002, 9002, 9002, 9002])
        reactor.advance(1.5)
        probes = []
        while targets(reactor)[-1] != 9001:
            d = pool.connect(factory(), b"", Proxy())
            accept(reactor)
            probes.append(connected(d))
        self.assertLessEqual(len(probes), 3)
        with capturedLogs() as events:
            probes[-1].release()
        self.assertEqual(pool.peers.primary[0].fails, 0)
        self.assertIn("available again", events[0]["log_format"])
        self.assertEqual(events[0]["peer"], "127.0.0.1:9001")

    def test_markHealthy(self) -> None:
        """
        An active health check can take a peer out and put it back; changes are
        logged.
        """
        pool, reactor = makePool(UpstreamServer(tcp(9001)), UpstreamServer(tcp(9002)))
        peer = pool.peers.primary[0]
        with capturedLogs() as events:
            pool.markHealthy(peer, False)
            pool.markHealthy(peer, False)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"].name, "warn")
        for _ in range(2):
            pool.connect(factory(), b"", Proxy())
            accept(reactor)
        self.assertEqual(targets(reactor), [9002, 9002])
        with capturedLogs() as events:
            pool.markHealthy(peer, True)
        self.assertEqual(events[0]["log_level"].name, "info")
        pool.connect(factory(), b"", Proxy())
        self.assertEqual(targets(reactor)[-1], 9001)

    def test_markHealthyReason(self) -> None:
        """
        The reason given for a change is logged with it.
        """
        pool, _ = makePool(UpstreamServer(tcp(9001)), UpstreamServer(tcp(9002)))
        peer = pool.peers.primary[0]
        with capturedLogs() as events:
            pool.markHealthy(peer, False, "health check failed: refused")
            pool.markHealthy(peer, True)
        self.assertEqual(
            [formatEvent(event) for event in events],
            [
                "upstream server 127.0.0.1:9001 of backend is unhealthy"
                " (health check failed: refused)",
                "upstream server 127.0.0.1:9001 of backend is healthy again",
            ],
        )
        self.assertEqual(events[0]["reason"], "health check failed: refused")

    def test_backup(self) -> None:
        """
        Backup servers are tried when every primary failed.
        """
        pool, reactor = makePool(
            UpstreamServer(tcp(9001)),
            UpstreamServer(tcp(9002)),
            UpstreamServer(tcp(9009), backup=True),
        )
        d = pool.connect(factory(), b"", Proxy())
        refuse(reactor)
        refuse(reactor)
        accept(reactor)
        self.assertEqual(
            connected(d).addresses,
            ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9009"],
        )
        pool.connect(factory(), b"", Proxy())
        self.assertEqual(targets(reactor)[-1], 9009)

    def test_singleAddress(self) -> None:
        """
        C{proxy_pass host:port} is a group of one server: its failures are not
        counted and it is not retried within a connection.
        """
        address = tcp(9001)
        group = groupForAddress(address)
        self.assertEqual(group.name, "127.0.0.1:9001")
        reactor = MemoryReactorClock()
        pool = UpstreamPool(group, reactor, random.Random(1))
        d = pool.connect(factory(), b"", Proxy())
        refuse(reactor)
        error = self.failureResultOf(d, NoUpstreamAvailable).value
        assert isinstance(error, NoUpstreamAvailable)
        self.assertEqual(error.addresses, ["127.0.0.1:9001"])
        self.assertEqual(pool.peers.primary[0].fails, 0)
        pool.connect(factory(), b"", Proxy())
        self.assertEqual(targets(reactor), [9001, 9001])


class ResolveTests(SynchronousTestCase):
    def test_fakeResolver(self) -> None:
        """
        The fake resolver provides L{IHostnameResolver}.
        """
        self.assertTrue(verifyObject(IHostnameResolver, FakeResolver({})))

    def test_literalsOnly(self) -> None:
        """
        Literal addresses need no resolution.
        """
        pool, _ = threeServers()
        self.assertIsNone(self.successResultOf(pool.resolveAll()))
        self.assertEqual(len(pool.peers.primary), 3)

    def test_expands(self) -> None:
        """
        A name becomes one peer per address, IPv4 and IPv6, between the peers of
        the other servers; consistent hashing keeps hashing the name.
        """
        pool, reactor = makePool(
            UpstreamServer(tcp(9001)),
            UpstreamServer(tcp(80, "backend.example"), weight=2),
            UpstreamServer(tcp(9003), backup=True),
            balancer=Balancer("hash", key="$remote_addr", consistent=True),
        )
        resolver = FakeResolver(
            {
                "backend.example": [
                    IPv4Address("TCP", "10.0.0.1", 80),
                    IPv6Address("TCP", "2001:db8::1", 80),
                    IPv4Address("TCP", "10.0.0.1", 80),
                ]
            }
        )
        reactor.installNameResolver(resolver)
        first = pool.peers.primary[0]
        d = pool.resolveAll()
        self.assertNoResult(d)
        self.assertEqual(resolver.asked[0][:2], ("backend.example", 80))
        self.assertEqual(set(resolver.asked[0][2]), {IPv4Address, IPv6Address})
        resolver.finish()
        self.successResultOf(d)
        self.assertEqual(
            [peer.name for peer in pool.peers.primary],
            ["127.0.0.1:9001", "10.0.0.1:80", "[2001:db8::1]:80"],
        )
        self.assertIs(pool.peers.primary[0], first)
        self.assertEqual(
            [peer.server for peer in pool.peers.primary[1:]], ["backend.example:80"] * 2
        )
        self.assertEqual([peer.weight for peer in pool.peers.primary], [1, 2, 2])
        self.assertEqual([peer.name for peer in pool.peers.backup], ["127.0.0.1:9003"])
        self.assertIs(pool.policy.group, pool.peers)
        pool.connect(factory(), b"10.1.2.3", Proxy())
        self.assertIn(
            reactor.tcpClients[0][0], {"127.0.0.1", "10.0.0.1", "2001:db8::1"}
        )

    def test_notFound(self) -> None:
        """
        A name without addresses fails start-up, naming it and its line.
        """
        where = Where("/etc/relay.conf", 12)
        pool, reactor = makePool(
            UpstreamServer(tcp(9001)),
            UpstreamServer(tcp(80, "nowhere.example"), where=where),
        )
        resolver = FakeResolver({})
        reactor.installNameResolver(resolver)
        d = pool.resolveAll()
        resolver.finish()
        failure = self.failureResultOf(d, HostNotFound)
        self.assertEqual(
            failure.getErrorMessage(),
            'host not found in upstream "nowhere.example:80" in /etc/relay.conf:12',
        )

    def test_unresolvedName(self) -> None:
        """
        A name not resolved yet is connected through the reactor's resolver.
        """
        pool, reactor = makePool(
            UpstreamServer(tcp(80, "backend.example")), UpstreamServer(tcp(9002))
        )
        d = pool.connect(factory(), b"", Proxy())
        # MemoryReactorClock's resolver answers 127.0.0.1 for every name.
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 80))
        accept(reactor)
        self.assertEqual(connected(d).peer, "backend.example:80")


class Recorder(Protocol):
    """
    The caller's protocol: records when it was connected and what it received.
    """

    def __init__(self) -> None:
        self.made: list[float] = []
        self.received: list[bytes] = []
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.made.append(1.0)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class Greeter(Protocol):
    """
    An upstream application: says hello once TLS is up.
    """

    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]


def tlsAccept(
    reactor: MemoryReactorClock, server: SSL.Context, index: int = -1
) -> IOPump:
    """
    Let the C{index}th connection attempt reach an in-memory TLS upstream serving
    with C{server}; return the pump between them (not yet pumped).
    """
    host, port, clientFactory, _, _ = reactor.tcpClients[index]
    client = clientFactory.buildProtocol(IPv4Address("TCP", host, port))
    upstream = TLSMemoryBIOFactory(
        ServerContextFactory(server), False, Factory.forProtocol(Greeter), reactor
    ).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    pump: IOPump = iosimConnect(
        upstream,
        FakeTransport(upstream, isServer=True),
        client,
        FakeTransport(client, isServer=False),
        greet=False,
        clock=reactor,
    )
    return pump


class TLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.files = writeCertificates(self.dir)
        self.ca = self.files.ca

    def serverContext(self, ca: trustme.CA | None = None) -> SSL.Context:
        context = SSL.Context(SSL.TLS_METHOD)
        (ca or self.ca).issue_cert("localhost").configure_cert(context)
        return context

    def tlsPool(
        self, *ports: int, **settings: Any
    ) -> tuple[UpstreamPool, MemoryReactorClock]:
        settings.setdefault("verify", True)
        settings.setdefault("trustedCertificate", self.files.caFile)
        tls = tlsForServer(UpstreamTLS(enabled=True, **settings), "localhost", None)
        return makePool(*(UpstreamServer(tcp(port)) for port in ports), tlsFor=tls)

    def test_handshaking(self) -> None:
        """
        The stand-in protocol listens for the handshake.
        """
        securing: Any = object()
        self.assertTrue(
            verifyObject(IHandshakeListener, _Handshaking(securing, Protocol()))
        )

    def test_connectedAtHandshake(self) -> None:
        """
        With TLS, the attempt succeeds when the handshake completes, not when TCP
        connects: the caller's protocol is connected then, over TLS, and the
        connect time includes the handshake.
        """
        pool, reactor = self.tlsPool(9001, 9002)
        recorder = Recorder()
        d = pool.connect(Factory.forProtocol(lambda: recorder), b"", Proxy())
        reactor.advance(0.5)
        pump = tlsAccept(reactor, self.serverContext())
        self.assertNoResult(d)
        self.assertEqual(recorder.made, [])
        reactor.advance(0.25)
        pump.flush()
        connection = connected(d)
        self.assertIs(connection.protocol, recorder)
        self.assertEqual(recorder.made, [1.0])
        self.assertIsInstance(recorder.transport, TLSMemoryBIOProtocol)
        self.assertEqual(b"".join(recorder.received), b"hello")
        self.assertEqual(connection.connectTime, 0.75)
        self.assertIs(connection.sessionReused, False)
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertEqual(pool.peers.primary[0].conns, 1)

    def test_settledAttemptLetsGo(self) -> None:
        """
        Once the handshake has decided the attempt, it holds neither the TLS
        layer nor the TCP attempt's result, which both lead back to it through
        the factories that built them: nothing the connection leaves is kept
        in a reference cycle for the cyclic garbage collector to find.
        """
        pool, reactor = self.tlsPool(9001)
        d = pool.connect(factory(), b"", Proxy())
        tlsFactory: Any = reactor.tcpClients[-1][2]._wrappedFactory  # type: ignore[attr-defined]
        securing = tlsFactory.wrappedFactory.securing
        self.assertIsNone(securing.tls)
        pump = tlsAccept(reactor, self.serverContext())
        self.assertIsNotNone(securing.connecting)
        self.assertIsNotNone(securing.tls)
        pump.flush()
        connected(d)
        self.assertIsNone(securing.tls)
        self.assertIsNone(securing.connecting)

    def test_plainHasNoSessionFlag(self) -> None:
        """
        Without TLS for the peer, C{sessionReused} is L{None}.
        """
        pool, reactor = threeServers(tlsFor=lambda peer: None)
        d = pool.connect(factory(), b"", Proxy())
        accept(reactor)
        self.assertIsNone(connected(d).sessionReused)

    def test_sessionReused(self) -> None:
        """
        The next connection to the same peer resumes the session the first one
        kept, and says so; another peer starts afresh.
        """
        pool, reactor = self.tlsPool(9001, 9002)
        server = self.serverContext()
        results = []
        for port in (9001, 9002, 9001):
            d = pool.connect(factory(), b"", Proxy())
            self.assertEqual(targets(reactor)[-1], port)
            pump = tlsAccept(reactor, server)
            pump.flush()
            connection = connected(d)
            results.append(connection.sessionReused)
            connection.protocol.transport.loseConnection()  # type: ignore[attr-defined]
            pump.flush()
            connection.release()
        self.assertEqual(results, [False, False, True])

    def test_verificationFailure(self) -> None:
        """
        A refused certificate fails the attempt at that peer: it is counted and
        logged, the caller's protocol never hears of it, and the next peer is
        tried.
        """
        pool, reactor = self.tlsPool(9001, 9002)
        recorder = Recorder()
        d = pool.connect(Factory.forProtocol(lambda: recorder), b"", Proxy())
        with capturedLogs() as events:
            tlsAccept(reactor, self.serverContext(trustme.CA())).flush()
        self.assertEqual(targets(reactor), [9001, 9002])
        self.assertEqual((recorder.made, recorder.lost), ([], []))
        first = pool.peers.primary[0]
        self.assertEqual((first.fails, first.conns), (1, 0))
        failed = [e for e in events if e.get("peer") == "127.0.0.1:9001"]
        self.assertEqual(failed[0]["kind"], "untrusted")
        self.assertIn("verify error", failed[1]["reason"])
        tlsAccept(reactor, self.serverContext()).flush()
        connection = connected(d)
        self.assertEqual(connection.addresses, ["127.0.0.1:9001", "127.0.0.1:9002"])
        self.assertEqual(connection.connectTimes[0], None)

    def test_allRefused(self) -> None:
        """
        When every peer's certificate is refused, the error names why.
        """
        pool, reactor = self.tlsPool(9001, 9002, name="backend.example")
        d = pool.connect(factory(), b"", Proxy())
        tlsAccept(reactor, self.serverContext()).flush()
        tlsAccept(reactor, self.serverContext()).flush()
        error = self.failureResultOf(d, NoUpstreamAvailable).value
        self.assertIn(
            '127.0.0.1:9002 (upstream SSL certificate does not match "backend.example")',
            str(error),
        )

    def test_handshakeTimeout(self) -> None:
        """
        C{proxy_connect_timeout} covers the handshake: an upstream that accepts
        TCP but never answers the ClientHello times out at the same deadline,
        and the next peer is tried.
        """
        pool, reactor = self.tlsPool(9001, 9002)
        d = pool.connect(factory(), b"", Proxy(connectTimeout=3.0))
        reactor.advance(1.0)
        transport = accept(reactor)
        reactor.advance(0)
        self.assertEqual(transport.value()[:1], b"\x16")
        with capturedLogs() as events:
            reactor.advance(1.9)
            self.assertEqual(targets(reactor), [9001])
            reactor.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(targets(reactor), [9001, 9002])
        self.assertEqual(pool.peers.primary[0].fails, 1)
        self.assertIn("timed out", events[0]["reason"])
        tlsAccept(reactor, self.serverContext()).flush()
        self.assertEqual(connected(d).peer, "127.0.0.1:9002")

    def test_closedInHandshake(self) -> None:
        """
        An upstream that closes during the handshake fails the attempt, and the
        session offered to it is forgotten.
        """
        pool, reactor = self.tlsPool(9001, 9002)
        peer = pool.peers.primary[0]
        peer.session = object()
        d = pool.connect(factory(), b"", Proxy())
        host, port, clientFactory, _, _ = reactor.tcpClients[0]
        protocol = clientFactory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        protocol.makeConnection(StringTransport())
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(targets(reactor), [9001, 9002])
        self.assertIsNone(peer.session)
        self.assertEqual(peer.fails, 1)
        d.cancel()
        error = self.failureResultOf(d, CancelledError)
        self.assertTrue(error)

    def test_cancelInHandshake(self) -> None:
        """
        Cancelling during the handshake aborts the connection and counts no
        failure.
        """
        pool, reactor = self.tlsPool(9001, 9002)
        d = pool.connect(factory(), b"", Proxy())
        transport = accept(reactor)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.disconnected)
        self.assertEqual(targets(reactor), [9001])
        self.assertEqual(
            [(peer.conns, peer.fails) for peer in pool.peers.primary], [(0, 0)] * 2
        )
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_singlePeer(self) -> None:
        """
        A group of one is not retried after a failed handshake, as after a
        failed connect.
        """
        pool, reactor = self.tlsPool(9001)
        d = pool.connect(factory(), b"", Proxy())
        tlsAccept(reactor, self.serverContext(trustme.CA())).flush()
        self.failureResultOf(d, NoUpstreamAvailable)
        self.assertEqual(targets(reactor), [9001])

    def test_protocolType(self) -> None:
        """
        The connection's protocol provides L{IProtocol}.
        """
        pool, reactor = threeServers()
        d = pool.connect(factory(), b"", Proxy())
        accept(reactor)
        self.assertTrue(IProtocol.providedBy(connected(d).protocol))


class RealListener(SynchronousTestCase):
    """
    A real epoll reactor and a loopback listener (C{port}) for each test.
    """

    def setUp(self) -> None:
        self.real = RealReactor(self)
        self.reactor = self.real.reactor
        self.listener = listeningSocket()
        self.addCleanup(self.listener.close)
        self.port = self.listener.getsockname()[1]


class DialTests(RealListener):
    """
    On a real POSIX reactor, plain TCP to a literal address skips the endpoint
    and connector layers (L{tlsrelay._pool._Dial}) with the same outcomes.
    """

    def pool(self, port: int) -> tuple[UpstreamPool, Any]:
        group = UpstreamGroup("backend", (UpstreamServer(tcp(port)),), Balancer())
        pool = UpstreamPool(group, self.reactor, random.Random(3))
        return pool, pool.peers.primary[0]

    def attempt(self, port: int, timeout: float = 5.0) -> Deferred[Any]:
        pool, peer = self.pool(port)
        self.pools = pool
        d = pool.connectPeer(peer, factory(), timeout)
        self.real.spin(lambda: d.called)
        return d

    def test_connects(self) -> None:
        """
        The protocol is connected straight on the socket transport, which lets
        the attempt go once connected; no timer is left.
        """
        d = self.attempt(self.port)
        protocol, reused = self.successResultOf(d)
        self.assertIsNone(reused)
        transport = protocol.transport
        self.assertIsInstance(transport, _UpstreamClient)
        self.assertIs(transport.connector, _ConnectedConnector)
        self.assertGreater(transport.readSize, transport.bufferSize)
        self.assertEqual(
            transport.getPeer(), IPv4Address("TCP", "127.0.0.1", self.port)
        )
        self.assertEqual(transport.logPrefix(), f"{type(protocol).__name__},client")
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        accepted, _ = self.listener.accept()
        self.addCleanup(accepted.close)
        transport.write(b"hello")
        self.real.spin(lambda: not transport._tempDataLen and not transport.dataBuffer)
        accepted.settimeout(5)
        self.assertEqual(accepted.recv(5), b"hello")
        transport.loseConnection()
        self.real.spin(lambda: transport.disconnected)
        self.assertEqual(accepted.recv(5), b"")

    def test_refused(self) -> None:
        """
        A refused connection fails with the refusal, as through an endpoint.
        """
        self.listener.close()
        d = self.attempt(self.port)
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """
        An attempt that does not connect in time fails with
        L{twisted.internet.error.TimeoutError}.
        """
        address = unanswering(self)
        d = self.attempt(address[1], timeout=0.2)
        failure = self.failureResultOf(d, ConnectTimeoutError)
        self.assertIn("no connection within 0.2s", str(failure.value))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connectsAtOnce(self) -> None:
        """
        A connection that C{connect(2)} finished before returning (loopback)
        is handed over at once: no wait for a writable event, and the socket
        was never registered for writing.
        """
        pool, peer = self.pool(self.port)
        self.pools = pool
        writers: list[object] = []
        addWriter = self.reactor.addWriter

        def recordWriter(writer: object) -> None:
            writers.append(writer)
            addWriter(writer)

        self.patch(self.reactor, "addWriter", recordWriter)
        d = pool.connectPeer(peer, factory(), 5.0)
        protocol, _ = self.successResultOf(d)
        transport: Any = protocol.transport  # type: ignore[attr-defined]
        self.assertTrue(transport.connectedAtOnce)
        self.assertEqual(writers, [])
        # Never timed, and its peer's address object is shared.
        self.assertEqual(len(pool._dialDeadlines(5.0)), 0)
        again, _ = self.successResultOf(pool.connectPeer(peer, factory(), 5.0))
        self.assertIs(again.transport.getPeer(), transport.getPeer())  # type: ignore[attr-defined]
        self.assertEqual(
            transport.getPeer(), IPv4Address("TCP", "127.0.0.1", self.port)
        )
        again.transport.abortConnection()  # type: ignore[attr-defined]
        self.real.spin(lambda: again.transport.disconnected)  # type: ignore[attr-defined]
        self.assertIn(transport, self.reactor.getReaders())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        accepted, _ = self.listener.accept()
        self.addCleanup(accepted.close)
        transport.loseConnection()
        self.real.spin(lambda: transport.disconnected)

    def test_connectsLater(self) -> None:
        """
        A connection still in progress when C{connect(2)} returns is handed
        over once the reactor reports the socket writable.
        """
        address = unanswering(self)
        pool, peer = self.pool(address[1])
        self.pools = pool
        d = pool.connectPeer(peer, factory(), 5.0)
        self.assertNoResult(d)
        [transport] = self.reactor.getWriters()
        self.assertFalse(transport.connectedAtOnce)
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)

    def test_cancel(self) -> None:
        """
        Cancelling stops the attempt and closes its socket.
        """
        address = unanswering(self)
        pool, peer = self.pool(address[1])
        d = pool.connectPeer(peer, factory(), 5.0)
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        waker = self.reactor.waker
        self.assertEqual([r for r in self.reactor.getReaders() if r is not waker], [])
        self.assertEqual(self.reactor.getWriters(), [])

    def test_targets(self) -> None:
        """
        IPv4 and IPv6 literals are dialled directly; another reactor goes
        through an endpoint.
        """
        pool, peer = self.pool(self.port)
        self.assertEqual(
            pool._target(peer, None), (socket.AF_INET, ("127.0.0.1", self.port))
        )
        self.assertEqual(
            pool._target(peer, 8080), (socket.AF_INET, ("127.0.0.1", 8080))
        )
        group = UpstreamGroup("six", (UpstreamServer(tcp(443, "::1")),), Balancer())
        six = UpstreamPool(group, self.reactor, random.Random(3))
        family, address = six._target(six.peers.primary[0], None)  # type: ignore[misc]
        self.assertEqual((family, address[:2]), (socket.AF_INET6, ("::1", 443)))
        memory, _ = threeServers()
        self.assertIsNone(memory._target(memory.peers.primary[0], None))


class PoolDialTests(RealListener):
    """
    The pool's own attempts at plain TCP peers on a POSIX reactor are dialled
    without a L{Deferred} per attempt, with the outcomes of the general path:
    connection, failover, timeout, cancellation.
    """

    def connect(
        self, *ports: int, proxy: Proxy | None = None
    ) -> tuple[UpstreamPool, Deferred[UpstreamConnection]]:
        servers = tuple(UpstreamServer(tcp(port)) for port in ports)
        group = UpstreamGroup("backend", servers, Balancer())
        pool = UpstreamPool(group, self.reactor, random.Random(3))
        return pool, pool.connect(factory(), b"", proxy or Proxy())

    def abort(self, connection: UpstreamConnection) -> None:
        transport: Any = connection.protocol.transport  # type: ignore[attr-defined]
        transport.abortConnection()
        self.real.spin(lambda: transport.disconnected)

    def closedPort(self) -> int:
        closed = listeningSocket()
        port: int = closed.getsockname()[1]
        closed.close()
        return port

    def test_connects(self) -> None:
        """
        The connection is made straight on the socket transport; its peer is
        counted until released, and no timer is left.
        """
        pool, d = self.connect(self.port)
        self.real.spin(lambda: d.called)
        connection = self.successResultOf(d)
        self.assertIsInstance(connection.protocol.transport, _UpstreamClient)  # type: ignore[attr-defined]
        self.assertEqual(connection.peer, f"127.0.0.1:{self.port}")
        self.assertIsNone(connection.sessionReused)
        peer = pool.peers.primary[0]
        self.assertEqual(peer.conns, 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        connection.release(False)
        self.assertEqual(peer.conns, 0)
        self.abort(connection)

    def test_failover(self) -> None:
        """
        A refused peer is counted as failed and the next one is tried.
        """
        closed = self.closedPort()
        pool, d = self.connect(closed, self.port)
        self.real.spin(lambda: d.called)
        connection = self.successResultOf(d)
        self.assertEqual(
            connection.addresses, [f"127.0.0.1:{closed}", f"127.0.0.1:{self.port}"]
        )
        self.assertIsNone(connection.connectTimes[0])
        self.assertEqual([p.fails for p in pool.peers.primary], [1, 0])
        self.assertEqual([p.conns for p in pool.peers.primary], [0, 1])
        self.abort(connection)

    def test_allRefused(self) -> None:
        """
        When every peer refuses, the result fails with the reasons.
        """
        first, second = self.closedPort(), self.closedPort()
        pool, d = self.connect(first, second)
        self.real.spin(lambda: d.called)
        error = self.failureResultOf(d, NoUpstreamAvailable).value
        self.assertIn("refused", str(error))
        self.assertEqual([p.conns for p in pool.peers.primary], [0, 0])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """
        A peer that does not answer within C{proxy_connect_timeout} fails the
        attempt with "upstream timed out".
        """
        address = unanswering(self)
        pool, d = self.connect(address[1], proxy=Proxy(connectTimeout=0.2))
        self.real.spin(lambda: d.called)
        error = self.failureResultOf(d, NoUpstreamAvailable).value
        self.assertIn("upstream timed out", str(error))
        self.assertEqual(pool.peers.primary[0].conns, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def listen(
        self, *ports: int, proxy: Proxy | None = None
    ) -> tuple[UpstreamPool, Any, list[object]]:
        """
        An attempt through C{connectFor}: its listener's calls are recorded.
        """
        told: list[object] = []

        class Listener:
            def upstreamConnected(self, connection: UpstreamConnection) -> None:
                told.append(connection)

            def upstreamFailed(self, reason: Failure) -> None:
                told.append(reason)

        servers = tuple(UpstreamServer(tcp(port)) for port in ports)
        pool = UpstreamPool(
            UpstreamGroup("backend", servers, Balancer()),
            self.reactor,
            random.Random(3),
        )
        attempt = pool.connectFor(factory(), b"", Listener(), proxy or Proxy())
        return pool, attempt, told

    def test_listenerConnected(self) -> None:
        """
        C{connectFor} tells its listener the connection (on loopback, before
        it returns); a later cancel changes nothing.
        """
        pool, attempt, told = self.listen(self.port)
        [connection] = told
        assert isinstance(connection, UpstreamConnection)
        self.assertEqual(connection.peer, f"127.0.0.1:{self.port}")
        self.assertIsNone(attempt.result)
        attempt.cancel()
        self.assertEqual(told, [connection])
        self.assertEqual(pool.peers.primary[0].conns, 1)
        connection.release(False)
        self.abort(connection)

    def test_listenerFailed(self) -> None:
        """
        When every peer refuses, the listener is told the failure, once.
        """
        closed = self.closedPort()
        pool, attempt, told = self.listen(closed, closed)
        self.real.spin(lambda: bool(told))
        [reason] = told
        assert isinstance(reason, Failure)
        reason.trap(NoUpstreamAvailable)
        self.assertEqual(pool.peers.primary[0].conns, 0)
        attempt.cancel()
        self.assertEqual(len(told), 1)

    def test_listenerCancelled(self) -> None:
        """
        Cancelling an attempt still connecting tells the listener a
        L{CancelledError}, closes the socket and counts no failure.
        """
        pool, attempt, told = self.listen(unanswering(self)[1])
        self.assertEqual(told, [])
        attempt.cancel()
        [reason] = told
        assert isinstance(reason, Failure)
        reason.trap(CancelledError)
        peer = pool.peers.primary[0]
        self.assertEqual((peer.conns, peer.fails), (0, 0))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.reactor.getWriters(), [])

    def test_cancel(self) -> None:
        """
        Cancelling stops the attempt, closes its socket, and does not count
        the peer as failed.
        """
        pool, d = self.connect(unanswering(self)[1])
        d.cancel()
        self.failureResultOf(d, CancelledError)
        peer = pool.peers.primary[0]
        self.assertEqual((peer.conns, peer.fails), (0, 0))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        waker = self.reactor.waker
        self.assertEqual([r for r in self.reactor.getReaders() if r is not waker], [])
        self.assertEqual(self.reactor.getWriters(), [])
