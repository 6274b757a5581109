"""
Integration tests for upstream TLS (issue 3): a real C{twistd -n tlsrelay} process
on loopback opening TLS to real upstreams — C{openssl s_server -Verify 2} and nginx
with C{ssl_verify_client on} — each process bounded in time.

The session-reuse rate to nginx is measured by nginx itself: its C{return} prints
C{$ssl_session_reused} (C{r} or C{.}) for every connection the relay makes.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

import trustme
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests._processes import RelayProcess, freePort, requireTool

STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
PEER_TIMEOUT = 10.0
CLIENT_NAME = "tlsrelay-client"


def _wired() -> bool:
    """
    Whether the service gives the pool its upstream TLS (C{proxy_ssl on}).
    """
    import inspect

    from tlsrelay import _service

    return "tlsForServer" in inspect.getsource(_service)


def _writeLeaf(
    directory: str, name: str, issued: trustme.LeafCert
) -> tuple[str, str, str]:
    """
    Write C{name}.pem (leaf), C{name}-chain.pem (intermediates, may be empty) and
    C{name}.key.
    """
    leaf = os.path.join(directory, f"{name}.pem")
    chain = os.path.join(directory, f"{name}-chain.pem")
    key = os.path.join(directory, f"{name}.key")
    issued.cert_chain_pems[0].write_to_path(leaf)
    with open(chain, "wb") as f:
        for blob in issued.cert_chain_pems[1:]:
            f.write(blob.bytes())
    issued.private_key_pem.write_to_path(key)
    return leaf, chain, key


def _waitForPort(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + PEER_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
            continue
        return
    raise AssertionError(f"{what} did not listen on {port}")


def _stop(process: subprocess.Popen[bytes], how: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(how)
        try:
            process.wait(PEER_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def exchange(
    port: int, data: bytes = b"", until: bytes | None = None, timeout: float = 10
) -> bytes:
    """
    Connect to the relay in plain TCP, send C{data}, and read until C{until} is
    seen or the relay closes.
    """
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        while until is None or until not in received:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


class UpstreamTLSTestCase(SynchronousTestCase):
    """
    Certificates for the upstreams (CA C{ca.pem}, leaf for localhost, 127.0.0.1
    and C{backend}) and for the relay (C{client.pem}, CN C{tlsrelay-client}, from
    C{client-ca.pem}); relays and peers are stopped at the end.
    """

    def setUp(self) -> None:
        requireTool("openssl")
        if not _wired():
            raise SkipTest(
                "proxy_ssl is not wired into the service yet "
                "(tlsrelay._service does not call tlsForServer)"
            )
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.sServerLogs: dict[int, str] = {}
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(os.path.join(self.dir, "ca.pem"))
        self.server = _writeLeaf(
            self.dir,
            "server",
            self.ca.issue_cert("localhost", "127.0.0.1", "backend"),
        )
        self.clientCA = trustme.CA()
        self.clientCA.cert_pem.write_to_path(os.path.join(self.dir, "client-ca.pem"))
        issued = self.clientCA.issue_cert("relay.example", common_name=CLIENT_NAME)
        _writeLeaf(self.dir, "client", issued)

    def relay(self, config: str, listeners: int = 1) -> RelayProcess:
        relay = RelayProcess(self.dir, config, listeners)
        self.addCleanup(relay.stop)
        return relay

    def sServer(self, certificate: tuple[str, str, str] | None = None) -> int:
        """
        C{openssl s_server -Verify 2}: demands a client certificate from
        C{client-ca.pem}, answers each line reversed.  Return its port.
        """
        leaf, chain, key = certificate or self.server
        port = freePort()
        command = [
            requireTool("openssl"),
            "s_server",
            "-accept",
            f"127.0.0.1:{port}",
            "-cert",
            leaf,
            "-key",
            key,
            "-CAfile",
            os.path.join(self.dir, "client-ca.pem"),
            "-Verify",
            "2",
            "-verify_return_error",
            "-rev",
        ]
        if os.path.getsize(chain):
            command += ["-cert_chain", chain]
        log = open(os.path.join(self.dir, f"s_server-{port}.log"), "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(_stop, process)
        self.sServerLogs[port] = log.name
        deadline = time.monotonic() + PEER_TIMEOUT
        while b"ACCEPT" not in open(log.name, "rb").read():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"s_server did not start: {command}")
            time.sleep(0.05)
        return port

    def nginx(self, ports: Sequence[int], protocols: str = "TLSv1.2 TLSv1.3") -> None:
        """
        nginx as an upstream on C{ports}: TLS, C{ssl_verify_client on}, and a
        C{return} that reports the session reuse, port and client subject.
        """
        nginx = requireTool("nginx")
        if not os.path.exists(STREAM_MODULE):
            raise SkipTest(f"{STREAM_MODULE} is missing (libnginx-mod-stream)")
        leaf, chain, key = self.server
        full = os.path.join(self.dir, "server-full.pem")
        with open(full, "wb") as f:
            f.write(open(leaf, "rb").read() + open(chain, "rb").read())
        listens = "\n".join(f"        listen 127.0.0.1:{port} ssl;" for port in ports)
        conf = os.path.join(self.dir, "nginx.conf")
        errorLog = os.path.join(self.dir, "nginx-error.log")
        with open(conf, "w") as f:
            f.write(
                f"""
load_module {STREAM_MODULE};
error_log {errorLog} info;
pid {os.path.join(self.dir, "nginx.pid")};
events {{ worker_connections 64; }}
stream {{
    server {{
{listens}
        ssl_certificate {full};
        ssl_certificate_key {key};
        ssl_protocols {protocols};
        ssl_verify_client on;
        ssl_client_certificate {os.path.join(self.dir, "client-ca.pem")};
        return "$ssl_session_reused $ssl_protocol $server_port $ssl_client_s_dn\\n";
    }}
}}
"""
            )
        process = subprocess.Popen(
            [nginx, "-c", conf, "-p", self.dir, "-e", errorLog, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(_stop, process)
        for port in ports:
            _waitForPort(port, process, "nginx")

    def proxySSL(self, **extra: str) -> str:
        """
        The C{proxy_ssl*} lines of a relay C{server} that presents its client
        certificate and verifies the upstream.
        """
        lines = {
            "proxy_ssl": "on",
            "proxy_ssl_certificate": "client.pem",
            "proxy_ssl_certificate_key": "client.key",
            "proxy_ssl_trusted_certificate": "ca.pem",
            "proxy_ssl_verify": "on",
            **extra,
        }
        return "\n".join(
            f"        {name} {value};" for name, value in lines.items() if value
        )


class SServerTests(UpstreamTLSTestCase):
    def test_clientCertificate(self) -> None:
        """
        The relay identifies itself with C{proxy_ssl_certificate} to an upstream
        that demands a client certificate (C{s_server -Verify 2}), verifies it,
        and relays both ways; without the certificate the upstream refuses it.
        """
        upstream = self.sServer()
        port, bare = freePort(), freePort()
        self.relay(
            f"""
stream {{
    server {{
        listen 127.0.0.1:{port};
        proxy_pass 127.0.0.1:{upstream};
{self.proxySSL()}
    }}
    server {{
        listen 127.0.0.1:{bare};
        proxy_pass 127.0.0.1:{upstream};
{self.proxySSL(proxy_ssl_certificate="", proxy_ssl_certificate_key="")}
    }}
}}
""",
            listeners=2,
        )
        self.assertEqual(exchange(port, b"hello\n", until=b"\n"), b"olleh\n")
        with open(self.sServerLogs[upstream], "rb") as f:
            self.assertIn(f"CN = {CLIENT_NAME}".encode(), f.read())
        self.assertNotIn(b"olleh", exchange(bare, b"hello\n", until=b"\n"))

    def test_refusals(self) -> None:
        """
        The relay refuses an upstream signed by an unknown CA, with an expired
        certificate, with a chain longer than C{proxy_ssl_verify_depth} allows,
        or whose certificate does not match C{proxy_ssl_name}; the client gets
        nothing and the relay's log says why.  The same long chain passes with
        depth 2 (OpenSSL's meaning: two intermediates).
        """
        now = datetime.datetime.now(datetime.UTC)
        stranger = _writeLeaf(
            self.dir, "stranger", trustme.CA().issue_cert("localhost", "127.0.0.1")
        )
        expired = _writeLeaf(
            self.dir,
            "expired",
            self.ca.issue_cert(
                "localhost",
                "127.0.0.1",
                not_before=now - datetime.timedelta(days=10),
                not_after=now - datetime.timedelta(days=1),
            ),
        )
        grandchild = self.ca.create_child_ca().create_child_ca()
        long = _writeLeaf(
            self.dir, "long", grandchild.issue_cert("localhost", "127.0.0.1")
        )
        upstreams = {
            "stranger": (self.sServer(stranger), {}),
            "expired": (self.sServer(expired), {}),
            "long": (self.sServer(long), {}),
            "long2": (self.sServer(long), {"proxy_ssl_verify_depth": "2"}),
            "name": (self.sServer(), {"proxy_ssl_name": "other.example"}),
            "good": (self.sServer(), {}),
        }
        ports = {case: freePort() for case in upstreams}
        servers = "\n".join(
            f"""
    server {{
        listen 127.0.0.1:{ports[case]};
        proxy_pass 127.0.0.1:{upstream};
{self.proxySSL(**extra)}
    }}"""
            for case, (upstream, extra) in upstreams.items()
        )
        relay = self.relay(f"stream {{{servers}\n}}\n", listeners=len(ports))
        got = {
            case: exchange(port, b"hello\n", until=b"\n")
            for case, port in ports.items()
        }
        self.assertEqual(
            got,
            {
                "stranger": b"",
                "expired": b"",
                "long": b"",
                "long2": b"olleh\n",
                "name": b"",
                "good": b"olleh\n",
            },
        )
        output = relay.output()
        self.assertIn("(20:unable to get local issuer certificate)", output)
        self.assertIn("(10:certificate has expired)", output)
        self.assertIn("(22:certificate chain too long)", output)
        self.assertIn('upstream SSL certificate does not match "other.example"', output)


class NginxTests(UpstreamTLSTestCase):
    CONNECTIONS = 20

    def measure(self, port: int, count: int) -> list[list[str]]:
        """
        Make C{count} connections through the relay, one after another; return
        nginx's answers, split (reused, protocol, port, client DN).
        """
        answers = []
        for _ in range(count):
            answer = exchange(port).decode()
            self.assertTrue(answer.endswith("\n"), answer)
            answers.append(answer.split(" ", 3))
        return answers

    def test_sessionReuse(self) -> None:
        """
        Against nginx with C{ssl_verify_client on}, 20 connections through the
        relay: the relay presents its certificate every time, and every
        connection after the first resumes the upstream session, with TLS 1.3
        tickets and with TLS 1.2.  (Measured: 19 of 20 for both.)
        """
        upstream = freePort()
        self.nginx([upstream])
        tls13, tls12 = freePort(), freePort()
        self.relay(
            f"""
stream {{
    server {{
        listen 127.0.0.1:{tls13};
        proxy_pass 127.0.0.1:{upstream};
{self.proxySSL(proxy_ssl_name="localhost")}
    }}
    server {{
        listen 127.0.0.1:{tls12};
        proxy_pass 127.0.0.1:{upstream};
{self.proxySSL(proxy_ssl_protocols="TLSv1.2")}
    }}
}}
""",
            listeners=2,
        )
        for port, protocol in ((tls13, "TLSv1.3"), (tls12, "TLSv1.2")):
            answers = self.measure(port, self.CONNECTIONS)
            self.assertEqual({a[1] for a in answers}, {protocol})
            self.assertTrue(
                all(a[3].startswith(f"CN={CLIENT_NAME},") for a in answers), answers
            )
            reused = [a[0] for a in answers]
            self.assertEqual(reused, ["."] + ["r"] * (self.CONNECTIONS - 1), protocol)

    def test_seed001(self) -> None:
        """
        Seed 001's complete example with paths and hosts made real: three nginx
        upstreams, the client certificate, TLS 1.2 only (TLSv1 and TLSv1.1 are
        refused by the library, with a warning), C{HIGH:!aNULL:!MD5}, verified
        against the CA with depth 2 under the group's name (C{backend}, the
        default C{proxy_ssl_name}), sessions reused per upstream server.
        """
        peers = [freePort() for _ in range(3)]
        self.nginx(peers)
        port = freePort()
        relay = self.relay(
            f"""
stream {{

    upstream backend {{
        server 127.0.0.1:{peers[0]};
        server 127.0.0.1:{peers[1]};
        server 127.0.0.1:{peers[2]};
   }}

    server {{
        listen     127.0.0.1:{port};
        proxy_pass backend;
        proxy_ssl  on;

        proxy_ssl_certificate         client.pem;
        proxy_ssl_certificate_key     client.key;
        proxy_ssl_protocols           TLSv1 TLSv1.1 TLSv1.2;
        proxy_ssl_ciphers             HIGH:!aNULL:!MD5;
        proxy_ssl_trusted_certificate ca.pem;

        proxy_ssl_verify        on;
        proxy_ssl_verify_depth  2;
        proxy_ssl_session_reuse on;
    }}
}}
"""
        )
        self.assertIn("proxy_ssl_protocols", relay.output())
        self.assertIn("offering TLSv1.2", relay.output())
        answers = self.measure(port, 21)
        self.assertEqual([int(a[2]) for a in answers], peers * 7)
        self.assertEqual({a[1] for a in answers}, {"TLSv1.2"})
        for peer in peers:
            reused = [a[0] for a in answers if int(a[2]) == peer]
            self.assertEqual(reused, ["."] + ["r"] * 6, peer)

    def test_failover(self) -> None:
        """
        One of three upstreams presents a certificate the relay refuses: clients
        see no error (the failed handshake moves on to the next server), and the
        refused server is left alone for C{fail_timeout}.
        """
        good = [freePort(), freePort()]
        self.nginx(good)
        stranger = _writeLeaf(
            self.dir, "stranger", trustme.CA().issue_cert("localhost", "127.0.0.1")
        )
        bad = self.sServer(stranger)
        port = freePort()
        relay = self.relay(
            f"""
stream {{
    upstream backend {{
        server 127.0.0.1:{good[0]};
        server 127.0.0.1:{bad};
        server 127.0.0.1:{good[1]};
    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_pass backend;
{self.proxySSL()}
    }}
}}
"""
        )
        answers = self.measure(port, 6)
        self.assertEqual({int(a[2]) for a in answers}, set(good))
        output = relay.output()
        refused = f"while SSL handshaking to upstream 127.0.0.1:{bad} of backend"
        self.assertEqual(output.count(refused), 1, output)
        self.assertIn(f"upstream server 127.0.0.1:{bad} of backend temporarily", output)
