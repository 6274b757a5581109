"""
TLS contexts built from the configuration model, once, at load.

L{buildServerContext} turns a L{ServerTLS} into a pyOpenSSL context with nginx's
semantics (certificates, protocols, ciphers, session cache, tickets, client
verification, ALPN); L{ServerContextFactory} hands it to
L{twisted.protocols.tls.TLSMemoryBIOFactory}.  Every file is read here; nothing is read
inside an OpenSSL callback.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from weakref import WeakKeyDictionary

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import LogLevel
from zope.interface import implementer

from tlsrelay import _openssl
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import CertificatePair, ServerTLS, Where
from tlsrelay._log import Logger

log = Logger()

# Every protocol nginx knows, oldest first, with its OpenSSL version constant
# (None: gone from the library entirely).
PROTOCOLS: dict[str, int | None] = {
    "SSLv2": None,
    "SSLv3": None,
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}

_NO_OPTION: dict[str, int] = {
    "TLSv1": SSL.OP_NO_TLSv1,
    "TLSv1.1": SSL.OP_NO_TLSv1_1,
    "TLSv1.2": SSL.OP_NO_TLSv1_2,
    "TLSv1.3": SSL.OP_NO_TLSv1_3,
}

# OpenSSL refuses TLS 1.0 and 1.1 (their SHA-1 based signatures) at security
# level 1 and above.
_LEGACY = ("TLSv1", "TLSv1.1")

# nginx's ngx_ssl_verify_error_optional: errors ``optional_no_ca`` tolerates.
_NO_CA_ERRORS = frozenset({18, 19, 20, 21, 27})


def readFile(path: str, what: str, where: Where | None) -> bytes:
    """
    Read a file named by the configuration, or raise a L{ConfigError} that says
    which file and why, like C{cannot load certificate "/x.crt": no such file}.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError.at(
            f'cannot load {what} "{path}": no such file', where
        ) from None
    except PermissionError:
        raise ConfigError.at(
            f'cannot load {what} "{path}": permission denied', where
        ) from None
    except IsADirectoryError:
        raise ConfigError.at(
            f'cannot load {what} "{path}": is a directory', where
        ) from None
    except OSError as e:
        raise ConfigError.at(
            f'cannot load {what} "{path}": {e.strerror}', where
        ) from None


def readPasswords(paths: Sequence[str], where: Where | None) -> list[bytes]:
    """
    The passphrases of C{ssl_password_file}: one per line, tried in turn.
    """
    passwords: list[bytes] = []
    for path in paths:
        for line in readFile(path, "password file", where).splitlines():
            if line:
                passwords.append(line)
    return passwords


def loadCertificates(path: str, where: Where | None) -> list[x509.Certificate]:
    """
    Every certificate in a PEM file, leaf first.
    """
    data = readFile(path, "certificate", where)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigError.at(
            f'cannot load certificate "{path}": no PEM certificate found', where
        )
    return certificates


def loadPrivateKey(path: str, passwords: Sequence[bytes], where: Where | None) -> Any:
    """
    The private key in a PEM file, decrypted with the first passphrase that works.
    """
    data = readFile(path, "certificate key", where)
    if b"PRIVATE KEY-----" not in data:
        raise ConfigError.at(
            f'cannot load certificate key "{path}": no PEM private key found', where
        )
    candidates: list[bytes | None] = [None, *passwords]
    lastError = "bad key"
    for password in candidates:
        try:
            key = serialization.load_pem_private_key(data, password)
        except TypeError:
            lastError = (
                "the key is encrypted and no ssl_password_file is given"
                if not passwords
                else "no passphrase in ssl_password_file decrypts it"
            )
            continue
        except ValueError as e:
            lastError = (
                "no passphrase in ssl_password_file decrypts it"
                if password is not None
                else str(e).splitlines()[0]
            )
            continue
        return key
    raise ConfigError.at(f'cannot load certificate key "{path}": {lastError}', where)


def offeredProtocols(
    listed: Iterable[str], securityLevel: int
) -> tuple[list[str], list[str]]:
    """
    Which of the listed protocols the TLS library will offer, and a sentence for
    each one it will not.
    """
    offered: list[str] = []
    problems: list[str] = []
    version = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii")
    for name in PROTOCOLS:
        if name not in listed:
            continue
        if PROTOCOLS[name] is None:
            problems.append(f"{name} is not supported by {version}")
        elif name in _LEGACY and securityLevel > 0:
            problems.append(
                f"{name} is refused by {version} at security level {securityLevel}"
                " (add @SECLEVEL=0 to ssl_ciphers to allow it)"
            )
        else:
            offered.append(name)
    return offered, problems


def setProtocols(
    context: SSL.Context,
    listed: Sequence[str],
    where: Where | None,
    directive: str = "ssl_protocols",
) -> list[str]:
    """
    Offer exactly the listed protocols the library can do (nginx: unlisted protocols
    are disabled), warn about the rest, and return what is offered.
    """
    offered, problems = offeredProtocols(listed, _openssl.getSecurityLevel(context))
    if problems:
        log.warn(
            "{directive}: {problems}; offering {offered}{at}",
            directive=directive,
            problems="; ".join(problems),
            offered=" ".join(offered) or "nothing",
            at=f" in {where}" if where is not None else "",
            where=where,
        )
    if not offered:
        raise ConfigError.at(
            f'"{directive}" leaves no protocol that this TLS library can offer', where
        )
    versions = [PROTOCOLS[name] for name in offered]
    context.set_min_proto_version(min(v for v in versions if v is not None))
    context.set_max_proto_version(max(v for v in versions if v is not None))
    for name, option in _NO_OPTION.items():
        if name not in offered:
            context.set_options(option)
    return offered


def sessionIdContext(tls: ServerTLS) -> bytes:
    """
    A session-id context that is the same in every process and on every machine
    serving the same certificates with the same client verification, as nginx
    derives its own from the certificates' contents (not their paths), so that
    instances sharing ticket keys resume each other's sessions.
    """
    digest = hashlib.sha256()
    for pair in tls.certificates:
        for certificate in loadCertificates(pair.certificate, pair.where):
            digest.update(certificate.fingerprint(hashes.SHA256()))
    digest.update(tls.verifyClient.encode("ascii"))
    for path in (tls.clientCertificate, tls.trustedCertificate):
        if path is not None and tls.verifyClient != "off":
            for certificate in loadCertificates(path, None):
                digest.update(certificate.fingerprint(hashes.SHA256()))
    return digest.digest()[:32]


# pyOpenSSL clears the verification error when a callback accepts a certificate;
# ``optional_no_ca`` keeps the first error it tolerated here so that
# ``$ssl_client_verify`` still says ``FAILED:reason``, as nginx does.
_tolerated: WeakKeyDictionary[SSL.Connection, int] = WeakKeyDictionary()


def toleratedVerifyError(connection: SSL.Connection) -> int | None:
    """
    The verification error C{ssl_verify_client optional_no_ca} let through on this
    connection, if any.
    """
    return _tolerated.get(connection)


VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]
"""
A pyOpenSSL verify callback: C{(connection, certificate, errno, depth, ok)}.
"""


def _tolerateErrors(callback: VerifyCallback) -> VerifyCallback:
    """
    C{callback}, made unable to raise, as Twisted's C{_sslverify._tolerateErrors}
    makes its info callback: an exception (a bug) refuses the certificate, which
    fails that one handshake, and is logged once, at error level, instead of
    escaping through pyOpenSSL into the TLS layer.
    """

    @functools.wraps(callback)
    def verify(
        connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        try:
            return callback(connection, cert, errno, depth, ok)
        except Exception:
            log.failure(
                "verifying a client certificate (depth {depth}, error {errno}):"
                " refused",
                level=LogLevel.error,
                depth=depth,
                errno=errno,
            )
            return False

    return verify


@_tolerateErrors
def _verifyOptionalNoCA(
    connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    if ok:
        return True
    if errno in _NO_CA_ERRORS:
        _tolerated.setdefault(connection, errno)
        return True
    return False


@_tolerateErrors
def _verifyStandard(
    connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    return bool(ok)


def addCertificateStore(
    context: SSL.Context,
    path: str,
    where: Where | None,
    sendNames: bool = False,
) -> None:
    """
    Trust every certificate in the PEM file at C{path} for verifying peers
    (C{ssl_client_certificate}, C{ssl_trusted_certificate},
    C{proxy_ssl_trusted_certificate}).

    @param sendNames: also name them to clients as acceptable issuers in the
        CertificateRequest (C{ssl_client_certificate} does,
        C{ssl_trusted_certificate} does not).
    """
    certificates = loadCertificates(path, where)
    store = context.get_cert_store()
    assert store is not None
    for certificate in certificates:
        try:
            store.add_cert(crypto.X509.from_cryptography(certificate))
        except crypto.Error:
            pass  # duplicates in the file are harmless
    if sendNames:
        for certificate in certificates:
            context.add_client_ca(certificate)


def addCRL(context: SSL.Context, path: str, where: Where | None) -> None:
    """
    Check peers' certificates, the whole chain, against every CRL in the PEM file
    at C{path} (C{ssl_crl}, C{proxy_ssl_crl}).
    """
    data = readFile(path, "CRL", where)
    store = context.get_cert_store()
    assert store is not None
    end = b"-----END X509 CRL-----"
    count = 0
    for block in data.split(end)[:-1]:
        try:
            crl = x509.load_pem_x509_crl(block + end + b"\n")
        except ValueError:
            raise ConfigError.at(f'cannot load CRL "{path}": bad PEM', where) from None
        store.add_crl(crl)
        count += 1
    if not count:
        raise ConfigError.at(f'cannot load CRL "{path}": no PEM CRL found', where)
    store.set_flags(
        crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL
    )


def _alpnSelector(protocols: Sequence[str]) -> Any:
    wanted = [p.encode("ascii") for p in protocols]

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in wanted:
            if protocol in offered:
                return protocol
        # nginx refuses the handshake with a fatal alert when nothing matches;
        # pyOpenSSL turns an exception here into SSL_TLSEXT_ERR_ALERT_FATAL.
        # Shaped like OpenSSL's own errors: Twisted's TLS layer reads them as
        # (library, function, reason) triples.
        raise SSL.Error([("SSL routines", "", "no application protocol")])

    return select


def useCertificate(
    context: SSL.Context, pair: CertificatePair, passwords: Sequence[bytes]
) -> None:
    """
    Present the certificate chain and key of C{pair} (C{ssl_certificate} and
    C{ssl_certificate_key}, C{proxy_ssl_certificate} and its key), or raise a
    L{ConfigError} that says which file is wrong, or that the key does not match.
    """
    loadCertificates(pair.certificate, pair.where)
    key = loadPrivateKey(pair.key, passwords, pair.where)
    try:
        context.use_certificate_chain_file(pair.certificate)
    except SSL.Error as e:
        raise ConfigError.at(
            f'cannot load certificate "{pair.certificate}": {_reason(e)}', pair.where
        ) from None
    try:
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise ConfigError.at(
            f'certificate key "{pair.key}" does not match certificate '
            f'"{pair.certificate}"',
            pair.where,
        ) from None


def _reason(error: SSL.Error) -> str:
    try:
        return ", ".join(str(part[2]) for part in error.args[0]) or str(error)
    except (IndexError, TypeError):
        return str(error)


def buildServerContext(tls: ServerTLS, where: Where | None = None) -> SSL.Context:
    """
    A server context with nginx's semantics for C{tls}, or a L{ConfigError} naming
    the file and line of the setting that is wrong.
    """
    if not tls.certificates:
        raise ConfigError.at(
            'no "ssl_certificate" is defined for the "listen ... ssl"', where
        )
    context = SSL.Context(SSL.TLS_METHOD)
    # OP_IGNORE_UNEXPECTED_EOF, as nginx sets it: a client that closes TCP
    # without close_notify keeps its cached session.
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_IGNORE_UNEXPECTED_EOF
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_ECDH_USE
        | SSL.OP_SINGLE_DH_USE
    )
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        context.set_cipher_list(tls.ciphers.encode("ascii"))
    except SSL.Error:
        raise ConfigError.at(
            f'SSL_CTX_set_cipher_list("{tls.ciphers}") failed: no cipher matches',
            tls.at("ssl_ciphers", where),
        ) from None
    setProtocols(context, tls.protocols, tls.protocolsWhere or where)
    if tls.preferServerCiphers:
        context.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    if tls.ecdhCurve != "auto":
        try:
            _openssl.setGroups(context, tls.ecdhCurve)
        except ValueError as e:
            raise ConfigError.at(str(e), tls.at("ssl_ecdh_curve", where)) from None
    if tls.dhparam is not None:
        readFile(tls.dhparam, "DH parameters", tls.at("ssl_dhparam", where))
        try:
            context.load_tmp_dh(tls.dhparam.encode("utf-8", "surrogateescape"))
        except SSL.Error as e:
            raise ConfigError.at(
                f'cannot load DH parameters "{tls.dhparam}": {_reason(e)}',
                tls.at("ssl_dhparam", where),
            ) from None

    passwords = readPasswords(tls.passwordFiles, tls.at("ssl_password_file", where))
    for pair in tls.certificates:
        useCertificate(context, pair, passwords)

    context.set_session_id(sessionIdContext(tls))
    context.set_timeout(max(1, int(tls.sessionTimeout)))
    cache = tls.sessionCache
    if cache.mode == "off":
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    elif cache.mode == "none":
        # nginx: tell clients sessions may be reused but store nothing (turning the
        # cache off entirely confuses some clients and breaks TLS 1.3 tickets).
        context.set_session_cache_mode(
            SSL.SESS_CACHE_SERVER | SSL.SESS_CACHE_NO_INTERNAL_STORE
        )
        _openssl.setSessionCacheSize(context, 1)
    else:
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        _openssl.setSessionCacheSize(context, cache.sessionLimit())
    if not tls.sessionTickets:
        context.set_options(SSL.OP_NO_TICKET)
        if cache.mode in ("off", "none"):
            _openssl.setNumTickets(context, 0)

    if tls.verifyClient != "off":
        caFile = tls.clientCertificate or tls.trustedCertificate
        if caFile is None and tls.verifyClient != "optional_no_ca":
            raise ConfigError.at(
                "no ssl_client_certificate or ssl_trusted_certificate for "
                f"ssl_verify_client {tls.verifyClient}",
                tls.at("ssl_verify_client", where),
            )
        if tls.clientCertificate is not None:
            addCertificateStore(
                context,
                tls.clientCertificate,
                tls.at("ssl_client_certificate", where),
                True,
            )
        if tls.trustedCertificate is not None:
            addCertificateStore(
                context,
                tls.trustedCertificate,
                tls.at("ssl_trusted_certificate", where),
                False,
            )
        mode = SSL.VERIFY_PEER
        if tls.verifyClient == "on":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        callback = (
            _verifyOptionalNoCA
            if tls.verifyClient == "optional_no_ca"
            else _verifyStandard
        )
        context.set_verify(mode, callback)
        context.set_verify_depth(tls.verifyDepth)
        if tls.crl is not None:
            addCRL(context, tls.crl, tls.at("ssl_crl", where))

    if tls.alpn:
        context.set_alpn_select_callback(_alpnSelector(tls.alpn))

    if tls.confCommands:
        try:
            _openssl.applyConfCommands(context, tls.confCommands, server=True)
        except ValueError as e:
            raise ConfigError.at(str(e), tls.at("ssl_conf_command", where)) from None
    return context


@implementer(IOpenSSLServerConnectionCreator)
@frozen
class ServerContextFactory:
    """
    Creates server connections from one context built at load.
    """

    context: SSL.Context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)
