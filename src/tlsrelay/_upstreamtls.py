"""
TLS from the relay to its upstream servers: the C{proxy_ssl*} directives.

L{tlsForServer} builds one client context per stream C{server} at load (client
certificate, protocols, ciphers, conf commands, trust roots, verify depth, CRL) and
returns a L{ClientTLS}: given a peer of the upstream pool, it gives the connection
creator the pool wraps that peer's connections with.  Per connection it sets SNI,
offers the peer's last session, checks the upstream's name and keeps the newest
session the upstream hands out (TLS 1.3 tickets arrive after the handshake).

nginx semantics, with these differences (see C{docs/}):

  - C{proxy_ssl_verify on} without C{proxy_ssl_trusted_certificate}: nginx trusts
    nothing and every handshake fails; we trust the system's default store and say
    so at load.
  - The name check uses service-identity: DNS names against DNS SANs, IP literals
    against IP SANs (nginx's C{X509_check_host} never matches IP SANs, and falls
    back to the subject's CN when there is no SAN; service-identity does not).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from attrs import define, field, frozen
from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from tlsrelay import _openssl
from tlsrelay._balance import PeerState
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import CertificatePair, UpstreamTLS, Where
from tlsrelay._log import Logger
from tlsrelay._tls import (
    addCertificateStore,
    addCRL,
    readPasswords,
    setProtocols,
    useCertificate,
)

__all__ = ["ClientTLS", "UpstreamVerificationError", "sslName", "tlsForServer"]

log = Logger()

VerifyFailure = Literal[
    "untrusted",
    "expired",
    "not yet valid",
    "chain too long",
    "revoked",
    "no CRL",
    "name mismatch",
    "invalid",
]

# X509_V_ERR_* codes (openssl/x509_vfy.h) by what an operator must fix.
_FAILURES: dict[int, VerifyFailure] = {
    2: "untrusted",  # unable to get issuer certificate
    3: "no CRL",  # unable to get certificate CRL
    9: "not yet valid",
    10: "expired",
    11: "no CRL",  # CRL not yet valid
    12: "no CRL",  # CRL has expired
    18: "untrusted",  # self-signed certificate
    19: "untrusted",  # self-signed certificate in chain
    20: "untrusted",  # unable to get local issuer certificate
    21: "untrusted",  # unable to verify the first certificate
    22: "chain too long",
    23: "revoked",
    24: "untrusted",  # invalid CA certificate
    25: "chain too long",  # path length constraint exceeded
    27: "untrusted",  # certificate not trusted
}


class UpstreamVerificationError(SSL.Error):
    """
    The upstream's certificate was refused; C{str()} says why, as nginx words it
    (C{upstream SSL certificate verify error: (10:certificate has expired)}).
    C{args} keep OpenSSL's error queue, as Twisted's TLS layer expects of an
    L{SSL.Error}.

    @ivar kind: what is wrong, for operators: C{"untrusted"}, C{"expired"},
        C{"name mismatch"}, C{"chain too long"}, ...
    @ivar message: the reason.
    """

    def __init__(self, message: str, kind: VerifyFailure, queue: object = ()) -> None:
        super().__init__(list(queue) if isinstance(queue, list) else [])
        self.message = message
        self.kind = kind

    def __str__(self) -> str:
        return self.message


def sslName(proxyPassHost: str, name: str | None = None) -> str:
    """
    The name the upstream must prove: C{proxy_ssl_name}, else the host of
    C{proxy_pass} (a group's name), without a port, as nginx strips it.
    """
    raw = proxyPassHost if name is None else name
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        pass
    else:
        return raw  # a bare IPv6 literal has colons but no port
    start = raw.find("]") if raw.startswith("[") else 0
    colon = raw.find(":", max(start, 0))
    return raw if colon == -1 else raw[:colon]


def _ipLiteral(name: str) -> str | None:
    """
    The IP address C{name} is a literal for (IPv6 with or without brackets).
    """
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return None


def _sniName(name: str) -> bytes | None:
    """
    What to send as SNI for C{name}: nothing for IP literals (RFC 6066).
    """
    if not name or _ipLiteral(name) is not None:
        return None
    try:
        return name.encode("idna")
    except UnicodeError:
        return name.encode("utf-8", "surrogateescape")


def _verifyErrorString(code: int) -> str:
    text: bytes = _ffi.string(_lib.X509_verify_cert_error_string(code))
    return text.decode("ascii", "replace")


def _subject(certificate: crypto.X509) -> str:
    try:
        return certificate.to_cryptography().subject.rfc4514_string()
    except ValueError:
        return "?"


@define(eq=False)
class _Attempt:
    """
    What one upstream connection needs in the context's callbacks.

    @ivar offered: the session offered for resumption, if any.
    @ivar failure: why verification refused the upstream.
    @ivar current: OpenSSL's session pointer last seen, to notice new tickets.
    """

    peer: PeerState
    offered: SSL.Session | None = None
    failure: UpstreamVerificationError | None = None
    handshakeDone: bool = False
    current: Any = None


class _UpstreamConnection(SSL.Connection):
    """
    A client connection that knows its peer, and reports a refused certificate
    with the reason verification found instead of OpenSSL's generic error.
    """

    attempt: _Attempt | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except SSL.Error as e:
            attempt = self.attempt
            if type(e) is not SSL.Error or attempt is None:
                raise
            failure = attempt.failure
            if failure is not None:
                queue = e.args[0] if e.args else []
                raise UpstreamVerificationError(
                    failure.message, failure.kind, queue
                ) from e
            raise


@implementer(IOpenSSLClientConnectionCreator)
@frozen
class _PeerCreator:
    """
    Creates the TLS connections to one peer.
    """

    tls: ClientTLS
    peer: PeerState

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        tls, peer = self.tls, self.peer
        connection = _UpstreamConnection(tls.context, None)
        attempt = _Attempt(peer)
        connection.attempt = attempt
        if tls.sni is not None:
            connection.set_tlsext_host_name(tls.sni)
        session = peer.session
        if tls.sessionReuse and isinstance(session, SSL.Session):
            try:
                connection.set_session(session)
            except ValueError:
                pass  # made by another context (an older configuration)
            else:
                attempt.offered = session
        return connection


@define(eq=False)
class ClientTLS:
    """
    The upstream TLS of one stream C{server}: one context, built at load, and a
    connection creator per peer (call the instance with a L{PeerState}; it is the
    pool's C{tlsFor}).

    @ivar context: the client context.
    @ivar name: the name the upstream must prove (C{proxy_ssl_name}).
    @ivar sni: the SNI sent, or L{None} (C{proxy_ssl_server_name off}, or an IP).
    @ivar verify: C{proxy_ssl_verify}.
    @ivar sessionReuse: C{proxy_ssl_session_reuse}.
    @ivar upstream: the C{proxy_pass} target, for messages.
    """

    context: SSL.Context
    name: str
    sni: bytes | None
    verify: bool
    sessionReuse: bool
    upstream: str
    _ip: str | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._ip = _ipLiteral(self.name)
        if self.verify:
            self.context.set_verify(SSL.VERIFY_PEER, self._verifyCallback)
        else:
            self.context.set_verify(SSL.VERIFY_NONE)
        self.context.set_info_callback(self._infoCallback)

    def __call__(self, peer: PeerState) -> IOpenSSLClientConnectionCreator:
        return _PeerCreator(self, peer)

    # --- verification ----------------------------------------------------------------

    def _refuse(
        self,
        attempt: _Attempt,
        kind: VerifyFailure,
        message: str,
        certificate: crypto.X509,
        depth: int,
        detail: str,
        code: int,
    ) -> bool:
        if attempt.failure is None:
            attempt.failure = UpstreamVerificationError(message, kind)
            log.warn(
                "{error} while SSL handshaking to upstream {peer} of {upstream}"
                " ({kind}{more}; certificate {subject} at depth {depth})",
                error=message,
                more="" if detail in message else f": {detail}",
                kind=kind,
                detail=detail,
                code=code,
                peer=attempt.peer.name,
                upstream=self.upstream,
                name=self.name,
                subject=_subject(certificate),
                depth=depth,
            )
        return False

    def _checkName(self, certificate: crypto.X509) -> str | None:
        """
        Why the leaf does not prove C{name}, or L{None} when it does.
        """
        if not self.name:
            return "no proxy_ssl_name to check"
        leaf: x509.Certificate = certificate.to_cryptography()
        try:
            if self._ip is not None:
                verify_certificate_ip_address(leaf, self._ip)
            else:
                verify_certificate_hostname(leaf, self.name)
        except (VerificationError, CertificateError) as e:
            return str(e)
        return None

    def _verify(
        self,
        connection: SSL.Connection,
        certificate: crypto.X509,
        errno: int,
        depth: int,
        ok: int,
    ) -> bool:
        attempt = getattr(connection, "attempt", None)
        if not isinstance(attempt, _Attempt):
            return bool(ok)
        if not ok:
            reason = _verifyErrorString(errno)
            return self._refuse(
                attempt,
                _FAILURES.get(errno, "invalid"),
                f"upstream SSL certificate verify error: ({errno}:{reason})",
                certificate,
                depth,
                reason,
                errno,
            )
        if depth == 0:
            problem = self._checkName(certificate)
            if problem is not None:
                return self._refuse(
                    attempt,
                    "name mismatch",
                    f'upstream SSL certificate does not match "{self.name}"',
                    certificate,
                    depth,
                    problem,
                    0,
                )
        return True

    def _verifyCallback(
        self,
        connection: SSL.Connection,
        certificate: crypto.X509,
        errno: int,
        depth: int,
        ok: int,
    ) -> bool:
        # An exception here must fail this handshake, not escape into OpenSSL.
        try:
            return self._verify(connection, certificate, errno, depth, ok)
        except Exception:
            log.failure(
                "verifying upstream certificate of {upstream}", upstream=self.upstream
            )
            return False

    # --- sessions ------------------------------------------------------------------------

    def _info(self, connection: SSL.Connection, where: int) -> None:
        attempt = getattr(connection, "attempt", None)
        if not isinstance(attempt, _Attempt) or not self.sessionReuse:
            return
        peer = attempt.peer
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            attempt.handshakeDone = True
            offered = attempt.offered
            if (
                offered is not None
                and peer.session is offered
                and not _openssl.sessionReused(connection)
            ):
                # Not resumed: never offer it again.
                peer.session = None
            attempt.current = _lib.SSL_get_session(connection._ssl)
            if connection.get_protocol_version() != SSL.TLS1_3_VERSION:
                peer.session = connection.get_session()
            # TLS 1.3: the session is resumable only once a ticket arrives.
        elif attempt.handshakeDone and where & SSL.SSL_CB_EXIT:
            current = _lib.SSL_get_session(connection._ssl)
            if current != attempt.current:
                # A NewSessionTicket replaced the session.
                attempt.current = current
                peer.session = connection.get_session()

    def _infoCallback(self, connection: SSL.Connection, where: int, ret: int) -> None:
        try:
            self._info(connection, where)
        except Exception:
            log.failure(
                "keeping upstream session of {upstream}", upstream=self.upstream
            )


def tlsForServer(
    settings: UpstreamTLS, proxyPassHost: str, where: Where | None
) -> ClientTLS:
    """
    Build the upstream TLS of one stream C{server} from its C{proxy_ssl*} settings
    (C{proxy_ssl} itself is the caller's business).

    @param proxyPassHost: the host of C{proxy_pass}, or the group's name: the
        default C{proxy_ssl_name} (a port is stripped, as nginx does).
    @param where: the C{server} block, for errors.
    @raise ConfigError: for a missing or bad file, a key that does not match, or
        a setting OpenSSL refuses, naming the file and line.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        context.set_cipher_list(settings.ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise ConfigError.at(
            f'SSL_CTX_set_cipher_list("{settings.ciphers}") failed: no cipher matches',
            where,
        ) from None
    setProtocols(context, settings.protocols, where, directive="proxy_ssl_protocols")

    if settings.certificate is not None:
        if settings.certificateKey is None:
            raise ConfigError.at(
                'no "proxy_ssl_certificate_key" is defined for certificate '
                f'"{settings.certificate}"',
                where,
            )
        passwords = readPasswords(settings.passwordFiles, where)
        pair = CertificatePair(settings.certificate, settings.certificateKey, where)
        useCertificate(context, pair, passwords)

    if settings.verify:
        if settings.trustedCertificate is not None:
            addCertificateStore(context, settings.trustedCertificate, where)
        else:
            context.set_default_verify_paths()
            log.info(
                "proxy_ssl_verify on without proxy_ssl_trusted_certificate: upstream"
                " certificates of {upstream} are checked against the system's default"
                " trust store ({where})",
                upstream=proxyPassHost,
                where=where,
            )
        context.set_verify_depth(settings.verifyDepth)
        if settings.crl is not None:
            addCRL(context, settings.crl, where)

    if settings.sessionReuse:
        context.set_session_cache_mode(
            SSL.SESS_CACHE_CLIENT | SSL.SESS_CACHE_NO_INTERNAL
        )
    else:
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_options(SSL.OP_NO_TICKET)

    if settings.confCommands:
        try:
            _openssl.applyConfCommands(context, settings.confCommands, server=False)
        except ValueError as e:
            raise ConfigError.at(str(e), where) from None

    name = sslName(proxyPassHost, settings.name)
    return ClientTLS(
        context=context,
        name=name,
        sni=_sniName(name) if settings.serverName else None,
        verify=settings.verify,
        sessionReuse=settings.sessionReuse,
        upstream=proxyPassHost,
    )
