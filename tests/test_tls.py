"""
Tests for L{tlsrelay._tls}: server contexts built from the model, checked with
in-memory handshakes against pyOpenSSL clients.
"""

from __future__ import annotations

import os

import trustme
from OpenSSL import SSL, crypto
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tlsrelay import _openssl
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import CertificatePair, ServerTLS, SessionCache, Where
from tlsrelay._tls import (
    _tolerateErrors,
    _verifyOptionalNoCA,
    _verifyStandard,
    buildServerContext,
    toleratedVerifyError,
)
from tlsrelay.testing import CertificateFiles, memoryHandshake, writeCertificates


def clientContext(
    caFile: str | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
    certificate: CertificateFiles | None = None,
) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    if caFile is not None:
        context.load_verify_locations(caFile)
        context.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    if minimum is not None:
        context.set_min_proto_version(minimum)
    if maximum is not None:
        context.set_max_proto_version(maximum)
    if certificate is not None:
        context.use_certificate_chain_file(certificate.certificate)
        context.use_privatekey_file(certificate.key)
    return context


class ServerContextTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.files = writeCertificates(self.dir)
        self.where = Where(os.path.join(self.dir, "relay.conf"), 7)

    def settings(self, **kwargs: object) -> ServerTLS:
        pair = CertificatePair(self.files.certificate, self.files.key, self.where)
        kwargs.setdefault("certificates", (pair,))
        return ServerTLS(**kwargs)  # type: ignore[arg-type]

    def test_handshakeVerifies(self) -> None:
        """
        The default context serves the chain and key; a client that trusts the CA
        completes TLS 1.3.
        """
        context = buildServerContext(self.settings())
        _, client = memoryHandshake(context, clientContext(self.files.caFile))
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.3")

    def test_seed000Protocols(self) -> None:
        """
        C{ssl_protocols SSLv3 TLSv1 TLSv1.1 TLSv1.2} loads with a warning naming what
        is offered: TLS 1.2 only.  TLS 1.3 is not offered because it is not listed;
        TLS 1.1 is refused at the library's security level.
        """
        listed = ("SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2")
        with capturedLogs() as events:
            context = buildServerContext(
                self.settings(protocols=listed, protocolsWhere=self.where)
            )
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["offered"], "TLSv1.2")
        self.assertIn("SSLv3 is not supported by OpenSSL", warning["problems"])
        self.assertIn("TLSv1.1 is refused", warning["problems"])
        _, client = memoryHandshake(context, clientContext(self.files.caFile))
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.2")
        self.assertRaises(
            SSL.Error,
            memoryHandshake,
            context,
            clientContext(self.files.caFile, minimum=SSL.TLS1_3_VERSION),
        )

    def test_onlyTLS13(self) -> None:
        context = buildServerContext(self.settings(protocols=("TLSv1.3",)))
        self.assertRaises(
            SSL.Error,
            memoryHandshake,
            context,
            clientContext(self.files.caFile, maximum=SSL.TLS1_2_VERSION),
        )

    def test_noOfferableProtocol(self) -> None:
        error = self.assertRaises(
            ConfigError,
            buildServerContext,
            self.settings(protocols=("SSLv3",), protocolsWhere=self.where),
        )
        self.assertEqual(
            str(error),
            f'"ssl_protocols" leaves no protocol that this TLS library can offer in '
            f"{self.where}",
        )

    def test_missingCertificate(self) -> None:
        missing = os.path.join(self.dir, "nope.pem")
        error = self.assertRaises(
            ConfigError,
            buildServerContext,
            self.settings(
                certificates=(CertificatePair(missing, self.files.key, self.where),)
            ),
        )
        self.assertEqual(
            str(error),
            f'cannot load certificate "{missing}": no such file in {self.where}',
        )

    def test_notACertificate(self) -> None:
        error = self.assertRaises(
            ConfigError,
            buildServerContext,
            self.settings(
                certificates=(
                    CertificatePair(self.files.key, self.files.key, self.where),
                )
            ),
        )
        self.assertIn("no PEM certificate found", error.message)

    def test_keyMismatch(self) -> None:
        other = writeCertificates(os.path.join(self.dir, "other"))
        error = self.assertRaises(
            ConfigError,
            buildServerContext,
            self.settings(
                certificates=(
                    CertificatePair(self.files.certificate, other.key, self.where),
                )
            ),
        )
        self.assertEqual(
            error.message,
            f'certificate key "{other.key}" does not match certificate '
            f'"{self.files.certificate}"',
        )
        self.assertEqual(error.line, 7)

    def test_keyInCertificateFile(self) -> None:
        combined = os.path.join(self.dir, "combined.pem")
        with open(combined, "wb") as f:
            for path in (self.files.certificate, self.files.key):
                with open(path, "rb") as part:
                    f.write(part.read())
        context = buildServerContext(
            self.settings(certificates=(CertificatePair(combined, combined),))
        )
        memoryHandshake(context, clientContext(self.files.caFile))

    def test_encryptedKey(self) -> None:
        """
        C{ssl_password_file}: each line is tried until one decrypts the key; with
        none that works the error says so.
        """
        from cryptography.hazmat.primitives import serialization

        with open(self.files.key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        encrypted = os.path.join(self.dir, "encrypted.key")
        with open(encrypted, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"secret"),
                )
            )
        passwords = os.path.join(self.dir, "passwords")
        with open(passwords, "w") as f:
            f.write("wrong\nsecret\n")
        pair = CertificatePair(self.files.certificate, encrypted, self.where)
        context = buildServerContext(
            self.settings(certificates=(pair,), passwordFiles=(passwords,))
        )
        memoryHandshake(context, clientContext(self.files.caFile))
        error = self.assertRaises(
            ConfigError, buildServerContext, self.settings(certificates=(pair,))
        )
        self.assertIn("the key is encrypted and no ssl_password_file", error.message)

    def test_rsaAndEcdsa(self) -> None:
        """
        Two certificate pairs (RSA and ECDSA) on one server: each client gets the
        one it can use.
        """
        rsa = writeCertificates(
            os.path.join(self.dir, "rsa"),
            ca=self.files.ca,
            keyType=trustme.KeyType.RSA,
        )
        ecdsa = writeCertificates(
            os.path.join(self.dir, "ec"),
            ca=self.files.ca,
            keyType=trustme.KeyType.ECDSA,
        )
        context = buildServerContext(
            self.settings(
                certificates=(
                    CertificatePair(rsa.certificate, rsa.key),
                    CertificatePair(ecdsa.certificate, ecdsa.key),
                ),
                protocols=("TLSv1.2",),
            )
        )
        for cipher, keyName in (
            (b"ECDHE-RSA-AES128-GCM-SHA256", "RSA"),
            (b"ECDHE-ECDSA-AES128-GCM-SHA256", "EC"),
        ):
            client = clientContext(self.files.caFile)
            client.set_cipher_list(cipher)
            _, connection = memoryHandshake(context, client)
            certificate = connection.get_peer_certificate()
            assert certificate is not None
            self.assertIn(
                keyName,
                type(certificate.to_cryptography().public_key()).__name__.upper(),
            )

    def test_sessionCacheResumes(self) -> None:
        """
        With a builtin cache and tickets off, a TLS 1.2 session ID resumes; with the
        cache off, it does not.
        """
        for mode, expected in (("builtin", True), ("off", False)):
            context = buildServerContext(
                self.settings(
                    sessionCache=SessionCache(mode),  # type: ignore[arg-type]
                    sessionTickets=False,
                    protocols=("TLSv1.2",),
                )
            )
            client = clientContext(self.files.caFile)
            _, first = memoryHandshake(context, client)
            session = first.get_session()
            assert session is not None
            _, second = memoryHandshake(context, client, session=session)
            self.assertEqual(_openssl.sessionReused(second), expected, mode)

    def test_ticketsResume(self) -> None:
        """
        Session tickets (the default) resume TLS 1.3 with no server cache.
        """
        context = buildServerContext(self.settings())
        client = clientContext(self.files.caFile)
        _, first = memoryHandshake(context, client)
        session = first.get_session()
        assert session is not None
        _, second = memoryHandshake(context, client, session=session)
        self.assertTrue(_openssl.sessionReused(second))

    def test_cacheSizeHonoured(self) -> None:
        context = buildServerContext(
            self.settings(sessionCache=SessionCache("builtin", builtinSize=1234))
        )
        self.assertEqual(_openssl.getSessionCacheSize(context), 1234)
        shared = buildServerContext(
            self.settings(
                sessionCache=SessionCache(
                    "shared", sharedName="SSL", sharedSize=1 << 20
                )
            )
        )
        self.assertEqual(_openssl.getSessionCacheSize(shared), 4000)

    def verifyClient(
        self, mode: str, certificate: CertificateFiles | None
    ) -> SSL.Connection:
        context = buildServerContext(
            self.settings(clientCertificate=self.files.caFile, verifyClient=mode)
        )
        server, _ = memoryHandshake(
            context, clientContext(self.files.caFile, certificate=certificate)
        )
        return server

    def test_verifyClient(self) -> None:
        """
        C{ssl_verify_client}: C{on} needs a certificate from the CA; C{optional}
        accepts none or a good one; C{optional_no_ca} also accepts an unknown CA.
        """
        good = writeCertificates(
            os.path.join(self.dir, "client"), ["client@example.com"], ca=self.files.ca
        )
        stranger = writeCertificates(
            os.path.join(self.dir, "stranger"), ["stranger@example.com"]
        )
        server = self.verifyClient("on", good)
        self.assertIsNotNone(server.get_peer_certificate())
        self.assertRaises(SSL.Error, self.verifyClient, "on", None)
        self.assertRaises(SSL.Error, self.verifyClient, "on", stranger)
        self.assertIsNone(self.verifyClient("optional", None).get_peer_certificate())
        self.assertIsNotNone(self.verifyClient("optional", good).get_peer_certificate())
        self.assertRaises(SSL.Error, self.verifyClient, "optional", stranger)
        accepted = self.verifyClient("optional_no_ca", stranger)
        self.assertIsNotNone(accepted.get_peer_certificate())

    def test_verifyClientNeedsCA(self) -> None:
        error = self.assertRaises(
            ConfigError, buildServerContext, self.settings(verifyClient="on")
        )
        self.assertIn("no ssl_client_certificate", error.message)

    def test_alpn(self) -> None:
        context = buildServerContext(self.settings(alpn=("h2", "http/1.1")))
        client = clientContext(self.files.caFile)
        client.set_alpn_protos([b"http/1.1"])
        server, _ = memoryHandshake(context, client)
        self.assertEqual(server.get_alpn_proto_negotiated(), b"http/1.1")
        other = clientContext(self.files.caFile)
        other.set_alpn_protos([b"imap"])
        self.assertRaises(SSL.Error, memoryHandshake, context, other)

    def test_confCommand(self) -> None:
        """
        C{ssl_conf_command Ciphersuites ...} restricts TLS 1.3 suites.
        """
        context = buildServerContext(
            self.settings(
                confCommands=(("Ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"),)
            )
        )
        server, _ = memoryHandshake(context, clientContext(self.files.caFile))
        self.assertEqual(server.get_cipher_name(), "TLS_CHACHA20_POLY1305_SHA256")

    def test_badCiphers(self) -> None:
        error = self.assertRaises(
            ConfigError, buildServerContext, self.settings(ciphers="NOPE-NOTHING")
        )
        self.assertIn('SSL_CTX_set_cipher_list("NOPE-NOTHING") failed', error.message)

    def test_ecdhCurve(self) -> None:
        """
        C{ssl_ecdh_curve} limits the key exchange to the listed groups, even
        when the client prefers another; an unknown curve is a configuration
        error.
        """
        context = buildServerContext(self.settings(ecdhCurve="prime256v1"))
        server, client = memoryHandshake(context, clientContext(self.files.caFile))
        for connection in (server, client):
            name = connection.get_group_name()
            self.assertEqual(None if name is None else name.lower(), "secp256r1")
        self.assertRaises(
            ConfigError, buildServerContext, self.settings(ecdhCurve="nocurve")
        )


class Exploding:
    """
    An C{ok} argument whose truth cannot be told: a stand-in for a bug.
    """

    def __bool__(self) -> bool:
        raise RuntimeError("bug")


class VerifyCallbackTests(SynchronousTestCase):
    """
    The client-certificate verify callbacks cannot raise into pyOpenSSL: a bug
    refuses the certificate, once logged at error level.
    """

    def test_bugRefuses(self) -> None:
        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        with capturedLogs() as events:
            # object() cannot be weakly referenced: the record of a tolerated
            # error fails.
            self.assertFalse(_verifyOptionalNoCA(object(), None, 20, 0, 0))  # type: ignore[arg-type]
            self.assertFalse(_verifyStandard(connection, None, 0, 0, Exploding()))  # type: ignore[arg-type]
        self.assertEqual([e["log_level"] for e in events], [LogLevel.error] * 2)
        self.assertEqual(len(self.flushLoggedErrors(TypeError, RuntimeError)), 2)
        # Without a bug, they decide as before.
        self.assertTrue(_verifyStandard(connection, None, 0, 0, 1))  # type: ignore[arg-type]
        self.assertFalse(_verifyStandard(connection, None, 20, 0, 0))  # type: ignore[arg-type]
        self.assertTrue(_verifyOptionalNoCA(connection, None, 20, 0, 0))  # type: ignore[arg-type]
        self.assertEqual(toleratedVerifyError(connection), 20)
        self.assertFalse(_verifyOptionalNoCA(connection, None, 10, 0, 0))  # type: ignore[arg-type]

    def test_bugFailsOneHandshake(self) -> None:
        """
        In a handshake, a callback that raises fails that handshake with an
        L{SSL.Error}, as a refused certificate does, and not with the bug's
        exception (which C{TLSMemoryBIOProtocol} would not expect).
        """
        directory = os.path.abspath(self.mktemp())
        files = writeCertificates(directory)
        client = writeCertificates(os.path.join(directory, "client"), ca=files.ca)

        @_tolerateErrors
        def broken(
            connection: SSL.Connection,
            cert: crypto.X509,
            errno: int,
            depth: int,
            ok: int,
        ) -> bool:
            raise RuntimeError("bug")

        context = buildServerContext(
            ServerTLS(
                certificates=(CertificatePair(files.certificate, files.key),),
                clientCertificate=files.caFile,
                verifyClient="optional",
            )
        )
        context.set_verify(SSL.VERIFY_PEER, broken)
        with capturedLogs() as events:
            self.assertRaises(
                SSL.Error,
                memoryHandshake,
                context,
                clientContext(files.caFile, certificate=client),
            )
        self.assertEqual(len(events), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # The next handshake, without a certificate to check, is not affected.
        memoryHandshake(context, clientContext(files.caFile))
