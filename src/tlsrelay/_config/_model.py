"""
The typed, validated configuration model.

The directive table (L{tlsrelay._config._directives}) turns a parsed tree into these
frozen classes; services are built from them.  Times are in seconds (float), sizes in
bytes, file names absolute (relative names were resolved against the directory of the
main configuration file, as nginx resolves them against its prefix).
"""

from __future__ import annotations

from typing import Literal

from attrs import field, frozen


@frozen
class Where:
    """
    Where a setting was written, for messages at load time.
    """

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@frozen
class Address:
    """
    A TCP or UNIX address.

    For TCP, C{host} is a literal IPv4/IPv6 address or a host name (upstream servers may
    name hosts; listeners resolve at load); C{path} is empty.  For UNIX, C{host} is empty,
    C{port} is 0 and C{path} is the socket path.
    """

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@frozen
class KeepAlive:
    """
    C{so_keepalive=on|off|[keepidle]:[keepintvl]:[keepcnt]} of C{listen}.
    """

    enabled: bool
    idle: float | None = None
    interval: float | None = None
    count: int | None = None


@frozen
class Listen:
    """
    A C{listen} directive of a stream C{server}.
    """

    address: Address
    ssl: bool = False
    backlog: int = 511
    reuseport: bool = False
    keepalive: KeepAlive | None = None
    where: Where | None = field(default=None, eq=False)


@frozen
class CertificatePair:
    """
    One C{ssl_certificate} and its C{ssl_certificate_key} (the key may be the same
    file).
    """

    certificate: str
    key: str
    where: Where | None = field(default=None, eq=False)


@frozen
class SessionCache:
    """
    C{ssl_session_cache}.

    @ivar mode: C{"off"} (no resumption from a cache, and the client is told so),
        C{"none"} (sessions are not stored, but the client is not told: nginx's
        default), C{"builtin"} (OpenSSL's per-process cache), C{"shared"} (a named cache;
        one process for now).
    @ivar builtinSize: sessions in the builtin cache (nginx default 20480).
    @ivar sharedName: the shared cache's name.
    @ivar sharedSize: the shared cache's size in bytes (about 4000 sessions per MiB).
    """

    mode: Literal["off", "none", "builtin", "shared"] = "none"
    builtinSize: int = 20480
    sharedName: str = ""
    sharedSize: int = 0

    def sessionLimit(self) -> int:
        """
        How many sessions this cache holds, 0 when it holds none.
        """
        if self.mode == "builtin":
            return self.builtinSize
        if self.mode == "shared":
            return max(1, self.sharedSize * 4000 // (1024 * 1024))
        return 0


VerifyClient = Literal["off", "on", "optional", "optional_no_ca"]


@frozen
class ServerTLS:
    """
    The TLS server settings of a stream C{server} (inherited from C{stream}).

    Defaults are nginx's, except where noted in C{docs/differences.md}.
    """

    certificates: tuple[CertificatePair, ...] = ()
    passwordFiles: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    protocolsWhere: Where | None = field(default=None, eq=False)
    ciphers: str = "HIGH:!aNULL:!MD5"
    confCommands: tuple[tuple[str, str], ...] = ()
    preferServerCiphers: bool = False
    ecdhCurve: str = "auto"
    dhparam: str | None = None
    handshakeTimeout: float = 60.0
    sessionCache: SessionCache = SessionCache()
    sessionTimeout: float = 300.0
    sessionTickets: bool = True
    ticketKeyFiles: tuple[str, ...] = ()
    ticketKeyRotation: float | None = None
    clientCertificate: str | None = None
    trustedCertificate: str | None = None
    verifyClient: VerifyClient = "off"
    verifyDepth: int = 1
    crl: str | None = None
    alpn: tuple[str, ...] = ()
    origins: tuple[tuple[str, Where], ...] = field(default=(), eq=False)

    def at(self, directive: str, fallback: Where | None) -> Where | None:
        """
        Where C{directive} was written (in the server or inherited from
        C{stream}), else C{fallback}: errors about a setting name its line.
        """
        for name, where in self.origins:
            if name == directive:
                return where
        return fallback


@frozen
class UpstreamTLS:
    """
    The C{proxy_ssl*} settings: TLS from the relay to its upstream servers.
    """

    enabled: bool = False
    certificate: str | None = None
    certificateKey: str | None = None
    passwordFiles: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    ciphers: str = "DEFAULT"
    confCommands: tuple[tuple[str, str], ...] = ()
    trustedCertificate: str | None = None
    verify: bool = False
    verifyDepth: int = 1
    crl: str | None = None
    name: str | None = None
    serverName: bool = False
    sessionReuse: bool = True


@frozen
class Proxy:
    """
    The C{proxy_*} settings of a stream C{server} (inherited from C{stream}).
    """

    connectTimeout: float = 60.0
    timeout: float = 600.0
    nextUpstream: bool = True
    nextUpstreamTries: int = 0
    nextUpstreamTimeout: float = 0.0
    halfClose: bool = False
    bufferSize: int = 16384
    tls: UpstreamTLS = UpstreamTLS()


@frozen
class UpstreamServer:
    """
    A C{server} line of an C{upstream} group.
    """

    address: Address
    weight: int = 1
    maxFails: int = 1
    failTimeout: float = 10.0
    backup: bool = False
    down: bool = False
    maxConns: int = 0
    where: Where | None = field(default=None, eq=False)


@frozen
class Balancer:
    """
    The balancing method of an C{upstream} group.

    @ivar method: C{"round_robin"} (smooth weighted, the default), C{"least_conn"},
        C{"hash"}, C{"random"}.
    @ivar key: for C{hash}, the key template (e.g. C{"$remote_addr"}).
    @ivar consistent: for C{hash}, ketama consistent hashing.
    @ivar two: for C{random}, pick two and choose by C{twoMethod}.
    """

    method: Literal["round_robin", "least_conn", "hash", "random"] = "round_robin"
    key: str = ""
    consistent: bool = False
    two: bool = False
    twoMethod: Literal["least_conn"] = "least_conn"


@frozen
class HealthCheck:
    """
    C{health_check} (nginx Plus syntax) of a stream C{server}.
    """

    interval: float = 5.0
    jitter: float = 0.0
    fails: int = 1
    passes: int = 1
    port: int | None = None


@frozen
class UpstreamGroup:
    """
    An C{upstream name { ... }} block.
    """

    name: str
    servers: tuple[UpstreamServer, ...]
    balancer: Balancer = Balancer()
    where: Where | None = field(default=None, eq=False)


@frozen
class ProxyTarget:
    """
    The argument of C{proxy_pass}: a named group, or a single address (which behaves
    as a group of one server named by that address, as in nginx).
    """

    group: str | None = None
    address: Address | None = None
    where: Where | None = field(default=None, eq=False)


@frozen
class AccessLog:
    """
    An C{access_log path [format]} directive; C{path} is L{None} for C{access_log off}.
    """

    path: str | None
    format: str
    where: Where | None = field(default=None, eq=False)


@frozen
class StreamServer:
    """
    A C{server { ... }} block of C{stream}.

    Exactly one of C{proxyPass} and C{returnValue} is set.
    """

    listens: tuple[Listen, ...]
    proxyPass: ProxyTarget | None
    returnValue: str | None
    tls: ServerTLS
    proxy: Proxy
    accessLogs: tuple[AccessLog, ...]
    healthCheck: HealthCheck | None = None
    where: Where | None = field(default=None, eq=False)


@frozen
class ErrorLog:
    """
    C{error_log file [level]}; C{path} C{"stderr"} means standard error.
    """

    path: str
    level: Literal[
        "debug", "info", "notice", "warn", "error", "crit", "alert", "emerg"
    ] = "error"


@frozen
class Config:
    """
    A whole configuration file.

    @ivar path: the main configuration file, absolute.
    @ivar logFormats: C{log_format} name to template, including the predefined
        C{"basic"} format (nginx's stream default is the C{combined}-like C{basic}).
    @ivar multiAccept: C{multi_accept}: a readable listening socket has every
        waiting connection accepted at once (C{on}), or one (C{off}, nginx's
        default: the next is accepted on the next turn of the event loop).
    """

    path: str
    pidFile: str | None = None
    errorLogs: tuple[ErrorLog, ...] = ()
    daemon: bool = True
    workerProcesses: int = 1
    workerConnections: int = 512
    multiAccept: bool = False
    shutdownTimeout: float = 30.0
    upstreams: tuple[UpstreamGroup, ...] = ()
    servers: tuple[StreamServer, ...] = ()
    logFormats: tuple[tuple[str, str], ...] = ()

    def upstream(self, name: str) -> UpstreamGroup | None:
        """
        The group called C{name}, or L{None}.
        """
        for group in self.upstreams:
            if group.name == name:
                return group
        return None
