"""
Tests for L{tlsrelay.testing}, the public helpers other projects' suites use: they
show each helper at work and prove it does what its documentation says.
"""

from __future__ import annotations

import os
import subprocess
import sys

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionRefusedError,
    NoProtocol,
)
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tlsrelay.testing import (
    CannedResponse,
    CertificateAuthority,
    CertificateFiles,
    ConfigError,
    Echo,
    MemoryClientEndpoint,
    MemoryUpstream,
    Recorder,
    RelayFixture,
    connectPending,
    memoryHandshake,
    pendingConnections,
    refusePending,
    relayFromConfig,
)

SERVER = IPv4Address("TCP", "127.0.0.1", 8443)


def echoFactory() -> Factory[Echo]:
    return Factory.forProtocol(Echo)


class CertificateAuthorityTests(SynchronousTestCase):
    """
    L{CertificateAuthority} writes trustme certificates to files and makes TLS
    options that trust its CA.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.ca = CertificateAuthority(self.mktemp())

    def handshake(
        self, serverFiles: CertificateFiles, client: IOpenSSLClientConnectionCreator
    ) -> Recorder:
        """
        Connect a L{Recorder} with the client options C{client} to an in-memory
        TLS echo server presenting C{serverFiles}, and exchange C{ping}.
        """
        server = TLSMemoryBIOFactory(
            self.ca.serverOptions(serverFiles), False, echoFactory(), self.reactor
        )
        endpoint = MemoryClientEndpoint(
            self.reactor,
            server,
            SERVER,
            client,
        )
        recorder = Recorder()
        self.successResultOf(endpoint.connect(Factory.forProtocol(lambda: recorder)))
        recorder.write(b"ping")
        endpoint.connections[0].flush()
        return recorder

    def test_files(self) -> None:
        """
        The CA is written at once, in an absolute directory (C{mktemp} is
        relative), and each certificate goes to C{<name>.pem} and C{<name>.key}
        there.
        """
        self.assertTrue(os.path.isabs(self.ca.directory))
        self.assertTrue(os.path.isfile(self.ca.caFile))
        files = self.ca.issueServerCertificate(name="web")
        self.assertEqual(
            (files.caFile, files.certificate, files.key),
            tuple(
                os.path.join(self.ca.directory, name)
                for name in ("ca.pem", "web.pem", "web.key")
            ),
        )
        self.assertIs(files.ca, self.ca.ca)
        client = self.ca.issueClientCertificate()
        self.assertTrue(os.path.isfile(client.certificate))
        self.assertTrue(os.path.isfile(client.key))

    def test_clientOptionsTrustTheCA(self) -> None:
        """
        C{clientOptions} verify the server against the CA and the server name;
        C{serverOptions} present the certificate.
        """
        files = self.ca.issueServerCertificate(("localhost", "127.0.0.1"))
        recorder = self.handshake(files, self.ca.clientOptions("localhost"))
        self.assertTrue(recorder.handshook)
        self.assertEqual(recorder.received, b"ping")
        recorder = self.handshake(files, self.ca.clientOptions("127.0.0.1"))
        self.assertEqual(recorder.received, b"ping")

    def test_otherCARefused(self) -> None:
        """
        A certificate from another CA is refused by C{clientOptions}.
        """
        other = CertificateAuthority(self.mktemp())
        files = other.issueServerCertificate()
        recorder = self.handshake(files, self.ca.clientOptions())
        self.assertFalse(recorder.handshook)
        self.assertEqual(recorder.received, b"")
        assert recorder.lostReason is not None
        self.assertIsInstance(recorder.lostReason.value, SSL.Error)

    def test_wrongNameRefused(self) -> None:
        """
        A certificate for another name is refused by C{clientOptions}.
        """
        files = self.ca.issueServerCertificate(("other.example",))
        recorder = self.handshake(files, self.ca.clientOptions("localhost"))
        self.assertFalse(recorder.handshook)
        self.assertTrue(recorder.lost)

    def test_memoryHandshake(self) -> None:
        """
        The files work with the existing helpers too: a pyOpenSSL server context
        loaded from them completes L{memoryHandshake}.
        """
        files = self.ca.issueServerCertificate()
        server = SSL.Context(SSL.TLS_METHOD)
        server.use_certificate_chain_file(files.certificate)
        server.use_privatekey_file(files.key)
        client = SSL.Context(SSL.TLS_METHOD)
        client.load_verify_locations(self.ca.caFile)
        client.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        _, clientConnection = memoryHandshake(server, client)
        self.assertIsNotNone(clientConnection.get_peer_certificate())


class ProtocolTests(SynchronousTestCase):
    """
    L{Recorder}, L{Echo} and L{CannedResponse}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_interfaces(self) -> None:
        """
        Each is an L{IProtocol} and an L{IHandshakeListener}.
        """
        for protocol in (Recorder(), Echo(), CannedResponse(b"x")):
            self.assertTrue(verifyObject(IProtocol, protocol))
            self.assertTrue(verifyObject(IHandshakeListener, protocol))

    def connect(
        self, server: IProtocolFactory
    ) -> tuple[Recorder, MemoryClientEndpoint]:
        endpoint = MemoryClientEndpoint(self.reactor, server, SERVER)
        client = self.successResultOf(endpoint.connect(Factory.forProtocol(Recorder)))
        assert isinstance(client, Recorder)
        return client, endpoint

    def test_echo(self) -> None:
        """
        L{Echo} sends back what it receives, and records it.
        """
        client, endpoint = self.connect(echoFactory())
        self.assertTrue(client.made)
        client.write(b"one ")
        client.write(b"two")
        endpoint.connections[0].flush()
        self.assertEqual(client.received, b"one two")
        echo = endpoint.connections[0].server
        assert isinstance(echo, Echo)
        self.assertEqual(echo.received, b"one two")
        self.assertFalse(client.lost)

    def test_cannedResponse(self) -> None:
        """
        L{CannedResponse} sends its response once connected, then closes.
        """
        client, endpoint = self.connect(CannedResponse.forResponse(b"hi"))
        connection = endpoint.connections[0]
        self.assertFalse(connection.disconnected)
        connection.flush()
        self.assertEqual(client.received, b"hi")
        self.assertTrue(client.lost)
        self.assertTrue(connection.disconnected)

    def test_cannedResponseStaysOpen(self) -> None:
        """
        With C{close=False}, L{CannedResponse} keeps the connection open.
        """
        client, endpoint = self.connect(CannedResponse.forResponse(b"hi", close=False))
        endpoint.connections[0].flush()
        self.assertEqual(client.received, b"hi")
        self.assertFalse(client.lost)


class MemoryClientEndpointTests(SynchronousTestCase):
    """
    L{MemoryClientEndpoint} connects in memory to any server factory.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_verifyObject(self) -> None:
        """
        It is an L{IStreamClientEndpoint}.
        """
        endpoint = MemoryClientEndpoint(self.reactor, echoFactory(), SERVER)
        self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))

    def test_addresses(self) -> None:
        """
        The server's transport is at C{serverAddress}, the client's at a
        loopback address of the same family.
        """
        endpoint = MemoryClientEndpoint(self.reactor, echoFactory(), SERVER)
        client = self.successResultOf(endpoint.connect(Factory.forProtocol(Recorder)))
        assert isinstance(client, Recorder) and client.transport is not None
        self.assertEqual(client.transport.getPeer(), SERVER)
        server = endpoint.connections[0].server
        assert isinstance(server, Echo) and server.transport is not None
        self.assertEqual(server.transport.getHost(), SERVER)
        self.assertEqual(server.transport.getPeer(), client.transport.getHost())
        peer = server.transport.getPeer()
        assert isinstance(peer, IPv4Address)
        self.assertEqual(peer.host, "127.0.0.1")

    def test_noProtocol(self) -> None:
        """
        A client factory that builds no protocol fails the connection with
        L{NoProtocol}; a server factory that builds none, with
        L{ConnectionRefusedError}.
        """
        nothing = Factory.forProtocol(Protocol)
        nothing.buildProtocol = lambda addr: None  # type: ignore[method-assign]
        endpoint = MemoryClientEndpoint(self.reactor, echoFactory(), SERVER)
        self.failureResultOf(endpoint.connect(nothing), NoProtocol)
        endpoint = MemoryClientEndpoint(self.reactor, nothing, SERVER)
        self.failureResultOf(
            endpoint.connect(Factory.forProtocol(Recorder)), ConnectionRefusedError
        )
        self.assertEqual(endpoint.connections, [])


class PendingConnectionTests(SynchronousTestCase):
    """
    L{pendingConnections}, L{connectPending} and L{refusePending} act on the
    C{connectTCP} calls recorded by a L{MemoryReactorClock}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def attempt(self, port: int, host: str = "127.0.0.1") -> Deferred[IProtocol]:
        return TCP4ClientEndpoint(self.reactor, host, port).connect(
            Factory.forProtocol(Recorder)
        )

    def test_connect(self) -> None:
        """
        C{connectPending} completes the attempts to a port with protocols of the
        given factory, removes them from the reactor's records, and leaves the
        others pending.
        """
        first = self.attempt(9001)
        other = self.attempt(9002)
        self.assertEqual(
            pendingConnections(self.reactor), [("127.0.0.1", 9001), ("127.0.0.1", 9002)]
        )
        [connection] = connectPending(self.reactor, echoFactory(), port=9001)
        client = self.successResultOf(first)
        assert isinstance(client, Recorder)
        self.assertNoResult(other)
        self.assertEqual(pendingConnections(self.reactor), [("127.0.0.1", 9002)])
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(len(self.reactor.connectors), 1)
        self.assertEqual(
            self.reactor.connectors[0].getDestination(),
            IPv4Address("TCP", "127.0.0.1", 9002),
        )
        client.write(b"ping")
        connection.flush()
        self.assertEqual(client.received, b"ping")
        assert isinstance(connection.server, Echo)
        assert connection.server.transport is not None
        self.assertEqual(
            connection.server.transport.getHost(),
            IPv4Address("TCP", "127.0.0.1", 9001),
        )

    def test_refuse(self) -> None:
        """
        C{refusePending} fails the attempts with L{ConnectionRefusedError}.
        """
        attempt = self.attempt(9001)
        self.assertEqual(refusePending(self.reactor, "127.0.0.1", 9001), 1)
        self.failureResultOf(attempt, ConnectionRefusedError)
        self.assertEqual(pendingConnections(self.reactor), [])
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(refusePending(self.reactor), 0)

    def test_cancelled(self) -> None:
        """
        A cancelled attempt is not pending, and is dropped rather than
        connected.
        """
        attempt = self.attempt(9001)
        attempt.cancel()
        self.failureResultOf(attempt, ConnectingCancelledError)
        self.assertEqual(pendingConnections(self.reactor), [])
        self.assertEqual(connectPending(self.reactor, echoFactory()), [])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_noIOSimAtImport(self) -> None:
        """
        Importing L{tlsrelay.testing} does not import C{twisted.test.iosim}
        (not a public Twisted API); making a connection does.
        """
        script = (
            "import sys, tlsrelay.testing\nprint('twisted.test.iosim' in sys.modules)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.stdout.strip(), "False", result.stderr)


class MemoryUpstreamTests(SynchronousTestCase):
    """
    L{MemoryUpstream} serves factories at addresses for the connections made on
    its reactor, here by the C{tlsrelay-pool:} endpoint.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.upstream = MemoryUpstream(self.reactor)

    def test_poolEndpoint(self) -> None:
        """
        A pool endpoint's connection reaches the served factory, and bytes go
        both ways when flushed.
        """
        self.upstream.serve("127.0.0.1", 9001, echoFactory())
        endpoint = clientFromString(
            self.reactor, r"tlsrelay-pool:servers=127.0.0.1\:9001"
        )
        connecting = endpoint.connect(Factory.forProtocol(Recorder))
        self.assertEqual(self.upstream.pending(), [("127.0.0.1", 9001)])
        self.upstream.flush()
        client = self.successResultOf(connecting)
        assert isinstance(client, Recorder)
        client.write(b"ping")
        self.assertTrue(self.upstream.flush())
        self.assertEqual(client.received, b"ping")
        [connection] = self.upstream.connections
        assert isinstance(connection.server, Echo)
        self.assertEqual(connection.server.received, b"ping")
        self.assertFalse(self.upstream.flush())

    def test_failover(self) -> None:
        """
        Attempts to an address nobody serves stay pending until refused; the
        pool then tries its next server.
        """
        self.upstream.serve("127.0.0.1", 9002, echoFactory())
        endpoint = clientFromString(
            self.reactor,
            r"tlsrelay-pool:servers=127.0.0.1\:9001,127.0.0.1\:9002",
        )
        connecting = endpoint.connect(Factory.forProtocol(Recorder))
        self.upstream.flush()
        self.assertNoResult(connecting)
        self.assertEqual(self.upstream.pending(), [("127.0.0.1", 9001)])
        self.assertEqual(self.upstream.refuse(), 1)
        self.upstream.flush()
        client = self.successResultOf(connecting)
        assert client.transport is not None
        self.assertEqual(
            client.transport.getPeer(), IPv4Address("TCP", "127.0.0.1", 9002)
        )

    def test_stopServing(self) -> None:
        """
        After C{stopServing}, attempts to the address stay pending.
        """
        self.upstream.serve("127.0.0.1", 9001, echoFactory())
        self.upstream.stopServing("127.0.0.1", 9001)
        TCP4ClientEndpoint(self.reactor, "127.0.0.1", 9001).connect(echoFactory())
        self.assertEqual(self.upstream.complete(), [])
        self.assertEqual(self.upstream.pending(), [("127.0.0.1", 9001)])


class RelayFixtureTests(SynchronousTestCase):
    """
    L{relayFromConfig} builds a relay from nginx-syntax text on a
    L{MemoryReactorClock}; clients reach it over TLS in memory, and it reaches a
    L{MemoryUpstream}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.directory = self.mktemp()
        self.ca = CertificateAuthority(self.directory)
        self.files = self.ca.issueServerCertificate()

    def relay(self, servers: str, stream: str = "") -> RelayFixture:
        text = f"""
            stream {{
                log_format test "$status $bytes_received $bytes_sent $upstream_addr"
                                " $ssl_protocol $ssl_server_name";
                ssl_certificate {self.files.certificate};
                ssl_certificate_key {self.files.key};
                access_log access.log test;
                {stream}
                {servers}
            }}
        """
        relay = relayFromConfig(text, self.directory, self.reactor, ca=self.ca)
        self.addCleanup(relay.close)
        return relay

    def test_echoRoundTrip(self) -> None:
        """
        Bytes from a TLS client cross the relay to the upstream, come back from
        the echo server, and the session is logged once the client closes.
        """
        relay = self.relay(
            "server { listen 127.0.0.1:8443 ssl; proxy_pass 127.0.0.1:9000; }"
        )
        relay.upstream.serve("127.0.0.1", 9000, echoFactory())
        client = relay.connect("127.0.0.1:8443")
        client.write(b"ping")
        relay.flush()
        self.assertTrue(client.handshook)
        self.assertEqual(client.received, b"ping")
        [upstream] = relay.upstream.connections
        assert isinstance(upstream.server, Echo)
        self.assertEqual(upstream.server.received, b"ping")
        self.assertEqual(relay.accessLog(), [])
        self.assertEqual(relay.workerConnections.active, 2)

        client.loseConnection()
        relay.flush()
        self.assertTrue(client.lost)
        self.assertTrue(upstream.server.lost)
        self.assertEqual(
            relay.accessLog(), ["200 4 4 127.0.0.1:9000 TLSv1.3 localhost"]
        )
        self.assertEqual(relay.workerConnections.active, 0)

    def test_upstreamClosesFirst(self) -> None:
        """
        An upstream that answers and closes: the client gets the answer, then
        the close.
        """
        relay = self.relay("server { listen 8443 ssl; proxy_pass 127.0.0.1:9000; }")
        relay.upstream.serve("127.0.0.1", 9000, CannedResponse.forResponse(b"hello\n"))
        client = relay.connect(8443)
        relay.flush()
        self.assertEqual(client.received, b"hello\n")
        self.assertTrue(client.lost)
        self.assertEqual(
            relay.accessLog(), ["200 0 6 127.0.0.1:9000 TLSv1.3 localhost"]
        )

    def test_return(self) -> None:
        """
        A C{return} server answers from the session's variables and closes,
        with no upstream connection.
        """
        relay = self.relay(
            'server { listen 127.0.0.1:8443 ssl; return "$ssl_server_name\\n"; }'
        )
        client = relay.connect("127.0.0.1:8443", serverName="localhost")
        relay.flush()
        self.assertEqual(client.received, b"localhost\n")
        self.assertTrue(client.lost)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(relay.accessLog(), ["200 0 10 - TLSv1.3 localhost"])

    def test_plainListener(self) -> None:
        """
        A listener without C{ssl} takes plain connections.
        """
        relay = self.relay('server { listen 127.0.0.1:8080; return "plain"; }')
        client = relay.connect(8080)
        relay.flush()
        self.assertFalse(client.handshook)
        self.assertEqual(client.received, b"plain")

    def test_clientCertificate(self) -> None:
        """
        With C{ssl_verify_client on}, a client presenting a certificate from the
        CA is let through; one without is refused (status 403).
        """
        relay = self.relay(
            f"""
            server {{
                listen 127.0.0.1:8443 ssl;
                ssl_verify_client on;
                ssl_client_certificate {self.ca.caFile};
                return "$ssl_client_verify $ssl_client_s_dn";
            }}
            """
        )
        certificate = self.ca.issueClientCertificate("alice.example")
        client = relay.connect(8443, certificate=certificate)
        relay.flush()
        verify, subject = client.received.split(b" ", 1)
        self.assertEqual(verify, b"SUCCESS")
        self.assertIn(b"CN=alice.example", subject)
        anonymous = relay.connect(8443)
        relay.flush()
        self.assertEqual(anonymous.received, b"")
        self.assertTrue(anonymous.lost)
        self.assertEqual(
            [line.split()[0] for line in relay.accessLog()], ["200", "403"]
        )

    def test_untrustedClient(self) -> None:
        """
        A client that trusts another CA does not complete the handshake: the
        fixture's default client options are what verify the relay.
        """
        relay = self.relay("server { listen 127.0.0.1:8443 ssl; return x; }")
        other = CertificateAuthority(self.mktemp())
        client = relay.connect(8443, creator=other.clientOptions())
        relay.flush()
        self.assertFalse(client.handshook)
        self.assertTrue(client.lost)
        self.assertEqual(client.received, b"")

    def test_upstreamRefused(self) -> None:
        """
        A relay's upstream attempt to an address nobody serves stays pending
        until refused; the client is then closed and the session logged with
        status 502.
        """
        relay = self.relay("server { listen 8443 ssl; proxy_pass 127.0.0.1:9000; }")
        client = relay.connect(8443)
        client.write(b"ping")
        relay.flush()
        self.assertEqual(relay.upstream.pending(), [("127.0.0.1", 9000)])
        self.assertFalse(client.lost)
        relay.upstream.refuse()
        relay.flush()
        self.assertTrue(client.lost)
        self.assertEqual(
            relay.accessLog(), ["502 4 0 127.0.0.1:9000 TLSv1.3 localhost"]
        )

    def test_connectTimeout(self) -> None:
        """
        Timeouts run on the reactor's clock: advancing it past
        C{proxy_connect_timeout} fails the pending upstream attempt.
        """
        relay = self.relay(
            "server { listen 8443 ssl; proxy_pass 127.0.0.1:9000; }",
            stream="proxy_connect_timeout 5s;",
        )
        client = relay.connect(8443)
        relay.flush()
        self.reactor.advance(4.9)
        relay.flush()
        self.assertFalse(client.lost)
        self.reactor.advance(0.2)
        relay.flush()
        self.assertTrue(client.lost)
        self.assertEqual(relay.upstream.pending(), [])
        self.assertEqual(relay.accessLog()[0].split()[0], "502")

    def test_tlsUpstream(self) -> None:
        """
        With C{proxy_ssl on}, the upstream is served by a TLS server factory
        made with the CA's C{serverOptions}, and verified by the relay.
        """
        upstreamFiles = self.ca.issueServerCertificate(
            ("backend.example",), name="backend"
        )
        relay = self.relay(
            f"""
            server {{
                listen 8443 ssl;
                proxy_pass 127.0.0.1:9443;
                proxy_ssl on;
                proxy_ssl_verify on;
                proxy_ssl_name backend.example;
                proxy_ssl_trusted_certificate {self.ca.caFile};
            }}
            """
        )
        relay.upstream.serve(
            "127.0.0.1",
            9443,
            TLSMemoryBIOFactory(
                self.ca.serverOptions(upstreamFiles),
                False,
                echoFactory(),
                self.reactor,
            ),
        )
        client = relay.connect(8443)
        client.write(b"secret")
        relay.flush()
        self.assertEqual(client.received, b"secret")
        [upstream] = relay.upstream.connections
        assert isinstance(upstream.server, TLSMemoryBIOProtocol)
        echo = upstream.server.wrappedProtocol
        assert isinstance(echo, Echo)
        self.assertTrue(echo.handshook)
        self.assertEqual(echo.received, b"secret")

    def test_clientEndpoint(self) -> None:
        """
        C{clientEndpoint} is an L{IStreamClientEndpoint} to a listener, for
        clients of the test's own protocol.
        """
        relay = self.relay("server { listen 127.0.0.1:8443 ssl; return ok; }")
        endpoint = relay.clientEndpoint("127.0.0.1:8443")
        self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))
        client = self.successResultOf(endpoint.connect(Factory.forProtocol(Recorder)))
        relay.flush()
        assert isinstance(client, Recorder)
        self.assertEqual(client.received, b"ok")
        self.assertEqual(relay.connections, endpoint.connections)

    def test_listeners(self) -> None:
        """
        Listeners are named by their address or their port; a name that does
        not pick exactly one is a L{KeyError}; an C{ssl} listener needs the CA
        or client options.
        """
        relay = self.relay(
            "server { listen 127.0.0.1:8443 ssl; listen [::1]:8443 ssl; return x; }"
        )
        self.assertIsNot(relay.factoryFor("[::1]:8443"), None)
        error = self.assertRaises(KeyError, relay.factoryFor, 8443)
        self.assertIn("127.0.0.1:8443, [::1]:8443", str(error))
        self.assertRaises(KeyError, relay.factoryFor, "127.0.0.1:9999")
        relay.ca = None
        self.assertRaises(ValueError, relay.connect, "127.0.0.1:8443")

    def test_ipv6Listener(self) -> None:
        """
        A client reaches an IPv6 listener from an IPv6 address.
        """
        relay = self.relay('server { listen [::1]:8443 ssl; return "$remote_addr"; }')
        client = relay.connect("[::1]:8443")
        relay.flush()
        self.assertEqual(client.received, b"::1")

    def test_upstreamNames(self) -> None:
        """
        Upstream addresses are served as the relay connects to them: IPv6
        literals as they are, host names as C{reactor.nameResolver} resolves
        them (C{MemoryReactorClock}: every name to 127.0.0.1).
        """
        relay = self.relay(
            "upstream backends { server [::1]:9000; server backend.example:9001; }"
            "server { listen 8443 ssl; proxy_pass backends; }"
        )
        relay.upstream.serve("::1", 9000, CannedResponse.forResponse(b"six"))
        relay.upstream.serve("127.0.0.1", 9001, CannedResponse.forResponse(b"four"))
        first = relay.connect(8443)
        relay.flush()
        second = relay.connect(8443)
        relay.flush()
        self.assertEqual((first.received, second.received), (b"six", b"four"))

    def test_accessLogPaths(self) -> None:
        """
        With several access logs, C{accessLog} needs the path, as the
        configuration writes it.
        """
        relay = self.relay(
            "server { listen 8443 ssl; access_log other.log test; return x; }"
            "server { listen 8444 ssl; return y; }"
        )
        self.assertRaises(ValueError, relay.accessLog)
        relay.connect(8443)
        relay.flush()
        self.assertEqual(len(relay.accessLog("other.log")), 1)
        self.assertEqual(relay.accessLog("access.log"), [])

    def test_configError(self) -> None:
        """
        A configuration error names the file and line, as C{--check} does.
        """
        error = self.assertRaises(
            ConfigError,
            relayFromConfig,
            "stream {\n  server { listen 8443; bogus; }\n}\n",
            self.directory,
            self.reactor,
        )
        self.assertEqual(error.line, 2)
        self.assertEqual(error.file, os.path.join(self.ca.directory, "tlsrelay.conf"))

    def test_buildError(self) -> None:
        """
        A configuration that parses but cannot be built (here, a missing key)
        raises L{ConfigError} too.
        """
        error = self.assertRaises(
            ConfigError,
            relayFromConfig,
            "stream { server { listen 8443 ssl; ssl_certificate missing.pem;"
            " ssl_certificate_key missing.key; return x; } }",
            self.directory,
            self.reactor,
        )
        self.assertIn("missing.pem", str(error))

    def test_close(self) -> None:
        """
        C{close} stops the session services (removing a shared session cache's
        files) and closes the access logs; it may be called twice.
        """
        relay = self.relay(
            "server { listen 8443 ssl; return x; }",
            stream="ssl_session_cache shared:SSL:1m;",
        )
        self.assertTrue(relay.sharing.running)
        directory = relay.sharing.directory
        assert directory is not None
        self.assertTrue(os.path.isdir(directory))
        relay.close()
        relay.close()
        self.assertFalse(relay.sharing.running)
        self.assertFalse(os.path.exists(directory))
