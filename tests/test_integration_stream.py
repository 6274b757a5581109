"""
Integration tests for TLS termination (issue 2): real C{twistd -n tlsrelay}
processes on loopback, driven by C{openssl s_client} and CPython's C{ssl}.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests._processes import (
    RelayProcess,
    freePort,
    runTwistd,
    sClient,
    startUpstream,
    stopUpstream,
)
from tlsrelay.testing import CertificateFiles, writeCertificates


class RelayTestCase(SynchronousTestCase):
    """
    Certificates in a temporary directory; relays and upstreams stopped at the end.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.files = writeCertificates(self.dir)

    def relay(self, config: str, listeners: int = 1) -> RelayProcess:
        relay = RelayProcess(self.dir, config, listeners)
        self.addCleanup(relay.stop)
        return relay

    def upstream(self, greeting: bytes | None = None, echo: bool = True) -> int:
        server, port = startUpstream(greeting, echo)
        self.addCleanup(stopUpstream, server)
        return port

    def clientContext(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.files.caFile)
        return context

    def tlsConnect(
        self, port: int, context: ssl.SSLContext | None = None
    ) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        return (context or self.clientContext()).wrap_socket(
            raw, server_hostname="localhost"
        )


SEED_000 = """
error_log relay-error.log info;
stream {{
    upstream stream_backend {{
         server 127.0.0.1:{a};
         server 127.0.0.1:{b};
         server localhost:{c};
    }}

    log_format main '$remote_addr $ssl_protocol $ssl_session_reused $upstream_addr '
                    '$bytes_sent $bytes_received $status';

    server {{
        listen                {port} ssl;
        proxy_pass            stream_backend;

        ssl_certificate       server.pem;
        ssl_certificate_key   server.key;
        ssl_protocols         SSLv3 TLSv1 TLSv1.1 TLSv1.2;
        ssl_ciphers           HIGH:!aNULL:!MD5;
        ssl_session_cache     shared:SSL:20m;
        ssl_session_timeout   4h;
        ssl_handshake_timeout 30s;
        access_log            access.log main;
        #...
     }}
}}
"""


class Seed000Tests(RelayTestCase):
    """
    Seed 000's complete example, with paths and host names made real.
    """

    def test_seed000(self) -> None:
        a = self.upstream(b"a\n")
        b = self.upstream(b"b\n")
        c = self.upstream(b"c\n")
        port = freePort()
        relay = self.relay(SEED_000.format(a=a, b=b, c=c, port=port))
        output = relay.output()
        self.assertIn("SSLv3 is not supported by OpenSSL", output)
        self.assertIn("offering TLSv1.2", output)

        # Round robin over three equal servers: a b c a b c, as nginx.
        seen = []
        for _ in range(6):
            with self.tlsConnect(port) as tls:
                seen.append(tls.recv(10).strip().decode())
        self.assertEqual(seen, ["a", "b", "c", "a", "b", "c"])

        # TLS 1.3 is not listed, so it is not offered.
        refused = sClient(port, ["-tls1_3", "-CAfile", self.files.caFile])
        self.assertNotEqual(refused.returncode, 0)
        self.assertNotIn(b"Protocol  : TLSv1.3", refused.stdout)
        accepted = sClient(port, ["-tls1_2", "-CAfile", self.files.caFile])
        self.assertIn(b"TLSv1.2", accepted.stdout)

        # Resumption from the session cache with tickets off on the client side.
        session = os.path.join(self.dir, "session.pem")
        first = sClient(
            port,
            ["-no_ticket", "-sess_out", session, "-CAfile", self.files.caFile],
        )
        self.assertIn(b"New, ", first.stdout)
        second = sClient(
            port,
            ["-no_ticket", "-sess_in", session, "-CAfile", self.files.caFile],
        )
        self.assertIn(b"Reused, ", second.stdout)

        relay.stop()
        with open(os.path.join(self.dir, "access.log")) as f:
            lines = f.read().splitlines()
        self.assertIn(f"127.0.0.1 TLSv1.2 . 127.0.0.1:{a} 2 0 200", lines)
        self.assertTrue(any(" r 127.0.0.1:" in line for line in lines), lines)


class ResumptionTests(RelayTestCase):
    """
    C{openssl s_client -sess_out/-sess_in}: tickets (TLS 1.2 and 1.3) and the
    session cache.
    """

    def resumes(self, port: int, args: list[str]) -> tuple[bytes, bytes]:
        session = os.path.join(self.dir, "session.pem")
        common = ["-CAfile", self.files.caFile, *args]
        first = sClient(port, ["-sess_out", session, *common], data=b"x")
        second = sClient(port, ["-sess_in", session, *common], data=b"x")
        return first.stdout, second.stdout

    def test_resumption(self) -> None:
        echo = self.upstream()
        tickets = freePort()
        cache = freePort()
        self.relay(
            f"""
stream {{
    ssl_certificate server.pem;
    ssl_certificate_key server.key;
    server {{
        listen 127.0.0.1:{tickets} ssl;
        proxy_pass 127.0.0.1:{echo};
    }}
    server {{
        listen 127.0.0.1:{cache} ssl;
        ssl_session_tickets off;
        ssl_session_cache builtin:1000;
        proxy_pass 127.0.0.1:{echo};
    }}
}}
""",
            listeners=2,
        )
        for port, args in [
            (tickets, ["-tls1_3"]),
            (tickets, ["-tls1_2"]),
            (cache, ["-tls1_2"]),
            (cache, ["-tls1_3"]),
        ]:
            first, second = self.resumes(port, args)
            self.assertIn(b"New, ", first, (port, args))
            self.assertIn(b"Reused, ", second, (port, args, second))


class ClientCertificateTests(RelayTestCase):
    """
    C{ssl_verify_client} modes against clients with a good certificate, none, and
    one from an unknown CA.
    """

    def test_modes(self) -> None:
        good = writeCertificates(
            os.path.join(self.dir, "good"), ["client.example"], ca=self.files.ca
        )
        stranger = writeCertificates(
            os.path.join(self.dir, "stranger"), ["stranger.example"]
        )
        ports = {mode: freePort() for mode in ("on", "optional", "optional_no_ca")}
        servers = "".join(
            f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_verify_client {mode};
        return "$ssl_client_verify $ssl_client_s_dn\\n";
    }}"""
            for mode, port in ports.items()
        )
        self.relay(
            f"""
stream {{
    ssl_certificate server.pem;
    ssl_certificate_key server.key;
    ssl_client_certificate ca.pem;
    ssl_verify_depth 2;
    {servers}
}}
""",
            listeners=3,
        )

        def attempt(mode: str, files: CertificateFiles | None) -> bytes:
            args = ["-quiet", "-CAfile", self.files.caFile]
            if files is not None:
                args += ["-cert", files.certificate, "-key", files.key]
            return sClient(ports[mode], args).stdout.strip()

        for mode in ports:
            answer = attempt(mode, good)
            self.assertEqual(answer[:8], b"SUCCESS ", f"{mode}: {answer!r}")
        self.assertEqual(attempt("on", None), b"")
        self.assertEqual(attempt("on", stranger), b"")
        self.assertEqual(attempt("optional", None), b"NONE")
        self.assertEqual(attempt("optional", stranger), b"")
        self.assertTrue(attempt("optional_no_ca", stranger).startswith(b"FAILED:"))


class RobustnessTests(RelayTestCase):
    """
    Silent clients, garbage and protocol mismatches cost one connection, never the
    relay.
    """

    def test_handshakeTimeoutAndGarbage(self) -> None:
        echo = self.upstream()
        port = freePort()
        self.relay(
            f"""
stream {{
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate server.pem;
        ssl_certificate_key server.key;
        ssl_handshake_timeout 1s;
        proxy_pass 127.0.0.1:{echo};
    }}
}}
"""
        )
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        started = time.monotonic()
        try:
            self.assertEqual(silent.recv(100), b"")
        except ConnectionResetError:
            pass  # the relay aborts the connection: a reset is as good as a close
        elapsed = time.monotonic() - started
        silent.close()
        self.assertTrue(0.8 <= elapsed < 5, elapsed)

        garbage = socket.create_connection(("127.0.0.1", port), timeout=10)
        garbage.sendall(os.urandom(4096))
        try:
            while garbage.recv(4096):
                pass
        except ConnectionResetError:
            pass
        garbage.close()

        with self.tlsConnect(port) as tls:
            tls.sendall(b"still serving")
            self.assertEqual(tls.recv(100), b"still serving")


class CheckTests(RelayTestCase):
    """
    C{--check} validates and exits 0, or 1 with one line naming file and line.
    """

    def test_checkGood(self) -> None:
        path = os.path.join(self.dir, "relay.conf")
        with open(path, "w") as f:
            f.write(
                "stream {\n  server {\n    listen 127.0.0.1:9;\n"
                "    ssl_protocols TLSv1 TLSv1.2;\n"
                "    proxy_pass 127.0.0.1:8;\n  }\n}\n"
            )
        result = runTwistd(["--config", path, "--check"], self.dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("test is successful", result.stdout)
        self.assertIn("proxy_pass 127.0.0.1:8", result.stdout)
        self.assertIn("worker_connections 512; multi_accept off;", result.stdout)

    def test_checkBadKey(self) -> None:
        other = writeCertificates(os.path.join(self.dir, "other"))
        path = os.path.join(self.dir, "relay.conf")
        with open(path, "w") as f:
            f.write(
                "stream {\n  server {\n    listen 127.0.0.1:9 ssl;\n"
                "    ssl_certificate server.pem;\n"
                f"    ssl_certificate_key {other.key};\n"
                "    proxy_pass 127.0.0.1:8;\n  }\n}\n"
            )
        result = runTwistd(["--config", path, "--check"], self.dir)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr.strip(),
            f'tlsrelay: [emerg] certificate key "{other.key}" does not match '
            f'certificate "{self.files.certificate}" in {path}:4',
        )

    def test_runBadConfig(self) -> None:
        """
        Without C{--check}, a bad configuration stops start-up the same way.
        """
        path = os.path.join(self.dir, "relay.conf")
        with open(path, "w") as f:
            f.write("stream {\n  server {\n    ssl_foo on;\n  }\n}\n")
        result = runTwistd(["--config", path], self.dir)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f'unknown directive "ssl_foo" in {path}:3', result.stderr)

    def test_portInUse(self) -> None:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        path = os.path.join(self.dir, "relay.conf")
        with open(path, "w") as f:
            f.write(
                f"stream {{\n  server {{\n    listen 127.0.0.1:{port};\n"
                "    return x;\n  }\n}\n"
            )
        result = runTwistd(["--config", path], self.dir)
        self.assertEqual(result.returncode, 1)
        self.assertIn(
            f"bind() to 127.0.0.1:{port} failed (98: Address already in use) in "
            f"{path}:3",
            result.stderr,
        )


class BackpressureTests(RelayTestCase):
    """
    A slow reader on either side does not grow the relay's memory.
    """

    TOTAL = 256 * 1024 * 1024
    PAUSE = 2.0

    def sampleRSS(
        self, relay: RelayProcess, stop: threading.Event, peak: list[int]
    ) -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], relay.rss())
            except (OSError, AssertionError):
                return
            time.sleep(0.05)

    def test_slowReaders(self) -> None:
        chunk = b"x" * 65536
        total = self.TOTAL

        # An upstream that sends TOTAL bytes, and one that reads nothing for a while.
        received = [0]

        def source(sock: socket.socket) -> None:
            sent = 0
            while sent < total:
                sock.sendall(chunk)
                sent += len(chunk)
            sock.close()

        def sink(sock: socket.socket) -> None:
            time.sleep(self.PAUSE)
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    break
                received[0] += len(data)
            sock.close()

        ports = []
        for handler in (source, sink):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            self.addCleanup(listener.close)
            ports.append(listener.getsockname()[1])

            def serve(
                listener: socket.socket = listener, handler: Any = handler
            ) -> None:
                try:
                    sock, _ = listener.accept()
                except OSError:
                    return
                handler(sock)

            threading.Thread(target=serve, daemon=True).start()

        down, up = freePort(), freePort()
        relay = self.relay(
            f"""
stream {{
    ssl_certificate server.pem;
    ssl_certificate_key server.key;
    server {{ listen 127.0.0.1:{down} ssl; proxy_pass 127.0.0.1:{ports[0]}; }}
    server {{ listen 127.0.0.1:{up} ssl; proxy_pass 127.0.0.1:{ports[1]}; }}
}}
""",
            listeners=2,
        )
        baseline = relay.rss()
        peak = [baseline]
        stop = threading.Event()
        sampler = threading.Thread(target=self.sampleRSS, args=(relay, stop, peak))
        sampler.start()
        try:
            # Upstream -> client, the client pausing before it reads.
            with self.tlsConnect(down) as tls:
                time.sleep(self.PAUSE)
                got = 0
                while True:
                    data = tls.recv(1 << 20)
                    if not data:
                        break
                    got += len(data)
            self.assertEqual(got, total)

            # Client -> upstream, the upstream pausing before it reads.
            with self.tlsConnect(up) as tls:
                sent = 0
                while sent < total:
                    tls.sendall(chunk)
                    sent += len(chunk)
                # close_notify, then wait for the relay's: closing with unread
                # session tickets in the socket would send a reset instead.
                tls.settimeout(30)
                tls.unwrap().close()
            deadline = time.monotonic() + 30
            while received[0] < total and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertEqual(received[0], total)
        finally:
            stop.set()
            sampler.join()
        growth = peak[0] - baseline
        relay.stop()
        with open(os.path.join(self.dir, "rss.txt"), "w") as f:
            f.write(f"baseline={baseline} peak={peak[0]} growth={growth}\n")
        print(
            f"\nbackpressure: baseline RSS {baseline >> 20} MiB, peak {peak[0] >> 20} MiB"
        )
        self.assertLess(growth, 32 * 1024 * 1024, f"RSS grew by {growth >> 20} MiB")


class DemoTests(SynchronousTestCase):
    """
    C{twistd -n tlsrelay} with no configuration runs the demo and says what to try.
    """

    def test_demo(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        log = open(os.path.join(directory, "out.log"), "wb")
        from tests._processes import twistdCommand

        process = subprocess.Popen(
            twistdCommand(), cwd=directory, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 20
            text = ""
            while time.monotonic() < deadline and text.count("listening on") < 2:
                time.sleep(0.1)
                with open(os.path.join(directory, "out.log")) as f:
                    text = f.read()
            self.assertIn("openssl s_client -connect 127.0.0.1:", text)
            line = next(x for x in text.splitlines() if "type, see it echoed" in x)
            args = line.split()
            port = int(args[3].split(":")[1])
            caFile = args[5]
            context = ssl.create_default_context(cafile=caFile)
            with context.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=10),
                server_hostname="localhost",
            ) as tls:
                tls.sendall(b"demo\n")
                self.assertEqual(tls.recv(100), b"demo\n")
        finally:
            process.terminate()
            process.wait(10)
            log.close()
            with open(os.path.join(directory, "out.log")) as f:
                for line in f:
                    if line.strip().startswith("config:"):
                        demo = os.path.dirname(line.split()[-1])
                        if os.path.basename(demo).startswith("tlsrelay-demo-"):
                            __import__("shutil").rmtree(demo, True)


class FailoverTests(RelayTestCase):
    """
    Passive health: with one of three upstreams down, clients see no error and
    the dead one is tried again only after C{fail_timeout}.
    """

    def test_oneDown(self) -> None:
        a = self.upstream(b"a\n")
        c = self.upstream(b"c\n")
        dead = freePort()
        port = freePort()
        relay = self.relay(
            f"""
stream {{
    upstream backend {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{dead} max_fails=1 fail_timeout=2s;
        server 127.0.0.1:{c};
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate server.pem;
        ssl_certificate_key server.key;
        proxy_pass backend;
    }}
}}
"""
        )
        failed = f"connect() to 127.0.0.1:{dead} failed"

        def round(count: int) -> list[str]:
            answers = []
            for _ in range(count):
                with self.tlsConnect(port) as tls:
                    answers.append(tls.recv(10).strip().decode())
            return answers

        self.assertEqual(set(round(6)), {"a", "c"})
        self.assertEqual(relay.output().count(failed), 1)
        started = time.monotonic()
        self.assertEqual(set(round(6)), {"a", "c"})
        if time.monotonic() - started < 2:
            # Still within fail_timeout: the dead server was left alone.
            self.assertEqual(relay.output().count(failed), 1)
        time.sleep(2.2)
        self.assertEqual(set(round(6)), {"a", "c"})
        self.assertEqual(relay.output().count(failed), 2)


class HostNotFoundTests(RelayTestCase):
    def test_unresolvableUpstream(self) -> None:
        """
        An upstream host name that does not resolve fails C{--check} and start-up
        with nginx's message, as nginx does at load.
        """
        path = os.path.join(self.dir, "relay.conf")
        with open(path, "w") as f:
            f.write(
                "stream {\n  upstream b {\n    server no-such-host.invalid:80;\n  }\n"
                f"  server {{\n    listen 127.0.0.1:{freePort()};\n"
                "    proxy_pass b;\n  }\n}\n"
            )
        for args in (["--config", path, "--check"], ["--config", path]):
            result = runTwistd(args, self.dir)
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertIn(
                f'host not found in upstream "no-such-host.invalid:80" in {path}:3',
                result.stderr,
            )


class CloseTests(RelayTestCase):
    """
    How sessions end: a 502 closes the client at once; ALPN with nothing in
    common is a TLS alert; a client leaving without close_notify keeps its
    cached session.
    """

    def test_closing(self) -> None:
        echo = self.upstream()
        nowhere, alpn, cached = freePort(), freePort(), freePort()
        relay = self.relay(
            f"""
stream {{
    ssl_certificate server.pem;
    ssl_certificate_key server.key;
    log_format st '$status';
    access_log access.log st;
    server {{
        listen 127.0.0.1:{nowhere} ssl;
        proxy_pass 127.0.0.1:{freePort()};
    }}
    server {{
        listen 127.0.0.1:{alpn} ssl;
        ssl_alpn h2;
        return "ok\\n";
    }}
    server {{
        listen 127.0.0.1:{cached} ssl;
        ssl_session_tickets off;
        ssl_session_cache builtin:1000;
        proxy_pass 127.0.0.1:{echo};
    }}
}}
""",
            listeners=3,
        )
        started = time.monotonic()
        with self.tlsConnect(nowhere) as tls:
            self.assertEqual(tls.recv(10), b"")
        relay.waitFor("no upstream", timeout=5)
        self.assertLess(time.monotonic() - started, 5)

        result = sClient(alpn, ["-alpn", "http/1.1", "-CAfile", self.files.caFile])
        self.assertIn(b"no application protocol", result.stderr)
        self.assertNotIn("Unhandled Error", relay.output())

        context = self.clientContext()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        session = None
        reused = []
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", cached), timeout=10)
            tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
            tls.sendall(b"x")
            self.assertEqual(tls.recv(1), b"x")
            reused.append(tls.session_reused)
            session = tls.session
            tls.close()  # no close_notify
        self.assertEqual(reused, [False, True, True])


class ErrorLocationTests(RelayTestCase):
    def test_settingLine(self) -> None:
        """
        A TLS setting that fails at load names its own line, also when it is
        inherited from C{stream}.
        """
        path = os.path.join(self.dir, "relay.conf")
        for setting, message in [
            ("ssl_ciphers NOSUCH;", 'SSL_CTX_set_cipher_list("NOSUCH") failed'),
            ("ssl_ecdh_curve nosuch;", "SSL_CTX_set1_groups_list"),
            ("ssl_conf_command Bogus x;", "SSL_CONF_cmd"),
        ]:
            with open(path, "w") as f:
                f.write(
                    "stream {\n"
                    f"  {setting}\n"
                    "  server {\n    listen 127.0.0.1:9 ssl;\n"
                    "    ssl_certificate server.pem;\n"
                    "    ssl_certificate_key server.key;\n"
                    "    return x;\n  }\n}\n"
                )
            result = runTwistd(["--config", path, "--check"], self.dir)
            self.assertEqual(result.returncode, 1)
            self.assertIn(message, result.stderr)
            self.assertIn(f" in {path}:2", result.stderr)


class MainContextTests(RelayTestCase):
    def test_errorLogAndUnixSockets(self) -> None:
        """
        C{error_log file level} receives the relay's events at that level and
        above; C{listen unix:} and a C{unix:} upstream relay bytes.
        """
        echo = self.upstream()
        sockets = os.path.join("/tmp", f"tlsrelay-test-{os.getpid()}-{freePort()}")
        os.makedirs(sockets)
        self.addCleanup(lambda: __import__("shutil").rmtree(sockets, True))
        front = os.path.join(sockets, "front.sock")
        middle = os.path.join(sockets, "middle.sock")
        self.relay(
            f"""
error_log logs/error.log info;
stream {{
    server {{
        listen unix:{middle};
        proxy_pass 127.0.0.1:{echo};
    }}
    server {{
        listen unix:{front} ssl;
        ssl_certificate server.pem;
        ssl_certificate_key server.key;
        proxy_pass unix:{middle};
    }}
}}
""".replace("logs/error.log", os.path.join(self.dir, "error.log")),
            listeners=2,
        )
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(10)
        raw.connect(front)
        with self.clientContext().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"through two relays")
            self.assertEqual(tls.recv(100), b"through two relays")
        with open(os.path.join(self.dir, "error.log")) as f:
            text = f.read()
        self.assertIn(f"listening on unix:{front} ssl", text)
