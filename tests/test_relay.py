"""
Tests for L{tlsrelay._relay} and L{tlsrelay._accesslog}: the byte relay of a
stream server, in memory.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable

from attrs import define, field
from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
)
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests._iosim import FakeTransport, connectedServerAndClient
from tests.test_variables import (
    certificateAuthority,
    clientCertificate,
    clientContext,
    pumpTLS,
    serverContext,
)
from tlsrelay._accesslog import (
    BASIC_FORMAT,
    PREDEFINED_FORMATS,
    AccessLogFiles,
    AccessLogWriter,
)
from tlsrelay._config._model import Proxy
from tlsrelay._log import setLevel
from tlsrelay._relay import (
    RelayFactory,
    RelayProtocol,
    UpstreamConnection,
    UpstreamListener,
    WorkerConnections,
    _isClientCertificateFailure,
    _UpstreamFactory,
    _UpstreamProtocol,
)
from tlsrelay._tls import _verifyOptionalNoCA, _verifyStandard
from tlsrelay._tlsfactory import TLSServerFactory
from tlsrelay._variables import compileTemplate, timeLocal, verifyResult

CLIENT = IPv4Address("TCP", "192.0.2.7", 50000)
LISTENER = IPv4Address("TCP", "10.0.0.1", 443)
UPSTREAM = IPv4Address("TCP", "127.0.0.1", 8080)


# --- fakes ------------------------------------------------------------------------


@implementer(ITCPTransport)
class TCPTransport(StringTransport):
    """
    A L{StringTransport} with the TCP methods the relay uses.
    """

    noDelay = False
    writeClosed = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.noDelay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


@define
class FakeUpstreamConnection:
    """
    What the pool hands over.
    """

    protocol: IProtocol
    peer: str = "127.0.0.1:8080"
    connectTime: float = 0.002
    tried: list[str] = field(factory=list)
    connectTimes: list[float | None] = field(factory=lambda: [0.002])
    sessionReused: bool | None = None
    releases: list[bool] = field(factory=list)

    @property
    def upstreamAddr(self) -> str:
        return ", ".join([*self.tried, self.peer])

    def release(self, failed: bool = False) -> None:
        self.releases.append(failed)


@define
class Attempt:
    factory: IProtocolFactory
    key: bytes
    deferred: Deferred[UpstreamConnection]
    cancelled: bool = False


class PeerError(Exception):
    """
    A pool failure that names the upstreams tried.
    """

    peer = "127.0.0.1:8080, 127.0.0.1:8081"
    connectTimes = [None, None]


@define
class FakePool:
    """
    A C{ConnectUpstream} whose attempts the test completes.
    """

    attempts: list[Attempt] = field(factory=list)
    cancelSucceeds: bool = False
    connectAtOnce: bool = False
    last: tuple[_UpstreamProtocol, TCPTransport, FakeUpstreamConnection] | None = None

    def connect(
        self, factory: IProtocolFactory, key: bytes, listener: UpstreamListener
    ) -> Deferred[UpstreamConnection]:
        def cancel(d: Deferred[UpstreamConnection]) -> None:
            attempt.cancelled = True
            if self.cancelSucceeds:
                # The connection completed as the relay gave up on it.
                self.succeed()

        attempt = Attempt(factory, key, Deferred(cancel))
        self.attempts.append(attempt)
        attempt.deferred.addCallbacks(
            listener.upstreamConnected, listener.upstreamFailed
        )
        if self.connectAtOnce:
            # As a loopback connect(2) finishes before it returns.
            self.succeed()
        return attempt.deferred

    def succeed(
        self, peer: str = "127.0.0.1:8080", early: bytes = b""
    ) -> tuple[_UpstreamProtocol, TCPTransport, FakeUpstreamConnection]:
        """
        Connect the last attempt to a new in-memory upstream (which may have sent
        C{early} before the pool hands it over).
        """
        attempt = self.attempts[-1]
        protocol = attempt.factory.buildProtocol(UPSTREAM)
        assert isinstance(protocol, _UpstreamProtocol)
        transport = TCPTransport(hostAddress=UPSTREAM, peerAddress=UPSTREAM)
        protocol.makeConnection(transport)
        if early:
            protocol.dataReceived(early)
        connection = FakeUpstreamConnection(protocol, peer=peer)
        self.last = protocol, transport, connection
        attempt.deferred.callback(connection)
        return protocol, transport, connection


@implementer(IOpenSSLServerConnectionCreator)
@define
class ServerCreator:
    context: SSL.Context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


@implementer(IOpenSSLClientConnectionCreator)
@define
class ClientCreator:
    context: SSL.Context

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_tlsext_host_name(b"example.com")
        return connection


class Recorder(Protocol):
    """
    A client application that records what it receives.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost = reason


class RawTLSClient:
    """
    A pyOpenSSL client driven by hand against a server protocol on a
    L{StringTransport}: unlike C{TLSMemoryBIOProtocol}, it can keep sending after
    it received close_notify, as a TLS peer that half-closes does.
    """

    def __init__(
        self,
        context: SSL.Context,
        server: IProtocol,
        wire: StringTransport,
        clock: Clock,
    ) -> None:
        self.connection = SSL.Connection(context, None)
        self.connection.set_connect_state()
        self.connection.set_tlsext_host_name(b"example.com")
        self.server, self.wire, self.clock = server, wire, clock
        self.received = b""
        self.closeNotify = False
        self.error: SSL.Error | None = None

    def handshakeWithData(self, data: bytes) -> None:
        """
        Handshake, sending C{data} in the same flight as the client's Finished,
        so that the server reads both at once.
        """
        for _ in range(10):
            try:
                self.connection.do_handshake()
            except SSL.WantReadError:
                pass
            else:
                break
            self.server.dataReceived(self.connection.bio_read(65536))
            self.connection.bio_write(self.wire.value())
            self.wire.clear()
        self.connection.send(data)
        self.pump()

    def pump(self) -> None:
        for _ in range(20):
            self.clock.advance(0)
            if not self.closeNotify and self.error is None:
                try:
                    while True:
                        self.received += self.connection.recv(65536)
                except SSL.WantReadError:
                    pass
                except SSL.ZeroReturnError:
                    self.closeNotify = True
                except SSL.Error as e:
                    self.error = e
            moved = False
            try:
                outgoing = self.connection.bio_read(65536)
            except SSL.WantReadError:
                outgoing = b""
            if outgoing and not self.wire.disconnected:
                self.server.dataReceived(outgoing)
                moved = True
            incoming = self.wire.value()
            if incoming:
                self.wire.clear()
                self.connection.bio_write(incoming)
                moved = True
            if not moved:
                return

    def send(self, data: bytes) -> None:
        self.connection.send(data)
        self.pump()


# --- helpers ----------------------------------------------------------------------


@define
class Relayed:
    """
    A session with both sides connected.
    """

    client: RelayProtocol
    clientTransport: TCPTransport
    upstream: _UpstreamProtocol
    upstreamTransport: TCPTransport
    connection: FakeUpstreamConnection


def producerOf(transport: StringTransport) -> StringTransport:
    """
    The producer registered on C{transport}.
    """
    producer = transport.producer
    assert producer is not None
    return producer  # type: ignore[no-any-return]


class RelayTestCase(SynchronousTestCase):
    """
    Builds relays on fakes.
    """

    def setUpRelay(
        self,
        proxy: Proxy | None = None,
        tls: bool = False,
        limit: int = 100,
        returnValue: str | None = None,
        hashKey: str | None = None,
        logFormat: str = BASIC_FORMAT,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.pool = FakePool()
        self.connections = WorkerConnections(limit)
        self.logPath = self.mktemp()
        self.writer = AccessLogWriter(self.logPath)
        self.writer.open()
        self.addCleanup(self.writer.close)
        self.factory = RelayFactory(
            connectUpstream=None if returnValue is not None else self.pool.connect,
            proxy=proxy or Proxy(),
            tls=tls,
            clock=self.clock,
            now=self.clock.seconds,
            connections=self.connections,
            accessLogs=[(self.writer, compileTemplate(logFormat))],
            returnTemplate=None
            if returnValue is None
            else compileTemplate(returnValue),
            hashKey=None if hashKey is None else compileTemplate(hashKey),
        )

    def logLines(self) -> list[str]:
        with open(self.logPath, encoding="utf-8") as f:
            return f.read().splitlines()

    def connectClient(self) -> tuple[RelayProtocol, TCPTransport]:
        protocol = self.factory.buildProtocol(CLIENT)
        transport = TCPTransport(hostAddress=LISTENER, peerAddress=CLIENT)
        protocol.makeConnection(transport)
        return protocol, transport

    def relaying(self) -> Relayed:
        client, clientTransport = self.connectClient()
        upstream, upstreamTransport, connection = self.pool.succeed()
        return Relayed(client, clientTransport, upstream, upstreamTransport, connection)

    def tlsRelay(
        self, context: SSL.Context, client: IAddress = CLIENT
    ) -> tuple[TLSMemoryBIOProtocol, TCPTransport]:
        """
        A client connected to the relay through L{TLSServerFactory}, as the
        service builds TLS listeners (C{ssl_handshake_timeout} 60s).
        """
        tlsFactory = TLSServerFactory(
            ServerCreator(context), self.factory, 60.0, self.clock
        )
        server = tlsFactory.buildProtocol(client)
        assert server is not None
        wire = TCPTransport(hostAddress=LISTENER, peerAddress=client)
        server.makeConnection(wire)
        return server, wire


def lost(protocol: IProtocol, reason: Exception | None = None) -> None:
    protocol.connectionLost(Failure(reason or ConnectionDone()))


# --- tests --------------------------------------------------------------------------


class InterfaceTests(SynchronousTestCase):
    """
    Every C{@implementer} class provides its interfaces.
    """

    def test_interfaces(self) -> None:
        factory = RelayFactory(
            connectUpstream=FakePool().connect,
            proxy=Proxy(),
            tls=True,
            clock=Clock(),
            now=lambda: 0.0,
            connections=WorkerConnections(),
        )
        self.assertTrue(verifyObject(IProtocolFactory, factory))
        relay = factory.buildProtocol(CLIENT)
        self.assertTrue(verifyObject(IProtocol, relay))
        self.assertTrue(verifyObject(IHandshakeListener, relay))
        self.assertTrue(verifyObject(IHalfCloseableProtocol, relay))
        upstream = _UpstreamFactory(relay).buildProtocol(None)
        self.assertTrue(verifyObject(IProtocol, upstream))
        # Without proxy_half_close, the upstream's end of stream closes its
        # connection: not half-closeable.
        self.assertFalse(IHalfCloseableProtocol.providedBy(upstream))
        halfClosing = RelayFactory(
            connectUpstream=FakePool().connect,
            proxy=Proxy(halfClose=True),
            tls=True,
            clock=Clock(),
            now=lambda: 0.0,
            connections=WorkerConnections(),
        ).buildProtocol(CLIENT)
        upstream = _UpstreamFactory(halfClosing).buildProtocol(None)
        self.assertTrue(verifyObject(IProtocol, upstream))
        self.assertTrue(verifyObject(IHalfCloseableProtocol, upstream))
        self.assertTrue(verifyObject(ITCPTransport, TCPTransport()))

    def test_exactlyOneTarget(self) -> None:
        """
        A relay either proxies or returns.
        """
        for connect, returned in (
            (None, None),
            (FakePool().connect, compileTemplate("")),
        ):
            self.assertRaises(
                ValueError,
                RelayFactory,
                connectUpstream=connect,
                proxy=Proxy(),
                tls=False,
                clock=Clock(),
                now=lambda: 0.0,
                connections=WorkerConnections(),
                returnTemplate=returned,
            )


class PlainRelayTests(RelayTestCase):
    """
    A plain TCP listener: connect at once, pause until connected, then relay
    with mutual producers.
    """

    def setUp(self) -> None:
        self.setUpRelay()

    def test_pausedUntilConnected(self) -> None:
        """
        The client is paused while the upstream connects, and resumed after.
        """
        _client, transport = self.connectClient()
        self.assertEqual(len(self.pool.attempts), 1)
        self.assertEqual(self.pool.attempts[0].key, b"")
        self.assertEqual(transport.producerState, "paused")
        self.assertTrue(transport.noDelay)
        self.pool.succeed()
        self.assertEqual(transport.producerState, "producing")

    def test_connectedAtOnce(self) -> None:
        """
        An upstream connected before the pool's call returns: the client is
        never paused, and what it sends goes straight upstream.
        """
        self.pool.connectAtOnce = True
        protocol = self.factory.buildProtocol(CLIENT)
        transport = TCPTransport(hostAddress=LISTENER, peerAddress=CLIENT)
        pauses: list[None] = []
        self.patch(transport, "pauseProducing", lambda: pauses.append(None))
        protocol.makeConnection(transport)
        self.assertEqual(pauses, [])
        self.assertEqual(transport.producerState, "producing")
        assert self.pool.last is not None
        _, upstreamTransport, _ = self.pool.last
        protocol.dataReceived(b"hello")
        self.assertEqual(upstreamTransport.value(), b"hello")

    def test_heldThenFlushed(self) -> None:
        """
        What the client sent before the upstream connected (in the same read) is
        sent upstream, in order, on connect; what the upstream sent before the
        pool handed it over reaches the client.
        """
        client, transport = self.connectClient()
        client.dataReceived(b"hello ")
        client.dataReceived(b"world")
        _upstream, upstreamTransport, _connection = self.pool.succeed(early=b"banner\n")
        self.assertEqual(upstreamTransport.value(), b"hello world")
        self.assertEqual(transport.value(), b"banner\n")
        self.assertTrue(upstreamTransport.noDelay)

    def test_producersRegistered(self) -> None:
        """
        Each side's transport is the other's streaming producer.
        """
        r = self.relaying()
        self.assertIs(r.clientTransport.producer, r.upstreamTransport)
        self.assertIs(r.upstreamTransport.producer, r.clientTransport)
        self.assertTrue(r.clientTransport.streaming)
        self.assertTrue(r.upstreamTransport.streaming)

    def test_backpressure(self) -> None:
        """
        A consumer whose buffer is full pauses the other side's transport.
        """
        r = self.relaying()
        producerOf(r.upstreamTransport).pauseProducing()
        self.assertEqual(r.clientTransport.producerState, "paused")
        producerOf(r.upstreamTransport).resumeProducing()
        producerOf(r.clientTransport).pauseProducing()
        self.assertEqual(r.upstreamTransport.producerState, "paused")

    def test_relayAndCount(self) -> None:
        """
        Bytes go both ways and are counted; the access log line has real values.
        """
        r = self.relaying()
        r.client.dataReceived(b"ping")
        r.upstream.dataReceived(b"pong!")
        self.assertEqual(r.upstreamTransport.value(), b"ping")
        self.assertEqual(r.clientTransport.value(), b"pong!")
        self.clock.advance(1.25)
        lost(r.client)
        lost(r.upstream)
        self.assertEqual(
            self.logLines(),
            [
                f"192.0.2.7 [{timeLocal(self.clock.seconds())}] TCP 200 5 4 1.250",
            ],
        )

    def test_debugEvents(self) -> None:
        """
        With C{error_log ... debug}, a session logs its steps with the client
        named once; at the default level it logs none of them.
        """
        r = self.relaying()
        with capturedLogs() as events:
            lost(r.client)
            lost(r.upstream)
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.debug], [])

        setLevel(LogLevel.debug)
        self.addCleanup(setLevel, LogLevel.info)
        with capturedLogs() as events:
            r = self.relaying()
            lost(r.client)
            lost(r.upstream)
        debug = [e for e in events if e["log_level"] == LogLevel.debug]
        self.assertEqual(
            [e["log_format"].split(" ", 2)[:2] for e in debug],
            [
                ["client", "{client}"],
                ["upstream", "{upstream}"],
                ["client", "{client}"],
            ],
        )
        self.assertEqual({e["client"] for e in debug}, {"192.0.2.7:50000"})
        self.assertEqual(debug[-1]["sessionTime"], 0.0)

    def test_connectionNumbers(self) -> None:
        """
        Sessions are numbered in order.
        """
        first, _ = self.connectClient()
        second, _ = self.connectClient()
        assert first.session is not None and second.session is not None
        self.assertEqual((first.session.connection, second.session.connection), (1, 2))


class HashKeyTests(RelayTestCase):
    def test_hashKey(self) -> None:
        """
        The C{hash} key is rendered per session and given to the pool.
        """
        self.setUpRelay(hashKey="$remote_addr")
        self.connectClient()
        self.assertEqual(self.pool.attempts[0].key, b"192.0.2.7")


class AccessLogTests(RelayTestCase):
    def test_fullFormat(self) -> None:
        """
        Upstream variables and missing values in a custom format.
        """
        self.setUpRelay(
            logFormat="$connection $upstream_addr $upstream_connect_time "
            "$upstream_bytes_sent $upstream_bytes_received $ssl_protocol $status"
        )
        r = self.relaying()
        r.client.dataReceived(b"abc")
        r.upstream.dataReceived(b"de")
        lost(r.upstream)
        lost(r.client)
        self.assertEqual(self.logLines(), ["1 127.0.0.1:8080 0.002 3 2 - 200"])

    def test_upstreamPerTry(self) -> None:
        """
        After retries, C{$upstream_addr} and C{$upstream_connect_time} have one
        value per try, C{-} for the tries that failed; when none connected,
        every try is C{-}.
        """
        self.setUpRelay(logFormat="$upstream_addr|$upstream_connect_time")
        client, _transport = self.connectClient()
        attempt = self.pool.attempts[0]
        upstream = attempt.factory.buildProtocol(UPSTREAM)
        assert upstream is not None
        upstream.makeConnection(TCPTransport())
        attempt.deferred.callback(
            FakeUpstreamConnection(
                upstream, tried=["127.0.0.1:8081"], connectTimes=[None, 0.25]
            )
        )
        lost(upstream)
        lost(client)
        client, _transport = self.connectClient()
        self.pool.attempts[-1].deferred.errback(PeerError("refused"))
        lost(client)
        self.assertEqual(
            self.logLines(),
            [
                "127.0.0.1:8081, 127.0.0.1:8080|-, 0.250",
                "127.0.0.1:8080, 127.0.0.1:8081|-, -",
            ],
        )

    def test_predefined(self) -> None:
        """
        C{basic} is nginx's stream format.
        """
        self.assertEqual(
            PREDEFINED_FORMATS["basic"],
            "$remote_addr [$time_local] $protocol $status $bytes_sent "
            "$bytes_received $session_time",
        )


class TeardownTests(RelayTestCase):
    """
    When one side closes, so does the other: cleanly after a clean close,
    abruptly after an abrupt one.
    """

    def setUp(self) -> None:
        self.setUpRelay()

    def test_clientClosesCleanly(self) -> None:
        r = self.relaying()
        lost(r.client)
        self.assertTrue(r.upstreamTransport.disconnecting)
        self.assertFalse(r.upstreamTransport.disconnected)
        self.assertIsNone(r.upstreamTransport.producer)
        self.assertEqual(self.logLines(), [])
        lost(r.upstream)
        self.assertEqual(r.connection.releases, [False])
        self.assertEqual(len(self.logLines()), 1)
        self.assertEqual(self.connections.active, 0)

    def test_clientDiesAbruptly(self) -> None:
        """
        A client that goes away abruptly still has what it sent delivered: the
        upstream is closed after its buffer is written, not aborted.
        """
        r = self.relaying()
        r.client.dataReceived(b"last words")
        lost(r.client, ConnectionLost())
        self.assertEqual(r.upstreamTransport.value(), b"last words")
        self.assertTrue(r.upstreamTransport.disconnecting)
        self.assertFalse(r.upstreamTransport.disconnected)
        lost(r.upstream, ConnectionLost())
        self.assertEqual(r.connection.releases, [False])

    def test_upstreamClosesCleanly(self) -> None:
        r = self.relaying()
        r.upstream.dataReceived(b"last words")
        lost(r.upstream)
        self.assertEqual(r.clientTransport.value(), b"last words")
        self.assertTrue(r.clientTransport.disconnecting)
        self.assertFalse(r.clientTransport.disconnected)
        self.assertIsNone(r.clientTransport.producer)
        self.assertEqual(r.connection.releases, [False])
        lost(r.client)
        self.assertEqual(len(self.logLines()), 1)
        self.assertEqual(self.connections.active, 0)

    def test_upstreamDiesAbruptly(self) -> None:
        """
        An upstream reset closes the client after what was already relayed is
        written; an upstream that broke before sending anything is released as
        failed.
        """
        r = self.relaying()
        with capturedLogs() as events:
            lost(r.upstream, ConnectionLost())
        self.assertTrue(r.clientTransport.disconnecting)
        self.assertEqual(r.connection.releases, [True])
        self.assertTrue(any("lost" in e["log_format"] for e in events))
        lost(r.client, ConnectionLost())
        self.assertEqual(r.connection.releases, [True])

    def test_finishedSessionNeedsNoCollector(self) -> None:
        """
        Once both sides are closed, nothing of the session refers back to it:
        its protocols are freed by reference counting as soon as their
        transports and the pool let go of them, not left to the cyclic
        garbage collector (a relay making thousands of sessions a second
        would otherwise keep each one's memory until the next collection).
        """
        enabled = gc.isenabled()
        gc.disable()
        if enabled:
            self.addCleanup(gc.enable)
        r = self.relaying()
        r.upstream.dataReceived(b"answer")
        lost(r.upstream)
        lost(r.client)
        self.assertEqual(len(self.logLines()), 1)
        client, upstream = weakref.ref(r.client), weakref.ref(r.upstream)
        del r
        self.pool.attempts.clear()
        self.pool.last = None
        self.assertIsNone(client())
        self.assertIsNone(upstream())

    def test_dataAfterCloseDropped(self) -> None:
        """
        Once the session is ending, nothing more is relayed.
        """
        r = self.relaying()
        lost(r.upstream)
        r.client.dataReceived(b"too late")
        self.assertEqual(r.upstreamTransport.value(), b"")

    def test_connectFails(self) -> None:
        """
        No upstream: the client is closed, status 502, C{$upstream_addr} is what
        the pool tried.
        """
        self.setUpRelay(logFormat="$status $upstream_addr $upstream_bytes_sent")
        client, transport = self.connectClient()
        with capturedLogs() as events:
            self.pool.attempts[0].deferred.errback(PeerError("refused"))
        self.assertTrue(transport.disconnecting)
        self.assertTrue(any("no upstream" in e["log_format"] for e in events))
        lost(client)
        self.assertEqual(self.logLines(), ["502 127.0.0.1:8080, 127.0.0.1:8081 0"])
        self.assertEqual(self.connections.active, 0)

    def test_connectRaises(self) -> None:
        """
        A C{connectUpstream} that raises is a bug: logged, status 500.
        """
        self.setUpRelay(logFormat="$status")

        def broken(
            factory: IProtocolFactory, key: bytes, listener: UpstreamListener
        ) -> Deferred[UpstreamConnection]:
            raise RuntimeError("bug")

        self.factory.connectUpstream = broken
        with capturedLogs() as events:
            client, transport = self.connectClient()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len([e for e in events if "log_failure" in e]), 1)
        self.flushLoggedErrors(RuntimeError)
        lost(client)
        self.assertEqual(self.logLines(), ["500"])
        self.assertEqual(self.connections.active, 0)

    def test_upstreamAlreadyGone(self) -> None:
        """
        An upstream that closed before the pool handed it over: what it sent is
        delivered, then the client is closed.
        """
        client, transport = self.connectClient()
        attempt = self.pool.attempts[0]
        upstream = attempt.factory.buildProtocol(UPSTREAM)
        assert upstream is not None
        upstreamTransport = TCPTransport()
        upstream.makeConnection(upstreamTransport)
        upstream.dataReceived(b"goodbye")
        lost(upstream)
        connection = FakeUpstreamConnection(upstream)
        attempt.deferred.callback(connection)
        self.assertEqual(transport.value(), b"goodbye")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(connection.releases, [False])
        lost(client)
        self.assertEqual(len(self.logLines()), 1)

    def test_clientGoneWhileConnecting(self) -> None:
        """
        The pending connect is cancelled and the session logged.
        """
        client, _transport = self.connectClient()
        lost(client, ConnectionLost())
        self.assertTrue(self.pool.attempts[0].cancelled)
        self.assertEqual(len(self.logLines()), 1)
        self.assertEqual(self.connections.active, 0)

    def test_connectedAfterClientGone(self) -> None:
        """
        An upstream handed over after the client left is closed and released.
        """
        self.pool.cancelSucceeds = True
        client, _transport = self.connectClient()
        lost(client)
        self.assertEqual(self.logLines(), [])
        assert self.pool.last is not None
        upstream, upstreamTransport, connection = self.pool.last
        self.assertTrue(upstreamTransport.disconnecting)
        lost(upstream)
        self.assertEqual(connection.releases, [False])
        self.assertEqual(len(self.logLines()), 1)


class HalfCloseTests(RelayTestCase):
    """
    C{proxy_half_close}.
    """

    def test_offClosesBoth(self) -> None:
        """
        Off (the default): a FIN from either side closes both, after flushing.
        """
        self.setUpRelay()
        r = self.relaying()
        r.client.dataReceived(b"request")
        r.client.readConnectionLost()
        self.assertTrue(r.clientTransport.disconnecting)
        self.assertTrue(r.upstreamTransport.disconnecting)
        self.assertFalse(r.upstreamTransport.writeClosed)

    def test_onKeepsOtherDirection(self) -> None:
        """
        On: the client's FIN is passed on as a write shutdown upstream, and the
        response still flows; the upstream's FIN then ends the session.
        """
        self.setUpRelay(proxy=Proxy(halfClose=True))
        r = self.relaying()
        r.client.dataReceived(b"request")
        r.client.readConnectionLost()
        self.assertTrue(r.upstreamTransport.writeClosed)
        self.assertFalse(r.upstreamTransport.disconnecting)
        self.assertFalse(r.clientTransport.disconnecting)
        # The half-closed client no longer produces for the upstream.
        self.assertIsNone(r.upstreamTransport.producer)
        self.assertIs(r.clientTransport.producer, r.upstreamTransport)
        r.upstream.dataReceived(b"response")
        self.assertEqual(r.clientTransport.value(), b"response")
        r.upstream.readConnectionLost()
        self.assertTrue(r.clientTransport.disconnecting)
        self.assertTrue(r.upstreamTransport.disconnecting)
        lost(r.client)
        lost(r.upstream)
        self.assertEqual(r.connection.releases, [False])

    def test_onUpstreamFirst(self) -> None:
        """
        On: the upstream's FIN shuts down writing to the client.
        """
        self.setUpRelay(proxy=Proxy(halfClose=True))
        r = self.relaying()
        r.upstream.readConnectionLost()
        self.assertTrue(r.clientTransport.writeClosed)
        r.client.dataReceived(b"more")
        self.assertEqual(r.upstreamTransport.value(), b"more")
        r.client.readConnectionLost()
        self.assertTrue(r.clientTransport.disconnecting)
        self.assertTrue(r.upstreamTransport.disconnecting)

    def test_onTLSClient(self) -> None:
        """
        On, with a TLS client: the upstream's FIN becomes close_notify to the
        client, and what the client sends afterwards still reaches the upstream.
        """
        self.setUpRelay(proxy=Proxy(halfClose=True), tls=True)
        ca = certificateAuthority()
        server, wire = self.tlsRelay(serverContext(ca))
        peer = RawTLSClient(clientContext(ca), server, wire, self.clock)
        peer.pump()
        upstream, upstreamTransport, _connection = self.pool.succeed()
        upstream.dataReceived(b"bye")
        upstream.readConnectionLost()
        peer.pump()
        self.assertEqual(peer.received, b"bye")
        self.assertTrue(peer.closeNotify)
        self.assertFalse(wire.disconnecting)
        peer.send(b"still talking")
        self.assertEqual(upstreamTransport.value(), b"still talking")
        # The client's close_notify closes the client, then the upstream.
        peer.connection.shutdown()
        peer.pump()
        self.assertTrue(wire.disconnecting)
        lost(server)
        self.assertTrue(upstreamTransport.disconnecting)


class TimeoutTests(RelayTestCase):
    def test_proxyTimeout(self) -> None:
        """
        C{proxy_timeout}: no data either way for that long closes both sides;
        data in either direction restarts the wait.
        """
        self.setUpRelay(proxy=Proxy(timeout=10.0))
        r = self.relaying()
        self.clock.advance(9)
        r.upstream.dataReceived(b"x")
        self.clock.advance(9)
        r.client.dataReceived(b"y")
        self.clock.advance(9)
        self.assertFalse(r.clientTransport.disconnecting)
        with capturedLogs() as events:
            self.clock.advance(1)
        self.assertTrue(r.clientTransport.disconnecting)
        self.assertTrue(r.upstreamTransport.disconnecting)
        self.assertTrue(any("proxy_timeout" in e["log_format"] for e in events))
        # Closing is bounded too: a side that never finishes closing is aborted.
        self.clock.advance(10)
        self.assertTrue(r.clientTransport.disconnected)
        self.assertTrue(r.upstreamTransport.disconnected)
        lost(r.client, ConnectionLost())
        lost(r.upstream, ConnectionLost())
        self.assertEqual(self.logLines()[0].split()[4], "200")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConnectionLimitTests(RelayTestCase):
    """
    C{worker_connections}: clients and upstreams count.
    """

    def test_clientOverLimit(self) -> None:
        """
        A client beyond the limit is closed at once, with a warning.
        """
        self.setUpRelay(limit=2)
        self.relaying()
        with capturedLogs() as events:
            client, transport = self.connectClient()
        self.assertTrue(transport.disconnected)
        self.assertEqual(len(self.pool.attempts), 1)
        self.assertEqual(
            [
                e["log_level"].name
                for e in events
                if "worker_connections" in e["log_format"]
            ],
            ["warn"],
        )
        lost(client)
        self.assertEqual(self.connections.active, 2)
        self.assertEqual(self.logLines(), [])

    def test_tlsClientOverLimit(self) -> None:
        """
        Behind TLS too, a client beyond the limit is aborted before any
        handshake.
        """
        self.setUpRelay(limit=0, tls=True)
        server, wire = self.tlsRelay(serverContext(certificateAuthority()))
        self.assertTrue(wire.disconnected)
        self.assertEqual(wire.value(), b"")
        lost(server, ConnectionLost())
        self.assertEqual(self.connections.active, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_upstreamOverLimit(self) -> None:
        """
        A client whose upstream would exceed the limit gets a 502.
        """
        self.setUpRelay(limit=1, logFormat="$status")
        client, transport = self.connectClient()
        self.assertEqual(self.pool.attempts, [])
        self.assertTrue(transport.disconnecting)
        lost(client)
        self.assertEqual(self.logLines(), ["502"])
        self.assertEqual(self.connections.active, 0)


class TLSRelayTests(RelayTestCase):
    """
    Behind C{TLSMemoryBIOFactory}: the upstream is connected after the handshake.
    """

    def setUp(self) -> None:
        self.setUpRelay(
            tls=True,
            logFormat="$status $ssl_protocol $ssl_server_name $ssl_client_verify",
        )
        self.ca = certificateAuthority()

    def test_handshakeTimeout(self) -> None:
        """
        No handshake within C{ssl_handshake_timeout} (L{TLSServerFactory}'s
        timer): the client is aborted, nothing connects upstream, status 400,
        and one line is logged, by the TLS layer.
        """
        server, wire = self.tlsRelay(serverContext(self.ca))
        self.clock.advance(59)
        self.assertFalse(wire.disconnecting)
        with capturedLogs() as events:
            self.clock.advance(1)
            lost(server, ConnectionLost())
        self.assertTrue(wire.disconnected)
        self.assertEqual(
            [(e["log_level"], e["log_format"]) for e in events],
            [(LogLevel.info, "TLS handshake with {peer} timed out after {timeout}s")],
        )
        self.assertEqual(events[0]["peer"], "192.0.2.7:50000")
        self.assertEqual(self.pool.attempts, [])
        self.assertEqual(self.logLines(), ["400 - - NONE"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handshakeTimeoutPartial(self) -> None:
        """
        A client that started its handshake and stalled times out too, with the
        name it asked for in the log.
        """
        server, wire = self.tlsRelay(serverContext(self.ca))
        peer = RawTLSClient(clientContext(self.ca), server, wire, self.clock)
        try:
            peer.connection.do_handshake()
        except SSL.WantReadError:
            pass
        server.dataReceived(peer.connection.bio_read(65536))  # ClientHello only
        self.assertTrue(wire.value())
        with capturedLogs() as events:
            self.clock.advance(60)
            lost(server, ConnectionLost())
        self.assertEqual(len(events), 1)
        self.assertIn("timed out", events[0]["log_format"])
        self.assertEqual(self.logLines(), ["400 - example.com NONE"])

    def test_ipv6ClientLogged(self) -> None:
        """
        Log lines name an IPv6 client as C{[address]:port}.
        """
        client = IPv6Address("TCP", "2001:db8::1", 443)
        server, _wire = self.tlsRelay(serverContext(self.ca), client)
        server.dataReceived(b"not TLS at all\r\n")
        with capturedLogs() as events:
            lost(server)
        [event] = [e for e in events if "handshake" in e["log_format"]]
        self.assertEqual(event["client"], "[2001:db8::1]:443")

    def test_handshakeThenConnect(self) -> None:
        """
        The upstream is connected once the handshake completes (not before), and
        the handshake timer is cancelled.
        """
        server, wire = self.tlsRelay(serverContext(self.ca))
        self.assertEqual(self.pool.attempts, [])
        peer = RawTLSClient(clientContext(self.ca), server, wire, self.clock)
        peer.pump()
        self.assertEqual(len(self.pool.attempts), 1)
        self.assertEqual(wire.producerState, "paused")
        self.clock.advance(120)
        self.assertFalse(wire.disconnecting)

    def test_garbage(self) -> None:
        """
        Bytes that are not TLS: the connection is closed, nothing connects
        upstream, status 400 is logged.
        """
        server, wire = self.tlsRelay(serverContext(self.ca))
        server.dataReceived(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertTrue(wire.disconnecting)
        with capturedLogs() as events:
            lost(server)
        self.assertTrue(any("handshake" in e["log_format"] for e in events))
        self.assertEqual(self.pool.attempts, [])
        self.assertEqual(self.logLines(), ["400 - - NONE"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_clientCertificateMissing(self) -> None:
        """
        A required client certificate that is missing: status 403.
        """
        server, wire = self.tlsRelay(serverContext(self.ca, verifyClients=True))
        peer = RawTLSClient(clientContext(self.ca), server, wire, self.clock)
        peer.pump()
        self.assertTrue(wire.disconnecting)
        lost(server)
        self.assertEqual(self.pool.attempts, [])
        self.assertEqual(self.logLines(), ["403 - example.com NONE"])

    def test_clientCertificateInvalid(self) -> None:
        """
        A client certificate from another CA: status 403, and
        C{$ssl_client_verify} says why.
        """
        server, wire = self.tlsRelay(serverContext(self.ca, verifyClients=True))
        other = certificateAuthority()
        peer = RawTLSClient(
            clientContext(self.ca, clientCertificate(other)), server, wire, self.clock
        )
        peer.pump()
        lost(server)
        self.assertEqual(len(self.logLines()), 1)
        status, _protocol, name, verify = self.logLines()[0].split(" ", 3)
        self.assertEqual((status, name), ("403", "example.com"))
        self.assertEqual(verify, "FAILED:unable to get local issuer certificate")

    def test_backpressureThroughTLS(self) -> None:
        """
        Producers registered through C{TLSMemoryBIOProtocol} still pause the
        right transports.
        """
        server, wire = self.tlsRelay(serverContext(self.ca))
        peer = RawTLSClient(clientContext(self.ca), server, wire, self.clock)
        peer.pump()
        _upstream, upstreamTransport, _connection = self.pool.succeed()
        self.assertEqual(wire.producerState, "producing")
        # The socket under TLS is full: the upstream is paused.
        producerOf(wire).pauseProducing()
        self.assertEqual(upstreamTransport.producerState, "paused")
        producerOf(wire).resumeProducing()
        self.assertEqual(upstreamTransport.producerState, "producing")
        # The upstream is full: the socket under TLS is paused.
        self.assertIs(upstreamTransport.producer, server)
        producerOf(upstreamTransport).pauseProducing()
        self.assertEqual(wire.producerState, "paused")

    def test_relayThroughTLS(self) -> None:
        """
        Data the client sends right after the handshake is held, then relayed;
        replies are encrypted back; the log has the TLS facts.
        """
        server, wire = self.tlsRelay(serverContext(self.ca))
        peer = RawTLSClient(clientContext(self.ca), server, wire, self.clock)
        peer.handshakeWithData(b"early")
        self.assertEqual(len(self.pool.attempts), 1)
        upstream, upstreamTransport, _connection = self.pool.succeed()
        self.assertEqual(upstreamTransport.value(), b"early")
        upstream.dataReceived(b"reply")
        peer.pump()
        self.assertEqual(peer.received, b"reply")
        lost(upstream)
        peer.pump()
        self.assertTrue(peer.closeNotify)
        lost(server)
        self.assertEqual(self.logLines(), ["200 TLSv1.3 example.com NONE"])


class ClientCertificateFailureTests(SynchronousTestCase):
    """
    L{_isClientCertificateFailure} tells a handshake that failed on the client's
    certificate (C{403}) from any other failure (C{400}).
    """

    def handshake(
        self, verify: Callable[..., bool], certificate: bool
    ) -> SSL.Connection:
        """
        A server connection after a completed handshake with C{verify} as its
        verify callback, with a client that presents a certificate from another
        CA if C{certificate}.
        """
        ca = certificateAuthority()
        context = serverContext(ca)
        context.set_verify(SSL.VERIFY_PEER, verify)
        client = SSL.Connection(
            clientContext(
                ca, clientCertificate(certificateAuthority()) if certificate else None
            ),
            None,
        )
        client.set_connect_state()
        server = SSL.Connection(context, None)
        server.set_accept_state()
        pumpTLS(client, server)
        return server

    def test_toleratedIsNot(self) -> None:
        """
        A verification error that C{optional_no_ca} tolerated does not make a
        later failure of the same connection a certificate failure (though
        C{$ssl_client_verify} still reports it).
        """
        server = self.handshake(_verifyOptionalNoCA, certificate=True)
        self.assertEqual(verifyResult(server, withTolerated=False)[0], 0)
        self.assertEqual(verifyResult(server)[0], 20)
        self.assertFalse(_isClientCertificateFailure(server, Failure(ConnectionLost())))

    def test_reasons(self) -> None:
        """
        OpenSSL's reasons for a missing or refused client certificate count; a
        client's alert about the server's certificate, other errors and a lost
        connection do not.
        """
        server = self.handshake(_verifyStandard, certificate=False)

        def failed(*reasons: str) -> bool:
            error = SSL.Error([("SSL routines", "", reason) for reason in reasons])
            return _isClientCertificateFailure(server, Failure(error))

        self.assertTrue(failed("peer did not return a certificate"))
        self.assertTrue(failed("unexpected message", "certificate verify failed"))
        self.assertFalse(failed("tls alert bad certificate"))
        self.assertFalse(failed("tlsv13 alert certificate required"))
        self.assertFalse(failed("no shared cipher"))
        self.assertFalse(
            _isClientCertificateFailure(None, Failure(SSL.Error("no ALPN in common")))
        )
        self.assertFalse(_isClientCertificateFailure(None, Failure(ConnectionLost())))


class ReturnTests(RelayTestCase):
    """
    C{return}: answer after the handshake and close, with no upstream.
    """

    def test_returnOverTLS(self) -> None:
        """
        Over an in-memory TLS connection (iosim), the rendered value is sent after
        the handshake, then the connection is closed.
        """
        self.setUpRelay(tls=True, returnValue="$ssl_protocol $ssl_session_reused\n")
        ca = certificateAuthority()
        serverFactory = TLSMemoryBIOFactory(
            ServerCreator(serverContext(ca)), False, self.factory, clock=self.clock
        )
        recorder = Recorder()
        clientFactory = TLSMemoryBIOFactory(
            ClientCreator(clientContext(ca)),
            True,
            ClientFactory.forProtocol(lambda: recorder),
            clock=self.clock,
        )
        _client, _server, pump = connectedServerAndClient(
            lambda: serverFactory.buildProtocol(CLIENT),
            lambda: clientFactory.buildProtocol(LISTENER),
            serverTransportFactory=lambda p: FakeTransport(
                p, True, hostAddress=LISTENER, peerAddress=CLIENT
            ),
            clock=self.clock,
        )
        pump.flush()
        self.assertEqual(recorder.received, b"TLSv1.3 .\n")
        self.assertIsNotNone(recorder.lost)
        self.assertEqual(self.pool.attempts, [])
        [line] = self.logLines()
        self.assertRegex(line, r"^192\.0\.2\.7 \[.*\] TCP 200 10 0 0\.\d{3}$")

    def test_returnPlain(self) -> None:
        """
        On a plain listener, the value is sent at once.
        """
        self.setUpRelay(returnValue="$remote_addr\n")
        client, transport = self.connectClient()
        self.assertEqual(transport.value(), b"192.0.2.7\n")
        self.assertTrue(transport.disconnecting)
        lost(client)
        self.assertEqual(len(self.logLines()), 1)


class AccessLogWriterTests(SynchronousTestCase):
    """
    L{AccessLogWriter}: whole lines, appended, reopened after rotation.
    """

    def test_appendAndReopen(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("old\n")
        writer = AccessLogWriter(path)
        writer.open()
        self.addCleanup(writer.close)
        writer.writeLine("one")
        os.rename(path, path + ".1")
        writer.writeLine("two")
        writer.reopen()
        writer.writeLine("three")
        with open(path + ".1") as f:
            self.assertEqual(f.read(), "old\none\ntwo\n")
        with open(path) as f:
            self.assertEqual(f.read(), "three\n")
        writer.close()
        self.assertFalse(writer.isOpen)
        writer.writeLine("dropped")
        with open(path) as f:
            self.assertEqual(f.read(), "three\n")

    def test_openFails(self) -> None:
        """
        A path that cannot be opened fails at start, loudly.
        """
        writer = AccessLogWriter(os.path.join(self.mktemp(), "missing", "x.log"))
        self.assertRaises(OSError, writer.open)

    def test_writeErrorLoggedOnce(self) -> None:
        """
        A failing write (disk full) is logged once, and never raises.
        """
        if not os.path.exists("/dev/full"):
            self.skipTest("needs /dev/full")
        writer = AccessLogWriter("/dev/full")
        writer.open()
        self.addCleanup(writer.close)
        with capturedLogs() as events:
            writer.writeLine("a")
            writer.writeLine("b")
        self.assertEqual(len(events), 1)

    def test_syslogRejected(self) -> None:
        self.assertRaises(ValueError, AccessLogWriter, "syslog:server=unix:/dev/log")

    def test_files(self) -> None:
        """
        One writer per path, shared.
        """
        files = AccessLogFiles()
        path = self.mktemp()
        self.assertIs(files.writerFor(path), files.writerFor(path))
        files.open()
        self.assertTrue(files.writerFor(path).isOpen)
        files.reopen()
        files.close()
        self.assertFalse(files.writerFor(path).isOpen)
