"""
Integration-test helpers: real C{twistd -n tlsrelay} processes, real peers
(C{openssl}, C{curl}, nginx) and small upstream servers on loopback, each bounded in
time.
"""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from twisted.trial.unittest import SkipTest

STARTUP_TIMEOUT = 20.0


def requireTool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SkipTest(f"{name} is not installed (.ci/run installs it)")
    return path


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistdCommand(*args: str) -> list[str]:
    """
    The command line of C{twistd -n tlsrelay ...} with this interpreter.
    """
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "tlsrelay",
        *args,
    ]


class RelayProcess:
    """
    A C{twistd -n tlsrelay --config} process, started and waited for until every
    listener is up.
    """

    def __init__(self, directory: str, config: str, listeners: int = 1) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "relay.conf")
        with open(self.path, "w") as f:
            f.write(config)
        self.logPath = os.path.join(directory, "twistd.log")
        self.log = open(self.logPath, "wb")
        self.process = subprocess.Popen(
            twistdCommand("--config", self.path),
            cwd=directory,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.waitFor("listening on", listeners)

    def output(self) -> str:
        with open(self.logPath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def waitFor(
        self, text: str, count: int = 1, timeout: float = STARTUP_TIMEOUT
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output().count(text) >= count:
                return
            if self.process.poll() is not None:
                raise AssertionError(
                    f"tlsrelay exited with {self.process.returncode}:\n{self.output()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {text!r}:\n{self.output()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def rss(self) -> int:
        """
        Resident set size of the relay process, in bytes.
        """
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def runTwistd(
    args: Sequence[str], cwd: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        twistdCommand(*args),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sClient(
    port: int,
    args: Sequence[str] = (),
    data: bytes = b"",
    timeout: float = 15,
    host: str = "127.0.0.1",
) -> subprocess.CompletedProcess[bytes]:
    """
    Run C{openssl s_client} against C{host:port}, send C{data}, and collect what it
    printed.  The input stays open briefly so that the reply arrives before EOF.
    """
    openssl = requireTool("openssl")
    command = [openssl, "s_client", "-connect", f"{host}:{port}", *args]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None
    try:
        process.stdin.write(data)
        process.stdin.flush()
        time.sleep(0.3)
        process.stdin.close()
        process.stdin = None
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


class _Handler(socketserver.BaseRequestHandler):
    server: _Upstream

    def handle(self) -> None:
        sock: socket.socket = self.request
        if self.server.greeting is not None:
            sock.sendall(self.server.greeting)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.server.echo:
                sock.sendall(data)


class _Upstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    greeting: bytes | None
    echo: bool


def startUpstream(
    greeting: bytes | None = None, echo: bool = True, port: int = 0
) -> tuple[_Upstream, int]:
    """
    A plain-TCP upstream on loopback in a thread: sends C{greeting} on connect and
    echoes what it reads.  Call C{shutdown()} and C{server_close()} when done.
    """
    server = _Upstream(("127.0.0.1", port), _Handler)
    server.greeting = greeting
    server.echo = echo
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, int(server.server_address[1])


def stopUpstream(server: Any) -> None:
    server.shutdown()
    server.server_close()
