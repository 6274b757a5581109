"""
Integration tests for reload (SIGHUP) and shutdown (SIGTERM) of a real
C{twistd -n tlsrelay} process.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from tests._processes import freePort, runTwistd
from tests.test_integration_stream import RelayTestCase

CONFIG = """
pid relay.pid;
worker_shutdown_timeout {drain};
stream {{
    ssl_certificate server.pem;
    ssl_certificate_key server.key;
    server {{
        listen 127.0.0.1:{port} ssl;
        proxy_pass 127.0.0.1:{echo};
    }}
    {extra}
}}
"""


class ReloadTests(RelayTestCase):
    def write(self, **values: object) -> None:
        with open(os.path.join(self.dir, "relay.conf"), "w") as f:
            f.write(CONFIG.format(**values))

    def test_reloadUnderLoad(self) -> None:
        """
        SIGHUP while clients keep connecting and talking drops no connection; a
        listener added by the new configuration starts; a broken configuration is
        reported and the running one stays.
        """
        echo = self.upstream()
        port, added = freePort(), freePort()
        values = {"port": port, "echo": echo, "drain": "5s", "extra": ""}
        relay = self.relay(CONFIG.format(**values))

        errors: list[BaseException] = []
        exchanges = [0]
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    with self.tlsConnect(port) as tls:
                        for _ in range(5):
                            tls.sendall(b"ping")
                            self.assertEqual(tls.recv(10), b"ping")
                            exchanges[0] += 1
                except BaseException as e:
                    errors.append(e)
                    return

        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            self.write(
                **{
                    **values,
                    "extra": f"server {{ listen 127.0.0.1:{added}; return added; }}",
                }
            )
            relay.process.send_signal(signal.SIGHUP)
            relay.waitFor("reloaded")
            time.sleep(0.5)
            self.write(**{**values, "extra": "ssl_bogus on;"})
            relay.process.send_signal(signal.SIGHUP)
            relay.waitFor("reload failed")
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        self.assertEqual(errors, [])
        self.assertGreater(exchanges[0], 20)
        self.assertIn('unknown directive "ssl_bogus"', relay.output())

        import socket

        with socket.create_connection(("127.0.0.1", added), timeout=10) as plain:
            self.assertEqual(plain.recv(100), b"added")
        with self.tlsConnect(port) as tls:
            tls.sendall(b"after")
            self.assertEqual(tls.recv(10), b"after")

    def test_reloadCommand(self) -> None:
        """
        C{twistd tlsrelay --config relay.conf --signal reload} signals the process
        named by the pid file.
        """
        echo = self.upstream()
        port = freePort()
        values = {"port": port, "echo": echo, "drain": "5s", "extra": ""}
        relay = self.relay(CONFIG.format(**values))
        result = runTwistd(
            ["--config", os.path.join(self.dir, "relay.conf"), "--signal", "reload"],
            self.dir,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        relay.waitFor("reloaded")

    def test_drainOnTerm(self) -> None:
        """
        SIGTERM stops accepting and lets an open connection finish, up to
        C{worker_shutdown_timeout}.
        """
        echo = self.upstream()
        port = freePort()
        values = {"port": port, "echo": echo, "drain": "10s", "extra": ""}
        relay = self.relay(CONFIG.format(**values))
        with self.tlsConnect(port) as tls:
            tls.sendall(b"one")
            self.assertEqual(tls.recv(10), b"one")
            relay.process.send_signal(signal.SIGTERM)
            relay.waitFor("draining 2 connections")
            tls.sendall(b"two")
            self.assertEqual(tls.recv(10), b"two")
            self.assertIsNone(relay.process.poll())
        relay.process.wait(10)
        # twistd ends with the signal that stopped it, as a shell expects.
        self.assertIn(relay.process.returncode, (0, -signal.SIGTERM))
        self.assertIn("Main loop terminated", relay.output())
