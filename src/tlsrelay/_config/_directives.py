"""
The directive table: every directive tlsrelay knows, where it may appear, how many
arguments it takes, and how its value is parsed into the model.

nginx directives that tlsrelay does not support (yet) are listed too, so that using
one is a clear error rather than "unknown directive" or, worse, silently ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, Literal

from attrs import frozen

from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import (
    Address,
    CertificatePair,
    HealthCheck,
    KeepAlive,
    Listen,
    SessionCache,
    UpstreamServer,
    Where,
)
from tlsrelay._config._tree import Directive
from tlsrelay._config._units import parseFlag, parseSize, parseTime

MAIN = "main"
EVENTS = "events"
STREAM = "stream"
UPSTREAM = "upstream"
SERVER = "server"

Settings = dict[str, Any]
Handler = Callable[[Directive, "Loader", Settings], None]


class Loader:
    """
    What handlers need besides the directive: the directory that relative paths
    resolve against.
    """

    def __init__(self, baseDir: str) -> None:
        self.baseDir = baseDir

    def path(self, value: str) -> str:
        """
        An absolute path: relative ones resolve against the main config's
        directory, as nginx resolves them against its prefix.
        """
        if value.startswith("/"):
            return os.path.normpath(value)
        return os.path.normpath(os.path.join(self.baseDir, value))


@frozen
class Spec:
    """
    One directive: its contexts, arity and handler.

    @ivar arity: (minimum, maximum) arguments; maximum L{None} means any number.
    @ivar block: whether it takes a C{{ }} block.
    @ivar repeatable: whether it may appear more than once in one block.
    @ivar unsupported: when set, the directive exists in nginx but not here; the
        string says where it is planned, and using it is an error.
    """

    name: str
    contexts: frozenset[str]
    arity: tuple[int, int | None]
    handler: Handler | None = None
    block: bool = False
    repeatable: bool = False
    unsupported: str = ""


def where(d: Directive) -> Where:
    return Where(d.file, d.line)


def invalid(d: Directive, value: str, why: str = "") -> ConfigError:
    suffix = f", {why}" if why else ""
    return d.error(f'invalid value "{value}" in "{d.name}" directive{suffix}')


def _flag(key: str) -> Handler:
    def handle(d: Directive, loader: Loader, settings: Settings) -> None:
        try:
            settings[key] = parseFlag(d.args[0])
        except ValueError:
            raise d.error(
                f'invalid value "{d.args[0]}" in "{d.name}" directive, '
                'it must be "on" or "off"'
            ) from None

    return handle


def _time(key: str, resolution: Literal["ms", "s"] = "ms") -> Handler:
    def handle(d: Directive, loader: Loader, settings: Settings) -> None:
        try:
            settings[key] = parseTime(d.args[0], resolution)
        except ValueError as e:
            _, _, reason = str(e).partition(", ")
            raise invalid(d, d.args[0], reason) from None

    return handle


def _int(key: str, minimum: int = 0) -> Handler:
    def handle(d: Directive, loader: Loader, settings: Settings) -> None:
        settings[key] = integer(d, d.args[0], minimum)

    return handle


def integer(d: Directive, text: str, minimum: int = 0) -> int:
    if not text.isdigit() or int(text) < minimum:
        raise invalid(d, text)
    return int(text)


def _path(key: str) -> Handler:
    def handle(d: Directive, loader: Loader, settings: Settings) -> None:
        settings[key] = loader.path(d.args[0])

    return handle


def _pathList(key: str) -> Handler:
    def handle(d: Directive, loader: Loader, settings: Settings) -> None:
        settings[key] = (*settings.get(key, ()), loader.path(d.args[0]))

    return handle


def _string(key: str) -> Handler:
    def handle(d: Directive, loader: Loader, settings: Settings) -> None:
        settings[key] = d.args[0]

    return handle


def _choice(key: str, *choices: str) -> Handler:
    def handle(d: Directive, loader: Loader, settings: Settings) -> None:
        if d.args[0] not in choices:
            raise invalid(
                d, d.args[0], "it must be " + " or ".join(f'"{c}"' for c in choices)
            )
        settings[key] = d.args[0]

    return handle


_PROTOCOL_NAMES = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def _protocols(key: str) -> Handler:
    def handle(d: Directive, loader: Loader, settings: Settings) -> None:
        for arg in d.args:
            if arg not in _PROTOCOL_NAMES:
                raise invalid(d, arg)
        settings[key] = tuple(d.args)
        if not key.startswith("u_"):
            settings[key + "Where"] = where(d)

    return handle


def _confCommand(key: str) -> Handler:
    def handle(d: Directive, loader: Loader, settings: Settings) -> None:
        settings[key] = (*settings.get(key, ()), (d.args[0], d.args[1]))

    return handle


def _certificate(d: Directive, loader: Loader, settings: Settings) -> None:
    settings["_certs"] = (*settings.get("_certs", ()), (loader.path(d.args[0]), d))


def _certificateKey(d: Directive, loader: Loader, settings: Settings) -> None:
    settings["_keys"] = (*settings.get("_keys", ()), (loader.path(d.args[0]), d))


def certificatePairs(
    settings: Settings, fallback: Where | None
) -> tuple[CertificatePair, ...]:
    """
    Pair each C{ssl_certificate} with the C{ssl_certificate_key} written in the same
    position, as nginx does, or fail as nginx does when they do not line up.
    """
    certs = settings.get("_certs", ())
    keys = settings.get("_keys", ())
    if len(keys) < len(certs):
        path, d = certs[len(keys)]
        raise d.error(f'no "ssl_certificate_key" is defined for certificate "{path}"')
    if len(keys) > len(certs):
        path, d = keys[len(certs)]
        raise d.error(f'no "ssl_certificate" is defined for key "{path}"')
    return tuple(
        CertificatePair(cert, key, where(cd))
        for (cert, cd), (key, _) in zip(certs, keys)
    )


def _sessionCache(d: Directive, loader: Loader, settings: Settings) -> None:
    mode = "none"
    builtinSize = SessionCache().builtinSize
    sharedName = ""
    sharedSize = 0
    seen: set[str] = set()
    for arg in d.args:
        if arg in ("off", "none"):
            if len(d.args) != 1:
                raise invalid(d, arg)
            mode = arg
        elif arg == "builtin" or arg.startswith("builtin:"):
            if "builtin" in seen:
                raise invalid(d, arg)
            seen.add("builtin")
            if arg != "builtin":
                size = arg[len("builtin:") :]
                if not size.isdigit() or int(size) == 0:
                    raise invalid(d, arg)
                builtinSize = int(size)
            if mode != "shared":
                mode = "builtin"
        elif arg.startswith("shared:"):
            if "shared" in seen:
                raise invalid(d, arg)
            seen.add("shared")
            name, _, size = arg[len("shared:") :].rpartition(":")
            if not name:
                raise invalid(d, arg)
            try:
                sharedSize = parseSize(size)
            except ValueError:
                raise invalid(d, arg) from None
            if sharedSize < 8 * 4096:
                raise d.error(f'session cache "{arg}" is too small')
            sharedName = name
            mode = "shared"
        else:
            raise invalid(d, arg)
    settings["sessionCache"] = SessionCache(
        mode,  # type: ignore[arg-type]
        builtinSize,
        sharedName,
        sharedSize,
    )


def _alpn(d: Directive, loader: Loader, settings: Settings) -> None:
    for arg in d.args:
        if not arg or len(arg) > 255:
            raise invalid(d, arg)
    settings["alpn"] = tuple(d.args)


def _ecdhCurve(d: Directive, loader: Loader, settings: Settings) -> None:
    settings["ecdhCurve"] = d.args[0]


def _nextUpstreamTries(d: Directive, loader: Loader, settings: Settings) -> None:
    settings["nextUpstreamTries"] = integer(d, d.args[0])


def _bufferSize(d: Directive, loader: Loader, settings: Settings) -> None:
    try:
        settings["bufferSize"] = parseSize(d.args[0])
    except ValueError:
        raise invalid(d, d.args[0]) from None
    if settings["bufferSize"] < 1:
        raise invalid(d, d.args[0])


def parseAddress(d: Directive, text: str, defaultPort: int | None) -> Address:
    """
    C{port}, C{addr:port}, C{[v6]:port}, C{host:port} or C{unix:/path}.
    """
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise d.error(f'no path in the unix domain socket "{text}"')
        return Address("unix", path=path)
    host: str
    port: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise d.error(f'invalid IPv6 address in "{text}"')
        host = text[1:end]
        rest = text[end + 1 :]
        if rest.startswith(":"):
            port = rest[1:]
        elif rest == "":
            port = None
        else:
            raise d.error(f'invalid host in "{text}"')
    elif text.isdigit():
        host, port = "", text
    elif ":" in text:
        host, _, port = text.rpartition(":")
    else:
        host, port = text, None
    if port is None:
        if defaultPort is None:
            raise d.error(f'no port in "{text}"')
        portNumber = defaultPort
    else:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise d.error(f'invalid port in "{text}"')
        portNumber = int(port)
    if host == "*":
        host = ""
    return Address("tcp", host=host, port=portNumber)


def _listen(d: Directive, loader: Loader, settings: Settings) -> None:
    address = parseAddress(d, d.args[0], None)
    if address.kind == "tcp" and address.host == "":
        address = Address("tcp", host="0.0.0.0", port=address.port)
    ssl = False
    backlog = 511
    reuseport = False
    keepalive: KeepAlive | None = None
    for arg in d.args[1:]:
        if arg == "ssl":
            ssl = True
        elif arg.startswith("backlog="):
            backlog = integer(d, arg[len("backlog=") :], 1)
        elif arg == "reuseport":
            reuseport = True
        elif arg.startswith("so_keepalive="):
            keepalive = _keepalive(d, arg[len("so_keepalive=") :])
        elif arg in ("udp", "proxy_protocol", "fastopen", "ipv6only=on", "bind") or (
            arg.split("=")[0]
            in (
                "rcvbuf",
                "sndbuf",
                "accept_filter",
                "setfib",
                "deferred",
                "ipv6only",
                "fastopen",
            )
        ):
            raise d.error(f'the "{arg}" parameter of "listen" is not supported yet')
        else:
            raise d.error(f'invalid parameter "{arg}"')
    settings["listens"] = (
        *settings.get("listens", ()),
        Listen(address, ssl, backlog, reuseport, keepalive, where(d)),
    )


def _keepalive(d: Directive, value: str) -> KeepAlive:
    if value == "on":
        return KeepAlive(True)
    if value == "off":
        return KeepAlive(False)
    parts = value.split(":")
    if len(parts) != 3:
        raise d.error(f'invalid so_keepalive value: "{value}"')
    try:
        idle = parseTime(parts[0], "s") if parts[0] else None
        interval = parseTime(parts[1], "s") if parts[1] else None
    except ValueError:
        raise d.error(f'invalid so_keepalive value: "{value}"') from None
    if parts[2] and not parts[2].isdigit():
        raise d.error(f'invalid so_keepalive value: "{value}"')
    count = int(parts[2]) if parts[2] else None
    return KeepAlive(True, idle, interval, count)


def _proxyPass(d: Directive, loader: Loader, settings: Settings) -> None:
    settings["_proxyPass"] = d


def _return(d: Directive, loader: Loader, settings: Settings) -> None:
    settings["_return"] = d


def _accessLog(d: Directive, loader: Loader, settings: Settings) -> None:
    settings["_accessLogs"] = (*settings.get("_accessLogs", ()), d)


def _upstreamServer(d: Directive, loader: Loader, settings: Settings) -> None:
    address = parseAddress(d, d.args[0], None)
    if address.kind == "tcp" and not address.host:
        raise d.error(f'no host in upstream "{d.args[0]}"')
    params: dict[str, Any] = {}
    for arg in d.args[1:]:
        name, eq, value = arg.partition("=")
        if name == "weight" and eq:
            params["weight"] = integer(d, value, 1)
        elif name == "max_fails" and eq:
            params["maxFails"] = integer(d, value)
        elif name == "fail_timeout" and eq:
            try:
                params["failTimeout"] = parseTime(value, "s")
            except ValueError:
                raise invalid(d, arg) from None
        elif name == "max_conns" and eq:
            params["maxConns"] = integer(d, value)
        elif arg == "backup":
            params["backup"] = True
        elif arg == "down":
            params["down"] = True
        elif name in ("resolve", "service", "slow_start", "route", "drain"):
            raise d.error(
                f'the "{name}" parameter of upstream "server" is not supported yet'
            )
        else:
            raise d.error(f'invalid parameter "{arg}"')
    settings["servers"] = (
        *settings.get("servers", ()),
        UpstreamServer(address, where=where(d), **params),
    )


def _balancer(method: str) -> Handler:
    def handle(d: Directive, loader: Loader, settings: Settings) -> None:
        if "balancer" in settings:
            raise d.error("load balancing method redefined")
        params: dict[str, Any] = {"method": method}
        if method == "hash":
            params["key"] = d.args[0]
            if len(d.args) == 2:
                if d.args[1] != "consistent":
                    raise invalid(d, d.args[1])
                params["consistent"] = True
        elif method == "random" and d.args:
            if d.args[0] != "two":
                raise invalid(d, d.args[0])
            params["two"] = True
            if len(d.args) == 2 and d.args[1] != "least_conn":
                raise invalid(d, d.args[1])
        settings["balancer"] = (params, d)

    return handle


def _healthCheck(d: Directive, loader: Loader, settings: Settings) -> None:
    params: dict[str, Any] = {}
    for arg in d.args:
        name, eq, value = arg.partition("=")
        if not eq:
            if arg in ("udp", "mandatory", "persistent"):
                raise d.error(
                    f'the "{arg}" parameter of "health_check" is not supported yet'
                )
            raise d.error(f'invalid parameter "{arg}"')
        if name in ("interval", "jitter"):
            try:
                params[name] = parseTime(value)
            except ValueError:
                raise invalid(d, arg) from None
            if name == "interval" and params[name] <= 0:
                raise invalid(d, arg)
        elif name in ("fails", "passes"):
            params[name] = integer(d, value, 1)
        elif name == "port":
            port = integer(d, value, 1)
            if port > 65535:
                raise invalid(d, arg)
            params["port"] = port
        elif name in ("match", "uri"):
            raise d.error(
                f'the "{name}" parameter of "health_check" is not supported yet'
            )
        else:
            raise d.error(f'invalid parameter "{arg}"')
    settings["_healthCheck"] = HealthCheck(**params)


def _errorLog(d: Directive, loader: Loader, settings: Settings) -> None:
    levels = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
    path = d.args[0]
    if path != "stderr":
        if path.startswith("syslog:") or path.startswith("memory:"):
            raise d.error(f'error_log "{path.split(":")[0]}:" is not supported yet')
        path = loader.path(path)
    level = "error"
    if len(d.args) == 2:
        if d.args[1] not in levels:
            raise d.error(f'invalid log level "{d.args[1]}"')
        level = d.args[1]
    settings["errorLogs"] = (*settings.get("errorLogs", ()), (path, level))


def _workerProcesses(d: Directive, loader: Loader, settings: Settings) -> None:
    if d.args[0] == "auto":
        settings["workerProcesses"] = os.cpu_count() or 1
    else:
        settings["workerProcesses"] = integer(d, d.args[0], 1)


def _pid(d: Directive, loader: Loader, settings: Settings) -> None:
    # "off": no pid file at all (an empty name), unlike no "pid" directive.
    settings["pidFile"] = "" if d.args[0] == "off" else loader.path(d.args[0])


def _logFormat(d: Directive, loader: Loader, settings: Settings) -> None:
    name = d.args[0]
    formats = dict(settings.get("logFormats", ()))
    if name in formats:
        raise d.error(f'duplicate "log_format" name "{name}"')
    args = list(d.args[1:])
    if args and args[0].startswith("escape="):
        if args[0] not in ("escape=default", "escape=none", "escape=json"):
            raise invalid(d, args[0])
        if args[0] != "escape=default":
            raise d.error(f'"{args[0]}" is not supported yet')
        args = args[1:]
    if not args:
        raise d.error('invalid number of arguments in "log_format" directive')
    formats[name] = "".join(args)
    settings["logFormats"] = tuple(formats.items())
    settings.setdefault("_logFormatWhere", {})[name] = d


def _loadModule(d: Directive, loader: Loader, settings: Settings) -> None:
    # Debian's nginx needs ``load_module .../ngx_stream_module.so`` for stream; here
    # the stream module is built in, so that one line keeps an nginx config runnable.
    if not re.search(r"ngx_stream_module\.so$", d.args[0]):
        raise d.error(f'"load_module" of "{d.args[0]}" is not supported')
    settings["_loadModuleWarnings"] = (*settings.get("_loadModuleWarnings", ()), d)


S = frozenset


def _specs() -> list[Spec]:
    both = S({STREAM, SERVER})
    specs = [
        # main
        Spec("daemon", S({MAIN}), (1, 1), _flag("daemon")),
        Spec("pid", S({MAIN}), (1, 1), _pid),
        Spec("error_log", S({MAIN}), (1, 2), _errorLog, repeatable=True),
        Spec("worker_processes", S({MAIN}), (1, 1), _workerProcesses),
        Spec("worker_shutdown_timeout", S({MAIN}), (1, 1), _time("shutdownTimeout")),
        Spec("events", S({MAIN}), (0, 0), block=True),
        Spec("stream", S({MAIN}), (0, 0), block=True),
        Spec("load_module", S({MAIN}), (1, 1), _loadModule, repeatable=True),
        Spec("worker_connections", S({EVENTS}), (1, 1), _int("workerConnections", 1)),
        Spec("multi_accept", S({EVENTS}), (1, 1), _flag("multiAccept")),
        # stream
        Spec("upstream", S({STREAM}), (1, 1), block=True, repeatable=True),
        Spec("server", S({STREAM}), (0, 0), block=True, repeatable=True),
        Spec("log_format", S({STREAM}), (2, None), _logFormat, repeatable=True),
        Spec("access_log", both, (1, 4), _accessLog, repeatable=True),
        # upstream
        Spec("server", S({UPSTREAM}), (1, None), _upstreamServer, repeatable=True),
        Spec("hash", S({UPSTREAM}), (1, 2), _balancer("hash")),
        Spec("least_conn", S({UPSTREAM}), (0, 0), _balancer("least_conn")),
        Spec("random", S({UPSTREAM}), (0, 2), _balancer("random")),
        # server
        Spec("listen", S({SERVER}), (1, None), _listen, repeatable=True),
        Spec("proxy_pass", S({SERVER}), (1, 1), _proxyPass),
        Spec("return", S({SERVER}), (1, 1), _return),
        # ssl_* (stream and server)
        Spec("ssl_certificate", both, (1, 1), _certificate, repeatable=True),
        Spec("ssl_certificate_key", both, (1, 1), _certificateKey, repeatable=True),
        Spec("ssl_password_file", both, (1, 1), _pathList("passwordFiles")),
        Spec("ssl_protocols", both, (1, None), _protocols("protocols")),
        Spec("ssl_ciphers", both, (1, 1), _string("ciphers")),
        Spec(
            "ssl_conf_command",
            both,
            (2, 2),
            _confCommand("confCommands"),
            repeatable=True,
        ),
        Spec("ssl_prefer_server_ciphers", both, (1, 1), _flag("preferServerCiphers")),
        Spec("ssl_ecdh_curve", both, (1, 1), _ecdhCurve),
        Spec("ssl_dhparam", both, (1, 1), _path("dhparam")),
        Spec("ssl_handshake_timeout", both, (1, 1), _time("handshakeTimeout")),
        Spec("ssl_session_cache", both, (1, 2), _sessionCache),
        Spec("ssl_session_timeout", both, (1, 1), _time("sessionTimeout", "s")),
        Spec("ssl_session_tickets", both, (1, 1), _flag("sessionTickets")),
        Spec(
            "ssl_session_ticket_key",
            both,
            (1, 1),
            _pathList("ticketKeyFiles"),
            repeatable=True,
        ),
        Spec(
            "ssl_session_ticket_key_rotation",
            both,
            (1, 1),
            _time("ticketKeyRotation", "s"),
        ),
        Spec("ssl_client_certificate", both, (1, 1), _path("clientCertificate")),
        Spec("ssl_trusted_certificate", both, (1, 1), _path("trustedCertificate")),
        Spec(
            "ssl_verify_client",
            both,
            (1, 1),
            _choice("verifyClient", "on", "off", "optional", "optional_no_ca"),
        ),
        Spec("ssl_verify_depth", both, (1, 1), _int("verifyDepth")),
        Spec("ssl_crl", both, (1, 1), _path("crl")),
        Spec("ssl_alpn", both, (1, None), _alpn),
        # proxy_* (stream and server)
        Spec("proxy_connect_timeout", both, (1, 1), _time("connectTimeout")),
        Spec("proxy_timeout", both, (1, 1), _time("timeout")),
        Spec("proxy_next_upstream", both, (1, 1), _flag("nextUpstream")),
        Spec("proxy_next_upstream_tries", both, (1, 1), _nextUpstreamTries),
        Spec("proxy_next_upstream_timeout", both, (1, 1), _time("nextUpstreamTimeout")),
        Spec("proxy_half_close", both, (1, 1), _flag("halfClose")),
        Spec("proxy_buffer_size", both, (1, 1), _bufferSize),
        Spec("health_check", S({SERVER}), (0, None), _healthCheck),
        # proxy_ssl_* (stream and server): TLS to the upstream servers
        Spec("proxy_ssl", both, (1, 1), _flag("u_enabled")),
        Spec("proxy_ssl_certificate", both, (1, 1), _path("u_certificate")),
        Spec("proxy_ssl_certificate_key", both, (1, 1), _path("u_certificateKey")),
        Spec("proxy_ssl_password_file", both, (1, 1), _pathList("u_passwordFiles")),
        Spec("proxy_ssl_protocols", both, (1, None), _protocols("u_protocols")),
        Spec("proxy_ssl_ciphers", both, (1, 1), _string("u_ciphers")),
        Spec(
            "proxy_ssl_conf_command",
            both,
            (2, 2),
            _confCommand("u_confCommands"),
            repeatable=True,
        ),
        Spec(
            "proxy_ssl_trusted_certificate",
            both,
            (1, 1),
            _path("u_trustedCertificate"),
        ),
        Spec("proxy_ssl_verify", both, (1, 1), _flag("u_verify")),
        Spec("proxy_ssl_verify_depth", both, (1, 1), _int("u_verifyDepth")),
        Spec("proxy_ssl_crl", both, (1, 1), _path("u_crl")),
        Spec("proxy_ssl_name", both, (1, 1), _string("u_name")),
        Spec("proxy_ssl_server_name", both, (1, 1), _flag("u_serverName")),
        Spec("proxy_ssl_session_reuse", both, (1, 1), _flag("u_sessionReuse")),
    ]
    later = {
        "the upstream TLS issue": [
            ("proxy_ssl_certificate_cache", both),
            ("proxy_ssl_key_log", both),
            ("zone", S({UPSTREAM})),
        ],
        "the HTTP issue": [("http", S({MAIN}))],
        "": [
            (name, both)
            for name in (
                "ssl_stapling",
                "ssl_stapling_file",
                "ssl_stapling_responder",
                "ssl_stapling_verify",
                "ssl_ocsp",
                "ssl_ocsp_cache",
                "ssl_ocsp_responder",
                "ssl_early_data",
                "ssl_reject_handshake",
                "ssl_certificate_cache",
                "ssl_key_log",
                "ssl_preread",
                "preread_buffer_size",
                "preread_timeout",
                "proxy_bind",
                "proxy_download_rate",
                "proxy_upload_rate",
                "proxy_protocol",
                "proxy_requests",
                "proxy_responses",
                "proxy_socket_keepalive",
                "resolver",
                "resolver_timeout",
                "tcp_nodelay",
                "limit_conn",
                "limit_conn_zone",
                "limit_conn_log_level",
                "allow",
                "deny",
                "set",
                "server_name",
                "variables_hash_max_size",
                "variables_hash_bucket_size",
                "open_log_file_cache",
            )
        ]
        + [
            (name, S({STREAM}))
            for name in ("map", "geo", "geoip_country", "split_clients", "js_import")
        ]
        + [
            (name, S({MAIN}))
            for name in (
                "user",
                "worker_rlimit_nofile",
                "worker_cpu_affinity",
                "worker_priority",
                "env",
                "lock_file",
                "master_process",
                "thread_pool",
                "timer_resolution",
                "working_directory",
                "ssl_engine",
                "pcre_jit",
                "mail",
            )
        ]
        + [
            (name, S({EVENTS}))
            for name in ("use", "accept_mutex", "accept_mutex_delay")
        ]
        + [
            (name, S({UPSTREAM}))
            for name in ("keepalive", "ntlm", "sticky", "queue", "resolver", "state")
        ],
    }
    for plan, entries in later.items():
        for name, contexts in entries:
            specs.append(
                Spec(
                    name,
                    contexts,
                    (0, None),
                    block=True,
                    repeatable=True,
                    unsupported=plan or "unplanned",
                )
            )
    return specs


SPECS: list[Spec] = _specs()


def lookup(name: str, context: str) -> tuple[Spec | None, bool]:
    """
    The spec for C{name} in C{context}, and whether C{name} is known at all.
    """
    known = False
    for spec in SPECS:
        if spec.name == name:
            known = True
            if context in spec.contexts:
                return spec, True
    return None, known
