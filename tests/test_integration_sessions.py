"""
Integration tests for sessions at scale (issue 4): ticket key files shared by
separate instances, rotation by SIGHUP, and worker processes resuming each other's
sessions through shared keys or the shared cache.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl

from tests._processes import RelayProcess, freePort, sClient
from tests.test_integration_stream import RelayTestCase

RETURN_SERVER = """
{main}
stream {{
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate server.pem;
        ssl_certificate_key server.key;
        {settings}
        return "$pid $ssl_session_reused $ssl_protocol\\n";
    }}
}}
"""


class SessionTestCase(RelayTestCase):
    def keyFile(self, name: str, size: int = 80) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        return path

    def returnRelay(
        self, settings: str, main: str = "", directory: str | None = None
    ) -> tuple[RelayProcess, int]:
        port = freePort()
        config = RETURN_SERVER.format(main=main, port=port, settings=settings)
        if directory is None:
            return self.relay(config), port
        os.makedirs(directory, exist_ok=True)
        for name in ("server.pem", "server.key"):
            shutil.copy(os.path.join(self.dir, name), directory)
        relay = RelayProcess(directory, config)
        self.addCleanup(relay.stop)
        return relay, port

    def fetch(
        self,
        port: int,
        context: ssl.SSLContext,
        session: ssl.SSLSession | None = None,
    ) -> tuple[list[str], ssl.SSLSession | None, bool]:
        """
        Connect, read the C{return} line, and give back its words, the session to
        resume next time and whether this one was resumed.
        """
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with context.wrap_socket(
            raw, server_hostname="localhost", session=session
        ) as tls:
            data = b""
            while True:
                chunk = tls.recv(1000)
                if not chunk:
                    break
                data += chunk
            return data.decode().split(), tls.session, bool(tls.session_reused)

    def context(self, version: ssl.TLSVersion) -> ssl.SSLContext:
        context = self.clientContext()
        context.minimum_version = version
        context.maximum_version = version
        return context


class TicketKeyFileTests(SessionTestCase):
    def resumeAcross(self, first: int, second: int, version: str) -> bytes:
        session = os.path.join(self.dir, f"session-{version}.pem")
        common = ["-CAfile", self.files.caFile, version]
        sClient(first, ["-sess_out", session, *common])
        return sClient(second, ["-sess_in", session, *common]).stdout

    def test_sharedFilesAcrossInstances(self) -> None:
        """
        Two separate relays with the same key files resume each other's tickets,
        TLS 1.2 and 1.3.
        """
        current = self.keyFile("current.key")
        previous = self.keyFile("previous.key", 48)
        settings = (
            f"ssl_session_ticket_key {current};\n"
            f"        ssl_session_ticket_key {previous};"
        )
        _, first = self.returnRelay(settings, directory=os.path.join(self.dir, "a"))
        _, second = self.returnRelay(settings, directory=os.path.join(self.dir, "b"))
        for version in ("-tls1_2", "-tls1_3"):
            self.assertIn(b"Reused, ", self.resumeAcross(first, second, version))
            self.assertIn(b"Reused, ", self.resumeAcross(second, first, version))

        # A third relay with other keys cannot resume them: a full handshake, no
        # error.
        other = self.keyFile("other.key")
        _, third = self.returnRelay(
            f"ssl_session_ticket_key {other};", directory=os.path.join(self.dir, "c")
        )
        stdout = self.resumeAcross(first, third, "-tls1_3")
        self.assertIn(b"New, ", stdout)
        self.assertIn(b"TLSv1.3", stdout)

    def test_rotationBySignal(self) -> None:
        """
        Seed 000's rotation: a new current key with the old one as previous keeps
        old tickets resuming; once the old key is gone they get a full handshake
        with no error.
        """
        a = os.path.join(self.dir, "a.key")
        b = os.path.join(self.dir, "b.key")
        current = os.path.join(self.dir, "current.key")
        previous = os.path.join(self.dir, "previous.key")
        for path in (a, b):
            with open(path, "wb") as f:
                f.write(os.urandom(80))
        shutil.copy(a, current)
        shutil.copy(a, previous)
        relay, port = self.returnRelay(
            f"ssl_session_ticket_key {current};\n"
            f"        ssl_session_ticket_key {previous};"
        )
        context = self.context(ssl.TLSVersion.TLSv1_3)
        _, session, _ = self.fetch(port, context)

        shutil.copy(b, current)
        shutil.copy(a, previous)
        relay.process.send_signal(signal.SIGHUP)
        relay.waitFor("reloaded")
        words, _, reused = self.fetch(port, context, session)
        self.assertTrue(reused, words)
        self.assertEqual(words[1], "r")

        with open(previous, "wb") as f:
            f.write(os.urandom(80))
        relay.process.send_signal(signal.SIGHUP)
        relay.waitFor("reloaded", 2)
        words, _, reused = self.fetch(port, context, session)
        self.assertFalse(reused)
        self.assertEqual(words[1:], [".", "TLSv1.3"])


class WorkerTests(SessionTestCase):
    ROUNDS = 20
    MOST = 300

    def resumptions(
        self, port: int, version: ssl.TLSVersion
    ) -> tuple[int, int, set[str]]:
        """
        Reconnect with the first connection's session: C{ROUNDS} times, and
        more (up to C{MOST}) until both workers have answered, since which
        worker accepts a connection is the kernel's choice.

        @return: how many reconnects resumed, how many there were, and the
            workers that answered.
        """
        context = self.context(version)
        words, session, _ = self.fetch(port, context)
        pids = {words[0]}
        reused = tries = 0
        while tries < self.ROUNDS or (len(pids) < 2 and tries < self.MOST):
            words, _, wasReused = self.fetch(port, context, session)
            pids.add(words[0])
            reused += wasReused
            tries += 1
        return reused, tries, pids

    def test_workersShareTickets(self) -> None:
        """
        With two workers, every reconnect resumes, whichever worker accepts it:
        the workers share the ticket keys their master generates.
        """
        relay, port = self.returnRelay("", main="worker_processes 2;")
        relay.waitFor("listening on", 2)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            reused, tries, pids = self.resumptions(port, version)
            self.assertEqual(reused, tries, version)
            self.assertEqual(len(pids), 2, pids)

    def test_workersShareCache(self) -> None:
        """
        With tickets off, the C{shared} cache alone lets every reconnect resume on
        either worker.
        """
        relay, port = self.returnRelay(
            "ssl_session_tickets off;\n        ssl_session_cache shared:SSL:1m;",
            main="worker_processes 2;",
        )
        relay.waitFor("listening on", 2)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            reused, tries, pids = self.resumptions(port, version)
            self.assertEqual(reused, tries, version)
            self.assertEqual(len(pids), 2, pids)

    def test_workerRestartAndReload(self) -> None:
        """
        A worker that dies is restarted; SIGHUP starts a new generation of workers
        while the old one drains, and clients see no error throughout.
        """
        import re
        import threading
        import time

        relay, port = self.returnRelay("", main="worker_processes 2;")
        relay.waitFor("listening on", 2)
        pids = [int(p) for p in re.findall(r"worker (\d+) started", relay.output())]
        self.assertEqual(len(pids), 2)
        os.kill(pids[0], signal.SIGKILL)
        relay.waitFor("restarting it")
        relay.waitFor("started (generation 1, slot 0)", 2)
        relay.waitFor("listening on", 3)

        context = self.context(ssl.TLSVersion.TLSv1_3)
        errors: list[BaseException] = []
        served = [0]
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    words, _, _ = self.fetch(port, context)
                    self.assertEqual(len(words), 3)
                    served[0] += 1
                except BaseException as e:
                    errors.append(e)
                    return

        threads = [threading.Thread(target=client) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            relay.process.send_signal(signal.SIGHUP)
            relay.waitFor("reloaded")
            self.assertEqual(relay.output().count("listening on"), 5)
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        self.assertEqual(errors, [])
        self.assertGreater(served[0], 10)
        relay.waitFor("exited", 2)
