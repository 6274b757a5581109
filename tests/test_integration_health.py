"""
Integration tests for active health checks (issue 3, C{health_check}): a real
C{twistd -n tlsrelay} process on loopback, upstreams that are down, come up, or
present a certificate the relay refuses, and CPython's C{ssl} as the client.
"""

from __future__ import annotations

import os
import socket
import socketserver
import ssl
import threading
from collections import Counter

from tests._processes import RelayProcess, freePort, startUpstream, stopUpstream
from tests.test_integration_stream import RelayTestCase
from tlsrelay.testing import writeCertificates

#: How long a health check state change may take to show in the log: a few
#: rounds of C{interval=200ms}, with room for a loaded machine.
CHANGE_TIMEOUT = 10.0

CONFIG = """
stream {{
    upstream backend {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
        server 127.0.0.1:{c};
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate server.pem;
        ssl_certificate_key server.key;
        proxy_pass backend;
        health_check interval=200ms fails=1 passes=1;
{extra}
    }}
}}
"""


class _TLSHandler(socketserver.BaseRequestHandler):
    server: _TLSUpstream

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        try:
            with self.server.context.wrap_socket(sock, server_side=True) as tls:
                tls.sendall(self.server.greeting)
                while tls.recv(65536):
                    pass
        except OSError:
            # Health checks close right after the handshake.
            return


class _TLSUpstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    context: ssl.SSLContext
    greeting: bytes


class HealthCheckTestCase(RelayTestCase):
    def tlsUpstream(self, greeting: bytes, certificate: str, key: str) -> int:
        """
        A TLS upstream on loopback in a thread: sends C{greeting} once the
        handshake is done, then reads until the client closes.
        """
        server = _TLSUpstream(("127.0.0.1", 0), _TLSHandler)
        server.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.context.load_cert_chain(certificate, key)
        server.greeting = greeting
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(stopUpstream, server)
        return int(server.server_address[1])

    def greetings(self, port: int, count: int) -> list[str]:
        """
        Connect C{count} TLS clients to the relay, one after the other; each
        must get an upstream's greeting, or the test fails.
        """
        seen = []
        for _ in range(count):
            with self.tlsConnect(port) as tls:
                seen.append(tls.recv(10).strip().decode())
        return seen


class TCPCheckTests(HealthCheckTestCase):
    def test_downAndBack(self) -> None:
        """
        With one of three upstreams down, the TCP check marks it unhealthy (the
        log says why) before any client is sent there, and clients see no
        error; once it listens, it is marked healthy again and receives
        connections.
        """
        a = self.upstream(b"a\n")
        b = freePort()
        c = self.upstream(b"c\n")
        port = freePort()
        relay = self.relay(CONFIG.format(a=a, b=b, c=c, port=port, extra=""))
        unhealthy = f"upstream server 127.0.0.1:{b} of backend is unhealthy"
        relay.waitFor(unhealthy, timeout=CHANGE_TIMEOUT)
        line = next(x for x in relay.output().splitlines() if unhealthy in x)
        self.assertIn("(health check failed: ", line)
        self.assertIn("refused", line)

        seen = self.greetings(port, 6)
        self.assertEqual(Counter(seen), Counter({"a": 3, "c": 3}))
        # No client connection was tried on the dead upstream: the health
        # check kept them away, not passive failover.
        self.assertNotIn(f"connect() to 127.0.0.1:{b} failed", relay.output())

        server, _ = startUpstream(b"b\n", port=b)
        self.addCleanup(stopUpstream, server)
        back = f"upstream server 127.0.0.1:{b} of backend is healthy again"
        relay.waitFor(back, timeout=CHANGE_TIMEOUT)
        self.assertIn("(health check passed)", relay.output())
        self.assertEqual(set(self.greetings(port, 6)), {"a", "b", "c"})

    def test_goesDown(self) -> None:
        """
        An upstream that stops listening is marked unhealthy, and clients keep
        seeing no error.
        """
        a = self.upstream(b"a\n")
        server, b = startUpstream(b"b\n")
        self.addCleanup(stopUpstream, server)
        c = self.upstream(b"c\n")
        port = freePort()
        relay = self.relay(CONFIG.format(a=a, b=b, c=c, port=port, extra=""))
        self.assertEqual(set(self.greetings(port, 3)), {"a", "b", "c"})
        stopUpstream(server)
        relay.waitFor(
            f"upstream server 127.0.0.1:{b} of backend is unhealthy",
            timeout=CHANGE_TIMEOUT,
        )
        self.assertEqual(set(self.greetings(port, 6)), {"a", "c"})


class TLSCheckTests(HealthCheckTestCase):
    def test_refusedCertificate(self) -> None:
        """
        With C{proxy_ssl on}, the check completes a verified handshake: an
        upstream whose certificate comes from an unknown CA accepts TCP but is
        marked unhealthy, with the verification's reason; clients are relayed
        to the two others only, and never fail over from the refused one.
        """
        stranger = writeCertificates(os.path.join(self.dir, "stranger"))
        a = self.tlsUpstream(b"a\n", self.files.certificate, self.files.key)
        b = self.tlsUpstream(b"b\n", stranger.certificate, stranger.key)
        c = self.tlsUpstream(b"c\n", self.files.certificate, self.files.key)
        port = freePort()
        extra = """
        proxy_ssl on;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate ca.pem;
        proxy_ssl_name localhost;
"""
        relay: RelayProcess = self.relay(
            CONFIG.format(a=a, b=b, c=c, port=port, extra=extra)
        )
        unhealthy = f"upstream server 127.0.0.1:{b} of backend is unhealthy"
        relay.waitFor(unhealthy, timeout=CHANGE_TIMEOUT)
        line = next(x for x in relay.output().splitlines() if unhealthy in x)
        self.assertIn("upstream SSL certificate verify error", line)
        self.assertEqual(set(self.greetings(port, 6)), {"a", "c"})
        self.assertNotIn("temporarily disabled", relay.output())
        # The good upstreams pass their handshake checks: never marked.
        for good in (a, c):
            self.assertNotIn(
                f"127.0.0.1:{good} of backend is unhealthy", relay.output()
            )
