"""
Listening sockets made as C{listen} asks (backlog, C{reuseport}, C{so_keepalive},
IPv6-only for C{[::]}) and handed to the reactor with C{adoptStreamPort}.

Binding is separate from listening, so that start-up can bind every address first
and fail with one clear line before anything runs, and so that a later reload can
keep or pass on sockets.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.interfaces import IListeningPort, IReactorSocket

from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import KeepAlive, Listen
from tlsrelay._log import Logger
from tlsrelay._tlsfactory import adoptStreamPort

log = Logger()


def _family(listen: Listen) -> socket.AddressFamily:
    if listen.address.kind == "unix":
        return socket.AF_UNIX
    if ":" in listen.address.host:
        return socket.AF_INET6
    return socket.AF_INET


def bindSocket(listen: Listen) -> socket.socket:
    """
    A bound, listening socket for C{listen}, or a L{ConfigError} naming the
    C{listen} directive and the reason (address in use, permission denied, ...).
    """
    family = _family(listen)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listen.reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # nginx binds [::] IPv6-only by default (ipv6only=on).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if family == socket.AF_UNIX:
            path = listen.address.path
            if os.path.exists(path):
                _removeStaleSocket(path)
            sock.bind(path)
        else:
            sock.bind((listen.address.host, listen.address.port))
        if family != socket.AF_UNIX:
            applyKeepAlive(sock, listen.keepalive)
        sock.listen(listen.backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        where = listen.where
        raise ConfigError(
            f"bind() to {listen.address} failed ({e.errno}: {e.strerror})",
            where.file if where else None,
            where.line if where else None,
        ) from None
    return sock


def _removeStaleSocket(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a leftover from an earlier run
    except OSError:
        pass
    finally:
        probe.close()


def applyKeepAlive(sock: socket.socket, keepalive: KeepAlive | None) -> None:
    """
    Set C{so_keepalive} on a listening socket; Linux copies it to every accepted
    connection (nginx sets it the same way).
    """
    if keepalive is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(keepalive.enabled))
    if not keepalive.enabled:
        return
    if keepalive.idle is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(keepalive.idle))
    if keepalive.interval is not None:
        sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, int(keepalive.interval)
        )
    if keepalive.count is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)


class BoundListener:
    """
    One bound socket waiting to be adopted by a reactor.
    """

    def __init__(self, listen: Listen, sock: socket.socket) -> None:
        self.listen = listen
        self.socket = sock
        self.port: IListeningPort | None = None

    def startListening(
        self, reactor: IReactorSocket, factory: Any, multiAccept: bool = False
    ) -> IListeningPort:
        """
        Start accepting connections for C{factory} (all that wait at once with
        C{multiAccept}, else one per event).  The reactor dups the descriptor,
        so our copy is closed.
        """
        self.port = adoptStreamPort(
            reactor, self.socket.fileno(), _family(self.listen), factory, multiAccept
        )
        self.socket.close()
        log.info(
            "listening on {address}{ssl}",
            address=str(self.listen.address),
            ssl=" ssl" if self.listen.ssl else "",
        )
        return self.port

    def close(self) -> None:
        """
        Close the socket if it was never adopted.
        """
        if self.port is None:
            self.socket.close()
