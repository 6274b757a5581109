"""
Tests for L{tlsrelay._upstreamtls}: the C{proxy_ssl*} client context and its
per-peer connections, checked with in-memory handshakes against pyOpenSSL servers.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tlsrelay import _openssl
from tlsrelay._balance import PeerState
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import Address, UpstreamServer, UpstreamTLS, Where
from tlsrelay._upstreamtls import (
    ClientTLS,
    UpstreamVerificationError,
    sslName,
    tlsForServer,
)
from tlsrelay.testing import pump, writeCertificates

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def peerState(port: int = 9001) -> PeerState:
    address = Address("tcp", "127.0.0.1", port)
    return PeerState.fromServer(UpstreamServer(address), address)


def serverContext(
    issued: trustme.LeafCert,
    version: int | None = None,
    clientCA: trustme.CA | None = None,
    tickets: bool = True,
) -> SSL.Context:
    """
    An upstream: serves C{issued}; with C{clientCA}, demands a client certificate
    signed by it.  Sessions resume from OpenSSL's cache and from tickets.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    issued.configure_cert(context)
    context.set_session_id(b"upstream")
    if version is not None:
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
    if not tickets:
        context.set_options(SSL.OP_NO_TICKET)
    if clientCA is not None:
        clientCA.configure_trust(context)
        context.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            lambda connection, certificate, errno, depth, ok: bool(ok),
        )
    return context


def handshake(
    server: SSL.Context, client: SSL.Connection, exchange: bool = True
) -> SSL.Connection:
    """
    Complete a handshake in memory between a server context and a client
    connection made by a creator; with C{exchange}, pass a byte each way so that
    TLS 1.3 tickets reach the client.
    """
    serverConnection = SSL.Connection(server, None)
    serverConnection.set_accept_state()
    client.set_connect_state()
    done = {serverConnection: False, client: False}
    for _ in range(20):
        for connection in (client, serverConnection):
            if not done[connection]:
                try:
                    connection.do_handshake()
                except SSL.WantReadError:
                    continue
                done[connection] = True
        pump(client, serverConnection)
        if all(done.values()):
            break
    else:
        raise AssertionError("handshake did not complete")
    if exchange:
        serverConnection.send(b"s")
        client.send(b"c")
        pump(client, serverConnection)
        client.recv(1)
        serverConnection.recv(1)
        # Close as TLSMemoryBIOProtocol does; OpenSSL marks the session of a
        # connection freed without close_notify as not resumable.
        client.shutdown()
        pump(client, serverConnection)
    return serverConnection


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.where = Where(os.path.join(self.dir, "relay.conf"), 12)
        self.ca = trustme.CA()
        self.files = writeCertificates(self.dir, ca=self.ca)
        self.issued = self.ca.issue_cert("localhost", "127.0.0.1")
        self.peer = peerState()

    def client(self, proxyPassHost: str = "localhost", **settings: Any) -> ClientTLS:
        settings.setdefault("enabled", True)
        return tlsForServer(UpstreamTLS(**settings), proxyPassHost, self.where)

    def connect(
        self,
        tls: ClientTLS,
        server: SSL.Context,
        peer: PeerState | None = None,
        exchange: bool = True,
    ) -> tuple[SSL.Connection, SSL.Connection]:
        """
        Handshake through C{tls}'s creator for C{peer}: (server, client).
        """
        creator = tls(self.peer if peer is None else peer)
        client = creator.clientConnectionForTLS(None)  # type: ignore[arg-type]
        return handshake(server, client, exchange), client

    def verifying(self, **settings: Any) -> ClientTLS:
        settings.setdefault("verify", True)
        settings.setdefault("trustedCertificate", self.files.caFile)
        return self.client(**settings)

    def refused(
        self, tls: ClientTLS, server: SSL.Context
    ) -> tuple[UpstreamVerificationError, dict[str, object]]:
        """
        The handshake fails; return the error and the one warning logged.
        """
        with capturedLogs() as events:
            error = self.assertRaises(
                UpstreamVerificationError, self.connect, tls, server
            )
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        return error, warnings[0]


class CreatorTests(Base):
    def test_interface(self) -> None:
        """
        The creator for a peer provides L{IOpenSSLClientConnectionCreator}.
        """
        self.assertTrue(
            verifyObject(IOpenSSLClientConnectionCreator, self.client()(self.peer))
        )

    def test_defaults(self) -> None:
        """
        nginx's defaults: no verification (an unknown CA is accepted), no SNI,
        TLS 1.3, session reuse on.
        """
        tls = self.client()
        self.assertEqual(
            (tls.verify, tls.sni, tls.sessionReuse, tls.name),
            (False, None, True, "localhost"),
        )
        stranger = trustme.CA().issue_cert("elsewhere.example")
        server, client = self.connect(tls, serverContext(stranger))
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.3")
        self.assertIsNone(server.get_servername())

    def test_protocols(self) -> None:
        """
        C{proxy_ssl_protocols} bounds what is offered.
        """
        tls = self.client(protocols=("TLSv1.2",))
        _, client = self.connect(tls, serverContext(self.issued))
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.2")

    def test_ciphers(self) -> None:
        """
        C{proxy_ssl_ciphers} is the TLS 1.2 cipher list.
        """
        tls = self.client(protocols=("TLSv1.2",), ciphers="ECDHE-ECDSA-AES128-SHA")
        _, client = self.connect(tls, serverContext(self.issued))
        self.assertEqual(client.get_cipher_name(), "ECDHE-ECDSA-AES128-SHA")

    def test_confCommand(self) -> None:
        """
        C{proxy_ssl_conf_command} reaches OpenSSL.
        """
        tls = self.client(
            confCommands=(("Ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"),)
        )
        _, client = self.connect(tls, serverContext(self.issued))
        self.assertEqual(client.get_cipher_name(), "TLS_CHACHA20_POLY1305_SHA256")


class ClientCertificateTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.clientCA = trustme.CA()
        self.clientFiles = writeCertificates(
            os.path.join(self.dir, "client"),
            identities=("relay.example",),
            ca=self.clientCA,
            prefix="client",
        )

    def test_presented(self) -> None:
        """
        C{proxy_ssl_certificate} and C{_key} identify the relay to an upstream that
        demands a client certificate.
        """
        tls = self.client(
            certificate=self.clientFiles.certificate,
            certificateKey=self.clientFiles.key,
        )
        server, _ = self.connect(
            tls, serverContext(self.issued, clientCA=self.clientCA)
        )
        certificate = server.get_peer_certificate(as_cryptography=True)
        assert certificate is not None
        self.assertEqual(
            certificate.subject,
            x509.load_pem_x509_certificate(
                open(self.clientFiles.certificate, "rb").read()
            ).subject,
        )

    def test_absent(self) -> None:
        """
        Without C{proxy_ssl_certificate}, such an upstream refuses the relay.
        """
        self.assertRaises(
            SSL.Error,
            self.connect,
            self.client(),
            serverContext(self.issued, clientCA=self.clientCA),
        )

    def test_encryptedKey(self) -> None:
        """
        An encrypted key is opened with C{proxy_ssl_password_file}, trying each
        line in turn.
        """
        key = serialization.load_pem_private_key(
            open(self.clientFiles.key, "rb").read(), None
        )
        encrypted = os.path.join(self.dir, "encrypted.key")
        with open(encrypted, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"second"),
                )
            )
        passwords = os.path.join(self.dir, "passwords")
        with open(passwords, "wb") as f:
            f.write(b"first\nsecond\n")
        tls = self.client(
            certificate=self.clientFiles.certificate,
            certificateKey=encrypted,
            passwordFiles=(passwords,),
        )
        self.connect(tls, serverContext(self.issued, clientCA=self.clientCA))
        error = self.assertRaises(
            ConfigError,
            self.client,
            certificate=self.clientFiles.certificate,
            certificateKey=encrypted,
        )
        self.assertIn(encrypted, str(error))
        self.assertTrue(str(error).endswith(f"in {self.where}"))


class ConfigErrorTests(Base):
    def assertConfigError(self, expected: str, **settings: Any) -> None:
        error = self.assertRaises(ConfigError, self.client, **settings)
        self.assertEqual((error.file, error.line), (self.where.file, 12))
        self.assertIn(expected, error.message)

    def test_missingCertificate(self) -> None:
        """
        A missing client certificate is named.
        """
        missing = os.path.join(self.dir, "nothing.pem")
        self.assertConfigError(
            f'cannot load certificate "{missing}": no such file',
            certificate=missing,
            certificateKey=self.files.key,
        )

    def test_certificateWithoutKey(self) -> None:
        """
        A certificate needs its key, as nginx says.
        """
        self.assertConfigError(
            'no "proxy_ssl_certificate_key" is defined for certificate',
            certificate=self.files.certificate,
        )

    def test_keyMismatch(self) -> None:
        """
        A key that is not the certificate's is refused, naming both.
        """
        other = writeCertificates(os.path.join(self.dir, "other"))
        self.assertConfigError(
            f'certificate key "{other.key}" does not match certificate '
            f'"{self.files.certificate}"',
            certificate=self.files.certificate,
            certificateKey=other.key,
        )

    def test_notACertificate(self) -> None:
        """
        A file that holds no certificate is refused.
        """
        self.assertConfigError(
            "no PEM certificate found",
            certificate=self.files.key,
            certificateKey=self.files.key,
        )

    def test_missingTrustedCertificate(self) -> None:
        """
        A missing C{proxy_ssl_trusted_certificate} is named when verifying.
        """
        missing = os.path.join(self.dir, "nothing.pem")
        self.assertConfigError(
            f'cannot load certificate "{missing}": no such file',
            verify=True,
            trustedCertificate=missing,
        )

    def test_badCRL(self) -> None:
        """
        A C{proxy_ssl_crl} without a CRL is refused.
        """
        self.assertConfigError(
            "no PEM CRL found",
            verify=True,
            trustedCertificate=self.files.caFile,
            crl=self.files.caFile,
        )

    def test_badCiphers(self) -> None:
        """
        A cipher list that matches nothing is refused.
        """
        self.assertConfigError("SSL_CTX_set_cipher_list", ciphers="NOTHING-AT-ALL")

    def test_badConfCommand(self) -> None:
        """
        A conf command OpenSSL refuses is refused, as nginx words it.
        """
        self.assertConfigError(
            'SSL_CONF_cmd("Bogus", "x") failed', confCommands=(("Bogus", "x"),)
        )

    def test_noProtocol(self) -> None:
        """
        A protocol list the library cannot offer is refused, naming the directive.
        """
        self.assertConfigError("proxy_ssl_protocols", protocols=("SSLv3",))


class VerifyTests(Base):
    def test_trusted(self) -> None:
        """
        A certificate from the trusted CA for the name passes.
        """
        self.connect(self.verifying(), serverContext(self.issued))

    def test_unknownCA(self) -> None:
        """
        A certificate from an unknown CA is refused; the warning says why.
        """
        stranger = trustme.CA().issue_cert("localhost")
        error, warning = self.refused(self.verifying(), serverContext(stranger))
        self.assertEqual(error.kind, "untrusted")
        self.assertIn("unable to get local issuer certificate", str(error))
        self.assertEqual(warning["kind"], "untrusted")
        self.assertEqual(warning["code"], 20)
        self.assertEqual(warning["peer"], "127.0.0.1:9001")
        self.assertEqual(warning["upstream"], "localhost")
        self.assertEqual(warning["depth"], 0)
        self.assertIn("upstream SSL certificate verify error", warning["error"])

    def test_expired(self) -> None:
        """
        An expired certificate is refused.
        """
        expired = self.ca.issue_cert(
            "localhost", not_before=NOW - 10 * DAY, not_after=NOW - DAY
        )
        error, warning = self.refused(self.verifying(), serverContext(expired))
        self.assertEqual((error.kind, warning["code"]), ("expired", 10))
        self.assertIn("certificate has expired", str(error))

    def test_nameMismatch(self) -> None:
        """
        A certificate for another name than C{proxy_ssl_name} is refused.
        """
        tls = self.verifying(name="backend.example")
        error, warning = self.refused(tls, serverContext(self.issued))
        self.assertEqual(error.kind, "name mismatch")
        self.assertEqual(
            str(error), 'upstream SSL certificate does not match "backend.example"'
        )
        self.assertEqual(warning["name"], "backend.example")
        self.assertIn("backend.example", str(warning["detail"]))

    def test_defaultNameIsProxyPassHost(self) -> None:
        """
        Without C{proxy_ssl_name}, the name is the host of C{proxy_pass} (a
        group's name), without its port.
        """
        issued = self.ca.issue_cert("backend")
        self.connect(self.verifying(proxyPassHost="backend"), serverContext(issued))
        error, _ = self.refused(
            self.verifying(proxyPassHost="other:443"), serverContext(issued)
        )
        self.assertIn('"other"', str(error))

    def test_ipAddress(self) -> None:
        """
        An IP literal name is checked against the IP SANs.
        """
        self.connect(self.verifying(name="127.0.0.1"), serverContext(self.issued))
        self.connect(
            self.verifying(proxyPassHost="127.0.0.1:9001"), serverContext(self.issued)
        )
        error, _ = self.refused(
            self.verifying(name="127.0.0.2"), serverContext(self.issued)
        )
        self.assertEqual(error.kind, "name mismatch")

    def test_ipv6Address(self) -> None:
        """
        An IPv6 name, bracketed with a port or bare, is checked as an address.
        """
        issued = self.ca.issue_cert("::1")
        self.connect(self.verifying(proxyPassHost="[::1]:9001"), serverContext(issued))
        self.connect(self.verifying(name="::1"), serverContext(issued))

    def test_chainDepth(self) -> None:
        """
        The depth is OpenSSL's: depth N allows N intermediates between the
        upstream's certificate and the trust anchor.
        """
        child = self.ca.create_child_ca()
        one = serverContext(child.issue_cert("localhost"))
        grandchild = child.create_child_ca()
        two = serverContext(grandchild.issue_cert("localhost"))
        self.connect(self.verifying(verifyDepth=1), one)
        self.connect(self.verifying(verifyDepth=2), two)
        error, warning = self.refused(self.verifying(verifyDepth=1), two)
        self.assertEqual((error.kind, warning["code"]), ("chain too long", 22))
        error, _ = self.refused(self.verifying(verifyDepth=0), one)
        self.assertEqual(error.kind, "chain too long")

    def test_revoked(self) -> None:
        """
        With C{proxy_ssl_crl}, a revoked certificate is refused and others pass.
        """
        caCertificate = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())
        caKey = serialization.load_pem_private_key(
            self.ca.private_key_pem.bytes(), None
        )
        revoked = self.ca.issue_cert("localhost")
        serial = x509.load_pem_x509_certificate(
            revoked.cert_chain_pems[0].bytes()
        ).serial_number
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(caCertificate.subject)
            .last_update(NOW - DAY)
            .next_update(NOW + DAY)
            .add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(NOW - DAY)
                .build()
            )
            .sign(caKey, hashes.SHA256())  # type: ignore[arg-type]
        )
        path = os.path.join(self.dir, "crl.pem")
        with open(path, "wb") as f:
            f.write(crl.public_bytes(serialization.Encoding.PEM))
        tls = self.verifying(crl=path)
        self.connect(tls, serverContext(self.issued))
        error, _ = self.refused(tls, serverContext(revoked))
        self.assertEqual(error.kind, "revoked")

    def test_systemStore(self) -> None:
        """
        C{proxy_ssl_verify on} without trusted certificates uses the system's
        default store, and says so at load: a private CA is not trusted.
        """
        with capturedLogs() as events:
            tls = self.client(verify=True)
        self.assertIn("system's default trust store", events[0]["log_format"])
        error, _ = self.refused(tls, serverContext(self.issued))
        self.assertEqual(error.kind, "untrusted")

    def test_resumedSkipsVerification(self) -> None:
        """
        A resumed session was verified when it was made: resuming logs nothing.
        """
        tls = self.verifying()
        server = serverContext(self.issued)
        self.connect(tls, server)
        with capturedLogs() as events:
            _, client = self.connect(tls, server)
        self.assertTrue(_openssl.sessionReused(client))
        self.assertEqual(events, [])


class ServerNameTests(Base):
    def test_off(self) -> None:
        """
        C{proxy_ssl_server_name off} (the default) sends no SNI.
        """
        server, _ = self.connect(
            self.client(name="backend.example"), serverContext(self.issued)
        )
        self.assertIsNone(server.get_servername())

    def test_on(self) -> None:
        """
        C{proxy_ssl_server_name on} sends C{proxy_ssl_name}, or the host of
        C{proxy_pass} without its port.
        """
        tls = self.client(serverName=True, name="backend.example")
        server, _ = self.connect(tls, serverContext(self.issued))
        self.assertEqual(server.get_servername(), b"backend.example")
        tls = self.client(proxyPassHost="upstream.example:8443", serverName=True)
        server, _ = self.connect(tls, serverContext(self.issued))
        self.assertEqual(server.get_servername(), b"upstream.example")

    def test_notForAddresses(self) -> None:
        """
        IP literals are never sent as SNI (RFC 6066).
        """
        for host in ("127.0.0.1:9001", "[::1]:9001"):
            tls = self.client(proxyPassHost=host, serverName=True)
            self.assertIsNone(tls.sni)
            server, _ = self.connect(tls, serverContext(self.issued))
            self.assertIsNone(server.get_servername())

    def test_sslName(self) -> None:
        """
        L{sslName} strips the port as nginx does, and keeps bare IPv6 literals.
        """
        cases = {
            "backend": "backend",
            "backend.example:443": "backend.example",
            "127.0.0.1:9000": "127.0.0.1",
            "[::1]:9000": "[::1]",
            "[::1]": "[::1]",
            "::1": "::1",
        }
        for given, expected in cases.items():
            self.assertEqual(sslName(given), expected, given)
        self.assertEqual(sslName("backend", "named.example:1"), "named.example")


class SessionTests(Base):
    def resumes(self, server: SSL.Context, **settings: Any) -> None:
        tls = self.client(**settings)
        _, first = self.connect(tls, server)
        self.assertFalse(_openssl.sessionReused(first))
        stored = self.peer.session
        self.assertIsInstance(stored, SSL.Session)
        _, second = self.connect(tls, server)
        self.assertTrue(_openssl.sessionReused(second))
        other = peerState(9002)
        _, third = self.connect(tls, server, peer=other)
        self.assertFalse(_openssl.sessionReused(third), "sessions are per peer")
        self.assertIsInstance(other.session, SSL.Session)

    def test_tls13(self) -> None:
        """
        TLS 1.3: the session from the ticket of one connection resumes the next
        connection to the same peer.
        """
        self.resumes(serverContext(self.issued, SSL.TLS1_3_VERSION))

    def test_tls12Tickets(self) -> None:
        """
        TLS 1.2 with session tickets resumes.
        """
        self.resumes(serverContext(self.issued, SSL.TLS1_2_VERSION))

    def test_tls12SessionIds(self) -> None:
        """
        TLS 1.2 with session IDs (the upstream's cache, no tickets) resumes.
        """
        self.resumes(serverContext(self.issued, SSL.TLS1_2_VERSION, tickets=False))

    def test_tls13TicketAfterHandshake(self) -> None:
        """
        In TLS 1.3 the session is kept when the ticket arrives after the
        handshake, not before (it would not resume).
        """
        tls = self.client()
        server, client = self.connect(
            tls, serverContext(self.issued, SSL.TLS1_3_VERSION), exchange=False
        )
        self.assertIsNone(self.peer.session)
        server.send(b"s")
        pump(client, server)
        client.recv(1)
        self.assertIsInstance(self.peer.session, SSL.Session)

    def test_newTicketReplaces(self) -> None:
        """
        Each new TLS 1.3 ticket replaces the session kept for the peer.
        """
        tls = self.client()
        server = serverContext(self.issued, SSL.TLS1_3_VERSION)
        self.connect(tls, server)
        first = self.peer.session
        _, client = self.connect(tls, server)
        self.assertTrue(_openssl.sessionReused(client))
        self.assertIsNot(self.peer.session, first)
        self.assertIsInstance(self.peer.session, SSL.Session)

    def test_notResumedIsReplaced(self) -> None:
        """
        A session the upstream does not resume (it restarted: new ticket keys, an
        empty cache) is replaced by the new one, and the next connection resumes.
        """
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            peer = peerState()
            tls = self.client()
            self.connect(tls, serverContext(self.issued, version), peer=peer)
            old = peer.session
            restarted = serverContext(self.issued, version)
            _, client = self.connect(tls, restarted, peer=peer)
            self.assertFalse(_openssl.sessionReused(client))
            self.assertIsNot(peer.session, old)
            _, client = self.connect(tls, restarted, peer=peer)
            self.assertTrue(_openssl.sessionReused(client))

    def test_notResumableIsDropped(self) -> None:
        """
        A TLS 1.3 session the upstream did not resume, and that was not replaced
        by a ticket, is not offered again.
        """
        tls = self.client()
        self.connect(tls, serverContext(self.issued, SSL.TLS1_3_VERSION))
        self.assertIsNotNone(self.peer.session)
        noTickets = serverContext(self.issued, SSL.TLS1_3_VERSION)
        _openssl.setNumTickets(noTickets, 0)
        _, client = self.connect(tls, noTickets)
        self.assertFalse(_openssl.sessionReused(client))
        self.assertIsNone(self.peer.session)

    def test_reuseOff(self) -> None:
        """
        C{proxy_ssl_session_reuse off} keeps nothing and asks for no tickets.
        """
        tls = self.client(sessionReuse=False)
        server = serverContext(self.issued, SSL.TLS1_2_VERSION)
        for _ in range(2):
            _, client = self.connect(tls, server)
            self.assertFalse(_openssl.sessionReused(client))
        self.assertIsNone(self.peer.session)
        self.peer.session = client.get_session()
        _, client = self.connect(tls, server)
        self.assertFalse(_openssl.sessionReused(client), "never offered")

    def test_otherContext(self) -> None:
        """
        A session made under another context (an older configuration) is not
        offered; the new handshake replaces it.
        """
        server = serverContext(self.issued)
        self.connect(self.client(), server)
        old = self.peer.session
        _, client = self.connect(self.client(), server)
        self.assertFalse(_openssl.sessionReused(client))
        self.assertIsInstance(self.peer.session, SSL.Session)
        self.assertIsNot(self.peer.session, old)
