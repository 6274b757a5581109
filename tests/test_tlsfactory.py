"""
Tests for the fast paths of L{tlsrelay._tlsfactory}: L{FastTLSProtocol},
L{writeThrough}, L{Deadlines}, and the lean socket transports (L{RelayPort},
L{RelayServer}, L{LeanSocketMixin}, L{TLSServerConnection}).  L{TLSServerFactory}'s handshake timeout
is tested with the endpoints, in C{tests.test_endpoints}.
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import Any

from OpenSSL import SSL
from twisted.internet import error, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests._realreactor import RealReactor, listeningSocket
from tests.test_endpoints import (
    CLIENT_ADDRESS,
    SERVER_ADDRESS,
    Recorder,
    RecorderFactory,
    clientCreator,
    connectTLS,
    makeCertificates,
)
from tlsrelay._config._model import CertificatePair, ServerTLS
from tlsrelay._openssl import _handshake
from tlsrelay._reactor import tuneReactor
from tlsrelay._relay import _tune
from tlsrelay._tls import ServerContextFactory, buildServerContext
from tlsrelay._tlsfactory import (
    _CONNECTION_DONE,
    Deadlines,
    HandshakeTimeoutTLSProtocol,
    RelayPort,
    RelayServer,
    TLSServerConnection,
    TLSServerFactory,
    adoptStreamPort,
    serverConnection,
    writeThrough,
)


class Chunks(Protocol):
    """
    Keeps every chunk it receives, and what ended the connection.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Failure | None = None

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class ChunksFactory(Factory):
    def __init__(self) -> None:
        self.built: list[Chunks] = []

    def buildProtocol(self, addr: Any) -> Chunks:
        protocol = Chunks()
        protocol.factory = self
        self.built.append(protocol)
        return protocol


def relayPort(
    testCase: SynchronousTestCase,
) -> tuple[RealReactor, ChunksFactory, Any, tuple[str, int]]:
    """
    A private epoll reactor with a port adopted by L{adoptStreamPort} for a
    L{ChunksFactory}, stopped after C{testCase}; and the port's address.
    """
    real = RealReactor(testCase)
    app = ChunksFactory()
    listener = listeningSocket()
    port = adoptStreamPort(real.reactor, listener.fileno(), socket.AF_INET, app)
    address: tuple[str, int] = listener.getsockname()
    listener.close()
    testCase.addCleanup(real.stopListening, port)
    return real, app, port, address


class DeadlinesTests(SynchronousTestCase):
    """
    L{Deadlines} times many items with one reactor call, as a C{callLater} each
    would.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.expired: list[str] = []
        self.deadlines: Deadlines[str] = Deadlines(
            self.clock, 10.0, self.expired.append
        )

    def test_tunedReactorKeepsTheCall(self) -> None:
        """
        On a tuned reactor, the reactor call outlives the last item: the next
        item needs no new call, and when the call runs with nothing left it
        ends without another.
        """
        clock: Any = Clock()
        clock._callsSoon = []
        deadlines: Deadlines[str] = Deadlines(clock, 10.0, self.expired.append)
        deadlines.add("a")
        [call] = clock.getDelayedCalls()
        deadlines.discard("a")
        self.assertEqual(clock.getDelayedCalls(), [call])
        clock.advance(4)
        deadlines.add("b")
        self.assertEqual(clock.getDelayedCalls(), [call])
        clock.advance(6)
        self.assertEqual(self.expired, [])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(4)
        self.assertEqual(self.expired, ["b"])
        self.assertEqual(clock.getDelayedCalls(), [])
        deadlines.add("c")
        deadlines.discard("c")
        clock.advance(10)
        self.assertEqual(self.expired, ["b"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_inOrderOnTime(self) -> None:
        """
        Each item expires when its own delay has passed, with one call
        scheduled at a time.
        """
        self.deadlines.add("a")
        self.clock.advance(3)
        self.deadlines.add("b")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.deadlines), 2)
        self.clock.advance(6.75)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.25)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(2.75)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(0.25)
        self.assertEqual(self.expired, ["a", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_discard(self) -> None:
        """
        A discarded item does not expire; discarding the last one leaves no
        call scheduled.
        """
        self.deadlines.add("a")
        self.deadlines.add("b")
        self.deadlines.discard("a")
        self.deadlines.discard("unknown")
        self.clock.advance(10)
        self.assertEqual(self.expired, ["b"])
        self.deadlines.add("c")
        self.deadlines.discard("c")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(self.expired, ["b"])

    def test_addAgain(self) -> None:
        """
        Adding an item again starts its delay again.
        """
        self.deadlines.add("a")
        self.clock.advance(5)
        self.deadlines.add("a")
        self.clock.advance(5)
        self.assertEqual(self.expired, [])
        self.clock.advance(5)
        self.assertEqual(self.expired, ["a"])

    def test_failingCallback(self) -> None:
        """
        An exception from the callback is logged; the other items still
        expire.
        """

        def expired(item: str) -> None:
            if item == "a":
                raise RuntimeError("bug")
            self.expired.append(item)

        deadlines: Deadlines[str] = Deadlines(self.clock, 1.0, expired)
        deadlines.add("a")
        deadlines.add("b")
        with capturedLogs() as events:
            self.clock.advance(1)
        self.assertEqual(self.expired, ["b"])
        [failure] = [e["log_failure"] for e in events if "log_failure" in e]
        self.assertTrue(failure.check(RuntimeError))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ServerConnectionTests(SynchronousTestCase):
    """
    L{serverConnection} makes server-side connections as pyOpenSSL does, and
    registers them for pyOpenSSL's callbacks only where a callback looks.
    """

    def setUp(self) -> None:
        _directory, self.files, _clientFiles = makeCertificates(self)
        self.context = buildServerContext(
            ServerTLS(
                certificates=(CertificatePair(self.files.certificate, self.files.key),)
            )
        )

    def handshake(self, server: SSL.Connection) -> SSL.Connection:
        client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        client.set_connect_state()
        _handshake(client, server)
        return client

    def test_asPyOpenSSLMakesThem(self) -> None:
        """
        Without callbacks that look connections up, a connection has the
        attributes pyOpenSSL's constructor gives, is not registered, and
        serves a handshake and data (it is in the accept state).
        """
        lean = serverConnection(self.context)
        self.assertEqual(set(vars(lean)), set(vars(SSL.Connection(self.context))))
        self.assertNotIn(lean._ssl, SSL.Connection._reverse_mapping)
        client = self.handshake(lean)
        client.send(b"ping")
        lean.bio_write(client.bio_read(65536))
        self.assertEqual(lean.recv(100), b"ping")

    def test_callbacksFindTheirConnection(self) -> None:
        """
        With a verification or ALPN callback, the connection is pyOpenSSL's
        own, which the callback is given.
        """
        seen: list[SSL.Connection] = []

        def select(connection: SSL.Connection, offered: list[bytes]) -> bytes:
            seen.append(connection)
            return offered[0]

        self.context.set_alpn_select_callback(select)
        connection = serverConnection(self.context)
        self.assertIs(SSL.Connection._reverse_mapping[connection._ssl], connection)
        client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        client.set_alpn_protos([b"h2"])
        client.set_connect_state()
        _handshake(client, connection)
        self.assertEqual(seen, [connection])
        self.assertEqual(connection.get_alpn_proto_negotiated(), b"h2")


class FastTLSProtocolTests(SynchronousTestCase):
    """
    L{FastTLSProtocol}, under L{TLSServerFactory}, moves application data the
    way Twisted's TLS layer does, with fewer calls.
    """

    def setUp(self) -> None:
        self.directory, self.files, self.clientFiles = makeCertificates(self)
        self.clock = Clock()
        self.app = ChunksFactory()
        context = buildServerContext(
            ServerTLS(
                certificates=(CertificatePair(self.files.certificate, self.files.key),)
            )
        )
        self.factory = TLSServerFactory(
            ServerContextFactory(context), self.app, 30.0, self.clock
        )

    def connect(self) -> tuple[Any, Any, Any, Any]:
        server, client, clientApp, pump = connectTLS(
            self.factory, clientCreator(self.files), self.clock
        )
        return server, client, clientApp, pump

    def test_largeWrite(self) -> None:
        """
        A write larger than a TLS record (and than the scratch buffers) reaches
        the peer whole and in order.
        """
        server, _client, clientApp, pump = self.connect()
        data = bytes(range(256)) * 4096  # 1 MiB
        server.write(data)
        pump.flush()
        self.assertEqual(clientApp.received, data)

    def test_recordsGathered(self) -> None:
        """
        Several records that arrive together are delivered in fewer, larger
        chunks, in order.
        """
        _server, client, _clientApp, pump = self.connect()
        [app] = self.app.built
        pieces = [bytes([n]) * 10_000 for n in range(6)]
        for piece in pieces:
            client.write(piece)
        pump.flush()
        self.assertEqual(app.received, b"".join(pieces))
        self.assertLess(len(app.chunks), len(pieces))

    def test_buffersRenewed(self) -> None:
        """
        Once the handshake is done, the connection has new, empty memory BIOs
        (the handshake's grown buffers are freed), and data still flows.
        """
        server = self.factory.buildProtocol(SERVER_ADDRESS)
        transport = StringTransport(SERVER_ADDRESS, CLIENT_ADDRESS)
        server.makeConnection(transport)
        tls = server.getHandle()
        before = (tls._into_ssl, tls._from_ssl)
        client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        client.set_connect_state()
        for _ in range(4):
            try:
                client.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                server.dataReceived(client.bio_read(65536))
            except SSL.WantReadError:
                pass
            if transport.value():
                client.bio_write(transport.value())
                transport.clear()
        self.assertTrue(server._handshakeDone)
        self.assertNotEqual(before, (tls._into_ssl, tls._from_ssl))
        client.send(b"after")
        server.dataReceived(client.bio_read(65536))
        self.assertEqual(self.app.built[0].received, b"after")

    def test_writeBeforeHandshake(self) -> None:
        """
        What the application writes before the handshake is done is sent once
        it is.
        """

        class Greeter(Chunks):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(b"hello")

        self.app.buildProtocol = lambda addr: Greeter()  # type: ignore[method-assign]
        _server, _client, clientApp, pump = self.connect()
        pump.flush()
        self.assertEqual(clientApp.received, b"hello")

    def test_closeNotify(self) -> None:
        """
        The application's loseConnection ends TLS cleanly: the peer sees
        close_notify, then the connection closed cleanly on both sides.
        """
        server, _client, clientApp, pump = self.connect()
        server.write(b"bye")
        server.loseConnection()
        pump.flush()
        self.assertEqual(clientApp.received, b"bye")
        [app] = self.app.built
        assert clientApp.lost is not None and app.lost is not None
        self.assertTrue(clientApp.lost.check(ConnectionDone))
        self.assertTrue(app.lost.check(ConnectionDone))

    def test_badRecord(self) -> None:
        """
        A record that does not decrypt ends the connection with the TLS error,
        as Twisted's TLS layer does.
        """
        server, _client, _clientApp, pump = self.connect()
        [app] = self.app.built
        server.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        pump.flush()
        assert app.lost is not None
        self.assertTrue(app.lost.check(SSL.Error))


class WriteThroughTests(SynchronousTestCase):
    """
    L{writeThrough} sends at once on an idle socket transport, and otherwise
    writes as the transport's C{write} does.
    """

    def setUp(self) -> None:
        self.real, self.app, self.port, address = relayPort(self)
        self.client = socket.create_connection(address, timeout=5)
        self.addCleanup(self.client.close)
        self.real.spin(lambda: self.app.built and self.app.built[0].transport)
        self.transport: Any = self.app.built[0].transport

    def receive(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            self.real.reactor.iterate(0)
            chunk = self.client.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    def test_notASocket(self) -> None:
        """
        Any other transport gets the data through C{write}, as bytes.
        """
        transport = StringTransport()
        writeThrough(transport, memoryview(b"abc"))
        writeThrough(transport, b"def")
        self.assertEqual(transport.value(), b"abcdef")

    def test_sentAtOnce(self) -> None:
        """
        With nothing queued, the data is sent before the call returns: nothing
        is left for the reactor to write.
        """
        writeThrough(self.transport, b"x" * 1000)
        self.assertEqual(self.transport._tempDataLen, 0)
        self.assertNotIn(self.transport, self.real.reactor.getWriters())
        self.assertEqual(self.receive(1000), b"x" * 1000)

    def test_behindQueued(self) -> None:
        """
        Data already queued goes first.
        """
        self.transport.write(b"first ")
        writeThrough(self.transport, b"second")
        self.assertEqual(self.receive(12), b"first second")


class LeanSocketTests(SynchronousTestCase):
    """
    L{adoptStreamPort} gives TCP listeners L{RelayPort}s, whose connections are
    L{RelayServer}s: they read more at once, and close without waiting for a
    writable event when nothing is left to write.
    """

    def setUp(self) -> None:
        self.real, self.app, self.port, self.address = relayPort(self)

    def connect(self) -> tuple[socket.socket, Chunks]:
        client = socket.create_connection(self.address, timeout=5)
        self.addCleanup(client.close)
        count = len(self.app.built)
        self.real.spin(lambda: len(self.app.built) > count)
        return client, self.app.built[-1]

    def test_port(self) -> None:
        """
        The port is a L{RelayPort}; its connections are L{RelayServer}s that
        read up to C{readSize} at once, and deliver everything.
        """
        self.assertIsInstance(self.port, RelayPort)
        client, app = self.connect()
        transport: Any = app.transport
        self.assertIsInstance(transport, RelayServer)
        self.assertGreater(RelayServer.readSize, transport.bufferSize)
        data = bytes(range(256)) * 1024
        client.sendall(data)
        self.real.spin(lambda: len(app.received) == len(data))
        self.assertEqual(app.received, data)

    def test_likeTwisted(self) -> None:
        """
        A L{RelayServer} starts as Twisted's C{tcp.Server} does: non-blocking,
        read, with its log prefix, its representation and its peer.
        """
        client, app = self.connect()
        transport: Any = app.transport
        self.assertIn(transport, self.real.reactor.getReaders())
        self.assertFalse(transport.socket.getblocking())
        self.assertEqual(transport.connected, 1)
        self.assertEqual(
            (transport.disconnected, transport.disconnecting, transport.dataBuffer),
            (0, 0, b""),
        )
        self.assertEqual((transport._tempDataBuffer, transport._tempDataLen), ([], 0))
        host, port = client.getsockname()
        self.assertEqual(transport.getPeer(), IPv4Address("TCP", host, port))
        self.assertEqual(transport.hostname, host)
        self.assertEqual(transport.logstr, f"Chunks,{transport.sessionno},{host}")
        self.assertEqual(
            repr(transport),
            f"<Chunks #{transport.sessionno} on {self.port.getHost().port}>",
        )

    def test_producers(self) -> None:
        """
        Producers register and unregister as on Twisted's transports: one at
        a time, and a pull producer is asked for data at once.
        """
        _, app = self.connect()
        transport: Any = app.transport
        producer = StringTransport()
        transport.registerProducer(producer, True)
        self.assertIs(transport.producer, producer)
        self.assertTrue(transport.streamingProducer)
        self.assertRaises(RuntimeError, transport.registerProducer, producer, True)
        transport.unregisterProducer()
        self.assertIsNone(transport.producer)
        pulled: list[None] = []

        class Pull:
            def resumeProducing(self) -> None:
                pulled.append(None)

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Pull(), False)
        self.assertEqual(pulled, [None])
        self.assertFalse(transport.streamingProducer)
        transport.unregisterProducer()
        # Unregistering from a transport closing with data queued lets the
        # queue drain and the connection close.
        transport.registerProducer(producer, True)
        transport.write(b"x" * 4)
        transport.loseConnection()
        transport.unregisterProducer()
        self.real.spin(lambda: app.lost is not None)

    def test_doneFailure(self) -> None:
        """
        The failure transports are closed with answers C{check} as
        C{Failure.check} does, for classes and qualified names.
        """
        mine = _CONNECTION_DONE
        twisted = Failure(ConnectionDone())
        for errorTypes in (
            (ConnectionDone,),
            (ConnectionLost, ConnectionDone),
            (error.ConnectionAborted,),
            (Exception,),
            ("twisted.internet.error.ConnectionDone",),
            ("builtins.ValueError",),
            (),
        ):
            self.assertEqual(mine.check(*errorTypes), twisted.check(*errorTypes))

    def test_quickClose(self) -> None:
        """
        With nothing to write, loseConnection stops reading and writing at
        once, and the connection is lost (cleanly) on the next turn of the
        reactor.
        """
        client, app = self.connect()
        transport: Any = app.transport
        transport.loseConnection()
        self.assertNotIn(transport, self.real.reactor.getWriters())
        self.assertNotIn(transport, self.real.reactor.getReaders())
        self.assertIsNone(app.lost)
        self.real.spin(lambda: app.lost is not None)
        assert app.lost is not None
        self.assertTrue(app.lost.check(ConnectionDone))
        self.assertEqual(client.recv(10), b"")

    def test_closeWithUnreadData(self) -> None:
        """
        A connection closed with data it never read still ends with the end
        of the stream first (not only a reset), so that the peer reads what
        was sent to it.
        """
        client, app = self.connect()
        transport: Any = app.transport
        transport.pauseProducing()
        client.sendall(b"never read")
        transport.write(b"answer")
        self.real.spin(lambda: not transport._tempDataLen and not transport.dataBuffer)
        transport.loseConnection()
        self.real.spin(lambda: app.lost is not None)
        self.assertEqual(client.recv(100), b"answer")
        self.assertEqual(client.recv(100), b"")

    def test_endOfStreamCloses(self) -> None:
        """
        The peer's end of stream closes a connection whose protocol cannot be
        half-closed, with close(2) alone (nothing is left to read), and the
        peer sees a clean end of stream.
        """
        client, app = self.connect()
        transport: Any = app.transport
        client.sendall(b"bye")
        client.shutdown(socket.SHUT_WR)
        self.real.spin(lambda: app.lost is not None)
        assert app.lost is not None
        self.assertTrue(app.lost.check(ConnectionDone))
        self.assertEqual(app.received, b"bye")
        self.assertIs(transport._shouldShutdown, False)
        self.assertEqual(client.recv(10), b"")

    def test_closeAfterWriting(self) -> None:
        """
        With data queued, loseConnection writes it first, as Twisted does.
        """
        client, app = self.connect()
        transport: Any = app.transport
        transport.write(b"last words")
        transport.loseConnection()
        self.assertIn(transport, self.real.reactor.getWriters())
        self.real.spin(lambda: app.lost is not None)
        data = b""
        while chunk := client.recv(100):
            data += chunk
        self.assertEqual(data, b"last words")

    def waiting(self, count: int) -> list[socket.socket]:
        """
        C{count} connections made and waiting to be accepted.
        """
        clients = [
            socket.create_connection(self.address, timeout=5) for _ in range(count)
        ]
        for client in clients:
            self.addCleanup(client.close)
        return clients

    def test_oneAcceptPerEvent(self) -> None:
        """
        Without C{multi_accept} (nginx's default), a readable event accepts one
        waiting connection; the next event accepts the next.
        """
        self.assertFalse(self.port.multiAccept)
        self.waiting(3)
        self.port.doRead()
        self.assertEqual(len(self.app.built), 1)
        self.port.doRead()
        self.assertEqual(len(self.app.built), 2)

    def test_multiAccept(self) -> None:
        """
        With C{multi_accept}, one readable event accepts every waiting
        connection.
        """
        real = RealReactor(self)
        app = ChunksFactory()
        listener = listeningSocket()
        port = adoptStreamPort(
            real.reactor, listener.fileno(), socket.AF_INET, app, multiAccept=True
        )
        self.address = listener.getsockname()
        listener.close()
        self.addCleanup(real.stopListening, port)
        self.assertTrue(port.multiAccept)
        self.waiting(3)
        port.doRead()
        self.assertEqual(len(app.built), 3)

    def test_acceptSeveral(self) -> None:
        """
        Each protocol is built for its client's address, which its transport's
        C{getPeer} returns (the same object each time), with a log prefix
        naming the protocol.
        """
        clients = [socket.create_connection(self.address, timeout=5) for _ in range(3)]
        for client in clients:
            self.addCleanup(client.close)
        self.real.spin(lambda: len(self.app.built) == 3)
        self.assertEqual(
            sorted(
                (p.transport.getPeer().host, p.transport.getPeer().port)  # type: ignore[union-attr]
                for p in self.app.built
            ),
            sorted(c.getsockname() for c in clients),
        )
        transport: Any = self.app.built[0].transport
        self.assertIs(transport.getPeer(), transport.getPeer())
        # The log prefix is made when first asked for, not with the connection.
        self.assertNotIn("_logstr", vars(transport))
        self.assertIn("Chunks", transport.logPrefix())
        self.assertIn("_logstr", vars(transport))
        port = self.port.getHost().port  # type: ignore[attr-defined]
        self.assertEqual(repr(transport), f"<Chunks #{transport.sessionno} on {port}>")
        self.assertNotEqual(
            self.app.built[0].transport.logPrefix(),  # type: ignore[union-attr]
            self.app.built[1].transport.logPrefix(),  # type: ignore[union-attr]
        )

    def test_refusedByFactory(self) -> None:
        """
        A connection the factory builds no protocol for is closed, and the
        port goes on accepting.
        """
        refuse = [True]
        build = self.app.buildProtocol

        def buildProtocol(addr: Any) -> Chunks | None:
            if refuse.pop() if refuse else False:
                return None
            return build(addr)

        self.app.buildProtocol = buildProtocol  # type: ignore[method-assign,assignment]
        first = socket.create_connection(self.address, timeout=5)
        self.addCleanup(first.close)
        self.real.spin(lambda: not refuse)
        self.assertEqual(first.recv(10), b"")
        _, app = self.connect()
        self.assertIsInstance(app.transport, RelayServer)

    def test_acceptErrorLeftToTwisted(self) -> None:
        """
        An accept error other than "nothing waiting" (here C{EMFILE}) is
        handled by Twisted's accept loop, which knows how to recover.
        """
        calls: list[object] = []
        self.patch(tcp.Port, "doRead", lambda port: calls.append(port))
        listener: Any = self.port.socket  # type: ignore[attr-defined]

        class Exhausted:
            def _accept(self) -> Any:
                raise OSError(errno.EMFILE, "Too many open files")

            def __getattr__(self, name: str) -> Any:
                return getattr(listener, name)

        self.port.socket = Exhausted()  # type: ignore[attr-defined]
        self.addCleanup(setattr, self.port, "socket", listener)
        self.port.doRead()  # type: ignore[attr-defined]
        self.assertEqual(calls, [self.port])

    def test_closesShareOneTimedCall(self) -> None:
        """
        Connections closed in the same turn of the reactor share one timed
        call, and each is lost on the next turn.
        """
        first = self.connect()[1]
        second = self.connect()[1]
        before = len(self.real.reactor.getDelayedCalls())
        first.transport.loseConnection()  # type: ignore[union-attr]
        second.transport.loseConnection()  # type: ignore[union-attr]
        self.assertEqual(len(self.real.reactor.getDelayedCalls()), before + 1)
        self.assertIsNone(first.lost)
        self.real.spin(lambda: first.lost is not None and second.lost is not None)

    def test_halfClose(self) -> None:
        """
        A protocol that provides C{IHalfCloseableProtocol} is told that its
        peer stopped sending, and the connection stays open for writing; a
        protocol that raises there loses the connection.
        """

        @implementer(IHalfCloseableProtocol)
        class Half(Chunks):
            readClosed = 0

            def readConnectionLost(self) -> None:
                self.readClosed += 1
                if self.readClosed > 1:
                    raise RuntimeError("once is enough")

            def writeConnectionLost(self) -> None:
                pass

        half = Half()
        transport: Any = self.connect()[1].transport
        transport.protocol = half
        half.makeConnection(transport)
        transport.readConnectionLost(Failure(ConnectionDone()))
        self.assertEqual(half.readClosed, 1)
        self.assertIsNone(half.lost)
        transport.readConnectionLost(Failure(ConnectionDone()))
        assert half.lost is not None
        self.assertTrue(half.lost.check(RuntimeError))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_otherReactors(self) -> None:
        """
        A reactor that is not a POSIX one adopts the port itself.
        """
        reactor = MemoryReactor()
        adoptStreamPort(reactor, 7, socket.AF_INET, self.app)
        self.assertEqual(reactor.adoptedPorts, [(7, socket.AF_INET, self.app)])


def _noDelay(skt: Any) -> bool:
    return bool(skt.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class _Recording:
    """
    A socket whose C{setsockopt} calls are recorded.
    """

    def __init__(self, wrapped: socket.socket, calls: list[object]) -> None:
        self._wrapped = wrapped
        self._calls = calls

    def setsockopt(self, *args: object) -> None:
        self._calls.append(args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class TuneTests(SynchronousTestCase):
    """
    The relay's tuning of a real socket transport.
    """

    def test_realSocket(self) -> None:
        """
        A TCP socket transport gets C{TCP_NODELAY} and the relay's buffer
        size.
        """
        real = RealReactor(self)
        app = ChunksFactory()
        listener = listeningSocket()
        self.addCleanup(listener.close)
        port = real.reactor.adoptStreamPort(listener.fileno(), socket.AF_INET, app)
        self.addCleanup(real.stopListening, port)
        transport = self.accepted(real, app, listener.getsockname())
        self.assertNotIsInstance(transport, RelayServer)
        self.assertFalse(_noDelay(transport.socket))
        _tune(transport, 1234)
        self.assertTrue(_noDelay(transport.socket))
        self.assertEqual(transport.bufferSize, 1234)

    def accepted(self, real: RealReactor, app: ChunksFactory, address: Any) -> Any:
        """
        The transport of a client connected to C{address}.
        """
        client = socket.create_connection(address, timeout=5)
        self.addCleanup(client.close)
        real.spin(lambda: app.built)
        return app.built[0].transport

    def test_inherited(self) -> None:
        """
        A L{RelayPort} sets C{TCP_NODELAY} on its listening socket: the
        sockets it accepts have it from there, and L{_tune} leaves them be.
        """
        real, app, port, address = relayPort(self)
        self.assertTrue(port.noDelay)
        self.assertTrue(_noDelay(port.socket))
        transport = self.accepted(real, app, address)
        self.assertIsInstance(transport, RelayServer)
        self.assertTrue(_noDelay(transport.socket))
        calls: list[object] = []
        transport.socket = _Recording(transport.socket, calls)
        _tune(transport, 1234)
        self.assertEqual((calls, transport.bufferSize), ([], 1234))


class _Producer:
    """
    A streaming producer that counts what it is asked.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class TLSServerConnectionTests(SynchronousTestCase):
    """
    On a L{RelayPort}, a L{TLSServerFactory}'s connections are
    L{TLSServerConnection}s: socket and TLS in one transport, which behaves to
    the application as Twisted's TLS layer over a TCP transport does.  Driven
    by a real TLS client (Python's C{ssl}) over loopback.
    """

    def setUp(self) -> None:
        _, self.files, _ = makeCertificates(self)
        self.real = RealReactor(self)
        self.clock = Clock()
        self.app = RecorderFactory(echo=True)
        context = buildServerContext(
            ServerTLS(
                certificates=(CertificatePair(self.files.certificate, self.files.key),)
            )
        )
        self.factory = TLSServerFactory(
            ServerContextFactory(context), self.app, 30.0, self.clock
        )
        listener = listeningSocket()
        self.port = adoptStreamPort(
            self.real.reactor, listener.fileno(), socket.AF_INET, self.factory
        )
        self.address: tuple[str, int] = listener.getsockname()
        listener.close()
        self.addCleanup(self.real.stopListening, self.port)

    def newClient(self) -> ssl.SSLSocket:
        """
        A non-blocking TLS client connected to the port, its handshake not
        started.
        """
        context = ssl.create_default_context(cafile=self.files.caFile)
        raw = socket.create_connection(self.address, timeout=5)
        raw.setblocking(False)
        client = context.wrap_socket(
            raw, server_hostname="localhost", do_handshake_on_connect=False
        )
        self.addCleanup(client.close)
        return client

    def connect(self, handshake: bool = True) -> tuple[ssl.SSLSocket, Recorder]:
        """
        A client connected (and, if C{handshake}, done with its handshake),
        and the application protocol that serves it.
        """
        client = self.newClient()
        count = len(self.app.built)
        self.real.spin(lambda: len(self.app.built) > count)
        app = self.app.built[-1]
        if handshake:
            self.real.spin(lambda: _step(client.do_handshake))
            self.real.spin(lambda: app.handshakes)
        return client, app

    def receive(self, client: ssl.SSLSocket, size: int) -> bytes:
        """
        What the client reads, once C{size} bytes (or the end) came.
        """
        received: list[bytes] = []

        def more() -> bool:
            data = _step(lambda: client.recv(65536))
            if data is None:
                return False
            received.append(data)
            return not data or sum(map(len, received)) >= size

        self.real.spin(more)
        return b"".join(received)

    def test_transport(self) -> None:
        """
        The application's transport is a L{TLSServerConnection}: an
        C{ISSLTransport} with the TLS connection as its handle, the client as
        its peer; bytes pass both ways decrypted; the handshake is told to an
        C{IHandshakeListener}, and its timeout ends with it.
        """
        client, app = self.connect()
        transport: Any = app.transport
        self.assertIsInstance(transport, TLSServerConnection)
        self.assertTrue(ISSLTransport.providedBy(transport))
        self.assertIsInstance(transport.getHandle(), SSL.Connection)
        self.assertIsNone(transport.getPeerCertificate())
        self.assertIsNone(transport.negotiatedProtocol)
        self.assertEqual(transport.getPeer(), IPv4Address("TCP", *client.getsockname()))
        self.assertEqual((app.made, app.handshakes), (True, 1))
        assert self.factory.handshakeDeadlines is not None
        self.assertEqual(len(self.factory.handshakeDeadlines), 0)
        client.sendall(b"ping " * 5000)
        self.assertEqual(self.receive(client, 25000), b"ping " * 5000)
        self.assertEqual(app.received, b"ping " * 5000)

    def test_writeBeforeHandshake(self) -> None:
        """
        What the application writes before the handshake is done is sent,
        encrypted, once it is; C{writeThrough} encrypts too.
        """
        client, app = self.connect(handshake=False)
        transport: Any = app.transport
        transport.write(b"hello ")
        writeThrough(transport, b"there")
        self.real.spin(lambda: _step(client.do_handshake))
        self.assertEqual(self.receive(client, 11), b"hello there")

    def test_loseConnection(self) -> None:
        """
        C{loseConnection} sends close_notify and keeps the connection until
        the client's; then the application hears a clean close.
        """
        client, app = self.connect()
        app.transport.loseConnection()  # type: ignore[union-attr]
        self.assertEqual(self.receive(client, 1), b"")
        self.assertIsNone(app.lost)
        raw = client.unwrap()
        self.addCleanup(raw.close)
        self.real.spin(lambda: app.lost is not None)
        assert app.lost is not None
        self.assertIsInstance(app.lost.value, ConnectionDone)

    def test_loseWriteConnection(self) -> None:
        """
        C{loseWriteConnection} sends close_notify and still delivers what the
        client sends after it.
        """
        client, app = self.connect()
        app.echo = False
        app.transport.loseWriteConnection()  # type: ignore[union-attr]
        self.assertEqual(self.receive(client, 1), b"")
        client.sendall(b"late")
        self.real.spin(lambda: app.received == b"late")
        self.assertIsNone(app.lost)

    def test_clientCloseNotify(self) -> None:
        """
        The client's close_notify is answered with the server's, and the
        connection closes cleanly.
        """
        client, app = self.connect()
        self.real.spin(lambda: _step(client.unwrap) is not None)
        self.real.spin(lambda: app.lost is not None)
        assert app.lost is not None
        self.assertIsInstance(app.lost.value, ConnectionDone)

    def test_readWhenAccepted(self) -> None:
        """
        On a tuned reactor, the client's hello, waiting when its connection is
        accepted, is read in that same turn (as nginx does): the server's
        answer is sent without another turn of the reactor.
        """
        reactor = self.real.reactor
        self.assertTrue(tuneReactor(reactor))
        client = self.newClient()
        self.assertIsNone(_step(client.do_handshake))
        reactor.doIteration(5.0)
        app = self.app.built[-1]
        # The server answered in that one turn: the client completes its
        # handshake without another.
        client.settimeout(5)
        client.do_handshake()
        client.sendall(b"hello")
        client.setblocking(False)
        self.real.spin(lambda: app.received == b"hello")
        self.assertEqual(app.handshakes, 1)

    def test_closedWhenRead(self) -> None:
        """
        The close_notify that completes the shutdown closes the connection in
        the reactor turn that reads it (with nothing left to send), not on a
        later one; the socket is unregistered and closed (without shutdown(2):
        nothing was left unread), and the application hears a clean close.
        """
        client, app = self.connect()
        transport: Any = app.transport
        app.transport.loseConnection()  # type: ignore[union-attr]
        self.assertEqual(self.receive(client, 1), b"")
        self.assertIsNone(app.lost)
        raw = client.unwrap()
        self.addCleanup(raw.close)
        reactor = self.real.reactor
        # One turn: the close_notify is on loopback already.
        reactor.doIteration(5.0)
        assert app.lost is not None
        self.assertIsInstance(app.lost.value, ConnectionDone)
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())
        self.assertFalse(hasattr(transport, "socket"))
        # Nothing was left unread: closed with close(2) alone, the end of the
        # stream (not a reset) reaches the client.
        self.assertIs(transport._shouldShutdown, False)
        self.assertEqual(raw.recv(1), b"")

    def test_truncated(self) -> None:
        """
        A client that closes TCP without close_notify: what it sent first is
        delivered, and (with C{OP_IGNORE_UNEXPECTED_EOF}, as nginx sets it) the
        close is a clean one.
        """
        client, app = self.connect()
        client.sendall(b"last")
        client.close()
        self.real.spin(lambda: app.lost is not None)
        assert app.lost is not None
        self.assertEqual(app.received, b"last")
        self.assertIsInstance(app.lost.value, ConnectionDone)

    def test_notTLS(self) -> None:
        """
        Bytes that are not TLS close that connection with the TLS error; the
        port serves the next client.
        """
        plain = socket.create_connection(self.address, timeout=5)
        self.addCleanup(plain.close)
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        self.real.spin(lambda: self.app.built and self.app.built[-1].lost is not None)
        lost = self.app.built[-1].lost
        assert lost is not None
        self.assertIsInstance(lost.value, SSL.Error)
        client, _ = self.connect()
        client.sendall(b"still")
        self.assertEqual(self.receive(client, 5), b"still")

    def test_handshakeTimeout(self) -> None:
        """
        A client that does not finish its handshake in time is aborted, and
        the transport says it timed out.
        """
        _, app = self.connect(handshake=False)
        with capturedLogs() as events:
            self.clock.advance(31)
        self.assertTrue(app.transport.timedOut)  # type: ignore[union-attr]
        self.assertIn("timed out", events[-1]["log_format"])
        self.assertEqual(events[-1]["timeout"], 30.0)
        self.real.spin(lambda: app.lost is not None)
        assert app.lost is not None
        self.assertIsInstance(app.lost.value, error.ConnectionAborted)

    def test_producers(self) -> None:
        """
        A streaming producer is registered (behind Twisted's membrane unless it
        is a socket transport), one at a time; a close waits for it to be
        unregistered before close_notify.
        """
        client, app = self.connect()
        transport: Any = app.transport
        producer = _Producer()
        transport.registerProducer(producer, True)
        self.assertIsNot(transport.producer, producer)
        self.assertRaises(RuntimeError, transport.registerProducer, _Producer(), True)
        transport.producer.pauseProducing()
        transport.producer.pauseProducing()
        self.assertEqual(producer.calls, ["pause"])
        transport.loseConnection()
        self.assertTrue(transport.tlsClosing)
        transport.write(b"while producing")
        self.assertEqual(self.receive(client, 15), b"while producing")
        transport.unregisterProducer()
        self.assertIsNone(transport.producer)
        self.assertEqual(self.receive(client, 1), b"")
        upstream = RelayServer(
            socket.socket(),
            Protocol(),
            ("127.0.0.1", 1),
            self.port,
            0,
            self.real.reactor,
        )
        self.addCleanup(upstream.socket.close)
        self.addCleanup(self.real.reactor.removeReader, upstream)
        _, otherApp = self.connect()
        otherTransport: Any = otherApp.transport
        otherTransport.registerProducer(upstream, True)
        self.assertIs(otherTransport.producer, upstream)

    def test_otherProtocols(self) -> None:
        """
        A factory whose protocol is not L{HandshakeTimeoutTLSProtocol} keeps
        the TLS layer over a L{RelayServer}.
        """

        class Own(HandshakeTimeoutTLSProtocol):
            pass

        self.factory.protocol = Own
        client, app = self.connect()
        self.assertIsInstance(app.transport, Own)
        client.sendall(b"layered")
        self.assertEqual(self.receive(client, 7), b"layered")


def _step(action: Any) -> Any:
    """
    C{action()}, or L{None} if the non-blocking TLS socket would block.
    """
    try:
        result = action()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return None
    return True if result is None else result
