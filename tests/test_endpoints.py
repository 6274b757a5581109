"""
Tests for L{tlsrelay._tlsfactory}, L{tlsrelay.endpoints}, L{tlsrelay._parsers} and
the C{tlsrelay:} endpoint plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa as rsaKeys
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    quoteStringArgument,
    serverFromString,
)
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.plugin import IPlugin, getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests._iosim import FakeTransport, IOPump, connect
from tlsrelay._config._model import CertificatePair, ServerTLS, SessionCache
from tlsrelay._openssl import applyConfCommands, sessionReused
from tlsrelay._parsers import (
    SERVER_KEYWORDS,
    TLSRelayServerParser,
    innerDescription,
    serverTLSFromKeywords,
)
from tlsrelay._tls import ServerContextFactory, buildServerContext
from tlsrelay._tlsfactory import TLSServerFactory
from tlsrelay.endpoints import TLSRelayServerEndpoint
from tlsrelay.testing import (
    CertificateFiles,
    WithClientCertificate,
    memoryHandshake,
    writeCertificates,
)

SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 8443)
CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.7", 51234)


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """
    Records what happens to it; echoes what it receives when C{echo} is set.
    """

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.made = False
        self.handshakes = 0
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo and self.transport is not None:
            self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class RecorderFactory(Factory):
    """
    Builds L{Recorder}s and keeps them.
    """

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        protocol = Recorder(self.echo)
        protocol.factory = self
        self.built.append(protocol)
        return protocol


def readBytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def clientCreator(
    files: CertificateFiles,
    clientFiles: CertificateFiles | None = None,
    alpn: list[bytes] | None = None,
) -> Any:
    """
    Twisted's client TLS options trusting C{files}' CA, presenting
    C{clientFiles}' certificate if given.
    """
    options = optionsForClientTLS(
        "localhost",
        trustRoot=Certificate.loadPEM(readBytes(files.caFile)),
        acceptableProtocols=alpn,
    )
    if clientFiles is None:
        return options
    return WithClientCertificate.fromFiles(options, clientFiles)


def connectTLS(
    serverFactory: IProtocolFactory,
    creator: Any,
    clock: Clock,
) -> tuple[Any, Any, Recorder, IOPump]:
    """
    Connect a TLS client to a protocol of C{serverFactory} in memory and pump
    until neither side has anything to say.

    @return: the server protocol, the client TLS protocol, the client's
        application protocol, and the pump.
    """
    server = serverFactory.buildProtocol(SERVER_ADDRESS)
    clientApp = Recorder()
    client = TLSMemoryBIOFactory(
        creator, True, Factory.forProtocol(lambda: clientApp), clock
    ).buildProtocol(CLIENT_ADDRESS)
    pump = connect(
        server,
        FakeTransport(server, True, SERVER_ADDRESS, CLIENT_ADDRESS),
        client,
        FakeTransport(client, False, CLIENT_ADDRESS, SERVER_ADDRESS),
        clock=clock,
    )
    return server, client, clientApp, pump


def connectPlain(
    serverFactory: IProtocolFactory, clock: Clock
) -> tuple[Any, Recorder, IOPump]:
    """
    Connect a client that speaks no TLS at all.
    """
    server = serverFactory.buildProtocol(SERVER_ADDRESS)
    client = Recorder()
    pump = connect(
        server,
        FakeTransport(server, True, SERVER_ADDRESS, CLIENT_ADDRESS),
        client,
        FakeTransport(client, False, CLIENT_ADDRESS, SERVER_ADDRESS),
        clock=clock,
    )
    return server, client, pump


def makeCertificates(
    testCase: SynchronousTestCase,
) -> tuple[str, CertificateFiles, CertificateFiles]:
    """
    A fresh directory with a server certificate and a client one from the same
    CA.
    """
    directory = os.path.abspath(testCase.mktemp())
    files = writeCertificates(directory)
    clientFiles = writeCertificates(
        directory, ("client.example",), ca=files.ca, prefix="client"
    )
    return directory, files, clientFiles


class TLSServerFactoryTests(SynchronousTestCase):
    """
    L{TLSServerFactory} terminates TLS for any factory and drops clients that do
    not finish their handshake in time.
    """

    def setUp(self) -> None:
        self.directory, self.files, self.clientFiles = makeCertificates(self)
        self.clock = Clock()
        self.app = RecorderFactory(echo=True)
        self.contextFactory = ServerContextFactory(
            buildServerContext(
                ServerTLS(
                    certificates=(
                        CertificatePair(self.files.certificate, self.files.key),
                    )
                )
            )
        )
        self.factory = TLSServerFactory(self.contextFactory, self.app, 30.0, self.clock)

    def test_interfaces(self) -> None:
        """
        The factory and its protocols provide the interfaces Twisted expects.
        """
        self.assertTrue(verifyObject(IProtocolFactory, self.factory))
        protocol = self.factory.buildProtocol(SERVER_ADDRESS)
        self.assertTrue(verifyObject(IProtocol, protocol))
        self.assertIs(self.factory.clock, self.clock)
        self.assertEqual(self.factory.handshakeTimeout, 30.0)

    def test_handshakeAndEcho(self) -> None:
        """
        A client completes the handshake and its bytes reach the wrapped
        protocol decrypted; the handshake timer is cancelled, so the connection
        outlives the timeout.
        """
        server, client, clientApp, pump = connectTLS(
            self.factory, clientCreator(self.files), self.clock
        )
        [app] = self.app.built
        self.assertEqual(app.handshakes, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        client.write(b"hello")
        pump.flush()
        self.assertEqual(app.received, b"hello")
        self.assertEqual(clientApp.received, b"hello")
        self.clock.advance(3600)
        pump.flush()
        self.assertIsNone(app.lost)
        self.assertFalse(server.transport.disconnecting)

    def test_handshakeTimeout(self) -> None:
        """
        A client that sends nothing is aborted when the handshake timeout
        passes, and the abort is logged at info with its address.
        """
        transport = StringTransport(SERVER_ADDRESS, CLIENT_ADDRESS)
        protocol = self.factory.buildProtocol(SERVER_ADDRESS)
        with capturedLogs() as events:
            protocol.makeConnection(transport)
            self.clock.advance(29.999)
            self.assertFalse(transport.disconnecting)
            self.clock.advance(0.001)
        self.assertTrue(transport.disconnected, "the connection was not aborted")
        timedOut = [e for e in events if "timed out" in e.get("log_format", "")]
        self.assertEqual(len(timedOut), 1)
        self.assertEqual(timedOut[0]["log_level"], LogLevel.info)
        self.assertEqual(timedOut[0]["peer"], "192.0.2.7:51234")
        self.assertEqual(timedOut[0]["timeout"], 30.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_silentClientDropped(self) -> None:
        """
        Through a connection pump: a silent client is disconnected at the
        timeout and the application sees the connection lost.
        """
        _server, client, pump = connectPlain(self.factory, self.clock)
        [app] = self.app.built
        self.clock.advance(30)
        pump.flush()
        self.assertIsNotNone(app.lost)
        self.assertIsNotNone(client.lost)

    def test_slowHandshakeDropped(self) -> None:
        """
        A client that starts its handshake but does not finish it is dropped
        too: the timer runs from the connection, not from the last byte.
        """
        _server, client, pump = connectPlain(self.factory, self.clock)
        hello = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        hello.set_connect_state()
        try:
            hello.do_handshake()
        except SSL.WantReadError:
            pass
        assert client.transport is not None
        client.transport.write(hello.bio_read(65536))
        pump.flush()
        self.assertIsNone(self.app.built[0].lost)
        self.clock.advance(30)
        pump.flush()
        self.assertIsNotNone(self.app.built[0].lost)

    def test_timerCancelledOnConnectionLost(self) -> None:
        """
        A client that goes away before the handshake leaves no timer behind.
        """
        _server, client, pump = connectPlain(self.factory, self.clock)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        assert client.transport is not None
        client.transport.loseConnection()
        pump.flush()
        self.assertIsNotNone(self.app.built[0].lost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_garbage(self) -> None:
        """
        Bytes that are not TLS make the TLS layer close that connection, with
        no timer left; the factory goes on serving the next client.
        """
        transport = StringTransport(SERVER_ADDRESS, CLIENT_ADDRESS)
        protocol = self.factory.buildProtocol(SERVER_ADDRESS)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(Exception("closed")))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        [garbageApp] = self.app.built
        self.assertEqual(garbageApp.received, b"")
        assert garbageApp.lost is not None
        self.assertTrue(garbageApp.lost.check(SSL.Error))

        _server, client, clientApp, pump = connectTLS(
            self.factory, clientCreator(self.files), self.clock
        )
        client.write(b"still serving")
        pump.flush()
        self.assertEqual(clientApp.received, b"still serving")

    def test_garbageThroughPump(self) -> None:
        """
        The same through a connection pump: the client sees the connection
        close.
        """
        _server, client, pump = connectPlain(self.factory, self.clock)
        assert client.transport is not None
        client.transport.write(os.urandom(512))
        pump.flush()
        self.assertIsNotNone(client.lost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noTimeout(self) -> None:
        """
        With a timeout of L{None} no timer is set.
        """
        factory = TLSServerFactory(self.contextFactory, self.app, None, self.clock)
        protocol = factory.buildProtocol(SERVER_ADDRESS)
        protocol.makeConnection(StringTransport(SERVER_ADDRESS, CLIENT_ADDRESS))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_negativeTimeout(self) -> None:
        """
        A negative timeout is a mistake.
        """
        self.assertRaises(
            ValueError, TLSServerFactory, self.contextFactory, self.app, -1, self.clock
        )


class TLSRelayServerEndpointTests(SynchronousTestCase):
    """
    L{TLSRelayServerEndpoint} listens on its inner endpoint with TLS.
    """

    def setUp(self) -> None:
        self.directory, self.files, self.clientFiles = makeCertificates(self)
        self.reactor = MemoryReactorClock()
        self.contextFactory = ServerContextFactory(
            buildServerContext(
                ServerTLS(
                    certificates=(
                        CertificatePair(self.files.certificate, self.files.key),
                    )
                )
            )
        )
        self.endpoint = TLSRelayServerEndpoint(
            TCP4ServerEndpoint(self.reactor, 8443, interface="127.0.0.1"),
            self.contextFactory,
            10.0,
            self.reactor,
        )

    def test_verifyObject(self) -> None:
        """
        L{TLSRelayServerEndpoint} is an L{IStreamServerEndpoint}.
        """
        self.assertTrue(verifyObject(IStreamServerEndpoint, self.endpoint))

    def test_listen(self) -> None:
        """
        C{listen} listens on the inner endpoint with a L{TLSServerFactory} around
        the application's factory, whose connections speak TLS.
        """
        app = RecorderFactory(echo=True)
        self.successResultOf(self.endpoint.listen(app))
        [(port, factory, _backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (8443, "127.0.0.1"))
        assert isinstance(factory, TLSServerFactory)
        self.assertIs(factory.wrappedFactory, app)
        self.assertEqual(factory.handshakeTimeout, 10.0)
        self.assertIs(factory.clock, self.reactor)

        _server, client, clientApp, pump = connectTLS(
            factory, clientCreator(self.files), self.reactor
        )
        client.write(b"ping")
        pump.flush()
        self.assertEqual(clientApp.received, b"ping")


class ParserTests(SynchronousTestCase):
    """
    The C{tlsrelay:} endpoint string.
    """

    def setUp(self) -> None:
        self.directory, self.files, self.clientFiles = makeCertificates(self)
        self.reactor = MemoryReactorClock()
        cwd = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, cwd)

    def parse(self, description: str) -> TLSRelayServerEndpoint:
        endpoint = serverFromString(self.reactor, description)
        self.assertIsInstance(endpoint, TLSRelayServerEndpoint)
        return endpoint  # type: ignore[no-any-return]

    def assertParseError(self, description: str, *fragments: str) -> str:
        error = self.assertRaises(
            ValueError, serverFromString, self.reactor, description
        )
        message = str(error)
        self.assertTrue(message.startswith("tlsrelay endpoint: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def listenAndConnect(
        self,
        endpoint: TLSRelayServerEndpoint,
        creator: Any,
    ) -> tuple[Any, Any, Recorder, IOPump]:
        self.successResultOf(endpoint.listen(RecorderFactory(echo=True)))
        factory = self.reactor.tcpServers[-1][1]
        return connectTLS(factory, creator, self.reactor)

    def test_verifyObject(self) -> None:
        """
        The parser is a plugin that parses server endpoint strings.
        """
        parser = TLSRelayServerParser()
        self.assertTrue(verifyObject(IPlugin, parser))
        self.assertTrue(verifyObject(IStreamServerEndpointStringParser, parser))
        self.assertEqual(parser.prefix, "tlsrelay")

    def test_pluginDiscovery(self) -> None:
        """
        Twisted finds the parser among its endpoint plugins with the prefix
        C{tlsrelay}, and the plugin module holds nothing but the parser.
        """
        found = [
            plugin
            for plugin in getPlugins(IStreamServerEndpointStringParser)
            if isinstance(plugin, TLSRelayServerParser)
        ]
        self.assertEqual([p.prefix for p in found], ["tlsrelay"])

        from twisted.plugins import tlsrelay_endpoints

        public = {
            name: value
            for name, value in vars(tlsrelay_endpoints).items()
            if not name.startswith("_")
        }
        self.assertEqual(
            set(public),
            {
                "TLSRelayServerParser",
                "tlsrelayServerParser",
                "TLSRelayPoolParser",
                "tlsrelayPoolParser",
            },
            public,
        )

    def test_lazyImports(self) -> None:
        """
        Loading the plugin (which Twisted does for every application that parses
        an endpoint string) imports neither OpenSSL, nor the configuration, nor
        the reactor.
        """
        code = (
            "import sys\n"
            "import twisted.plugins.tlsrelay_endpoints\n"
            "heavy = ['OpenSSL', 'cryptography', 'twisted.internet.reactor',\n"
            "         'twisted.internet.endpoints', 'tlsrelay._config',\n"
            "         'tlsrelay._tls', 'tlsrelay.endpoints']\n"
            "print(' '.join(m for m in heavy if m in sys.modules))\n"
        )
        output = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        self.assertEqual(output.stdout.strip(), "", output.stderr)

    def test_fullString(self) -> None:
        """
        Every kind of keyword in one string reaches the context: the inner
        endpoint's address, ALPN, client verification and the handshake
        timeout.
        """
        endpoint = self.parse(
            "tlsrelay:tcp\\:8443\\:interface\\=127.0.0.1"
            ":certificate=server.pem:certificateKey=server.key"
            ":protocols=TLSv1.2+TLSv1.3:ciphers=HIGH\\:!aNULL"
            ":sessionCache=shared\\:SSL\\:20m:sessionTimeout=4h:sessionTickets=on"
            ":verifyClient=on:clientCertificate=ca.pem:verifyDepth=2"
            ":handshakeTimeout=30s:alpn=h2+http/1.1"
        )
        self.assertEqual(endpoint.handshakeTimeout, 30.0)
        self.assertIs(endpoint.clock, self.reactor)

        _server, client, clientApp, pump = self.listenAndConnect(
            endpoint, clientCreator(self.files, self.clientFiles, [b"h2"])
        )
        [(port, factory, _backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (8443, "127.0.0.1"))
        assert isinstance(factory, TLSServerFactory)
        self.assertEqual(factory.handshakeTimeout, 30.0)
        self.assertEqual(client.negotiatedProtocol, b"h2")
        client.write(b"ok")
        pump.flush()
        self.assertEqual(clientApp.received, b"ok")

        # verifyClient=on: no certificate, no connection.
        _server, client, clientApp, pump = connectTLS(
            factory, clientCreator(self.files), self.reactor
        )
        self.assertIsNotNone(clientApp.lost)

    def test_keywordsToModel(self) -> None:
        """
        Each keyword sets the L{ServerTLS} field of its nginx directive, with
        nginx's value syntax; relative file names resolve against the current
        directory.
        """
        tls = serverTLSFromKeywords(
            {
                "certificate": "server.pem",
                "certificateKey": "server.key",
                "passwordFile": "pass.txt",
                "protocols": "TLSv1.2 TLSv1.3",
                "ciphers": "HIGH:!aNULL",
                "confCommand": "Ciphersuites TLS_AES_256_GCM_SHA384;Options -Foo,Bar",
                "preferServerCiphers": "on",
                "ecdhCurve": "X25519:prime256v1",
                "dhparam": "dh.pem",
                "handshakeTimeout": "500ms",
                "sessionCache": "builtin:1000,shared:SSL:20m",
                "sessionTimeout": "4h",
                "sessionTickets": "off",
                "clientCertificate": "ca.pem",
                "trustedCertificate": "/etc/trusted.pem",
                "verifyClient": "optional_no_ca",
                "verifyDepth": "2",
                "crl": "crl.pem",
                "alpn": "h2,http/1.1",
            },
            "/base",
        )
        self.assertEqual(
            tls,
            ServerTLS(
                certificates=(CertificatePair("/base/server.pem", "/base/server.key"),),
                passwordFiles=("/base/pass.txt",),
                protocols=("TLSv1.2", "TLSv1.3"),
                ciphers="HIGH:!aNULL",
                confCommands=(
                    ("Ciphersuites", "TLS_AES_256_GCM_SHA384"),
                    ("Options", "-Foo,Bar"),
                ),
                preferServerCiphers=True,
                ecdhCurve="X25519:prime256v1",
                dhparam="/base/dh.pem",
                handshakeTimeout=0.5,
                sessionCache=SessionCache("shared", 1000, "SSL", 20 * 1024 * 1024),
                sessionTimeout=4 * 3600.0,
                sessionTickets=False,
                clientCertificate="/base/ca.pem",
                trustedCertificate="/etc/trusted.pem",
                verifyClient="optional_no_ca",
                verifyDepth=2,
                crl="/base/crl.pem",
                alpn=("h2", "http/1.1"),
            ),
        )
        self.assertIsNone(tls.protocolsWhere)

    def test_keywordTable(self) -> None:
        """
        Every keyword stands for an nginx C{ssl_*} directive whose name it
        mirrors.
        """
        for keyword, (directive, _split) in SERVER_KEYWORDS.items():
            self.assertTrue(directive.startswith("ssl_"), directive)
            camel = "".join(
                part if i == 0 else part.capitalize()
                for i, part in enumerate(directive[len("ssl_") :].split("_"))
            )
            self.assertEqual(camel, keyword)

    def test_defaults(self) -> None:
        """
        With only a certificate, every setting has the configuration file's
        default (nginx's), including a 60s handshake timeout; the key may be in
        the certificate's file.
        """
        combined = os.path.join(self.directory, "combined.pem")
        with open(combined, "wb") as f:
            f.write(readBytes(self.files.certificate) + readBytes(self.files.key))
        endpoint = self.parse("tlsrelay:tcp\\:443:certificate=combined.pem")
        self.assertEqual(endpoint.handshakeTimeout, 60.0)
        self.assertEqual(
            serverTLSFromKeywords({"certificate": "combined.pem"}),
            ServerTLS(certificates=(CertificatePair(combined, combined),)),
        )

    def test_severalCertificates(self) -> None:
        """
        Several certificates pair with several keys in order, as repeated
        C{ssl_certificate}/C{ssl_certificate_key} directives do.
        """
        import trustme

        ecdsa = writeCertificates(
            self.directory,
            ca=self.files.ca,
            prefix="ecdsa",
            keyType=trustme.KeyType.ECDSA,
        )
        rsa = writeCertificates(
            self.directory, ca=self.files.ca, prefix="rsa", keyType=trustme.KeyType.RSA
        )
        description = (
            "tlsrelay:tcp\\:443:certificate=rsa.pem,ecdsa.pem"
            ":certificateKey=rsa.key, ecdsa.key"
        )
        endpoint = self.parse(description)
        contextFactory = endpoint.contextFactory
        assert isinstance(contextFactory, ServerContextFactory)
        # Both are served: each to the client that can check its signatures.
        for algorithms, keyType in (
            ("ECDSA+SHA256", ec.EllipticCurvePublicKey),
            ("RSA-PSS+SHA256", rsaKeys.RSAPublicKey),
        ):
            client = SSL.Context(SSL.TLS_METHOD)
            applyConfCommands(
                client, [("SignatureAlgorithms", algorithms)], server=False
            )
            _, connection = memoryHandshake(contextFactory.context, client)
            certificate = connection.get_peer_certificate(as_cryptography=True)
            assert certificate is not None
            self.assertIsInstance(certificate.public_key(), keyType, algorithms)
        self.assertEqual(
            serverTLSFromKeywords(
                {
                    "certificate": "rsa.pem,ecdsa.pem",
                    "certificateKey": "rsa.key,ecdsa.key",
                }
            ).certificates,
            (
                CertificatePair(rsa.certificate, rsa.key),
                CertificatePair(ecdsa.certificate, ecdsa.key),
            ),
        )

    def test_protocols(self) -> None:
        """
        C{protocols=} offers only the listed protocols.
        """
        endpoint = self.parse(
            "tlsrelay:tcp\\:443:certificate=server.pem:certificateKey=server.key"
            ":protocols=TLSv1.2"
        )
        contextFactory = endpoint.contextFactory
        assert isinstance(contextFactory, ServerContextFactory)
        client = SSL.Context(SSL.TLS_METHOD)
        server, _ = memoryHandshake(contextFactory.context, client)
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.2")

    def test_prefixCaseInsensitive(self) -> None:
        """
        Twisted matches prefixes whatever their case.
        """
        endpoint = self.parse(
            "TLSRelay:tcp\\:443:certificate=server.pem:certificateKey=server.key"
        )
        _server, client, clientApp, pump = self.listenAndConnect(
            endpoint, clientCreator(self.files)
        )
        [(port, factory, _backlog, _interface)] = self.reactor.tcpServers
        self.assertEqual(port, 443)
        self.assertIsInstance(factory, TLSServerFactory)
        client.write(b"ok")
        pump.flush()
        self.assertEqual(clientApp.received, b"ok")

    def test_quotedInner(self) -> None:
        """
        C{endpoint=} takes an inner description quoted with
        C{quoteStringArgument}, keywords, escaped colons and all: a generated
        string round-trips.
        """
        inner = "unix:" + quoteStringArgument("/tmp/a:b.sock") + ":mode=600"
        description = (
            "tlsrelay:endpoint="
            + quoteStringArgument(inner)
            + ":certificate="
            + quoteStringArgument(self.files.certificate)
            + ":certificateKey="
            + quoteStringArgument(self.files.key)
        )
        endpoint = self.parse(description)
        self.successResultOf(endpoint.listen(RecorderFactory()))
        [(address, factory, _backlog, mode, _wantPID)] = self.reactor.unixServers
        self.assertEqual((address, mode), ("/tmp/a:b.sock", 0o600))
        self.assertIsInstance(factory, TLSServerFactory)

    def test_escapedInner(self) -> None:
        """
        A single positional argument is a whole inner description, its C{:} and
        C{=} escaped with backslashes.
        """
        endpoint = self.parse(
            "tlsrelay:unix\\:/tmp/a\\\\\\:b.sock\\:mode\\=600"
            ":certificate=server.pem:certificateKey=server.key"
        )
        self.successResultOf(endpoint.listen(RecorderFactory()))
        [(address, _factory, _backlog, mode, _wantPID)] = self.reactor.unixServers
        self.assertEqual((address, mode), ("/tmp/a:b.sock", 0o600))

    def test_positionalInner(self) -> None:
        """
        Several positional arguments are the inner endpoint's own, re-quoted as
        Twisted's C{haproxy:} parser does.
        """
        endpoint = self.parse(
            "tlsrelay:tcp:8444:certificate=server.pem:certificateKey=server.key"
        )
        self.successResultOf(endpoint.listen(RecorderFactory()))
        self.assertEqual(self.reactor.tcpServers[0][0], 8444)

    def test_innerDescription(self) -> None:
        """
        One positional argument is a whole description; several are re-quoted so
        that the inner parser sees the same arguments; C{endpoint=} is taken as
        it is.
        """
        self.assertEqual(
            innerDescription(["tcp:443:interface=::1"]), "tcp:443:interface=::1"
        )
        self.assertEqual(innerDescription(["tcp", "443"]), "tcp:443")
        self.assertEqual(innerDescription(["unix", "/a:b=c"]), "unix:/a\\:b\\=c")
        self.assertEqual(innerDescription([b"tcp:443"]), "tcp:443")
        self.assertEqual(innerDescription([], "tcp:443:backlog=5"), "tcp:443:backlog=5")

    def test_innerTwice(self) -> None:
        """
        An inner endpoint given both ways is an error.
        """
        self.assertParseError(
            "tlsrelay:tcp\\:443:endpoint=tcp\\:444:certificate=server.pem",
            "give the inner endpoint once",
        )

    def test_unknownKeyword(self) -> None:
        """
        An unknown keyword is named, with the likely intended one.
        """
        self.assertParseError(
            "tlsrelay:tcp\\:443:certificate=server.pem:sesionCache=off",
            '"sesionCache"',
            'did you mean "sessionCache"',
        )
        self.assertParseError(
            "tlsrelay:tcp\\:443:certificate=server.pem:verifyclient=on",
            'did you mean "verifyClient"',
        )

    def test_innerKeywordOutside(self) -> None:
        """
        An inner endpoint's keyword left unescaped is explained.
        """
        self.assertParseError(
            "tlsrelay:tcp:443:interface=127.0.0.1:certificate=server.pem",
            '"interface"',
            "tcp\\:8443\\:interface\\=127.0.0.1",
        )

    def test_ticketKeys(self) -> None:
        """
        C{sessionTicketKey=} takes nginx key files (repeatable with C{,}); the
        endpoint installs them, so two endpoints with the same file resume each
        other's tickets; a bad file is an error naming it.
        """
        keyFile = os.path.join(self.directory, "ticket.key")
        with open(keyFile, "wb") as f:
            f.write(os.urandom(80))
        endpoints = [
            self.parse(
                "tlsrelay:tcp\\:443:certificate=server.pem:certificateKey=server.key"
                f":sessionTicketKey={keyFile}:sessionTicketKeyRotation=1h"
            )
            for _ in range(2)
        ]
        contexts = [e.contextFactory.context for e in endpoints]  # type: ignore[union-attr]
        client = SSL.Context(SSL.TLS_METHOD)
        _, first = memoryHandshake(contexts[0], client)
        session = first.get_session()
        _, second = memoryHandshake(contexts[1], client, session=session)
        self.assertTrue(sessionReused(second))
        short = os.path.join(self.directory, "short.key")
        with open(short, "wb") as f:
            f.write(b"x" * 10)
        self.assertParseError(
            "tlsrelay:tcp\\:443:certificate=server.pem:certificateKey=server.key"
            f":sessionTicketKey={short}",
            "must be 48 or 80 bytes",
        )

    def test_badValues(self) -> None:
        """
        Bad values are errors that name the keyword and the value, with the
        message the configuration file gives for the same directive.
        """
        base = "tlsrelay:tcp\\:443:certificate=server.pem:certificateKey=server.key"
        cases = {
            "verifyClient=maybe": ('"verifyClient=maybe"', "ssl_verify_client"),
            "protocols=TLSv9": ('invalid value "TLSv9"',),
            "sessionTimeout=4x": ('invalid value "4x"',),
            "handshakeTimeout=1y": ('invalid value "1y"',),
            "sessionTickets=yes": ('it must be "on" or "off"',),
            "verifyDepth=-1": ('invalid value "-1"',),
            "sessionCache=shared\\:SSL\\:1k": ("is too small",),
            "sessionCache=off+builtin": ('invalid value "off"',),
            "alpn=": ("has an empty value",),
            "confCommand=Ciphersuites": ('not a "Name Value" command',),
            "ciphers=NOTACIPHER": ("no cipher matches",),
            "verifyClient=on": ("no ssl_client_certificate",),
        }
        for keyword, fragments in cases.items():
            self.assertParseError(f"{base}:{keyword}", *fragments)

    def test_certificates(self) -> None:
        """
        Missing certificates, missing files and keys that do not line up are
        errors.
        """
        self.assertParseError("tlsrelay:tcp\\:443", '"certificate=" is required')
        self.assertParseError(
            "tlsrelay:tcp\\:443:certificate=nope.pem",
            'cannot load certificate "' + os.path.join(self.directory, "nope.pem"),
            "no such file",
        )
        self.assertParseError(
            "tlsrelay:tcp\\:443:certificate=server.pem",
            "no PEM private key found",
            "without certificateKey=",
        )
        self.assertParseError(
            "tlsrelay:tcp\\:443:certificate=server.pem,server.pem"
            ":certificateKey=server.key",
            "names 2 file(s)",
        )
        self.assertParseError(
            "tlsrelay:tcp\\:443:certificate=server.pem:certificateKey=client.key",
            "does not match",
        )

    def test_badInner(self) -> None:
        """
        A missing or unparseable inner endpoint is an error that quotes it.
        """
        self.assertParseError(
            "tlsrelay:certificate=server.pem", "the inner endpoint is missing"
        )
        self.assertParseError(
            "tlsrelay:bogus\\:1:certificate=server.pem:certificateKey=server.key",
            'inner endpoint "bogus:1"',
            "Unknown endpoint type",
        )
        self.assertParseError(
            "tlsrelay:tcp\\:443\\:nope\\=1:certificate=server.pem"
            ":certificateKey=server.key",
            'inner endpoint "tcp:443:nope=1"',
        )

    def test_reactorWithoutClock(self) -> None:
        """
        The reactor is the clock of the handshake timeout, so it must be one.
        """
        self.assertRaises(
            TypeError,
            serverFromString,
            MemoryReactor(),
            "tlsrelay:tcp\\:443:certificate=server.pem:certificateKey=server.key",
        )

    def test_modelMatchesConfigFile(self) -> None:
        """
        The keywords give the same L{ServerTLS} as the matching directives in a
        configuration file.
        """
        from tlsrelay._config._load import loadConfig

        config = os.path.join(self.directory, "relay.conf")
        with open(config, "w") as f:
            f.write(
                "stream {\n"
                "  server {\n"
                "    listen 8443 ssl;\n"
                "    ssl_certificate server.pem;\n"
                "    ssl_certificate_key server.key;\n"
                "    ssl_protocols TLSv1.3;\n"
                "    ssl_session_cache builtin:1000 shared:SSL:20m;\n"
                "    ssl_session_timeout 4h;\n"
                "    ssl_verify_client optional;\n"
                "    ssl_client_certificate ca.pem;\n"
                "    ssl_alpn h2 http/1.1;\n"
                "    return ok;\n"
                "  }\n"
                "}\n"
            )
        [server] = loadConfig(config).servers
        fromKeywords = serverTLSFromKeywords(
            {
                "certificate": "server.pem",
                "certificateKey": "server.key",
                "protocols": "TLSv1.3",
                "sessionCache": "builtin:1000 shared:SSL:20m",
                "sessionTimeout": "4h",
                "verifyClient": "optional",
                "clientCertificate": "ca.pem",
                "alpn": "h2 http/1.1",
            }
        )
        self.assertEqual(fromKeywords, attrs.evolve(server.tls, protocolsWhere=None))
