# mypy: allow-untyped-calls
"""
Tests for the C{tlsrelay-pool:} client endpoint-string parser
(L{tlsrelay._parsers.TLSRelayPoolParser}), the endpoint it returns
(L{tlsrelay.endpoints.TLSRelayPoolEndpoint}) and its plugin.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from typing import Any

import trustme
from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import clientFromString, quoteStringArgument
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.plugin import IPlugin, getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests._helpers import FakeResolver
from tests._iosim import FakeTransport, IOPump
from tests._iosim import connect as iosimConnect
from tlsrelay._config._model import (
    Address,
    Balancer,
    Proxy,
    UpstreamGroup,
    UpstreamServer,
    UpstreamTLS,
)
from tlsrelay._openssl import sessionReused
from tlsrelay._parsers import (
    POOL_GROUP_KEYWORDS,
    POOL_KEYWORDS,
    TLSRelayPoolParser,
    poolFromKeywords,
)
from tlsrelay._pool import HostNotFound, NoUpstreamAvailable, UpstreamConnection
from tlsrelay._tls import ServerContextFactory
from tlsrelay._upstreamtls import ClientTLS
from tlsrelay.endpoints import (
    TLSRelayPoolEndpoint,
    _Releasing,
    _ReleasingFactory,
)
from tlsrelay.testing import CertificateFiles, writeCertificates

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "endpoints.md")


def tcp(port: int, host: str = "127.0.0.1") -> Address:
    return Address("tcp", host, port)


class Recorder(Protocol):
    """
    The caller's protocol: records what happens to it.
    """

    def __init__(self) -> None:
        self.made = 0
        self.received: list[bytes] = []
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class RecorderFactory(Factory[Recorder]):
    """
    Builds L{Recorder}s and keeps them; counts starts and stops.
    """

    noisy = False

    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.starts = 0
        self.stops = 0

    def buildProtocol(self, addr: IAddress | None) -> Recorder:
        protocol = Recorder()
        protocol.factory = self
        self.built.append(protocol)
        return protocol

    def startFactory(self) -> None:
        self.starts += 1

    def stopFactory(self) -> None:
        self.stops += 1


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class HalfCloser(Recorder):
    """
    A caller's protocol that wants half-close and handshake notifications.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def readConnectionLost(self) -> None:
        self.events.append("read")

    def writeConnectionLost(self) -> None:
        self.events.append("write")

    def handshakeCompleted(self) -> None:
        self.events.append("handshake")


class Greeter(Protocol):
    """
    An upstream application: says hello once connected.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello")


def accept(reactor: MemoryReactorClock, index: int = -1) -> tuple[Any, StringTransport]:
    """
    Let the C{index}th connection attempt succeed; return the protocol the
    transport talks to, and the transport.
    """
    host, port, clientFactory, _, _ = reactor.tcpClients[index]
    protocol = clientFactory.buildProtocol(IPv4Address("TCP", host, port))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def refuse(reactor: MemoryReactorClock, index: int = -1) -> None:
    """
    Let the C{index}th connection attempt fail.
    """
    reactor.tcpClients[index][2].clientConnectionFailed(
        reactor.connectors[index], Failure(ConnectionRefusedError())
    )


def targets(reactor: MemoryReactorClock) -> list[int]:
    return [client[1] for client in reactor.tcpClients]


def tlsAccept(
    reactor: MemoryReactorClock, server: SSL.Context, index: int = -1
) -> tuple[IOPump, TLSMemoryBIOProtocol]:
    """
    Let the C{index}th connection attempt reach an in-memory TLS upstream
    serving with C{server} (a L{Greeter}); return the pump between them (not yet
    pumped) and the upstream's TLS protocol.
    """
    host, port, clientFactory, _, _ = reactor.tcpClients[index]
    client = clientFactory.buildProtocol(IPv4Address("TCP", host, port))
    upstream = TLSMemoryBIOFactory(
        ServerContextFactory(server), False, Factory.forProtocol(Greeter), reactor
    ).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert isinstance(upstream, TLSMemoryBIOProtocol)
    pump: IOPump = iosimConnect(
        upstream,
        FakeTransport(upstream, isServer=True),
        client,
        FakeTransport(client, isServer=False),
        greet=False,
        clock=reactor,
    )
    return pump, upstream


def fakeConnection(protocol: IProtocol, released: list[bool]) -> UpstreamConnection:
    """
    An L{UpstreamConnection} that records its releases.
    """
    from tlsrelay._balance import PeerState

    return UpstreamConnection(
        protocol=protocol,
        peer="127.0.0.1:9001",
        connectTime=0.0,
        addresses=["127.0.0.1:9001"],
        connectTimes=[0.0],
        state=PeerState.fromServer(UpstreamServer(tcp(9001)), tcp(9001)),
        onRelease=released.append,
    )


class Certificates:
    """
    A directory with an upstream certificate (localhost, 127.0.0.1, ::1) and a
    client certificate from the same CA; the test runs in that directory.
    """

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.directory = os.path.abspath(testCase.mktemp())
        self.files: CertificateFiles = writeCertificates(self.directory)
        self.clientFiles: CertificateFiles = writeCertificates(
            self.directory, ("client.example",), ca=self.files.ca, prefix="client"
        )
        cwd = os.getcwd()
        os.chdir(self.directory)
        testCase.addCleanup(os.chdir, cwd)

    def serverContext(
        self, ca: trustme.CA | None = None, requireClient: bool = False
    ) -> SSL.Context:
        context = SSL.Context(SSL.TLS_METHOD)
        (ca or self.files.ca).issue_cert("localhost").configure_cert(context)
        if requireClient:
            self.files.ca.configure_trust(context)
            context.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                lambda *args: bool(args[-1]),
            )
        return context


class ParserTests(SynchronousTestCase):
    """
    The C{tlsrelay-pool:} endpoint string.
    """

    def setUp(self) -> None:
        self.certificates = Certificates(self)
        self.reactor = MemoryReactorClock()

    def parse(self, description: str) -> TLSRelayPoolEndpoint:
        endpoint = clientFromString(self.reactor, description)
        self.assertIsInstance(endpoint, TLSRelayPoolEndpoint)
        return endpoint  # type: ignore[no-any-return]

    def assertParseError(self, description: str, *fragments: str) -> str:
        error = self.assertRaises(
            ValueError, clientFromString, self.reactor, description
        )
        message = str(error)
        self.assertTrue(message.startswith("tlsrelay-pool endpoint: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_verifyObject(self) -> None:
        """
        The parser is a plugin that parses client endpoint strings.
        """
        parser = TLSRelayPoolParser()
        self.assertTrue(verifyObject(IPlugin, parser))
        self.assertTrue(
            verifyObject(IStreamClientEndpointStringParserWithReactor, parser)
        )
        self.assertEqual(parser.prefix, "tlsrelay-pool")

    def test_pluginDiscovery(self) -> None:
        """
        Twisted finds the parser among its client endpoint plugins, once, with
        the prefix C{tlsrelay-pool}, and matches the prefix without regard to
        case.
        """
        found = [
            plugin
            for plugin in getPlugins(IStreamClientEndpointStringParserWithReactor)
            if isinstance(plugin, TLSRelayPoolParser)
        ]
        self.assertEqual([p.prefix for p in found], ["tlsrelay-pool"])
        self.parse("TLSRelay-Pool:servers=127.0.0.1\\:9001")

        from twisted.plugins import tlsrelay_endpoints

        self.assertIsInstance(tlsrelay_endpoints.tlsrelayPoolParser, TLSRelayPoolParser)

    def test_lazyImports(self) -> None:
        """
        Loading the plugin (which Twisted does for every application that parses
        an endpoint string) imports neither OpenSSL, nor the pool, nor the
        configuration, nor the reactor.
        """
        code = (
            "import sys\n"
            "import twisted.plugins.tlsrelay_endpoints\n"
            "heavy = ['OpenSSL', 'cryptography', 'twisted.internet.reactor',\n"
            "         'twisted.internet.endpoints', 'tlsrelay._config',\n"
            "         'tlsrelay._tls', 'tlsrelay._pool', 'tlsrelay._upstreamtls',\n"
            "         'tlsrelay.endpoints']\n"
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
        Every kind of keyword in one string reaches the group, the balancer, the
        C{proxy_*} settings and the upstream TLS settings.
        """
        d = self.certificates.directory
        with open("password.txt", "w") as f:
            f.write("unused\n")
        endpoint = self.parse(
            "tlsrelay-pool:servers=127.0.0.1\\:9001 max_fails=3 fail_timeout=30s,"
            "127.0.0.1\\:9002 weight=2,[\\:\\:1]\\:9003 backup"
            ":balancer=least_conn:upstream=backend.example"
            ":tls=on:certificate=client.pem:certificateKey=client.key"
            ":passwordFile=password.txt:protocols=TLSv1.2+TLSv1.3"
            ":ciphers=HIGH\\:!aNULL:confCommand=Options -SessionTicket"
            ":trustedCertificate=ca.pem:verify=on:verifyDepth=2"
            ":name=localhost:serverName=on:sessionReuse=off"
            ":connectTimeout=5s:nextUpstream=on:nextUpstreamTries=3"
            ":nextUpstreamTimeout=1m"
        )
        self.assertEqual(
            endpoint.pool.config,
            UpstreamGroup(
                "backend.example",
                (
                    UpstreamServer(tcp(9001), maxFails=3, failTimeout=30.0),
                    UpstreamServer(tcp(9002), weight=2),
                    UpstreamServer(tcp(9003, "::1"), backup=True),
                ),
                Balancer("least_conn"),
            ),
        )
        self.assertEqual(
            endpoint.proxy,
            Proxy(
                connectTimeout=5.0,
                nextUpstream=True,
                nextUpstreamTries=3,
                nextUpstreamTimeout=60.0,
                tls=UpstreamTLS(
                    enabled=True,
                    certificate=f"{d}/client.pem",
                    certificateKey=f"{d}/client.key",
                    passwordFiles=(f"{d}/password.txt",),
                    protocols=("TLSv1.2", "TLSv1.3"),
                    ciphers="HIGH:!aNULL",
                    confCommands=(("Options", "-SessionTicket"),),
                    trustedCertificate=f"{d}/ca.pem",
                    verify=True,
                    verifyDepth=2,
                    name="localhost",
                    serverName=True,
                    sessionReuse=False,
                ),
            ),
        )
        self.assertEqual(endpoint.hashKey, b"")
        tls = endpoint.pool._tlsFor
        assert isinstance(tls, ClientTLS)
        self.assertEqual((tls.name, tls.sni), ("localhost", b"localhost"))
        self.assertEqual((tls.verify, tls.sessionReuse), (True, False))
        self.assertEqual(tls.context.get_verify_depth(), 2)
        self.assertEqual(tls.context.get_verify_mode(), SSL.VERIFY_PEER)
        self.assertEqual(tls.upstream, "backend.example")

    def test_defaults(self) -> None:
        """
        With only servers, the balancer is round robin, every C{proxy_*}
        setting has nginx's default, there is no TLS, and the group is named by
        its server, as C{proxy_pass host:port} names its implicit group.
        """
        endpoint = self.parse("tlsrelay-pool:servers=backend.example\\:443")
        self.assertEqual(
            endpoint.pool.config,
            UpstreamGroup(
                "backend.example:443", (UpstreamServer(tcp(443, "backend.example")),)
            ),
        )
        self.assertEqual(endpoint.proxy, Proxy())
        self.assertIsNone(endpoint.pool._tlsFor)
        self.assertEqual(poolFromKeywords({"servers": "a:1,b:2"})[0].name, "a:1,b:2")

    def test_tlsDefaults(self) -> None:
        """
        With C{tls=on} alone, the upstream TLS has nginx's defaults; the name
        to check defaults to the host of a single server, or to C{upstream=}.
        """
        endpoint = self.parse("tlsrelay-pool:servers=localhost\\:9001:tls=on")
        self.assertEqual(endpoint.proxy.tls, UpstreamTLS(enabled=True))
        tls = endpoint.pool._tlsFor
        assert isinstance(tls, ClientTLS)
        self.assertEqual((tls.name, tls.sni, tls.verify), ("localhost", None, False))
        self.assertEqual(tls.context.get_verify_mode(), SSL.VERIFY_NONE)

        endpoint = self.parse(
            "tlsrelay-pool:servers=127.0.0.1\\:9001,127.0.0.1\\:9002"
            ":upstream=backend.example:tls=on:serverName=on"
        )
        tls = endpoint.pool._tlsFor
        assert isinstance(tls, ClientTLS)
        self.assertEqual((tls.name, tls.sni), ("backend.example", b"backend.example"))

    def test_serverParameters(self) -> None:
        """
        Each server takes the parameters of an C{upstream}'s C{server} line;
        UNIX paths and IPv6 literals are addresses too.
        """
        group, _, _ = poolFromKeywords(
            {
                "servers": "127.0.0.1:9001 weight=5 max_fails=0 max_conns=10,"
                " [::1]:9002 down , unix:/run/up.sock backup fail_timeout=1m"
            }
        )
        self.assertEqual(
            group.servers,
            (
                UpstreamServer(tcp(9001), weight=5, maxFails=0, maxConns=10),
                UpstreamServer(tcp(9002, "::1"), down=True),
                UpstreamServer(
                    Address("unix", path="/run/up.sock"), backup=True, failTimeout=60.0
                ),
            ),
        )

    def test_balancers(self) -> None:
        """
        C{balancer=} takes the methods of an C{upstream} block; C{hash} takes a
        fixed key, which becomes the endpoint's hash key.
        """
        cases = {
            "round_robin": (Balancer(), b""),
            "least_conn": (Balancer("least_conn"), b""),
            "hash user42": (Balancer("hash", key="user42"), b"user42"),
            "hash  user42  consistent": (
                Balancer("hash", key="user42", consistent=True),
                b"user42",
            ),
            "random": (Balancer("random"), b""),
            "random two": (Balancer("random", two=True), b""),
            "random two least_conn": (Balancer("random", two=True), b""),
        }
        for value, (balancer, key) in cases.items():
            endpoint = self.parse(
                f"tlsrelay-pool:servers=127.0.0.1\\:9001:balancer={value}"
            )
            self.assertEqual(
                (endpoint.pool.config.balancer, endpoint.hashKey),
                (balancer, key),
                value,
            )

    def test_generatedString(self) -> None:
        """
        A program builds the string with C{quoteStringArgument}: only C{:} and
        C{\\} need escaping in a keyword's value (C{=} is literal there).
        """
        servers = "[::1]:9001 weight=2,unix:/run/a\\b.sock"
        endpoint = self.parse(
            "tlsrelay-pool:servers="
            + quoteStringArgument(servers)
            + ":tls=on:ciphers="
            + quoteStringArgument("HIGH:!aNULL")
        )
        self.assertEqual(
            endpoint.pool.config.servers,
            (
                UpstreamServer(tcp(9001, "::1"), weight=2),
                UpstreamServer(Address("unix", path="/run/a\\b.sock")),
            ),
        )
        self.assertEqual(endpoint.proxy.tls.ciphers, "HIGH:!aNULL")

    def test_keyInCertificateFile(self) -> None:
        """
        Without C{certificateKey=}, the key is read from the certificate's own
        file, as Twisted's C{ssl:} endpoint does; when it is not there, the
        error says so.
        """
        files = self.certificates.clientFiles
        with open("combined.pem", "wb") as f:
            for path in (files.certificate, files.key):
                with open(path, "rb") as part:
                    f.write(part.read())
        endpoint = self.parse(
            "tlsrelay-pool:servers=127.0.0.1\\:9001:tls=on:certificate=combined.pem"
        )
        combined = os.path.join(self.certificates.directory, "combined.pem")
        self.assertEqual(endpoint.proxy.tls.certificateKey, combined)
        self.assertParseError(
            "tlsrelay-pool:servers=127.0.0.1\\:9001:tls=on:certificate=client.pem",
            "client.pem",
            "without certificateKey=, the key must be in the certificate file",
        )

    def test_unknownKeyword(self) -> None:
        """
        An unknown keyword is an error that names it, with a hint when one
        helps.
        """
        base = "tlsrelay-pool:servers=127.0.0.1\\:9001:"
        self.assertEqual(
            self.assertParseError(base + "bogus=1"),
            'tlsrelay-pool endpoint: unknown keyword "bogus"',
        )
        self.assertParseError(
            base + "connectTimout=1s",
            'unknown keyword "connectTimout"',
            'did you mean "connectTimeout"',
        )
        self.assertParseError(base + "verifydepth=1", 'did you mean "verifyDepth"')
        self.assertParseError(
            base + "server=127.0.0.1\\:9002",
            'unknown keyword "server"',
            "servers=",
            "repeated",
        )
        self.assertParseError(base + "tries=2", '"nextUpstreamTries"')
        self.assertParseError(
            base + "verifyClient=on", "a keyword of tlsrelay: server strings"
        )

    def test_positionalArgument(self) -> None:
        """
        The servers are not positional arguments.
        """
        self.assertParseError(
            "tlsrelay-pool:127.0.0.1:9001",
            'unexpected argument "127.0.0.1"',
            "servers=",
        )

    def test_serversRequired(self) -> None:
        """
        There is no pool without servers.
        """
        self.assertParseError("tlsrelay-pool:", '"servers=" is required')
        self.assertParseError(
            "tlsrelay-pool:servers=127.0.0.1\\:9001,,127.0.0.1\\:9002",
            "empty server",
        )

    def test_badValues(self) -> None:
        """
        Bad values fail with the configuration file's message for the
        directive they stand for, after the keyword and its value.
        """
        base = "tlsrelay-pool:servers=127.0.0.1\\:9001:"
        cases = [
            ("servers=backend", ['"servers=backend"', 'no port in "backend"']),
            ("servers=127.0.0.1\\:0", ['invalid port in "127.0.0.1:0"']),
            (
                "servers=127.0.0.1\\:1 weight\\=0",
                ['"servers=127.0.0.1:1 weight=0"', 'invalid value "0"'],
            ),
            ("servers=127.0.0.1\\:1 slow", ['invalid parameter "slow"']),
            (
                "servers=127.0.0.1\\:1 resolve",
                ['"resolve" parameter', "not supported yet"],
            ),
            ("balancer=fastest", ['"balancer=fastest"', "unknown balancing method"]),
            ("balancer=hash", ["hash needs a key"]),
            ("balancer=hash consistent", ["hash needs a key"]),
            ("balancer=hash $remote_addr", ["fixed string", "withHashKey"]),
            ("balancer=hash k consistent x", ["wrong number of values"]),
            ("balancer=random three", ['invalid value "three"']),
            ("balancer=round_robin two", ["round_robin takes no parameters"]),
            ("connectTimeout=soon", ['"connectTimeout=soon"', "invalid value"]),
            ("nextUpstreamTries=-1", ['invalid value "-1"']),
            ("nextUpstream=maybe", ['it must be "on" or "off"']),
            ("tls=yes", ['"tls=yes"', 'it must be "on" or "off"']),
            ("tls=on:verify=maybe", ['"verify=maybe"']),
            ("tls=on:verifyDepth=deep", ['"verifyDepth=deep"']),
            ("tls=on:protocols=TLSv9", ['invalid value "TLSv9"']),
            ("tls=on:confCommand=Options", ['"Options" is not a "Name Value"']),
            ("upstream=", ['"upstream=" is empty']),
        ]
        for extra, fragments in cases:
            self.assertParseError(base + extra, *fragments)

    def test_tlsKeywordsNeedTLS(self) -> None:
        """
        A TLS keyword without C{tls=on} would silently do nothing, as in nginx;
        here it is an error.
        """
        base = "tlsrelay-pool:servers=127.0.0.1\\:9001:"
        self.assertParseError(
            base + "verify=on:trustedCertificate=ca.pem",
            '"trustedCertificate=" has no effect without TLS',
            "tls=on",
        )
        self.assertParseError(base + "tls=off:verify=on", '"verify="')

    def test_severalServersNeedName(self) -> None:
        """
        With several servers, the group has no host name, so checking or
        sending the name needs C{name=} or C{upstream=}.
        """
        base = "tlsrelay-pool:servers=127.0.0.1\\:9001,127.0.0.1\\:9002:tls=on:"
        for extra in ("verify=on:trustedCertificate=ca.pem", "serverName=on"):
            self.assertParseError(base + extra, "give name=")
            self.parse(base + extra + ":name=localhost")
            self.parse(base + extra + ":upstream=localhost")
        self.parse(base + "verify=off")

    def test_tlsErrors(self) -> None:
        """
        The TLS context is built while parsing: a file that cannot be loaded or
        a setting OpenSSL refuses fails C{clientFromString} with the
        configuration's message.
        """
        base = "tlsrelay-pool:servers=127.0.0.1\\:9001:tls=on:"
        d = self.certificates.directory
        self.assertParseError(
            base + "certificate=nope.pem:certificateKey=client.key",
            f'cannot load certificate "{d}/nope.pem"',
        )
        self.assertParseError(
            base + "certificate=client.pem:certificateKey=server.key",
            "does not match",
        )
        self.assertParseError(
            base + "verify=on:trustedCertificate=nope.pem", f"{d}/nope.pem"
        )
        self.assertParseError(base + "ciphers=NOTACIPHER", "no cipher matches")
        self.assertParseError(base + "crl=nope.pem:verify=on", f"{d}/nope.pem")

    def test_reactorWithoutClock(self) -> None:
        """
        The pool times connections with the reactor, so it must be a clock.
        """
        self.assertRaises(
            TypeError,
            clientFromString,
            MemoryReactor(),
            "tlsrelay-pool:servers=127.0.0.1\\:9001",
        )

    def test_keywordTable(self) -> None:
        """
        Every directive keyword stands for a supported C{proxy_*} directive of a
        stream C{server} whose name it mirrors, and every keyword is in the
        client section's table in C{docs/endpoints.md}.
        """
        from tlsrelay._config._directives import SERVER, lookup

        for keyword, (directive, _split) in POOL_KEYWORDS.items():
            spec, _ = lookup(directive, SERVER)
            assert spec is not None, directive
            self.assertEqual(spec.unsupported, "", directive)
            stem = directive.removeprefix("proxy_ssl_").removeprefix("proxy_")
            if directive == "proxy_ssl":
                stem = "tls"
            camel = "".join(
                part if i == 0 else part.capitalize()
                for i, part in enumerate(stem.split("_"))
            )
            self.assertEqual(camel, keyword)
        with open(DOCS, encoding="utf-8") as f:
            docs = f.read()
        client = docs[docs.index("## Client endpoint") :]
        documented = set(re.findall(r"^\| `(\w+)` \|", client, re.MULTILINE))
        self.assertEqual(documented, {*POOL_KEYWORDS, *POOL_GROUP_KEYWORDS})

    def test_modelMatchesConfigFile(self) -> None:
        """
        The keywords give the same group and C{proxy_*} settings as the matching
        directives in a configuration file.
        """
        from tlsrelay._config._load import loadConfig

        with open("relay.conf", "w") as f:
            f.write(
                "stream {\n"
                "  upstream backend {\n"
                "    hash client7 consistent;\n"
                "    server 127.0.0.1:9001 weight=3 max_fails=2;\n"
                "    server [::1]:9002 fail_timeout=5s;\n"
                "  }\n"
                "  server {\n"
                "    listen 8443;\n"
                "    proxy_pass backend;\n"
                "    proxy_connect_timeout 2s;\n"
                "    proxy_next_upstream_tries 2;\n"
                "    proxy_ssl on;\n"
                "    proxy_ssl_certificate client.pem;\n"
                "    proxy_ssl_certificate_key client.key;\n"
                "    proxy_ssl_trusted_certificate ca.pem;\n"
                "    proxy_ssl_verify on;\n"
                "    proxy_ssl_verify_depth 3;\n"
                "    proxy_ssl_protocols TLSv1.3;\n"
                "    proxy_ssl_server_name on;\n"
                "  }\n"
                "}\n"
            )
        config = loadConfig("relay.conf")
        [server] = config.servers
        group, proxy, key = poolFromKeywords(
            {
                "servers": "127.0.0.1:9001 weight=3 max_fails=2,"
                "[::1]:9002 fail_timeout=5s",
                "balancer": "hash client7 consistent",
                "upstream": "backend",
                "connectTimeout": "2s",
                "nextUpstreamTries": "2",
                "tls": "on",
                "certificate": "client.pem",
                "certificateKey": "client.key",
                "trustedCertificate": "ca.pem",
                "verify": "on",
                "verifyDepth": "3",
                "protocols": "TLSv1.3",
                "serverName": "on",
            }
        )
        self.assertEqual(group, config.upstream("backend"))
        self.assertEqual(proxy, server.proxy)
        self.assertEqual(key, b"client7")


class ReleasingTests(SynchronousTestCase):
    """
    L{_Releasing} and L{_ReleasingFactory}: how the endpoint learns that a
    connection ended.
    """

    def test_interfaces(self) -> None:
        """
        The factory is a protocol factory, the wrapper a protocol; the wrapper
        provides the optional protocol interfaces its protocol provides, and
        only those (the handshake is told otherwise, see
        L{TLSEndpointTests.test_handshakeListener}).
        """
        self.assertTrue(
            verifyObject(IProtocolFactory, _ReleasingFactory(RecorderFactory()))
        )
        plain = _Releasing(Recorder())
        self.assertTrue(verifyObject(IProtocol, plain))
        self.assertFalse(IHalfCloseableProtocol.providedBy(plain))
        self.assertFalse(IHandshakeListener.providedBy(plain))
        both = _Releasing(HalfCloser())
        self.assertTrue(verifyObject(IHalfCloseableProtocol, both))
        self.assertFalse(IHandshakeListener.providedBy(both))

    def test_passThrough(self) -> None:
        """
        The caller's protocol gets the real transport (its writes do not pass
        through the wrapper), and every notification of the transport.
        """
        wrapped = HalfCloser()
        releasing = _Releasing(wrapped)
        transport = StringTransport()
        releasing.makeConnection(transport)
        self.assertIs(wrapped.transport, transport)
        self.assertEqual(wrapped.made, 1)
        releasing.dataReceived(b"abc")
        releasing.readConnectionLost()
        releasing.writeConnectionLost()
        self.assertEqual(wrapped.received, [b"abc"])
        self.assertEqual(wrapped.events, ["read", "write"])
        self.assertEqual(releasing.logPrefix(), "HalfCloser")

    def test_factory(self) -> None:
        """
        The factory wraps what the caller's factory builds, and passes on its
        starts and stops.
        """
        wrapped = RecorderFactory()
        factory = _ReleasingFactory(wrapped)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert protocol is not None
        self.assertIs(protocol.wrapped, wrapped.built[0])
        factory.doStart()
        factory.doStop()
        self.assertEqual((wrapped.starts, wrapped.stops), (1, 1))

        class Refusing(Factory[Protocol]):
            def buildProtocol(self, addr: IAddress | None) -> None:
                return None

        self.assertIsNone(
            _ReleasingFactory(Refusing()).buildProtocol(
                IPv4Address("TCP", "127.0.0.1", 1)
            )
        )

    def test_releaseWhenLost(self) -> None:
        """
        When the connection is lost, the caller's protocol hears of it, then
        the connection is released: as a failure if the upstream broke it
        before sending anything, as a success otherwise.
        """
        cases = [
            (ConnectionDone(), False, False),
            (ConnectionLost(), False, True),
            (ConnectionLost(), True, False),
            (ConnectionAborted(), False, False),
        ]
        for error, data, failed in cases:
            wrapped = Recorder()
            releasing = _Releasing(wrapped)
            released: list[bool] = []
            releasing.makeConnection(StringTransport())
            releasing.attach(fakeConnection(releasing, released))
            if data:
                releasing.dataReceived(b"x")
            self.assertEqual(released, [])
            releasing.connectionLost(Failure(error))
            self.assertEqual(len(wrapped.lost), 1)
            self.assertEqual(released, [failed], (error, data))

    def test_lostBeforeAttached(self) -> None:
        """
        A connection lost before the pool's connection is known is released as
        soon as it is.
        """
        releasing = _Releasing(Recorder())
        releasing.makeConnection(StringTransport())
        releasing.connectionLost(Failure(ConnectionLost()))
        released: list[bool] = []
        releasing.attach(fakeConnection(releasing, released))
        self.assertEqual(released, [True])

    def test_releasedEvenIfProtocolFails(self) -> None:
        """
        The connection is released even when the caller's C{connectionLost}
        raises.
        """

        class Broken(Recorder):
            def connectionLost(self, reason: Failure = connectionDone) -> None:
                raise RuntimeError("bug")

        releasing = _Releasing(Broken())
        released: list[bool] = []
        releasing.makeConnection(StringTransport())
        releasing.attach(fakeConnection(releasing, released))
        self.assertRaises(
            RuntimeError, releasing.connectionLost, Failure(ConnectionDone())
        )
        self.assertEqual(released, [False])


class EndpointTests(SynchronousTestCase):
    """
    L{TLSRelayPoolEndpoint} over a L{MemoryReactorClock}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def endpoint(self, description: str) -> TLSRelayPoolEndpoint:
        endpoint = clientFromString(self.reactor, description)
        assert isinstance(endpoint, TLSRelayPoolEndpoint)
        return endpoint

    def test_verifyObject(self) -> None:
        """
        The endpoint is a client endpoint.
        """
        endpoint = self.endpoint("tlsrelay-pool:servers=127.0.0.1\\:9001")
        self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))
        self.assertEqual(
            repr(endpoint), "<TLSRelayPoolEndpoint '127.0.0.1:9001' (round_robin)>"
        )

    def test_connect(self) -> None:
        """
        C{connect} fires with the caller's protocol, connected to the real
        transport, within C{connectTimeout}.
        """
        endpoint = self.endpoint(
            "tlsrelay-pool:servers=127.0.0.1\\:9001:connectTimeout=7s"
        )
        factory = RecorderFactory()
        d = endpoint.connect(factory)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 9001))
        self.assertEqual(self.reactor.tcpClients[0][3], 7.0)
        self.assertNoResult(d)
        _, transport = accept(self.reactor)
        protocol = self.successResultOf(d)
        self.assertIs(protocol, factory.built[0])
        self.assertIs(factory.built[0].transport, transport)
        self.assertEqual(factory.built[0].made, 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_roundRobin(self) -> None:
        """
        One pool serves all of an endpoint's connections: successive connects
        go round the servers, by weight (nginx's smooth weighted round robin).
        """
        endpoint = self.endpoint(
            "tlsrelay-pool:servers=127.0.0.1\\:9001,127.0.0.1\\:9002"
        )
        for _ in range(4):
            endpoint.connect(RecorderFactory())
            accept(self.reactor)
        self.assertEqual(targets(self.reactor), [9001, 9002, 9001, 9002])

        weighted = self.endpoint(
            "tlsrelay-pool:servers=127.0.0.1\\:9001 weight=2,127.0.0.1\\:9002"
        )
        for _ in range(3):
            weighted.connect(RecorderFactory())
            accept(self.reactor)
        self.assertEqual(targets(self.reactor)[4:], [9001, 9002, 9001])

    def test_leastConn(self) -> None:
        """
        With C{least_conn}, the connections still open steer the next one: a
        connection counts until it is lost.
        """
        endpoint = self.endpoint(
            "tlsrelay-pool:servers=127.0.0.1\\:9001,127.0.0.1\\:9002"
            ":balancer=least_conn"
        )
        endpoint.connect(RecorderFactory())
        first, _ = accept(self.reactor)
        endpoint.connect(RecorderFactory())
        accept(self.reactor)
        first.connectionLost(Failure(ConnectionDone()))
        endpoint.connect(RecorderFactory())
        self.assertEqual(targets(self.reactor), [9001, 9002, 9001])

    def test_failover(self) -> None:
        """
        When the first server refuses, the same C{connect} goes on to the next
        one; the refusal counts against the first server, which is then left
        out until C{fail_timeout} has passed.
        """
        endpoint = self.endpoint(
            "tlsrelay-pool:servers=127.0.0.1\\:9001 fail_timeout=30s,127.0.0.1\\:9002"
        )
        factory = RecorderFactory()
        d = endpoint.connect(factory)
        refuse(self.reactor)
        self.assertEqual(targets(self.reactor), [9001, 9002])
        self.assertNoResult(d)
        accept(self.reactor)
        self.assertIs(self.successResultOf(d), factory.built[0])
        first = endpoint.pool.peers.primary[0]
        self.assertEqual(first.fails, 1)
        endpoint.connect(RecorderFactory())
        self.assertEqual(targets(self.reactor)[-1], 9002)
        accept(self.reactor)
        # Back after fail_timeout, at a weight that recovers as nginx's does.
        self.reactor.advance(30.5)
        for _ in range(4):
            endpoint.connect(RecorderFactory())
            accept(self.reactor)
        self.assertIn(9001, targets(self.reactor)[-4:])

    def test_connectTimeout(self) -> None:
        """
        A server that does not answer within C{connectTimeout} is given up for
        the next one.
        """
        endpoint = self.endpoint(
            "tlsrelay-pool:servers=127.0.0.1\\:9001,127.0.0.1\\:9002:connectTimeout=5s"
        )
        d = endpoint.connect(RecorderFactory())
        self.reactor.advance(4.9)
        self.assertEqual(targets(self.reactor), [9001])
        self.reactor.advance(0.1)
        self.assertEqual(targets(self.reactor), [9001, 9002])
        accept(self.reactor)
        self.successResultOf(d)

    def test_allFail(self) -> None:
        """
        When no server can be reached within C{nextUpstreamTries}, C{connect}
        fails with L{NoUpstreamAvailable}, naming what was tried.
        """
        endpoint = self.endpoint(
            "tlsrelay-pool:servers=127.0.0.1\\:9001,127.0.0.1\\:9002,"
            "127.0.0.1\\:9003:nextUpstreamTries=2"
        )
        factory = RecorderFactory()
        d = endpoint.connect(factory)
        refuse(self.reactor)
        refuse(self.reactor)
        failure = self.failureResultOf(d, NoUpstreamAvailable)
        self.assertEqual(
            failure.value.addresses,  # type: ignore[attr-defined]
            ["127.0.0.1:9001", "127.0.0.1:9002"],
        )
        self.assertEqual(factory.built, [])

    def test_releaseOnConnectionLost(self) -> None:
        """
        When the caller's connection is lost, its protocol hears of it and the
        server's connection count drops; a connection the upstream broke before
        sending anything counts as a failure of that server, one that ended
        after a response, or that the caller aborted, does not.
        """
        endpoint = self.endpoint(
            "tlsrelay-pool:servers=127.0.0.1\\:9001 max_fails=5,127.0.0.1\\:9002 down"
        )
        peer = endpoint.pool.peers.primary[0]
        cases = [
            (ConnectionLost(), b"", 1),
            (ConnectionLost(), b"response", 1),
            (ConnectionAborted(), b"", 1),
            (ConnectionDone(), b"", 1),
            (ConnectionLost(), b"", 2),
        ]
        for reason, data, fails in cases:
            factory = RecorderFactory()
            self.assertNoResult(endpoint.connect(factory))
            wrapping, _ = accept(self.reactor)
            self.assertEqual(targets(self.reactor)[-1], 9001)
            self.assertEqual(peer.conns, 1)
            if data:
                wrapping.dataReceived(data)
            wrapping.connectionLost(Failure(reason))
            self.assertEqual(factory.built[0].received, [data] if data else [])
            self.assertEqual(len(factory.built[0].lost), 1)
            self.assertEqual((peer.conns, peer.fails), (0, fails), reason)

    def test_cancel(self) -> None:
        """
        Cancelling C{connect} stops the attempt under way.
        """
        endpoint = self.endpoint("tlsrelay-pool:servers=127.0.0.1\\:9001")
        d = endpoint.connect(RecorderFactory())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(endpoint.pool.peers.primary[0].conns, 0)

    def test_lazyResolution(self) -> None:
        """
        Host names are resolved at the first C{connect}, once for the
        connections waiting meanwhile; each address becomes a server of the
        pool, and later connections do not resolve again.
        """
        resolver = FakeResolver(
            {
                "backend.example": [
                    IPv4Address("TCP", "10.0.0.1", 443),
                    IPv6Address("TCP", "2001:db8::1", 443),
                ]
            }
        )
        self.reactor.installNameResolver(resolver)
        endpoint = self.endpoint("tlsrelay-pool:servers=backend.example\\:443")
        self.assertEqual(resolver.receivers, [])
        first = endpoint.connect(RecorderFactory())
        second = endpoint.connect(RecorderFactory())
        self.assertEqual([name for _, name in resolver.receivers], ["backend.example"])
        self.assertEqual(self.reactor.tcpClients, [])
        resolver.finish()
        self.assertEqual(
            [client[0] for client in self.reactor.tcpClients],
            ["10.0.0.1", "2001:db8::1"],
        )
        accept(self.reactor, 0)
        accept(self.reactor, 1)
        self.successResultOf(first)
        self.successResultOf(second)
        endpoint.connect(RecorderFactory())
        self.assertEqual(resolver.receivers, [])
        self.assertEqual(len(self.reactor.tcpClients), 3)

    def test_resolutionFailure(self) -> None:
        """
        A name without addresses fails the connections waiting for it with
        L{HostNotFound}; the next C{connect} resolves again.
        """
        resolver = FakeResolver({})
        self.reactor.installNameResolver(resolver)
        endpoint = self.endpoint("tlsrelay-pool:servers=nowhere.example\\:443")
        d = endpoint.connect(RecorderFactory())
        resolver.finish()
        failure = self.failureResultOf(d, HostNotFound)
        self.assertIn("nowhere.example:443", failure.getErrorMessage())
        resolver.answers["nowhere.example"] = [IPv4Address("TCP", "10.0.0.9", 443)]
        d = endpoint.connect(RecorderFactory())
        resolver.finish()
        accept(self.reactor)
        self.successResultOf(d)
        self.assertEqual(self.reactor.tcpClients[0][0], "10.0.0.9")

    def test_cancelWhileResolving(self) -> None:
        """
        Cancelling a C{connect} that waits for the names leaves the resolution
        to the others.
        """
        resolver = FakeResolver({"b.example": [IPv4Address("TCP", "10.0.0.2", 1)]})
        self.reactor.installNameResolver(resolver)
        endpoint = self.endpoint("tlsrelay-pool:servers=b.example\\:1")
        cancelled = endpoint.connect(RecorderFactory())
        waiting = endpoint.connect(RecorderFactory())
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        resolver.finish()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        accept(self.reactor)
        self.successResultOf(waiting)

    def test_hashKey(self) -> None:
        """
        With C{hash KEY}, every connection goes to the server the key picks;
        C{withHashKey} gives an endpoint on the same pool with another key.
        """
        endpoint = self.endpoint(
            "tlsrelay-pool:servers=127.0.0.1\\:9001,127.0.0.1\\:9002,"
            "127.0.0.1\\:9003:balancer=hash alpha consistent"
        )
        for _ in range(3):
            endpoint.connect(RecorderFactory())
            accept(self.reactor)
        picked = set(targets(self.reactor))
        self.assertEqual(len(picked), 1)
        others = set()
        for key in (b"beta", b"gamma", b"delta", b"epsilon"):
            keyed = endpoint.withHashKey(key)
            self.assertIs(keyed.pool, endpoint.pool)
            self.assertEqual(keyed.hashKey, key)
            keyed.connect(RecorderFactory())
            accept(self.reactor)
            others.add(targets(self.reactor)[-1])
        self.assertGreater(len(picked | others), 1)

    def test_fromGroup(self) -> None:
        """
        From Python, an endpoint is built from the configuration model, with an
        injected random source.
        """
        group = UpstreamGroup(
            "backend",
            (UpstreamServer(tcp(9001)), UpstreamServer(tcp(9002))),
            Balancer("random"),
        )
        endpoint = TLSRelayPoolEndpoint.fromGroup(
            self.reactor, group, random=random.Random(5)
        )
        self.assertEqual(endpoint.proxy, Proxy())
        for _ in range(6):
            endpoint.connect(RecorderFactory())
            accept(self.reactor)
        again = TLSRelayPoolEndpoint.fromGroup(
            self.reactor, group, random=random.Random(5)
        )
        for _ in range(6):
            again.connect(RecorderFactory())
            accept(self.reactor)
        self.assertEqual(targets(self.reactor)[:6], targets(self.reactor)[6:])
        self.assertRaises(
            ValueError,
            TLSRelayPoolEndpoint.fromGroup,
            self.reactor,
            group,
            Proxy(tls=UpstreamTLS(enabled=True, certificate="/nonexistent.pem")),
        )


class TLSEndpointTests(SynchronousTestCase):
    """
    L{TLSRelayPoolEndpoint} with upstream TLS, against in-memory TLS upstreams.
    """

    def setUp(self) -> None:
        self.certificates = Certificates(self)
        self.reactor = MemoryReactorClock()

    def endpoint(self, servers: str, extra: str = "") -> TLSRelayPoolEndpoint:
        endpoint = clientFromString(
            self.reactor,
            f"tlsrelay-pool:servers={servers}:tls=on:verify=on"
            f":trustedCertificate=ca.pem:name=localhost{extra}",
        )
        assert isinstance(endpoint, TLSRelayPoolEndpoint)
        return endpoint

    def test_connectedOverTLS(self) -> None:
        """
        C{connect} fires once the handshake is complete, with the caller's
        protocol on the TLS transport; the client certificate and the SNI name
        of the string reach the upstream.
        """
        endpoint = self.endpoint(
            "127.0.0.1\\:9001",
            ":certificate=client.pem:certificateKey=client.key:serverName=on",
        )
        names: list[bytes | None] = []
        server = self.certificates.serverContext(requireClient=True)
        server.set_tlsext_servername_callback(
            lambda connection: names.append(connection.get_servername())
        )
        factory = RecorderFactory()
        d = endpoint.connect(factory)
        pump, upstream = tlsAccept(self.reactor, server)
        self.assertNoResult(d)
        pump.flush()
        protocol = self.successResultOf(d)
        self.assertIs(protocol, factory.built[0])
        self.assertIsInstance(factory.built[0].transport, TLSMemoryBIOProtocol)
        self.assertEqual(b"".join(factory.built[0].received), b"hello")
        self.assertEqual(names, [b"localhost"])
        peer = upstream.getPeerCertificate()
        self.assertIsNotNone(peer)
        self.assertIn(
            "client.example",
            str(peer.to_cryptography().extensions),  # type: ignore[union-attr]
        )

    def test_handshakeListener(self) -> None:
        """
        A protocol that listens for the TLS handshake hears of it once, when it
        is connected (after the handshake); without TLS it hears nothing.
        """
        endpoint = self.endpoint("127.0.0.1\\:9001")
        protocol = HalfCloser()
        d = endpoint.connect(Factory.forProtocol(lambda: protocol))
        pump, _ = tlsAccept(self.reactor, self.certificates.serverContext())
        pump.flush()
        self.successResultOf(d)
        self.assertEqual((protocol.made, protocol.events), (1, ["handshake"]))

        plain = clientFromString(self.reactor, "tlsrelay-pool:servers=127.0.0.1\\:9002")
        protocol = HalfCloser()
        d = plain.connect(Factory.forProtocol(lambda: protocol))
        accept(self.reactor)
        self.successResultOf(d)
        self.assertEqual((protocol.made, protocol.events), (1, []))

    def test_sessionReuse(self) -> None:
        """
        The endpoint's one pool keeps each server's session: the next
        C{connect} to the same server resumes it.
        """
        endpoint = self.endpoint("127.0.0.1\\:9001")
        server = self.certificates.serverContext()
        reused: list[bool] = []
        for _ in range(2):
            factory = RecorderFactory()
            d = endpoint.connect(factory)
            pump, _ = tlsAccept(self.reactor, server)
            pump.flush()
            self.successResultOf(d)
            transport = factory.built[0].transport
            assert isinstance(transport, TLSMemoryBIOProtocol)
            reused.append(sessionReused(transport.getHandle()))
            transport.loseConnection()
            pump.flush()
        self.assertEqual(reused, [False, True])
        self.assertEqual(endpoint.pool.peers.primary[0].conns, 0)

    def test_verificationFailover(self) -> None:
        """
        An upstream whose certificate is refused fails that attempt (the
        caller's protocol never hears of it) and the next server is tried.
        """
        endpoint = self.endpoint("127.0.0.1\\:9001,127.0.0.1\\:9002")
        factory = RecorderFactory()
        d = endpoint.connect(factory)
        pump, _ = tlsAccept(self.reactor, self.certificates.serverContext(trustme.CA()))
        pump.flush()
        self.assertEqual(targets(self.reactor), [9001, 9002])
        self.assertEqual(factory.built[0].made, 0)
        pump, _ = tlsAccept(self.reactor, self.certificates.serverContext())
        pump.flush()
        self.assertIs(self.successResultOf(d), factory.built[1])
        self.assertEqual(endpoint.pool.peers.primary[0].fails, 1)

    def test_allRefused(self) -> None:
        """
        When every upstream's certificate is refused, C{connect} fails, saying
        why.
        """
        endpoint = self.endpoint("127.0.0.1\\:9001")
        d = endpoint.connect(RecorderFactory())
        pump, _ = tlsAccept(self.reactor, self.certificates.serverContext(trustme.CA()))
        pump.flush()
        failure = self.failureResultOf(d, NoUpstreamAvailable)
        self.assertIn("verify error", failure.getErrorMessage())

    def test_releaseOnConnectionLost(self) -> None:
        """
        Over TLS too, the connection is released when the caller's protocol
        loses it.
        """
        endpoint = self.endpoint("127.0.0.1\\:9001")
        factory = RecorderFactory()
        d = endpoint.connect(factory)
        pump, upstream = tlsAccept(self.reactor, self.certificates.serverContext())
        pump.flush()
        self.successResultOf(d)
        peer = endpoint.pool.peers.primary[0]
        self.assertEqual(peer.conns, 1)
        upstream.loseConnection()
        pump.flush()
        self.assertEqual(len(factory.built[0].lost), 1)
        self.assertEqual((peer.conns, peer.fails), (0, 0))
