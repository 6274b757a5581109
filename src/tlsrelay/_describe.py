"""
The effective settings of a configuration, as C{--check} prints them: every value
after inheritance and defaults, so an operator sees what will actually run.
"""

from __future__ import annotations

from tlsrelay._config._model import Config, StreamServer


def _seconds(value: float) -> str:
    if value == int(value):
        return f"{int(value)}s"
    return f"{int(value * 1000)}ms"


def _server(index: int, server: StreamServer) -> list[str]:
    lines = [f"server #{index + 1} ({server.where}):"]
    for listen in server.listens:
        extras = [
            p for p, on in (("ssl", listen.ssl), ("reuseport", listen.reuseport)) if on
        ]
        extras.append(f"backlog={listen.backlog}")
        lines.append(f"  listen {listen.address} {' '.join(extras)}")
    if server.proxyPass is not None:
        target = server.proxyPass.group or str(server.proxyPass.address)
        lines.append(f"  proxy_pass {target}")
        p = server.proxy
        lines.append(
            f"  proxy_connect_timeout {_seconds(p.connectTimeout)}; proxy_timeout "
            f"{_seconds(p.timeout)}; proxy_next_upstream "
            f"{'on' if p.nextUpstream else 'off'} tries={p.nextUpstreamTries} "
            f"timeout={_seconds(p.nextUpstreamTimeout)}; proxy_half_close "
            f"{'on' if p.halfClose else 'off'}"
        )
    else:
        lines.append(f"  return {server.returnValue!r}")
    if any(listen.ssl for listen in server.listens):
        t = server.tls
        for pair in t.certificates:
            lines.append(f"  ssl_certificate {pair.certificate} key {pair.key}")
        lines.append(
            f"  ssl_protocols {' '.join(t.protocols)}; ssl_ciphers {t.ciphers}"
        )
        cache = t.sessionCache
        described: str = cache.mode
        if cache.mode == "builtin":
            described = f"builtin:{cache.builtinSize}"
        elif cache.mode == "shared":
            described = (
                f"shared:{cache.sharedName}:{cache.sharedSize} "
                f"(~{cache.sessionLimit()} sessions)"
            )
        lines.append(
            f"  ssl_session_cache {described}; ssl_session_timeout "
            f"{_seconds(t.sessionTimeout)}; ssl_session_tickets "
            f"{'on' if t.sessionTickets else 'off'}"
        )
        lines.append(
            f"  ssl_handshake_timeout {_seconds(t.handshakeTimeout)}; "
            f"ssl_verify_client {t.verifyClient} depth={t.verifyDepth}; "
            f"ssl_ecdh_curve {t.ecdhCurve}"
        )
        if t.alpn:
            lines.append(f"  ssl_alpn {' '.join(t.alpn)}")
    for log in server.accessLogs:
        lines.append(f"  access_log {log.path}")
    return lines


def describe(config: Config) -> str:
    """
    The effective settings, one block per C{server}.
    """
    lines = [
        f"# effective settings of {config.path}",
        f"worker_processes {config.workerProcesses}; worker_connections "
        f"{config.workerConnections}; multi_accept "
        f"{'on' if config.multiAccept else 'off'}; daemon "
        f"{'on' if config.daemon else 'off'}",
    ]
    for group in config.upstreams:
        servers = ", ".join(
            f"{s.address} weight={s.weight} max_fails={s.maxFails} "
            f"fail_timeout={_seconds(s.failTimeout)}"
            + (" backup" if s.backup else "")
            + (" down" if s.down else "")
            for s in group.servers
        )
        lines.append(f"upstream {group.name} ({group.balancer.method}): {servers}")
    for index, server in enumerate(config.servers):
        lines.extend(_server(index, server))
    return "\n".join(lines) + "\n"
