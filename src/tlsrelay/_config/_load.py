"""
From a parsed tree to the validated model: contexts, arity, duplicates, inheritance
of C{ssl_*} and C{proxy_*} settings from C{stream} into each C{server}, and the
cross-checks nginx makes at load (listen addresses, upstream names, certificates).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import attrs

from tlsrelay._accesslog import PREDEFINED_FORMATS
from tlsrelay._config._directives import (
    EVENTS,
    MAIN,
    SERVER,
    STREAM,
    UPSTREAM,
    Loader,
    Settings,
    certificatePairs,
    parseAddress,
    where,
)
from tlsrelay._config._directives import lookup as lookupDirective
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import (
    AccessLog,
    Address,
    Balancer,
    Config,
    ErrorLog,
    Proxy,
    ProxyTarget,
    ServerTLS,
    StreamServer,
    UpstreamGroup,
    UpstreamServer,
    UpstreamTLS,
)
from tlsrelay._config._parser import parseFile
from tlsrelay._config._tree import Directive
from tlsrelay._log import Logger

log = Logger()


_TLS_FIELDS = frozenset(f.name for f in attrs.fields(ServerTLS)) - {"certificates"}
_PROXY_FIELDS = frozenset(f.name for f in attrs.fields(Proxy)) - {"tls"}


def loadConfig(path: str) -> Config:
    """
    Read, parse and validate the configuration file at C{path}.

    @raise ConfigError: naming the file and line of the first problem.
    """
    path = os.path.abspath(path)
    return buildConfig(parseFile(path), path)


def _check(d: Directive, context: str, seen: set[str]) -> Any:
    spec, known = lookupDirective(d.name, context)
    if spec is None:
        if known:
            raise d.error(f'"{d.name}" directive is not allowed here')
        raise d.error(f'unknown directive "{d.name}"')
    if spec.unsupported:
        plan = (
            f" (planned in {spec.unsupported})"
            if spec.unsupported != "unplanned"
            else ""
        )
        raise d.error(f'"{d.name}" directive is not supported yet{plan}')
    if spec.block and d.block is None:
        raise d.error(f'directive "{d.name}" has no opening "{{"')
    if not spec.block and d.block is not None:
        raise d.error(f'directive "{d.name}" is not terminated by ";"')
    low, high = spec.arity
    if len(d.args) < low or (high is not None and len(d.args) > high):
        raise d.error(f'invalid number of arguments in "{d.name}" directive')
    if not spec.repeatable:
        if d.name in seen:
            raise d.error(f'"{d.name}" directive is duplicate')
        seen.add(d.name)
    return spec


def _apply(
    directives: Iterable[Directive], context: str, loader: Loader, settings: Settings
) -> list[Directive]:
    """
    Run the handlers of simple directives into C{settings}; return the blocks and
    the directives without handlers for the caller.
    """
    seen: set[str] = set()
    rest: list[Directive] = []
    for d in directives:
        spec = _check(d, context, seen)
        if spec.handler is None:
            rest.append(d)
        else:
            spec.handler(d, loader, settings)
            settings.setdefault("_origins", {})[d.name] = where(d)
    return rest


def buildConfig(tree: Iterable[Directive], path: str) -> Config:
    """
    Validate a parsed tree into a L{Config}.
    """
    loader = Loader(os.path.dirname(path))
    main: Settings = {}
    streams: list[Directive] = []
    for d in _apply(tree, MAIN, loader, main):
        if d.name == "events":
            assert d.block is not None
            _apply(d.block, EVENTS, loader, main)
        elif d.name == "stream":
            streams.append(d)
    for d in main.get("_loadModuleWarnings", ()):
        log.warn(
            '"load_module {module}" ignored: the stream module is built into tlsrelay '
            "({file}:{line})",
            module=d.args[0],
            file=d.file,
            line=d.line,
        )
    stream: Settings = {}
    upstreamBlocks: list[Directive] = []
    serverBlocks: list[Directive] = []
    for block in streams:
        assert block.block is not None
        for d in _apply(block.block, STREAM, loader, stream):
            (upstreamBlocks if d.name == "upstream" else serverBlocks).append(d)

    logFormats: dict[str, str] = dict(PREDEFINED_FORMATS)
    for name, template in stream.get("logFormats", ()):
        if name in logFormats:
            d = stream["_logFormatWhere"][name]
            raise d.error(f'duplicate "log_format" name "{name}"')
        logFormats[name] = template

    upstreams: list[UpstreamGroup] = []
    for d in upstreamBlocks:
        group = _upstream(d, loader)
        if any(u.name == group.name for u in upstreams):
            raise d.error(f'duplicate upstream "{group.name}"')
        upstreams.append(group)
    names = {u.name for u in upstreams}

    servers = [_server(d, loader, stream, names, logFormats) for d in serverBlocks]
    _checkListens(servers)

    return Config(
        path=path,
        pidFile=main.get("pidFile"),
        errorLogs=tuple(ErrorLog(p, level) for p, level in main.get("errorLogs", ())),
        daemon=main.get("daemon", True),
        workerProcesses=main.get("workerProcesses", 1),
        workerConnections=main.get("workerConnections", 512),
        multiAccept=main.get("multiAccept", False),
        shutdownTimeout=main.get("shutdownTimeout", 30.0),
        upstreams=tuple(upstreams),
        servers=tuple(servers),
        logFormats=tuple(logFormats.items()),
    )


def _upstream(d: Directive, loader: Loader) -> UpstreamGroup:
    assert d.block is not None
    settings: Settings = {}
    _apply(d.block, UPSTREAM, loader, settings)
    servers: tuple[UpstreamServer, ...] = settings.get("servers", ())
    if not servers:
        raise d.error(f'no servers are inside upstream "{d.args[0]}"')
    balancer = Balancer()
    if "balancer" in settings:
        params, bd = settings["balancer"]
        balancer = Balancer(**params)
        if balancer.method == "hash":
            _checkTemplate(bd, balancer.key)
        for server in servers:
            if balancer.method == "hash" and server.backup:
                raise bd.error(
                    'balancing method "hash" does not support the "backup" parameter'
                )
    return UpstreamGroup(d.args[0], servers, balancer, where(d))


def _checkTemplate(d: Directive, text: str) -> None:
    from tlsrelay._variables import compileTemplate

    try:
        compileTemplate(text)
    except ValueError as e:
        raise d.error(str(e)) from None


def _server(
    d: Directive,
    loader: Loader,
    stream: Settings,
    upstreamNames: set[str],
    logFormats: dict[str, str],
) -> StreamServer:
    assert d.block is not None
    own: Settings = {}
    _apply(d.block, SERVER, loader, own)
    merged = {**stream, **own}
    listens = own.get("listens", ())
    if not listens:
        raise d.error('no "listen" is defined for server')

    proxyPass = own.get("_proxyPass")
    returnDirective = own.get("_return")
    if proxyPass is not None and returnDirective is not None:
        later = max(proxyPass, returnDirective, key=lambda x: x.line)
        raise later.error(f'"{later.name}" directive is duplicate')
    if proxyPass is None and returnDirective is None:
        raise d.error('no handler for server: "proxy_pass" or "return" is required')

    target: ProxyTarget | None = None
    returnValue: str | None = None
    if proxyPass is not None:
        target = _proxyTarget(proxyPass, upstreamNames)
    elif "_healthCheck" in own:
        raise ConfigError(
            '"health_check" needs "proxy_pass" in the same server', d.file, d.line
        )
    else:
        assert returnDirective is not None
        returnValue = returnDirective.args[0]
        _checkTemplate(returnDirective, returnValue)

    origins = {**stream.get("_origins", {}), **own.get("_origins", {})}
    tls = ServerTLS(
        certificates=certificatePairs(merged, where(d)),
        origins=tuple(
            (name, at) for name, at in origins.items() if name.startswith("ssl_")
        ),
        **{k: v for k, v in merged.items() if k in _TLS_FIELDS},
    )
    if tls.ticketKeyRotation is not None and tls.ticketKeyFiles:
        raise d.error(
            '"ssl_session_ticket_key_rotation" applies to the keys tlsrelay generates; '
            'with "ssl_session_ticket_key" files, rotate by replacing the files'
        )
    for listen in listens:
        if listen.ssl and not tls.certificates:
            assert listen.where is not None
            raise ConfigError(
                'no "ssl_certificate" is defined for the "listen ... ssl" directive',
                listen.where.file,
                listen.where.line,
            )
    upstreamTLS = UpstreamTLS(
        **{k[2:]: v for k, v in merged.items() if k.startswith("u_")}
    )
    proxy = Proxy(
        tls=upstreamTLS, **{k: v for k, v in merged.items() if k in _PROXY_FIELDS}
    )

    accessLogs: list[AccessLog] = []
    for ad in merged.get("_accessLogs", ()):
        accessLogs.extend(_accessLog(ad, loader, logFormats))
    return StreamServer(
        listens=listens,
        proxyPass=target,
        returnValue=returnValue,
        tls=tls,
        proxy=proxy,
        accessLogs=tuple(accessLogs),
        healthCheck=own.get("_healthCheck"),
        where=where(d),
    )


def _proxyTarget(d: Directive, upstreamNames: set[str]) -> ProxyTarget:
    value = d.args[0]
    if value in upstreamNames:
        return ProxyTarget(group=value, where=where(d))
    if "$" in value:
        raise d.error('variables in "proxy_pass" are not supported yet')
    if (
        value.startswith("unix:")
        or ":" in value.lstrip("[").split("]")[-1]
        or (value.startswith("["))
    ):
        address = parseAddress(d, value, None)
        if address.kind == "tcp" and not address.host:
            raise d.error(f'no host in "{value}"')
        return ProxyTarget(address=address, where=where(d))
    raise d.error(
        f'no upstream "{value}" is defined (and "{value}" has no port) in "proxy_pass"'
    )


def _accessLog(
    d: Directive, loader: Loader, logFormats: dict[str, str]
) -> list[AccessLog]:
    if d.args[0] == "off":
        if len(d.args) != 1:
            raise d.error('invalid number of arguments in "access_log" directive')
        return []
    path = d.args[0]
    if path.startswith("syslog:"):
        raise d.error('access_log "syslog:" is not supported yet')
    formatName = "basic"
    if len(d.args) >= 2:
        formatName = d.args[1]
    for extra in d.args[2:]:
        raise d.error(
            f'the "{extra.split("=")[0]}" parameter of "access_log" is not supported yet'
        )
    if formatName not in logFormats:
        raise d.error(f'unknown log format "{formatName}"')
    if "$" in path:
        raise d.error('variables in "access_log" paths are not supported yet')
    template = logFormats[formatName]
    _checkTemplate(d, template)
    return [AccessLog(loader.path(path), template, where(d))]


def _checkListens(servers: list[StreamServer]) -> None:
    seen: dict[str, Any] = {}
    for server in servers:
        for listen in server.listens:
            key = str(listen.address)
            if key in seen:
                assert listen.where is not None
                raise ConfigError(
                    f'duplicate "{key}" address and port pair',
                    listen.where.file,
                    listen.where.line,
                )
            seen[key] = listen
    wildcards = {"0.0.0.0", "::"}
    for listen in seen.values():
        address = listen.address
        if address.kind != "tcp" or address.host in wildcards:
            continue
        wildcard = "::" if ":" in address.host else "0.0.0.0"
        other = seen.get(str(Address("tcp", wildcard, address.port)))
        if other is not None:
            assert listen.where is not None
            raise ConfigError(
                f'"{address}" and the wildcard "{other.address}" on the same port '
                "are not supported yet (listen on one or the other)",
                listen.where.file,
                listen.where.line,
            )
