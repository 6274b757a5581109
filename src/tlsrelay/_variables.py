"""
nginx stream variables (C{$remote_addr}, C{$ssl_protocol}, ...) and the templates
that use them: C{log_format}, C{return}, the C{hash} key.

A L{Template} is compiled once, at load, into literal text and variable getters; it
renders a L{Session}, which the relay fills as the session goes on.  TLS facts are
taken from the pyOpenSSL connection once, right after the handshake
(L{extractTLSFacts}), and only those some template uses.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import lru_cache
from typing import Any

from attrs import define, frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID, ObjectIdentifier
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress

from tlsrelay._openssl import sessionReused
from tlsrelay._tls import toleratedVerifyError
from tlsrelay._version import __version__

# $status values, as nginx's stream module defines them.
STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_FORBIDDEN = 403
STATUS_INTERNAL_SERVER_ERROR = 500
STATUS_BAD_GATEWAY = 502
STATUS_SERVICE_UNAVAILABLE = 503


@frozen
class TLSFacts:
    """
    What the C{$ssl_*} variables show, taken once from a TLS connection.

    Every field is L{None} when unknown, not applicable, or not used by any template
    (nginx shows such variables as "not found": empty in C{return}, C{-} in logs).
    """

    protocol: str | None = None
    cipher: str | None = None
    sessionReused: str | None = None
    sessionId: str | None = None
    serverName: str | None = None
    alpnProtocol: str | None = None
    clientSubject: str | None = None
    clientIssuer: str | None = None
    clientVerify: str | None = None
    clientSerial: str | None = None
    clientFingerprint: str | None = None


@define
class Session:
    """
    One stream session: what the variables render.

    The relay fills it as the session goes on.  Times come from the injected C{now},
    in seconds since the epoch.

    @ivar upstreamConnectTimes: seconds per upstream tried, L{None} for a try
        that failed (C{$upstream_connect_time}); L{None} until an upstream was
        tried.
    @ivar upstreamBytesSent: L{None} until an upstream was tried (nginx shows
        C{$upstream_bytes_*} only then).
    @ivar endTime: when the session ended, or L{None} while it runs
        (C{$session_time} then counts up to C{now()}).
    """

    now: Callable[[], float]
    startTime: float
    connection: int = 0
    remoteAddr: str | None = None
    remotePort: str | None = None
    serverAddr: str | None = None
    serverPort: str | None = None
    protocol: str = "TCP"
    tls: TLSFacts | None = None
    status: int = STATUS_OK
    bytesSent: int = 0
    bytesReceived: int = 0
    upstreamAddr: str | None = None
    upstreamConnectTimes: Sequence[float | None] | None = None
    upstreamSessionReused: bool | None = None
    upstreamBytesSent: int | None = None
    upstreamBytesReceived: int | None = None
    endTime: float | None = None

    def setAddresses(self, host: IAddress | None, peer: IAddress) -> None:
        """
        Fill C{$server_addr}, C{$server_port} (unless C{host} is L{None}: no
        template shows them), C{$remote_addr}, C{$remote_port}.
        """
        if host is not None:
            self.serverAddr, self.serverPort = addressParts(host)
        self.remoteAddr, self.remotePort = addressParts(peer)

    def duration(self) -> float:
        """
        Seconds from the start of the session to its end (or to now).
        """
        end = self.endTime if self.endTime is not None else self.now()
        return max(0.0, end - self.startTime)


def addressParts(address: IAddress) -> tuple[str | None, str | None]:
    """
    An address as nginx shows it: (host, port); C{unix:path} and no port for UNIX.
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, str(address.port)
    if isinstance(address, UNIXAddress):
        name = address.name
        text = name.decode("utf-8", "surrogateescape") if name else ""
        return "unix:" + text, None
    return None, None


def describePeer(address: IAddress) -> str:
    """
    An address for a log line: C{192.0.2.1:443}, C{[2001:db8::1]:443},
    C{unix:/path}.
    """
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        text = name.decode("utf-8", "replace") if name is not None else ""
        return f"unix:{text}"
    return str(address)


# --- TLS facts ------------------------------------------------------------------

# The short names OpenSSL's RFC 2253 printing (XN_FLAG_RFC2253, which nginx uses for
# $ssl_client_s_dn since 1.11.6) gives attributes that cryptography names by OID.
_OPENSSL_SHORT_NAMES: dict[ObjectIdentifier, str] = {
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.TITLE: "title",
    NameOID.GIVEN_NAME: "GN",
    NameOID.SURNAME: "SN",
    NameOID.INITIALS: "initials",
    NameOID.PSEUDONYM: "pseudonym",
    NameOID.GENERATION_QUALIFIER: "generationQualifier",
    NameOID.DN_QUALIFIER: "dnQualifier",
    NameOID.BUSINESS_CATEGORY: "businessCategory",
    NameOID.POSTAL_CODE: "postalCode",
    NameOID.JURISDICTION_COUNTRY_NAME: "jurisdictionC",
    NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME: "jurisdictionST",
    NameOID.JURISDICTION_LOCALITY_NAME: "jurisdictionL",
    NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier",
}


def _escapeHighAndControl(text: str) -> str:
    # OpenSSL's ASN1_STRFLGS_ESC_CTRL and ESC_MSB: control characters and every byte
    # of a non-ASCII character's UTF-8 form become \XX.
    if text.isascii() and text.isprintable():
        return text
    out = []
    for char in text:
        if char.isascii() and " " <= char != "\x7f":
            out.append(char)
        else:
            out.extend(f"\\{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


def distinguishedName(name: x509.Name) -> str:
    """
    A name as nginx shows C{$ssl_client_s_dn}: RFC 2253, most specific first,
    OpenSSL's short attribute names, non-ASCII bytes escaped as C{\\XX}.
    """
    return _escapeHighAndControl(
        name.rfc4514_string(attr_name_overrides=_OPENSSL_SHORT_NAMES)
    )


def _serialNumber(serial: int) -> str:
    # i2a_ASN1_INTEGER: the integer's bytes in upper-case hex pairs.
    sign = "-" if serial < 0 else ""
    digits = f"{abs(serial):X}"
    if len(digits) % 2:
        digits = "0" + digits
    return sign + digits


def _derElements(der: bytes) -> list[tuple[int, bytes]]:
    """
    The (tag, contents) of the elements of the DER SEQUENCE C{der}.
    """

    def header(data: bytes, offset: int) -> tuple[int, int, int]:
        tag = data[offset]
        length = data[offset + 1]
        offset += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[offset : offset + count], "big")
            offset += count
        return tag, offset, length

    tag, offset, length = header(der, 0)
    if tag != 0x30:
        raise ValueError("not a SEQUENCE")
    end = offset + length
    elements = []
    while offset < end:
        tag, start, length = header(der, offset)
        elements.append((tag, der[start : start + length]))
        offset = start + length
    return elements


def _sessionId(connection: SSL.Connection) -> str | None:
    # pyOpenSSL does not bind SSL_SESSION_get_id; the id is the fourth element of
    # the session's DER form (ssl/ssl_asn1.c: version, ssl_version, cipher,
    # session_id, ...).
    session = _lib.SSL_get_session(connection._ssl)
    if session == _ffi.NULL:
        return None
    length = _lib.i2d_SSL_SESSION(session, _ffi.NULL)
    if length <= 0:
        return None
    buffer = _ffi.new("unsigned char[]", length)
    _lib.i2d_SSL_SESSION(session, _ffi.new("unsigned char **", buffer))
    elements = _derElements(bytes(_ffi.buffer(buffer, length)))
    if len(elements) < 4 or elements[3][0] != 0x04 or not elements[3][1]:
        return None
    return elements[3][1].hex()


def verifyResult(
    connection: SSL.Connection, withTolerated: bool = True
) -> tuple[int, str]:
    """
    OpenSSL's verification result of the peer's certificate: code and reason.

    @param withTolerated: report the first error C{ssl_verify_client
        optional_no_ca} tolerated, if any, as C{$ssl_client_verify} does;
        otherwise only an error that refused the certificate.
    """
    tolerated = toleratedVerifyError(connection) if withTolerated else None
    code = (
        tolerated
        if tolerated is not None
        else int(_lib.SSL_get_verify_result(connection._ssl))
    )
    reason = _ffi.string(_lib.X509_verify_cert_error_string(code))
    return code, reason.decode("ascii", "replace")


_TLS_FACT_VARIABLES: dict[str, str] = {
    "ssl_protocol": "protocol",
    "ssl_cipher": "cipher",
    "ssl_session_reused": "sessionReused",
    "ssl_session_id": "sessionId",
    "ssl_server_name": "serverName",
    "ssl_alpn_protocol": "alpnProtocol",
    "ssl_client_s_dn": "clientSubject",
    "ssl_client_i_dn": "clientIssuer",
    "ssl_client_verify": "clientVerify",
    "ssl_client_serial": "clientSerial",
    "ssl_client_fingerprint": "clientFingerprint",
}


def _factExtractors() -> dict[str, Callable[[SSL.Connection], str | None]]:
    def peer(connection: SSL.Connection) -> x509.Certificate | None:
        certificate = connection.get_peer_certificate()
        return None if certificate is None else certificate.to_cryptography()

    def serverName(connection: SSL.Connection) -> str | None:
        name = connection.get_servername()
        return name.decode("utf-8", "backslashreplace") if name else None

    def alpn(connection: SSL.Connection) -> str | None:
        selected = connection.get_alpn_proto_negotiated()
        return selected.decode("utf-8", "backslashreplace") if selected else None

    def subject(connection: SSL.Connection) -> str | None:
        certificate = peer(connection)
        return None if certificate is None else distinguishedName(certificate.subject)

    def issuer(connection: SSL.Connection) -> str | None:
        certificate = peer(connection)
        return None if certificate is None else distinguishedName(certificate.issuer)

    def verify(connection: SSL.Connection) -> str | None:
        # ngx_ssl_get_client_verify: NONE without a certificate, else the result.
        # The result is looked at first: a certificate that failed verification
        # in the handshake is not kept, and that is still a failure.
        code, reason = verifyResult(connection)
        if code != 0:
            return f"FAILED:{reason}"
        return "NONE" if connection.get_peer_certificate() is None else "SUCCESS"

    def serial(connection: SSL.Connection) -> str | None:
        certificate = peer(connection)
        return None if certificate is None else _serialNumber(certificate.serial_number)

    def fingerprint(connection: SSL.Connection) -> str | None:
        certificate = peer(connection)
        if certificate is None:
            return None
        return certificate.fingerprint(hashes.SHA1()).hex()

    def reused(connection: SSL.Connection) -> str | None:
        return "r" if sessionReused(connection) else "."

    def nonEmpty(value: str | None) -> str | None:
        return value or None

    return {
        "protocol": lambda c: nonEmpty(c.get_protocol_version_name()),
        "cipher": lambda c: nonEmpty(c.get_cipher_name()),
        "sessionReused": reused,
        "sessionId": _sessionId,
        "serverName": serverName,
        "alpnProtocol": alpn,
        "clientSubject": subject,
        "clientIssuer": issuer,
        "clientVerify": verify,
        "clientSerial": serial,
        "clientFingerprint": fingerprint,
    }


_EXTRACTORS = _factExtractors()
_NO_FACTS = TLSFacts()


def tlsFactNames(variables: Iterable[str]) -> frozenset[str]:
    """
    The L{TLSFacts} fields that the given variable names need.
    """
    return frozenset(
        _TLS_FACT_VARIABLES[name] for name in variables if name in _TLS_FACT_VARIABLES
    )


def extractTLSFacts(connection: SSL.Connection, fields: Collection[str]) -> TLSFacts:
    """
    Take the L{TLSFacts} C{fields} (see L{tlsFactNames}) from a connection.

    Call it once, after the handshake (or after it failed: what can be known then
    is); the relay keeps the result, not the connection.
    """
    if not fields:
        return _NO_FACTS
    values: dict[str, Any] = {}
    for field in fields:
        try:
            values[field] = _EXTRACTORS[field](connection)
        except (SSL.Error, ValueError):
            values[field] = None
    return TLSFacts(**values)


# --- Times ----------------------------------------------------------------------

_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


@lru_cache(maxsize=4)
def _localTimes(second: int) -> tuple[str, str]:
    # nginx caches its time strings per second too.
    t = time.localtime(second)
    offset = t.tm_gmtoff or 0
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset) // 60, 60)
    local = (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}:"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{hours:02d}{minutes:02d}"
    )
    iso = (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}{sign}{hours:02d}:{minutes:02d}"
    )
    return local, iso


def timeLocal(when: float) -> str:
    """
    C{$time_local}: C{28/Sep/1970:12:00:00 +0600}.
    """
    return _localTimes(int(when))[0]


def timeISO8601(when: float) -> str:
    """
    C{$time_iso8601}: C{1970-09-28T12:00:00+06:00}.
    """
    return _localTimes(int(when))[1]


def _seconds(value: float) -> str:
    # nginx's "%T.%03M": seconds with millisecond resolution.
    return f"{value:.3f}"


def _perTry(times: Sequence[float | None] | None) -> str | None:
    # ngx_stream_upstream_response_time_variable: one value per upstream tried,
    # "-" for a try that did not connect, joined as $upstream_addr is.
    if not times:
        return None
    return ", ".join("-" if t is None else _seconds(t) for t in times)


# --- Variables ------------------------------------------------------------------

Getter = Callable[[Session], "str | None"]


def _tlsGetter(field: str) -> Getter:
    def get(session: Session) -> str | None:
        facts = session.tls
        return None if facts is None else getattr(facts, field)  # type: ignore[no-any-return]

    return get


def _optionalInt(value: int | None) -> str | None:
    return None if value is None else str(value)


@lru_cache(maxsize=1)
def _hostname() -> str:
    return socket.gethostname()


# $pid, computed once per process rather than per line.  Workers are exec'd and
# import this module afresh, but a single-process relay imports it before twistd
# daemonizes (forks): a fork updates it.
_pid = [str(os.getpid())]


def _forked() -> None:
    _pid[0] = str(os.getpid())


os.register_at_fork(after_in_child=_forked)

_NGINX_VERSION = __version__.public()


_VARIABLES: dict[str, Getter] = {
    "remote_addr": lambda s: s.remoteAddr,
    "remote_port": lambda s: s.remotePort,
    "server_addr": lambda s: s.serverAddr,
    "server_port": lambda s: s.serverPort,
    "protocol": lambda s: s.protocol,
    "status": lambda s: f"{s.status:03d}",
    "bytes_sent": lambda s: str(s.bytesSent),
    "bytes_received": lambda s: str(s.bytesReceived),
    "session_time": lambda s: _seconds(s.duration()),
    "upstream_addr": lambda s: s.upstreamAddr,
    "upstream_ssl_session_reused": lambda s: (
        None
        if s.upstreamSessionReused is None
        else "r"
        if s.upstreamSessionReused
        else "."
    ),
    "upstream_connect_time": lambda s: _perTry(s.upstreamConnectTimes),
    "upstream_bytes_sent": lambda s: _optionalInt(s.upstreamBytesSent),
    "upstream_bytes_received": lambda s: _optionalInt(s.upstreamBytesReceived),
    "time_local": lambda s: timeLocal(s.now()),
    "time_iso8601": lambda s: timeISO8601(s.now()),
    "msec": lambda s: _seconds(s.now()),
    "connection": lambda s: str(s.connection),
    "hostname": lambda s: _hostname(),
    "pid": lambda s: _pid[0],
    "nginx_version": lambda s: _NGINX_VERSION,
}
_VARIABLES.update(
    (name, _tlsGetter(field)) for name, field in _TLS_FACT_VARIABLES.items()
)

KNOWN_VARIABLES: frozenset[str] = frozenset(_VARIABLES)


# --- Templates ------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_]+")


def _escapeLogValue(value: str) -> str:
    # ngx_stream_log_escape (escape=default): '"', '\\' and bytes outside 32..126
    # become \xXX.
    if (
        value.isascii()
        and value.isprintable()
        and '"' not in value
        and "\\" not in value
    ):
        return value
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        if 0x20 <= byte <= 0x7E and byte not in (0x22, 0x5C):
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02X}")
    return "".join(out)


@frozen
class Template:
    """
    A compiled nginx template: literal text and variables.

    @ivar text: the source text.
    @ivar names: the variables it uses.
    """

    text: str
    parts: tuple[str | Getter, ...]
    names: frozenset[str]

    def render(self, session: Session) -> str:
        """
        Render for C{return} or a C{hash} key: variables without a value are empty.
        """
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                out.append(part(session) or "")
        return "".join(out)

    def renderLog(self, session: Session) -> str:
        """
        Render for C{access_log}: variables without a value show as C{-}, values
        are escaped as nginx's default C{log_format} escaping does.
        """
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = part(session)
                out.append("-" if not value else _escapeLogValue(value))
        return "".join(out)


def compileTemplate(text: str) -> Template:
    """
    Compile C{text}, which uses variables as C{$name} or C{${name}}.

    @raise ValueError: with nginx's wording, for an unknown variable or a malformed
        reference.
    """
    parts: list[str | Getter] = []
    names: set[str] = set()
    literal: list[str] = []
    position = 0
    while True:
        dollar = text.find("$", position)
        if dollar < 0:
            literal.append(text[position:])
            break
        literal.append(text[position:dollar])
        position = dollar + 1
        braced = text.startswith("{", position)
        if braced:
            position += 1
        match = _NAME.match(text, position)
        if match is None:
            raise ValueError(f'invalid variable name in "{text}"')
        name = match.group()
        position = match.end()
        if braced:
            if not text.startswith("}", position):
                raise ValueError(f'the closing bracket in "{name}" variable is missing')
            position += 1
        getter = _VARIABLES.get(name)
        if getter is None:
            raise ValueError(f'unknown "{name}" variable')
        if literal:
            joined = "".join(literal)
            if joined:
                parts.append(joined)
            literal = []
        parts.append(getter)
        names.add(name)
    joined = "".join(literal)
    if joined:
        parts.append(joined)
    return Template(text=text, parts=tuple(parts), names=frozenset(names))
