"""TLS connection load generator for the benchmark harness (run.py).

Runs as its own process (pinned by the harness with taskset) under any Python >= 3.11.
It uses pyOpenSSL when importable (cryptography's bundled OpenSSL: the cheapest client
handshake measured here) and the standard library's ssl module otherwise. Either way
the client offers the same key share (X25519) to every relay, so a relay built on a
newer OpenSSL does not end up doing a hybrid post-quantum key exchange the other
relay does not.

Modes:
  full    every connection: full TLS 1.3 handshake, GET PATH, read to EOF, close.
  resume  the same, offering the session (ticket or ID) from the previous connection.
  hold    open COUNT idle TLS connections and keep them open.

Protocol with the harness: warm up (each worker makes one connection; in resume mode
that provides its first session), print "READY" and wait for a line on stdin, then run
for SECONDS (full/resume) or until the next line on stdin (hold), and print one JSON
line with the totals. The harness samples the relay's CPU between READY+go and the
JSON line, so interpreter start-up and warm-up are not counted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.synchronize import Event as EventT
from typing import Any, Protocol

TIMEOUT = 10.0
GROUPS = "X25519:P-256"


class Client(Protocol):
    """One TLS client backend: connect, optionally fetch PATH, close."""

    name: str

    def connect(self, session: Any) -> tuple[Any, Any, bool]:
        """Connect and handshake; return (connection, socket, resumed)."""
        ...

    def fetch(self, conn: Any, request: bytes) -> tuple[bytes, bool]:
        """Send request, read to EOF; return (response head, clean close_notify)."""
        ...

    def session(self, conn: Any) -> Any:
        """The session to offer on the next connection."""
        ...


def _rawSocket(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tv = struct.pack("ll", int(TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    return sock


class PyOpenSSLClient:
    name = "pyopenssl"

    def __init__(self, host: str, port: int) -> None:
        from OpenSSL import SSL
        from OpenSSL._util import lib

        self.SSL = SSL
        self.lib = lib
        self.host, self.port = host, port
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
        if lib.SSL_CTX_set1_curves_list(ctx._context, GROUPS.encode()) != 1:
            raise RuntimeError("SSL_CTX_set1_curves_list failed")
        self.ctx = ctx

    def connect(self, session: Any) -> tuple[Any, Any, bool]:
        sock = _rawSocket(self.host, self.port)
        conn = self.SSL.Connection(self.ctx, sock)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        if session is not None:
            conn.set_session(session)
        conn.do_handshake()
        return conn, sock, bool(self.lib.SSL_session_reused(conn._ssl))

    def fetch(self, conn: Any, request: bytes) -> tuple[bytes, bool]:
        conn.sendall(request)
        head = b""
        while True:
            try:
                data = conn.recv(262144)
            except self.SSL.ZeroReturnError:
                return head, True
            except self.SSL.SysCallError as e:
                if e.args and e.args[0] == -1:
                    return head, False
                raise
            if not data:
                return head, False
            if len(head) < 64:
                head += data[:64]

    def session(self, conn: Any) -> Any:
        # Freeing an SSL that has not "sent" close_notify marks its session not
        # resumable; the peer has closed already, so mark both directions done.
        conn.set_shutdown(self.SSL.SENT_SHUTDOWN | self.SSL.RECEIVED_SHUTDOWN)
        return conn.get_session()


class StdlibClient:
    name = "stdlib-ssl"

    def __init__(self, host: str, port: int) -> None:
        import ssl

        self.ssl = ssl
        self.host, self.port = host, port
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # On OpenSSL 3 this sets the client's groups too (SSL_CTX_set1_groups).
        ctx.set_ecdh_curve("X25519")
        self.ctx = ctx

    def connect(self, session: Any) -> tuple[Any, Any, bool]:
        sock = _rawSocket(self.host, self.port)
        conn = self.ctx.wrap_socket(
            sock,
            server_hostname="localhost",
            session=session,
            suppress_ragged_eofs=False,
        )
        return conn, sock, bool(conn.session_reused)

    def fetch(self, conn: Any, request: bytes) -> tuple[bytes, bool]:
        conn.sendall(request)
        head = b""
        while True:
            try:
                data = conn.recv(262144)
            except self.ssl.SSLEOFError:
                return head, False
            if not data:
                return head, True
            if len(head) < 64:
                head += data[:64]

    def session(self, conn: Any) -> Any:
        return conn.session


def makeClient(backend: str, host: str, port: int) -> Client:
    if backend in ("auto", "pyopenssl"):
        try:
            return PyOpenSSLClient(host, port)
        except Exception:
            if backend == "pyopenssl":
                raise
    return StdlibClient(host, port)


def _closeQuietly(conn: Any, sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
    del conn


def _loopWorker(
    args: argparse.Namespace,
    ready: Any,
    go: EventT,
    deadline: Any,
    results: Any,
) -> None:
    client = makeClient(args.backend, args.host, args.port)
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    ).encode()
    resume = args.mode == "resume"
    counts: Counter[str] = Counter()
    session: Any = None

    def once() -> None:
        nonlocal session
        conn, sock, resumed = client.connect(session if resume else None)
        try:
            head, clean = client.fetch(conn, request)
            if not head.startswith(b"HTTP/1.1 200"):
                counts["bad response"] += 1
                return
            counts["ok"] += 1
            counts["resumed"] += resumed
            counts["unclean eof"] += not clean
            if resume:
                session = client.session(conn)
        finally:
            _closeQuietly(conn, sock)

    try:
        once()  # warm-up; in resume mode, the first session
    except Exception as e:
        results.put({"error": f"warm-up: {type(e).__name__}: {e}"})
        return
    ready.put(client.name)
    go.wait()
    counts.clear()
    end = deadline.value
    while time.monotonic() < end:
        try:
            once()
        except Exception as e:
            counts[f"error {type(e).__name__}: {e}"[:120]] += 1
            time.sleep(0.01)
    results.put(dict(counts))


def _holdWorker(
    args: argparse.Namespace, count: int, ready: Any, go: EventT, results: Any
) -> None:
    client = makeClient(args.backend, args.host, args.port)
    held: list[tuple[Any, Any]] = []
    errors: Counter[str] = Counter()
    for _ in range(count):
        try:
            conn, sock, _resumed = client.connect(None)
            held.append((conn, sock))
        except Exception as e:
            errors[f"{type(e).__name__}: {e}"[:120]] += 1
    ready.put(client.name)
    go.wait()
    for conn, sock in held:
        _closeQuietly(conn, sock)
    results.put({"ok": len(held), **{f"error {k}": v for k, v in errors.items()}})


def _collect(results: Any, n: int) -> dict[str, int]:
    total: Counter[str] = Counter()
    for _ in range(n):
        part = results.get()
        if "error" in part:
            print(json.dumps({"fatal": part["error"]}), flush=True)
            sys.exit(2)
        total.update(part)
    return dict(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["full", "resume", "hold"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--path", default="/small")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument(
        "--backend", choices=["auto", "pyopenssl", "stdlib"], default="auto"
    )
    args = parser.parse_args()

    mpc = mp.get_context("fork")
    ready, results = mpc.Queue(), mpc.Queue()
    go = mpc.Event()
    deadline = mpc.Value("d", 0.0)
    procs: list[Any] = []
    target: Callable[..., None]
    extra: tuple[Any, ...]
    for i in range(args.procs):
        if args.mode == "hold":
            share = args.count // args.procs + (i < args.count % args.procs)
            target, extra = _holdWorker, (share, ready, go, results)
        else:
            target, extra = _loopWorker, (ready, go, deadline, results)
        p = mpc.Process(target=target, args=(args, *extra), daemon=True)
        p.start()
        procs.append(p)

    backends = set()
    for _ in procs:
        while True:
            try:
                backends.add(ready.get(timeout=0.5))
                break
            except Exception:
                if not results.empty():  # a worker failed its warm-up
                    _collect(results, 1)
                if not any(p.is_alive() for p in procs):
                    print(json.dumps({"fatal": "workers died"}), flush=True)
                    sys.exit(2)
    print("READY " + ",".join(sorted(backends)), flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    deadline.value = start + args.seconds
    go.set()
    total = _collect(results, len(procs))
    elapsed = time.monotonic() - start
    for p in procs:
        p.join(timeout=5)
    out = {"mode": args.mode, "backend": ",".join(sorted(backends))}
    out.update(
        {
            "ok": total.pop("ok", 0),
            "resumed": total.pop("resumed", 0),
            "unclean_eof": total.pop("unclean eof", 0),
            "bad_response": total.pop("bad response", 0),
            "seconds": elapsed if args.mode != "hold" else 0.0,
            "errors": total,
            "pid": os.getpid(),
        }
    )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
