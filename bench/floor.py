"""
The floor: the least Python a TLS-terminating relay can run per connection.

A measuring instrument, not a relay to deploy: one process, no Twisted, an epoll
loop over non-blocking sockets, OpenSSL through pyOpenSSL's C bindings with
memory BIOs, and tlsrelay's own session-ticket callback (so the cryptography is
tlsrelay's, ticket for ticket).  No timeouts, no limits, no logs, no balancing:
what tlsrelay does beyond this is what its architecture costs.  The benchmark
runs it in tlsrelay's place::

    python3 bench/run.py --only ecdsa,rsa --relay-name floor \\
        --relay-cmd '.venv/bin/python bench/floor.py {config}'

It reads the harness's configuration with tlsrelay's loader and refuses anything
it does not do: one stream server listening with TLS on one TCP address, its
certificate and key, C{proxy_pass} to one TCP upstream server.  Each connection:
handshake, connect upstream, relay both ways, close_notify and FIN when the
upstream closes, close when the client's close_notify (or FIN) arrives.
"""

from __future__ import annotations

import os
import select
import socket
import sys
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from tlsrelay._config._load import loadConfig
from tlsrelay._openssl import TicketKey, installTicketKeys

_SIZE = 2**18
_buffer = ffi.new("char[]", _SIZE)
_view = memoryview(ffi.buffer(_buffer))  # type: ignore[arg-type]
_WANT_READ = lib.SSL_ERROR_WANT_READ
_ZERO_RETURN = lib.SSL_ERROR_ZERO_RETURN


class _Session:
    """
    One client, its TLS state and its upstream socket.
    """

    __slots__ = ("done", "fd", "into", "loop", "out", "sock", "ssl", "up", "upfd")

    def __init__(self, loop: _Loop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        ssl = lib.SSL_new(loop.context)
        self.ssl = ffi.gc(ssl, lib.SSL_free)
        self.into = lib.BIO_new(lib.BIO_s_mem())
        self.out = lib.BIO_new(lib.BIO_s_mem())
        lib.SSL_set_bio(ssl, self.into, self.out)
        lib.SSL_set_accept_state(ssl)
        self.done = False
        self.up: socket.socket | None = None
        self.upfd = -1

    def flush(self) -> None:
        while True:
            size = lib.BIO_read(self.out, _buffer, _SIZE)
            if size <= 0:
                return
            try:
                _send(self.sock, _view[:size])
            except OSError:
                return

    def readable(self) -> None:
        try:
            data = self.sock.recv(_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        lib.BIO_write(self.into, data, len(data))
        ssl = self.ssl
        if not self.done:
            result = lib.SSL_do_handshake(ssl)
            if result <= 0:
                if lib.SSL_get_error(ssl, result) == _WANT_READ:
                    self.flush()
                else:
                    lib.ERR_clear_error()
                    self.close()
                return
            self.done = True
            self.connect()
        while True:
            size = lib.SSL_read(ssl, _buffer, _SIZE)
            if size > 0:
                if self.up is not None:
                    _send(self.up, _view[:size])
                continue
            error = lib.SSL_get_error(ssl, size)
            if error != _WANT_READ:
                lib.ERR_clear_error()
                if error == _ZERO_RETURN:
                    lib.SSL_shutdown(ssl)
                    self.flush()
                self.close()
                return
            break
        self.flush()

    def connect(self) -> None:
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up.connect_ex(self.loop.upstream)
        # As tlsrelay: a loopback connect(2) has finished by now.
        up.connect_ex(self.loop.upstream)
        self.up, self.upfd = up, up.fileno()
        self.loop.add(self.upfd, self.upstreamReadable)

    def upstreamReadable(self) -> None:
        assert self.up is not None
        try:
            data = self.up.recv(_SIZE)
        except OSError:
            data = b""
        if data:
            lib.SSL_write(self.ssl, data, len(data))
            self.flush()
            return
        self.closeUpstream()
        lib.SSL_shutdown(self.ssl)
        self.flush()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()

    def closeUpstream(self) -> None:
        if self.up is not None:
            self.loop.remove(self.upfd)
            self.up.close()
            self.up = None

    def close(self) -> None:
        self.closeUpstream()
        self.loop.remove(self.fd)
        self.sock.close()


class _Loop:
    def __init__(
        self, listen: tuple[str, int], upstream: tuple[str, int], tls: SSL.Context
    ) -> None:
        self.tls = tls
        self.context = tls._context
        self.upstream = upstream
        self.poller = select.epoll()
        self.handlers: dict[int, Any] = {}
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(listen)
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.add(self.listener.fileno(), self.accept)

    def add(self, fd: int, handler: Any) -> None:
        self.handlers[fd] = handler
        self.poller.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        del self.handlers[fd]
        self.poller.unregister(fd)

    def accept(self) -> None:
        accept = self.listener._accept  # type: ignore[attr-defined]
        while True:
            try:
                fd, _ = accept()
            except BlockingIOError:
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
            session = _Session(self, sock)
            self.add(session.fd, session.readable)

    def run(self) -> None:
        handlers, poll = self.handlers, self.poller.poll
        while True:
            for fd, _ in poll():
                handler = handlers.get(fd)
                if handler is not None:
                    handler()


def _send(sock: socket.socket, data: Any) -> None:
    """
    Send all of C{data}: what the socket does not take at once is sent
    blocking (an instrument for handshakes needs no write queue).
    """
    sent = sock.send(data)
    if sent < len(data):
        sock.setblocking(True)
        try:
            sock.sendall(data[sent:])
        finally:
            sock.setblocking(False)


def _fail(message: str) -> None:
    sys.stderr.write(f"floor: {message}\n")
    raise SystemExit(1)


def main(path: str) -> None:
    config = loadConfig(path)
    if len(config.servers) != 1:
        _fail("one stream server only")
    server = config.servers[0]
    if len(server.listens) != 1 or not server.listens[0].ssl:
        _fail("one listen ... ssl only")
    listen = server.listens[0].address
    target = server.proxyPass
    if target is None or listen.kind != "tcp" or len(server.tls.certificates) != 1:
        _fail("proxy_pass, a TCP listener and one certificate only")
    assert target is not None
    if target.address is not None:
        upstream = target.address
    else:
        [group] = [g for g in config.upstreams if g.name == target.group]
        if len(group.servers) != 1:
            _fail("one upstream server only")
        upstream = group.servers[0].address
    if upstream.kind != "tcp":
        _fail("a TCP upstream only")
    if not server.tls.sessionTickets or server.proxy.tls.enabled:
        _fail("session tickets on and plain TCP to the upstream only")
    pair = server.tls.certificates[0]
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(
        SSL.TLS1_3_VERSION
        if server.tls.protocols == ("TLSv1.3",)
        else SSL.TLS1_2_VERSION
    )
    context.use_certificate_chain_file(pair.certificate)
    context.use_privatekey_file(pair.key)
    key = TicketKey.generate(os.urandom)
    installTicketKeys(context, lambda: (key, (key,)))
    _Loop((listen.host, listen.port), (upstream.host, upstream.port), context).run()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        _fail("usage: floor.py CONFIG")
    main(sys.argv[1])
