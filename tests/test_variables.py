"""
Tests for L{tlsrelay._variables}: nginx variables and templates.
"""

from __future__ import annotations

import datetime
import os
import socket

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from tlsrelay._variables import (
    KNOWN_VARIABLES,
    Session,
    TLSFacts,
    compileTemplate,
    describePeer,
    distinguishedName,
    extractTLSFacts,
    timeISO8601,
    timeLocal,
    tlsFactNames,
)
from tlsrelay._version import __version__

# --- TLS helpers, also used by test_relay ----------------------------------------


def _loadKey(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def certificateAuthority() -> trustme.CA:
    """
    A CA with a known subject (made at test time, never at import).
    """
    return trustme.CA(organization_name="Example", organization_unit_name="Test CA")


def serverContext(
    ca: trustme.CA,
    verifyClients: bool = False,
    maximum: int | None = None,
) -> SSL.Context:
    """
    A server context with a certificate for C{example.com}; with C{verifyClients},
    a client certificate from C{ca} is required.
    """
    leaf = ca.issue_cert("example.com")
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate(
        x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    )
    context.use_privatekey(_loadKey(leaf.private_key_pem.bytes()))
    context.set_session_id(b"tlsrelay-tests")
    if maximum is not None:
        context.set_max_proto_version(maximum)
    if verifyClients:
        store = context.get_cert_store()
        assert store is not None
        store.add_cert(
            crypto.load_certificate(crypto.FILETYPE_PEM, ca.cert_pem.bytes())
        )
        context.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            lambda connection, cert, errno, depth, ok: bool(ok),
        )
    return context


def clientContext(
    ca: trustme.CA, certificate: trustme.LeafCert | None = None
) -> SSL.Context:
    """
    A client context that trusts C{ca}, presenting C{certificate} if given.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    store = context.get_cert_store()
    assert store is not None
    store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, ca.cert_pem.bytes()))
    context.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    if certificate is not None:
        context.use_certificate(
            x509.load_pem_x509_certificate(certificate.cert_chain_pems[0].bytes())
        )
        context.use_privatekey(_loadKey(certificate.private_key_pem.bytes()))
    return context


def clientCertificate(ca: trustme.CA) -> trustme.LeafCert:
    """
    A client certificate with a known subject.
    """
    return ca.issue_cert(
        "client.example",
        common_name="Client One",
        organization_name="Example",
        organization_unit_name="Relay",
    )


def pumpTLS(client: SSL.Connection, server: SSL.Connection) -> None:
    """
    Run two memory-BIO connections' handshake to the end.
    """
    for _ in range(8):
        for connection in (client, server):
            try:
                connection.do_handshake()
            except SSL.WantReadError:
                pass
        for source, sink in ((client, server), (server, client)):
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass
    # TLS 1.3 tickets come after the handshake: let the client read them.
    try:
        client.recv(1)
    except SSL.WantReadError:
        pass


def memoryHandshake(
    serverCtx: SSL.Context,
    clientCtx: SSL.Context,
    serverName: bytes | None = b"example.com",
    alpn: list[bytes] | None = None,
    session: SSL.Session | None = None,
) -> tuple[SSL.Connection, SSL.Connection]:
    """
    Handshake a client and a server connection in memory.
    """
    server = SSL.Connection(serverCtx, None)
    server.set_accept_state()
    client = SSL.Connection(clientCtx, None)
    client.set_connect_state()
    if serverName is not None:
        client.set_tlsext_host_name(serverName)
    if alpn is not None:
        client.set_alpn_protos(alpn)
    if session is not None:
        client.set_session(session)
    pumpTLS(client, server)
    return client, server


# --- tests --------------------------------------------------------------------------


def session(**kwargs: object) -> Session:
    values: dict[str, object] = {"now": lambda: 1000.5, "startTime": 1000.0}
    values.update(kwargs)
    return Session(**values)  # type: ignore[arg-type]


class CompileTemplateTests(SynchronousTestCase):
    """
    L{compileTemplate} parses C{$name} and C{${name}} as nginx does.
    """

    def test_literal(self) -> None:
        """
        Text without variables renders as itself.
        """
        template = compileTemplate("hello, world\n")
        self.assertEqual(template.render(session()), "hello, world\n")
        self.assertEqual(template.names, frozenset())

    def test_plainAndBraced(self) -> None:
        """
        C{$name} ends at the first character that cannot be in a name; C{${name}}
        can be followed by any.
        """
        template = compileTemplate("[$remote_addr:${remote_port}x] $status.")
        s = session(remoteAddr="192.0.2.1", remotePort="4433", status=502)
        self.assertEqual(template.render(s), "[192.0.2.1:4433x] 502.")
        self.assertEqual(
            template.names, frozenset({"remote_addr", "remote_port", "status"})
        )

    def test_unknown(self) -> None:
        """
        An unknown name is an error with nginx's wording; the name is as long as
        nginx reads it.
        """
        with self.assertRaises(ValueError) as caught:
            compileTemplate("$remote_addrx")
        self.assertEqual(str(caught.exception), 'unknown "remote_addrx" variable')
        with self.assertRaises(ValueError) as caught:
            compileTemplate("${http_host}")
        self.assertEqual(str(caught.exception), 'unknown "http_host" variable')

    def test_malformed(self) -> None:
        """
        A C{$} without a name, or a C{${} without C{}}, is an error.
        """
        self.assertRaises(ValueError, compileTemplate, "cost: $")
        self.assertRaises(ValueError, compileTemplate, "$ remote_addr")
        with self.assertRaises(ValueError) as caught:
            compileTemplate("${remote_addr")
        self.assertIn("closing bracket", str(caught.exception))

    def test_everyDocumentedVariable(self) -> None:
        """
        Every variable the relay documents compiles.
        """
        names = (
            "remote_addr remote_port server_addr server_port protocol ssl_protocol "
            "ssl_cipher ssl_session_reused ssl_session_id ssl_server_name "
            "ssl_alpn_protocol ssl_client_s_dn ssl_client_i_dn ssl_client_verify "
            "ssl_client_serial ssl_client_fingerprint upstream_addr "
            "upstream_connect_time upstream_bytes_sent upstream_bytes_received "
            "upstream_ssl_session_reused "
            "bytes_sent bytes_received session_time status time_iso8601 time_local "
            "msec connection hostname pid nginx_version"
        ).split()
        self.assertEqual(set(names), set(KNOWN_VARIABLES))
        template = compileTemplate(" ".join("$" + name for name in names))
        self.assertEqual(template.names, frozenset(names))
        template.render(session())
        template.renderLog(session())


class RenderTests(SynchronousTestCase):
    """
    Values, and how missing values show in C{return} and in logs.
    """

    def test_missingValues(self) -> None:
        """
        A variable without a value renders empty in C{return} and as C{-} in logs
        (nginx's "not found").
        """
        template = compileTemplate("$upstream_addr|$ssl_protocol|$upstream_bytes_sent")
        self.assertEqual(template.render(session()), "||")
        self.assertEqual(template.renderLog(session()), "-|-|-")

    def test_logEscaping(self) -> None:
        """
        In logs, C{"}, C{\\} and bytes outside printable ASCII are C{\\xXX}
        (nginx's default C{log_format} escaping); literal text is kept.
        """
        template = compileTemplate('"$ssl_server_name"')
        s = session(tls=TLSFacts(serverName='a"b\\c\x01é'))
        self.assertEqual(template.renderLog(s), '"a\\x22b\\x5Cc\\x01\\xC3\\xA9"')
        self.assertEqual(template.render(s), '"a"b\\c\x01é"')

    def test_counters(self) -> None:
        """
        Byte counts, status, connection number and times.
        """
        s = session(
            status=200,
            bytesSent=10,
            bytesReceived=20,
            upstreamBytesSent=20,
            upstreamBytesReceived=10,
            upstreamConnectTimes=[None, 0.0012],
            upstreamAddr="127.0.0.1:8080, 127.0.0.1:8081",
            connection=7,
        )
        template = compileTemplate(
            "$status $bytes_sent $bytes_received $upstream_bytes_sent "
            "$upstream_bytes_received $upstream_connect_time $upstream_addr "
            "$connection $session_time $msec"
        )
        self.assertEqual(
            template.render(s),
            "200 10 20 20 10 -, 0.001 127.0.0.1:8080, 127.0.0.1:8081 7 0.500 1000.500",
        )

    def test_sessionTimeEnds(self) -> None:
        """
        C{$session_time} counts to the end of the session once it has one.
        """
        s = session(endTime=1000.123)
        self.assertEqual(compileTemplate("$session_time").render(s), "0.123")

    def test_process(self) -> None:
        """
        C{$pid}, C{$hostname}, C{$nginx_version} (tlsrelay's version), C{$protocol}.
        """
        template = compileTemplate("$pid $hostname $nginx_version $protocol")
        self.assertEqual(
            template.render(session()),
            f"{os.getpid()} {socket.gethostname()} {__version__.public()} TCP",
        )

    def test_pidAfterFork(self) -> None:
        """
        C{$pid} is the process's own after a fork (twistd daemonizing a
        single-process relay forks after this module is imported).
        """
        if not hasattr(os, "fork"):
            self.skipTest("needs fork")
        template = compileTemplate("$pid")
        reading, writing = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover (the child)
            try:
                os.write(
                    writing, f"{os.getpid()} {template.render(session())}".encode()
                )
            finally:
                os._exit(0)
        os.close(writing)
        with os.fdopen(reading, "rb") as pipe:
            pid, rendered = pipe.read().decode().split()
        os.waitpid(child, 0)
        self.assertEqual((int(pid), rendered), (child, str(child)))
        self.assertEqual(template.render(session()), str(os.getpid()))

    def test_times(self) -> None:
        """
        C{$time_local} and C{$time_iso8601} are local time, as nginx prints them.
        """
        when = 1700000000.75
        local = datetime.datetime.fromtimestamp(when).astimezone()
        offset = local.strftime("%z")
        self.assertEqual(
            timeLocal(when),
            f"{local.day:02d}/{local.strftime('%b')}/{local.year}:"
            f"{local.strftime('%H:%M:%S')} {offset}",
        )
        self.assertEqual(timeISO8601(when), local.replace(microsecond=0).isoformat())
        self.assertRegex(
            compileTemplate("$time_local").render(session(now=lambda: when)),
            r"^\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}$",
        )

    def test_addresses(self) -> None:
        """
        IPv4, IPv6 (no brackets) and UNIX addresses.
        """
        template = compileTemplate(
            "$remote_addr $remote_port $server_addr $server_port"
        )
        s = session()
        s.setAddresses(
            IPv4Address("TCP", "10.0.0.1", 443), IPv6Address("TCP", "::1", 50000)
        )
        self.assertEqual(template.render(s), "::1 50000 10.0.0.1 443")
        s.setAddresses(UNIXAddress(b"/run/relay.sock"), UNIXAddress(None))
        self.assertEqual(template.render(s), "unix:  unix:/run/relay.sock ")

    def test_describePeer(self) -> None:
        """
        Peer addresses in log lines read as they do in nginx's logs: IPv6 in
        brackets, so that the port stands apart.
        """
        self.assertEqual(
            describePeer(IPv4Address("TCP", "192.0.2.7", 51234)), "192.0.2.7:51234"
        )
        self.assertEqual(
            describePeer(IPv6Address("TCP", "2001:db8::1", 443)), "[2001:db8::1]:443"
        )
        self.assertEqual(describePeer(UNIXAddress(b"/run/x.sock")), "unix:/run/x.sock")
        self.assertEqual(describePeer(UNIXAddress(None)), "unix:")


class DistinguishedNameTests(SynchronousTestCase):
    """
    C{$ssl_client_s_dn} as nginx (OpenSSL's RFC 2253 printing) shows it.
    """

    def test_format(self) -> None:
        """
        Most specific first, OpenSSL's short names, RFC 2253 escapes, non-ASCII
        bytes as C{\\XX}: the same text as C{openssl x509 -nameopt RFC2253}.
        """
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc."),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "R+D"),
                x509.NameAttribute(NameOID.COMMON_NAME, "José"),
                x509.NameAttribute(NameOID.EMAIL_ADDRESS, "jose@example.com"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, "1234"),
            ]
        )
        self.assertEqual(
            distinguishedName(name),
            "serialNumber=1234,emailAddress=jose@example.com,CN=Jos\\C3\\A9,"
            "OU=R\\+D,O=Example\\, Inc.,C=FR",
        )


class TLSFactsTests(SynchronousTestCase):
    """
    L{extractTLSFacts} reads a pyOpenSSL connection after its handshake.
    """

    def test_facts(self) -> None:
        """
        Protocol, cipher, SNI, ALPN, session, and the client certificate.
        """
        ca = certificateAuthority()
        certificate = clientCertificate(ca)
        serverCtx = serverContext(ca, verifyClients=True)
        serverCtx.set_alpn_select_callback(lambda connection, offered: b"h2")
        _client, server = memoryHandshake(
            serverCtx,
            clientContext(ca, certificate),
            alpn=[b"h2", b"http/1.1"],
        )
        facts = extractTLSFacts(server, tlsFactNames(KNOWN_VARIABLES))
        leaf = x509.load_pem_x509_certificate(certificate.cert_chain_pems[0].bytes())
        self.assertEqual(facts.protocol, "TLSv1.3")
        self.assertEqual(facts.cipher, server.get_cipher_name())
        self.assertTrue(facts.cipher and facts.cipher.startswith("TLS_"))
        self.assertEqual(facts.serverName, "example.com")
        self.assertEqual(facts.alpnProtocol, "h2")
        self.assertEqual(facts.sessionReused, ".")
        assert facts.sessionId is not None
        self.assertRegex(facts.sessionId, "^[0-9a-f]{64}$")
        self.assertEqual(facts.clientSubject, "CN=Client One,OU=Relay,O=Example")
        self.assertEqual(facts.clientIssuer, "OU=Test CA,O=Example")
        self.assertEqual(facts.clientVerify, "SUCCESS")
        digits = f"{leaf.serial_number:X}"
        self.assertEqual(
            facts.clientSerial, digits.zfill(len(digits) + len(digits) % 2)
        )
        self.assertEqual(facts.clientFingerprint, leaf.fingerprint(hashes.SHA1()).hex())

    def test_onlyWhatIsUsed(self) -> None:
        """
        Only the facts some template uses are taken; the rest stay L{None}.
        """
        ca = certificateAuthority()
        _client, server = memoryHandshake(serverContext(ca), clientContext(ca))
        fields = tlsFactNames(compileTemplate("$ssl_protocol $remote_addr").names)
        self.assertEqual(fields, frozenset({"protocol"}))
        self.assertEqual(extractTLSFacts(server, fields), TLSFacts(protocol="TLSv1.3"))

    def test_noClientCertificate(self) -> None:
        """
        Without a client certificate, C{$ssl_client_verify} is C{NONE} and the
        certificate variables have no value; without SNI or ALPN, neither have
        theirs.
        """
        ca = certificateAuthority()
        _client, server = memoryHandshake(
            serverContext(ca), clientContext(ca), serverName=None
        )
        facts = extractTLSFacts(server, tlsFactNames(KNOWN_VARIABLES))
        self.assertEqual(facts.clientVerify, "NONE")
        self.assertIsNone(facts.clientSubject)
        self.assertIsNone(facts.clientSerial)
        self.assertIsNone(facts.serverName)
        self.assertIsNone(facts.alpnProtocol)
        rendered = compileTemplate("$ssl_server_name|$ssl_client_s_dn").renderLog(
            session(tls=facts)
        )
        self.assertEqual(rendered, "-|-")

    def test_reused(self) -> None:
        """
        A resumed session shows C{r}, and the same session id (TLS 1.2 session-ID
        resumption: with a ticket, OpenSSL's server session has no id, and nginx
        then shows none either).
        """
        ca = certificateAuthority()
        serverCtx = serverContext(ca, maximum=SSL.TLS1_2_VERSION)
        serverCtx.set_options(SSL.OP_NO_TICKET)
        clientCtx = clientContext(ca)
        client, server = memoryHandshake(serverCtx, clientCtx)
        first = extractTLSFacts(server, {"sessionReused", "sessionId", "protocol"})
        _client2, server2 = memoryHandshake(
            serverCtx, clientCtx, session=client.get_session()
        )
        second = extractTLSFacts(server2, {"sessionReused", "sessionId", "protocol"})
        self.assertEqual((first.protocol, first.sessionReused), ("TLSv1.2", "."))
        self.assertEqual((second.protocol, second.sessionReused), ("TLSv1.2", "r"))
        self.assertEqual(second.sessionId, first.sessionId)

    def test_serialFormat(self) -> None:
        """
        C{$ssl_client_serial} is upper-case hex in whole bytes, as OpenSSL prints it.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        ca = certificateAuthority()
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c")])
        leaf = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(0xABC)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        serverCtx = serverContext(ca)
        serverCtx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
        clientCtx = clientContext(ca)
        clientCtx.use_certificate(leaf)
        clientCtx.use_privatekey(key)
        _client, server = memoryHandshake(serverCtx, clientCtx)
        facts = extractTLSFacts(server, {"clientSerial"})
        self.assertEqual(facts.clientSerial, "0ABC")
