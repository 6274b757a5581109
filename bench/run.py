#!/usr/bin/env python3
"""tlsrelay vs nginx, side by side: python3 bench/run.py [--quick].

Installs what it needs (Debian: nginx, libnginx-mod-stream, wrk, openssl), makes
ECDSA P-256 and RSA-2048 certificates, starts a plain-HTTP nginx upstream, then runs
tlsrelay and nginx as TLS terminators (one generated nginx-syntax stream config for
both) in interleaved rounds: relay pinned to one core, load generator and upstream to
another. Relay CPU is read from /proc for the relay's process tree, so each figure is
per relay CPU-second whatever the load generator manages. Prints a table (median value
per relay, median of the per-round tlsrelay/nginx ratios) and writes the raw numbers
as JSON to bench/results/. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
DEBIAN_PACKAGES = ["nginx", "libnginx-mod-stream", "wrk", "openssl", "util-linux"]
HOUSEKEEPING = ("daemon", "pid", "error_log", "events", "worker_processes")
MEMORY_CONNECTIONS = 1000
SMALL_BODY = "ok\n"


class HarnessError(Exception):
    """The harness itself cannot go on (a tool is missing, nginx does not start)."""


class RelayError(Exception):
    """A relay did not start, did not relay, or died."""


class RelayExited(RelayError):
    """A relay exited while starting (typically: it rejected its configuration)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools


def ensureTools(install: bool) -> str | None:
    """Install the Debian packages that are missing; return the load_module path."""
    missing = [t for t in ("nginx", "wrk", "openssl", "taskset") if not _which(t)]
    needModule = _which("nginx") and not STREAM_MODULE.exists() and not _staticStream()
    if missing or needModule or (not _which("nginx") and not STREAM_MODULE.exists()):
        if not install:
            raise HarnessError(
                f"missing {missing or 'ngx_stream_module'}: --no-install"
            )
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise HarnessError(
                f"missing {missing or 'ngx_stream_module'} and cannot apt-get install "
                f"(needs root on Debian): install {' '.join(DEBIAN_PACKAGES)}"
            )
        log(f"installing {' '.join(DEBIAN_PACKAGES)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (
            ["apt-get", "update", "-qq"],
            [
                "apt-get",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                *DEBIAN_PACKAGES,
            ],
        ):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise HarnessError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    if STREAM_MODULE.exists():
        return str(STREAM_MODULE)
    if _staticStream():
        return None
    raise HarnessError("nginx has no stream module (install libnginx-mod-stream)")


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _staticStream() -> bool:
    nginx = _which("nginx")
    if not nginx:
        return False
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    return bool(re.search(r"--with-stream(\s|$)", out))


def versions(relayPython: str | None, clientPython: str) -> dict[str, str]:
    def run(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unavailable: {e}"
        lines = (done.stdout + done.stderr).strip().splitlines()
        return lines[0] if lines else ""

    probe = (
        "import sys, ssl\n"
        "try:\n import OpenSSL.SSL as S; o = S.SSLeay_version(S.SSLEAY_VERSION).decode()\n"
        "except Exception: o = 'no pyOpenSSL'\n"
        "print(sys.version.split()[0], '|', o, '| stdlib', ssl.OPENSSL_VERSION)"
    )
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    out = {
        "cpu": cpu,
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "nginx": run([_which("nginx") or "nginx", "-v"]),
        "nginx_openssl": next(
            (
                line
                for line in subprocess.run(
                    [_which("nginx") or "nginx", "-V"], capture_output=True, text=True
                ).stderr.splitlines()
                if "OpenSSL" in line
            ),
            "",
        ),
        "wrk": run(["wrk", "-v"]),
        "openssl_cli": run(["openssl", "version"]),
        "client_python": run([clientPython, "-c", probe]),
    }
    if relayPython:
        out["relay_python"] = run([relayPython, "-c", probe])
    return out


# --------------------------------------------------------------------------- /proc


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def processTree(pid: int) -> list[int]:
    kids = _children()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(kids.get(p, []))
    return tree


def treeCpu(pid: int) -> float:
    """CPU seconds (utime+stime, plus reaped children's) of pid and its descendants."""
    total = 0
    for p in processTree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def treeRssKib(pid: int) -> int:
    total = 0
    for p in processTree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(m.group(1)) if m else 0
    return total


def cpuList(spec: str) -> list[int]:
    """taskset's CPU list syntax: 0,2-3."""
    cpus: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def coreTimes(cpus: list[int]) -> tuple[float, float, float]:
    """(busy, softirq, steal) seconds of these CPUs since boot, from /proc/stat: busy
    is everything but idle, iowait and steal, whoever ran; softirq (part of busy) is
    kernel work no process is charged for, such as receiving loopback packets that a
    process on this CPU sent."""
    busy = softirq = steal = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(f) for f in fields]
                busy += v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
                softirq += v[6]
                steal += v[7] if len(v) > 7 else 0
    return busy / CLK_TCK, softirq / CLK_TCK, steal / CLK_TCK


def establishedTo(port: int) -> int:
    """Established IPv4 TCP connections whose remote port is port."""
    count = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "01" and int(parts[2].split(":")[1], 16) == port:
                count += 1
    return count


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    logPath: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def logTail(self, lines: int = 15) -> str:
        try:
            text = self.logPath.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


STARTED: list[Proc] = []


def spawn(name: str, argv: list[str], cwd: Path, cpus: str | None) -> Proc:
    logPath = cwd / f"{name}.out"
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    with logPath.open("wb") as out:
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc = Proc(name, popen, logPath)
    STARTED.append(proc)
    return proc


def groupMembers(pgid: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1]
                if int(stat.split()[2]) == pgid:
                    members.append(int(name))
    return members


def stop(proc: Proc, timeout: float = 5.0) -> str | None:
    """Stop a process this harness started, and what is left of its process group.
    Returns a complaint if it had to be killed or left processes behind."""
    complaint = None
    if proc.alive():
        # Like an operator: SIGTERM to the master only; it stops its workers.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            complaint = f"still running {timeout:.0f} s after SIGTERM: killed"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout)
    deadline = time.monotonic() + 2.0
    while (left := groupMembers(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        complaint = complaint or f"{len(left)} process(es) outlived the master: killed"
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc in STARTED:
        STARTED.remove(proc)
    return complaint


def stopAll() -> None:
    for proc in list(STARTED):
        with contextlib.suppress(Exception):
            stop(proc, 3.0)


def waitListening(proc: Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RelayExited(
                f"exited with status {proc.popen.returncode}:\n{proc.logTail()}"
            )
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    raise RelayError(
        f"not listening on {port} after {timeout:.0f} s:\n{proc.logTail()}"
    )


def probe(port: int, path: str = "/small", tls: bool = True) -> dict[str, str]:
    """One request through the relay; returns what was negotiated."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    last: Exception | None = None
    for _ in range(20):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                sock: Any = raw
                if tls:
                    sock = ctx.wrap_socket(raw, server_hostname="localhost")
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            if not data.startswith(b"HTTP/1.1 200") or not data.endswith(
                SMALL_BODY.encode()
            ):
                raise RelayError(f"unexpected response {data[:200]!r}")
            info = {"response": "200 ok"}
            if tls:
                info["protocol"] = str(sock.version())
                info["cipher"] = str(sock.cipher()[0])
            return info
        except (OSError, RelayError) as e:
            last = e
            time.sleep(0.1)
    raise RelayError(f"probe GET {path} failed: {type(last).__name__}: {last}")


def negotiated(port: int) -> str:
    """Protocol, cipher and key exchange group, as openssl s_client reports them."""
    try:
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief"],
            input="",
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"s_client failed: {e}"
    found = {}
    for line in done.stderr.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Protocol version", "Ciphersuite", "Server Temp Key"):
            found[key.strip()] = value.strip()
    return ", ".join(found.values()) or done.stderr.strip()[-200:]


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[str, ...]
    cert: str = "ecdsa"
    session: str = "tickets"  # or "cache"
    upstreamTls: bool = False
    workers: int = 1
    pinned: bool = True
    optional: bool = False  # a feature tlsrelay may not have yet: n/a, not a failure


SCENARIOS = [
    Scenario("ecdsa", ("memory", "warmup", "full", "resume", "bulk", "c1", "c50")),
    Scenario("rsa", ("warmup", "full"), cert="rsa"),
    Scenario("cache", ("warmup", "resume"), session="cache"),
    Scenario("upstream-tls", ("warmup", "full"), upstreamTls=True, optional=True),
    Scenario("unpinned", ("warmup", "full"), pinned=False),
    Scenario("workers-2", ("warmup", "full"), workers=2, pinned=False, optional=True),
]


@dataclass
class Env:
    work: Path
    certs: dict[str, tuple[Path, Path]]
    upPort: int
    upTlsPort: int
    upAccessLog: Path
    streamModule: str | None


def relayConfig(
    s: Scenario, flavor: str, env: Env, port: int, run: Path, dropped: set[str]
) -> str:
    """One nginx stream config; the nginx copy adds load_module, the tlsrelay copy
    leaves out what tlsrelay has rejected (recorded as a problem)."""
    crt, key = env.certs[s.cert]
    up = env.upTlsPort if s.upstreamTls else env.upPort
    lines: list[str] = []
    if flavor == "nginx" and env.streamModule:
        lines.append(f"load_module {env.streamModule};")
    house = {
        "daemon": "daemon off;",
        "worker_processes": f"worker_processes {s.workers};",
        "pid": f"pid {run}/relay.pid;",
        "error_log": f"error_log {run}/error.log;",
        "events": "events {\n    worker_connections 4096;\n}",
    }
    for name, text in house.items():
        if name in dropped and not (name == "worker_processes" and s.workers != 1):
            continue
        lines.append(text)
    server = [
        f"listen 127.0.0.1:{port} ssl;",
        f"ssl_certificate {crt};",
        f"ssl_certificate_key {key};",
        "ssl_protocols TLSv1.3;",
    ]
    if s.session == "cache":
        server += ["ssl_session_cache shared:SSL:10m;", "ssl_session_tickets off;"]
    else:
        server += ["ssl_session_tickets on;"]
    if s.upstreamTls:
        server += [
            "proxy_ssl on;",
            "proxy_ssl_protocols TLSv1.3;",
            "proxy_ssl_session_reuse on;",
        ]
    server.append("proxy_pass up;")
    body = "\n".join(f"        {line}" for line in server)
    lines.append(
        "stream {\n"
        f"    upstream up {{\n        server 127.0.0.1:{up};\n    }}\n"
        f"    server {{\n{body}\n    }}\n"
        "}"
    )
    return "\n".join(lines) + "\n"


def upstreamConfig(env: Env, run: Path) -> str:
    crt, key = env.certs["ecdsa"]
    return f"""daemon off;
worker_processes 1;
pid {run}/upstream.pid;
error_log {run}/upstream-error.log notice;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {run}/tmp-body;
    proxy_temp_path {run}/tmp-proxy;
    fastcgi_temp_path {run}/tmp-fastcgi;
    uwsgi_temp_path {run}/tmp-uwsgi;
    scgi_temp_path {run}/tmp-scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    log_format reused '$ssl_session_reused';
    server {{
        listen 127.0.0.1:{env.upPort};
        root {env.work}/www;
        location = /small {{ return 200 "{SMALL_BODY.strip()}\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{env.upTlsPort} ssl;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        access_log {env.upAccessLog} reused;
        root {env.work}/www;
        location = /small {{ return 200 "{SMALL_BODY.strip()}\\n"; }}
    }}
}}
"""


def startUpstream(env: Env, cpus: str) -> Proc:
    """The plain-HTTP (and HTTPS, for upstream TLS) nginx behind the relays."""
    work = env.work
    argv = ["nginx", "-e", f"{work}/upstream-error.log", "-p", f"{work}/"]
    proc = spawn("upstream", [*argv, "-c", f"{work}/upstream.conf"], work, cpus)
    try:
        waitListening(proc, env.upPort, 10)
        probe(env.upPort, tls=False)
    except RelayError as e:
        stop(proc)
        raise HarnessError(f"upstream nginx: {e}") from None
    return proc


def killedBy(errorLog: Path) -> str:
    """Who sent nginx its last SIGTERM/SIGINT/SIGQUIT, from its notice-level log."""
    try:
        found = re.findall(
            r"signal \d+ \((SIG(?:TERM|INT|QUIT|HUP))\) received from (\d+)",
            errorLog.read_text(),
        )
    except OSError:
        return "unknown"
    if not found:
        return "unknown (no signal logged)"
    sig, pid = found[-1]
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        who = cmd.decode(errors="replace").strip()[:200]
    except OSError:
        who = "(gone)"
    return f"{sig} from PID {pid} {who}"


def makeCerts(work: Path) -> dict[str, tuple[Path, Path]]:
    certs = {}
    for name, newkey in (
        ("ecdsa", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        ("rsa", ["-newkey", "rsa:2048"]),
    ):
        crt, key = work / f"{name}.crt", work / f"{name}.key"
        done = subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                *newkey,
                "-nodes",
                "-days",
                "7",
                "-subj",
                "/CN=localhost",
                "-keyout",
                str(key),
                "-out",
                str(crt),
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise HarnessError(f"openssl req ({name}) failed: {done.stderr}")
        key.chmod(0o644)
        certs[name] = (crt, key)
    return certs


# --------------------------------------------------------------------------- relays


@dataclass
class Relay:
    name: str
    argv: list[str]  # with {config} and {dir} placeholders
    flavor: str  # "nginx" or "tlsrelay": which copy of the config it reads
    dropped: set[str] = field(default_factory=set)
    # scenario -> (table cell, reason)
    broken: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Options:
    quick: bool
    rounds: int
    duration: float
    warmup: float
    relayCpus: str
    clientCpus: str
    procs: int
    clientPython: str
    clientBackend: str
    startTimeout: float
    strict: bool
    only: list[str]


class Bench:
    def __init__(
        self, opts: Options, env: Env, relays: list[Relay], upstream: Proc
    ) -> None:
        self.opts, self.env, self.relays, self.upstream = opts, env, relays, upstream
        self.problems: list[dict[str, Any]] = []
        self.fatal = False
        self.negotiated: dict[str, str] = {}

    def problem(self, relay: str, scenario: str, text: str, fatal: bool) -> None:
        self.problems.append(
            {"relay": relay, "scenario": scenario, "message": text, "fatal": fatal}
        )
        self.fatal |= fatal
        log(f"  ! {relay} / {scenario}: {text.splitlines()[0] if text else ''}")

    # ---- start/stop

    def start(self, relay: Relay, s: Scenario, run: Path) -> tuple[Proc, int]:
        for _attempt in range(len(HOUSEKEEPING) + 1):
            port = freePort()
            conf = run / f"{relay.flavor}.conf"
            conf.write_text(
                relayConfig(s, relay.flavor, self.env, port, run, relay.dropped)
            )
            argv = [a.format(config=conf, dir=run) for a in relay.argv]
            cpus = self.opts.relayCpus if s.pinned else None
            proc = spawn(relay.name, argv, run, cpus)
            try:
                waitListening(proc, port, self.opts.startTimeout)
                info = probe(port)
            except RelayError as e:
                stop(proc)
                rejected = [
                    n
                    for n in re.findall(r'"(\w+)"', str(e))
                    if n in HOUSEKEEPING and n not in relay.dropped
                ]
                if relay.flavor == "tlsrelay" and rejected:
                    relay.dropped.add(rejected[0])
                    self.problem(
                        relay.name,
                        s.name,
                        f"rejected housekeeping directive {rejected[0]!r}; "
                        f"retrying without it:\n{e}",
                        False,
                    )
                    continue
                raise type(e)(f"{' '.join(argv)}\n{e}") from None
            if s.name == "ecdsa":
                self.negotiated[relay.name] = (
                    f"{negotiated(port)} (stdlib probe: {info.get('cipher')})"
                )
            return proc, port
        raise RelayError("gave up after dropping housekeeping directives")

    # ---- one scenario for one relay

    def runScenario(self, relay: Relay, s: Scenario, rnd: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # A start-up failure is tried again next round (the tree may be mid-edit);
        # a relay that ignores worker_processes is not.
        if relay.broken.get(s.name, ("",))[0] == "n/a (no workers)":
            return {"error": relay.broken[s.name][1]}
        if not self.upstream.alive():
            why = killedBy(self.env.work / "upstream-error.log")
            self.problem(
                "upstream",
                s.name,
                f"upstream nginx was stopped ({why}); restarted",
                False,
            )
            stop(self.upstream)
            self.upstream = startUpstream(self.env, self.opts.clientCpus)
        run = Path(
            tempfile.mkdtemp(prefix=f"{relay.name}-{s.name}-", dir=self.env.work)
        )
        run.chmod(0o755)
        try:
            proc, port = self.start(relay, s, run)
        except RelayError as e:
            reason = str(e)
            if "Traceback" in reason:
                cell = "n/a (crashed)"
            elif isinstance(e, RelayExited) and s.optional:
                cell = "n/a (feature pending)"
            else:
                cell = "n/a (failed)"
            relay.broken[s.name] = (cell, reason)
            fatal = relay.name == "nginx" or s.name == "ecdsa" or self.opts.strict
            self.problem(relay.name, s.name, f"did not start or relay: {reason}", fatal)
            return {"error": reason}
        try:
            for step in s.steps:
                if not proc.alive():
                    raise RelayError(
                        f"died (status {proc.popen.returncode}) before step {step}:\n"
                        f"{proc.logTail()}"
                    )
                try:
                    out[step] = self.step(step, s, proc, port)
                    procs = out[step].get("relay_processes", s.workers)
                    if procs < s.workers:
                        reason = (
                            f"worker_processes {s.workers} accepted, but the relay "
                            f"runs {procs} process(es)"
                        )
                        relay.broken[s.name] = ("n/a (no workers)", reason)
                        raise RelayError(reason)
                except RelayError as e:
                    fatal = relay.name == "nginx" or self.opts.strict
                    self.problem(relay.name, s.name, f"{step}: {e}", fatal)
                    out[step] = {"error": str(e)}
                    if not proc.alive():
                        break
        except RelayError as e:
            self.problem(relay.name, s.name, str(e), relay.name == "nginx")
        finally:
            if proc.alive():
                complaint = stop(proc)
                if complaint:
                    self.problem(relay.name, s.name, f"on SIGTERM: {complaint}", False)
            else:
                out["exited"] = proc.popen.returncode
                self.problem(
                    relay.name,
                    s.name,
                    f"exited by itself with status {proc.popen.returncode}:\n"
                    f"{proc.logTail()}",
                    relay.name == "nginx" or self.opts.strict,
                )
                stop(proc)
            notes = logNotes(proc.logPath, run / "error.log")
            if notes:
                out["log_notes"] = notes
        return out

    def runScenarioOnce(self, relay: Relay, s: Scenario, rnd: int) -> dict[str, Any]:
        """runScenario, once more if something outside stopped a process of ours
        (this machine is shared; a `pkill -x nginx` elsewhere is not our failure)."""
        fatal, first = self.fatal, len(self.problems)
        out = self.runScenario(relay, s, rnd)
        upstreamGone = not self.upstream.alive()
        signalled = out.get("exited") is not None and out["exited"] <= 0
        if not (upstreamGone or signalled):
            return out
        who = killedBy(self.env.work / "upstream-error.log") if upstreamGone else ""
        for pr in self.problems[first:]:
            pr["fatal"] = False
        self.fatal = fatal
        self.problem(
            relay.name,
            s.name,
            "stopped from outside "
            + (f"(upstream: {who})" if upstreamGone else "(status 0 or a signal)")
            + "; running the scenario again",
            False,
        )
        return self.runScenario(relay, s, rnd)

    def step(self, step: str, s: Scenario, proc: Proc, port: int) -> dict[str, Any]:
        o = self.opts
        client = o.clientCpus if s.pinned else None
        if step == "warmup":
            return self.loadgen("full", proc, port, o.warmup, client)
        if step == "full":
            upLines = _lineCount(self.env.upAccessLog)
            r = self.loadgen("full", proc, port, o.duration, client)
            if s.upstreamTls:
                r["upstream_reused"] = _reusedSince(self.env.upAccessLog, upLines)
            return r
        if step == "resume":
            return self.loadgen("resume", proc, port, o.duration, client)
        if step == "bulk":
            return self.wrk(proc, port, "/1m.bin", 4, client)
        if step == "c1":
            return self.wrk(proc, port, "/small", 1, client)
        if step == "c50":
            return self.wrk(proc, port, "/small", 50, client)
        if step == "memory":
            return self.memory(proc, port, client)
        raise HarnessError(f"unknown step {step}")

    # ---- measurements

    def _window(
        self, proc: Proc, loadPid: int | None
    ) -> Callable[[], dict[str, float]]:
        """Start a measurement window; the returned function closes it."""
        cores = cpuList(self.opts.relayCpus)
        loadCores = cpuList(self.opts.clientCpus)
        l0, _, _ = coreTimes(loadCores)
        t0 = time.monotonic()
        r0, u0 = treeCpu(proc.pid), treeCpu(self.upstream.pid)
        c0 = treeCpu(loadPid) if loadPid else 0.0
        b0, q0, s0 = coreTimes(cores)

        def close() -> dict[str, float]:
            b1, q1, s1 = coreTimes(cores)
            l1, _, _ = coreTimes(loadCores)
            return {
                "load_cores_busy_s": l1 - l0,
                "wall_s": time.monotonic() - t0,
                "relay_cores_busy_s": b1 - b0,  # everything on the relay's cores
                "relay_cores_softirq_s": q1 - q0,  # part of busy
                "relay_cores_steal_s": s1 - s0,  # taken by the hypervisor
                "relay_cpu_s": treeCpu(proc.pid) - r0,
                "upstream_cpu_s": treeCpu(self.upstream.pid) - u0,
                "client_cpu_s": (treeCpu(loadPid) - c0) if loadPid else 0.0,
                "relay_processes": len(processTree(proc.pid)),
            }

        return close

    def _loadgenProc(self, args: list[str], cpus: str | None) -> subprocess.Popen[str]:
        argv = [self.opts.clientPython, str(BENCH / "loadgen.py"), *args]
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def loadgen(
        self, mode: str, proc: Proc, port: int, seconds: float, cpus: str | None
    ) -> dict[str, Any]:
        p = self._loadgenProc(
            [
                mode,
                "--port",
                str(port),
                "--seconds",
                str(seconds),
                "--procs",
                str(self.opts.procs),
                "--backend",
                self.opts.clientBackend,
            ],
            cpus,
        )
        try:
            ready = _readLine(p, 60)
            if not ready.startswith("READY"):
                raise RelayError(f"load generator: {ready or _stderr(p)}")
            close = self._window(proc, p.pid)
            _send(p)
            result = _parseJson(_readLine(p, seconds + 60), p)
            result.update(close())
        finally:
            _reap(p)
        if result["ok"] == 0:
            raise RelayError(f"no connection succeeded: {result['errors']}")
        return result

    def wrk(
        self, proc: Proc, port: int, path: str, conns: int, cpus: str | None
    ) -> dict[str, Any]:
        secs = max(1, round(self.opts.duration))
        argv = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "10s"]
        argv += ["-s", str(BENCH / "wrk_report.lua"), f"https://127.0.0.1:{port}{path}"]
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        p = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        close = self._window(proc, p.pid)
        # wrk's own CPU is only known once it exits: sample from its rusage instead.
        try:
            stdout, stderr = p.communicate(timeout=secs + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise RelayError("wrk did not finish") from None
        result = close()
        line = next((x for x in stdout.splitlines() if x.startswith("JSON ")), None)
        if p.returncode != 0 or line is None:
            raise RelayError(f"wrk failed ({p.returncode}): {stderr or stdout}"[:2000])
        data: dict[str, Any] = json.loads(line[5:])
        data.update(result)
        if data["requests"] == 0:
            raise RelayError(f"wrk completed no request: {stdout}"[:2000])
        errors = sum(
            data[k]
            for k in ("connect_errors", "read_errors", "write_errors", "status_errors")
        )
        if errors:
            data["error_note"] = f"{errors} wrk errors: {stdout.strip()[-400:]}"
        return data

    def memory(self, proc: Proc, port: int, cpus: str | None) -> dict[str, Any]:
        time.sleep(0.5)
        before = treeRssKib(proc.pid)
        baseUp = establishedTo(self.env.upPort)
        p = self._loadgenProc(
            [
                "hold",
                "--port",
                str(port),
                "--count",
                str(MEMORY_CONNECTIONS),
                "--procs",
                str(self.opts.procs),
                "--backend",
                self.opts.clientBackend,
            ],
            cpus,
        )
        try:
            ready = _readLine(p, 180)
            if not ready.startswith("READY"):
                raise RelayError(f"load generator: {ready or _stderr(p)}")
            # Wait until the relay has connected upstream for every client (it has
            # then finished each handshake), and its RSS has settled.
            deadline = time.monotonic() + 15
            while (
                establishedTo(self.env.upPort) - baseUp < MEMORY_CONNECTIONS
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
            upstreams = establishedTo(self.env.upPort) - baseUp
            after, prev = treeRssKib(proc.pid), -1
            while after != prev and time.monotonic() < deadline:
                time.sleep(0.3)
                prev, after = after, treeRssKib(proc.pid)
            _send(p)
            result = _parseJson(_readLine(p, 60), p)
        finally:
            _reap(p)
        held = result["ok"]
        if held == 0:
            raise RelayError(f"no connection opened: {result['errors']}")
        result.update(
            {
                "rss_before_kib": before,
                "rss_after_kib": after,
                "upstream_connections": upstreams,
                "kib_per_connection": (after - before) / held,
            }
        )
        if held < MEMORY_CONNECTIONS:
            result["error_note"] = f"only {held} connections opened"
        return result


def logNotes(*paths: Path) -> list[str]:
    """Lines from a relay's logs that someone should read (first few, deduplicated)."""
    pattern = re.compile(
        r"Traceback|Unhandled|Error|CRITICAL|\[(crit|alert|emerg|error|warn)\]|warn",
        re.I,
    )
    notes: list[str] = []
    for path in paths:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                text = re.sub(r"^\S+ \S+ \[[^\]]*\] ", "", line.strip())[:300]
                if pattern.search(line) and text not in notes:
                    notes.append(text)
                if len(notes) >= 8:
                    return notes
    return notes


def _lineCount(path: Path) -> int:
    try:
        return len(path.read_bytes().splitlines())
    except OSError:
        return 0


def _reusedSince(path: Path, skip: int) -> dict[str, int]:
    try:
        lines = path.read_bytes().splitlines()[skip:]
    except OSError:
        lines = []
    return {"reused": sum(1 for x in lines if x.strip() == b"r"), "total": len(lines)}


def _readLine(p: subprocess.Popen[str], timeout: float) -> str:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        raise RelayError(f"load generator silent for {timeout:.0f} s")
    return p.stdout.readline().strip()


def _send(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()


def _stderr(p: subprocess.Popen[str]) -> str:
    with contextlib.suppress(Exception):
        p.wait(5)
        assert p.stderr is not None
        return p.stderr.read()[-2000:]
    return "(no output)"


def _parseJson(line: str, p: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(line)
    except ValueError:
        raise RelayError(f"load generator said {line!r}: {_stderr(p)}") from None
    if "fatal" in data:
        raise RelayError(f"load generator: {data['fatal']}")
    return data


def _reap(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Row:
    label: str
    scenario: str
    step: str
    value: Callable[[dict[str, Any]], float | None]
    fmt: str = "{:,.0f}"
    lowerIsBetter: bool = False


def _perCpu(key: str) -> Callable[[dict[str, Any]], float | None]:
    def f(r: dict[str, Any]) -> float | None:
        cpu = r.get("relay_cpu_s", 0.0)
        return r[key] / cpu if cpu > 0 else None

    return f


def _frac(r: dict[str, Any]) -> float | None:
    return 100.0 * r["resumed"] / r["ok"] if r.get("ok") else None


def _ms(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: r[key] / 1000.0


def _busy(r: dict[str, Any]) -> float | None:
    return 100.0 * r["relay_cpu_s"] / r["wall_s"] if r.get("wall_s") else None


ROWS = [
    Row("full handshakes / CPU-s, ECDSA P-256", "ecdsa", "full", _perCpu("ok")),
    Row("full handshakes / CPU-s, RSA-2048", "rsa", "full", _perCpu("ok")),
    Row("resumed handshakes / CPU-s, tickets", "ecdsa", "resume", _perCpu("ok")),
    Row("  resumed fraction, tickets (%)", "ecdsa", "resume", _frac, "{:.1f}"),
    Row("resumed handshakes / CPU-s, session cache", "cache", "resume", _perCpu("ok")),
    Row("  resumed fraction, session cache (%)", "cache", "resume", _frac, "{:.1f}"),
    Row(
        "bulk MB / CPU-s (1 MiB bodies, keep-alive)",
        "ecdsa",
        "bulk",
        lambda r: r["bytes"] / 1e6 / r["relay_cpu_s"] if r["relay_cpu_s"] else None,
    ),
    Row(
        "bulk wall MB/s",
        "ecdsa",
        "bulk",
        lambda r: r["bytes"] / 1e6 / (r["duration_us"] / 1e6),
    ),
    Row("c=1 p50 latency (ms)", "ecdsa", "c1", _ms("p50_us"), "{:.3f}", True),
    Row("c=1 p99 latency (ms)", "ecdsa", "c1", _ms("p99_us"), "{:.3f}", True),
    Row("c=1 requests / CPU-s", "ecdsa", "c1", _perCpu("requests")),
    Row("c=50 p50 latency (ms)", "ecdsa", "c50", _ms("p50_us"), "{:.3f}", True),
    Row("c=50 p99 latency (ms)", "ecdsa", "c50", _ms("p99_us"), "{:.3f}", True),
    Row("c=50 requests / CPU-s", "ecdsa", "c50", _perCpu("requests")),
    Row(
        "memory per idle TLS connection (KiB)",
        "ecdsa",
        "memory",
        lambda r: r["kib_per_connection"],
        "{:.1f}",
        True,
    ),
    Row(
        "upstream TLS handshakes / CPU-s",
        "upstream-tls",
        "full",
        _perCpu("ok"),
    ),
    Row(
        "  upstream resumed fraction (%)",
        "upstream-tls",
        "full",
        lambda r: (
            100.0
            * r["upstream_reused"]["reused"]
            / max(1, r["upstream_reused"]["total"])
        ),
        "{:.1f}",
    ),
    Row("worker_processes 2: handshakes / CPU-s", "workers-2", "full", _perCpu("ok")),
]
INFO_ROWS = [
    Row("ECDSA handshakes/s (wall)", "ecdsa", "full", lambda r: r["ok"] / r["wall_s"]),
    Row("  relay core busy (%)", "ecdsa", "full", _busy, "{:.0f}"),
    Row(
        "  load generator core busy (%)",
        "ecdsa",
        "full",
        lambda r: 100.0 * r["client_cpu_s"] / r["wall_s"],
        "{:.0f}",
    ),
    Row(
        "  kernel softirq on the relay core (%)",
        "ecdsa",
        "full",
        lambda r: 100.0 * r["relay_cores_softirq_s"] / r["wall_s"],
        "{:.0f}",
    ),
    Row(
        "  other programs on the relay core (%)",
        "ecdsa",
        "full",
        lambda r: (
            100.0
            * max(
                0.0,
                r["relay_cores_busy_s"] - r["relay_cores_softirq_s"] - r["relay_cpu_s"],
            )
            / r["wall_s"]
        ),
        "{:.0f}",
    ),
    Row(
        "  other programs on the load core (%)",
        "ecdsa",
        "full",
        lambda r: (
            100.0
            * max(0.0, r["load_cores_busy_s"] - r["client_cpu_s"] - r["upstream_cpu_s"])
            / r["wall_s"]
        ),
        "{:.0f}",
    ),
    Row(
        "  hypervisor steal on the relay core (%)",
        "ecdsa",
        "full",
        lambda r: 100.0 * r["relay_cores_steal_s"] / r["wall_s"],
        "{:.0f}",
    ),
    Row("RSA handshakes/s (wall)", "rsa", "full", lambda r: r["ok"] / r["wall_s"]),
    Row("  relay core busy (%)", "rsa", "full", _busy, "{:.0f}"),
    Row("bulk: relay core busy (%)", "ecdsa", "bulk", _busy, "{:.0f}"),
    Row(
        "c=50 requests/s (wall)",
        "ecdsa",
        "c50",
        lambda r: r["requests"] / (r["duration_us"] / 1e6),
    ),
    Row("  relay core busy (%)", "ecdsa", "c50", _busy, "{:.0f}"),
    Row(
        "unpinned 1 worker: handshakes/s (wall)",
        "unpinned",
        "full",
        lambda r: r["ok"] / r["wall_s"],
    ),
    Row(
        "unpinned 2 workers: handshakes/s (wall)",
        "workers-2",
        "full",
        lambda r: r["ok"] / r["wall_s"],
    ),
]
SCALING_LABEL = "worker_processes 2: scaling (wall rate 2 workers / 1)"


def _value(rnd: dict[str, Any], relay: str, row: Row) -> float | None:
    r = rnd.get(row.scenario, {}).get(relay, {}).get(row.step)
    if not isinstance(r, dict) or "error" in r:
        return None
    try:
        return row.value(r)
    except (KeyError, ZeroDivisionError, TypeError):
        return None


def _scaling(rnd: dict[str, Any], relay: str) -> float | None:
    byLabel = {row.label: row for row in INFO_ROWS}
    one = _value(rnd, relay, byLabel["unpinned 1 worker: handshakes/s (wall)"])
    two = _value(rnd, relay, byLabel["unpinned 2 workers: handshakes/s (wall)"])
    return two / one if one and two else None


def summarize(
    rounds: list[dict[str, Any]], relays: list[Relay]
) -> list[dict[str, Any]]:
    base, test = relays[0].name, relays[1].name
    table = []

    def add(
        label: str,
        per: Callable[[dict[str, Any], str], float | None],
        fmt: str,
        lower: bool,
        scenario: str,
        info: bool,
    ) -> None:
        vals = {name: [per(r, name) for r in rounds] for name in (base, test)}
        med = {
            name: statistics.median([v for v in vs if v is not None])
            if any(v is not None for v in vs)
            else None
            for name, vs in vals.items()
        }
        ratios = [
            t / b
            for b, t in zip(vals[base], vals[test])
            if b is not None and t is not None and b != 0
        ]
        missing = {name: _why(relays, name, scenario) for name in (base, test)}
        table.append(
            {
                "metric": label,
                "format": fmt,
                "lower_is_better": lower,
                "info": info,
                base: med[base],
                test: med[test],
                "ratio": statistics.median(ratios) if ratios else None,
                "round_ratios": ratios,
                "missing": missing,
            }
        )

    def of(row: Row) -> Callable[[dict[str, Any], str], float | None]:
        return lambda r, n: _value(r, n, row)

    for row in ROWS:
        add(
            row.label,
            of(row),
            row.fmt,
            row.lowerIsBetter,
            row.scenario,
            False,
        )
        if row.scenario == "workers-2":
            add(SCALING_LABEL, _scaling, "{:.2f}", False, "workers-2", False)
    for row in INFO_ROWS:
        add(
            row.label,
            of(row),
            row.fmt,
            row.lowerIsBetter,
            row.scenario,
            True,
        )
    return table


def _why(relays: list[Relay], name: str, scenario: str) -> str | None:
    relay = next(r for r in relays if r.name == name)
    if scenario in relay.broken:
        return relay.broken[scenario][0]
    return None


def render(table: list[dict[str, Any]], relays: list[Relay]) -> str:
    base, test = relays[0].name, relays[1].name
    width = max(len(r["metric"]) for r in table) + 2
    head = f"{'metric':<{width}}{base:>14}{test:>24}{test + '/' + base:>20}"
    out = [head, "-" * len(head)]
    infoStarted = False
    for r in table:
        if r["info"] and not infoStarted:
            out += [
                "",
                "diagnostics (wall rates and core use; not targets)",
                "-" * len(head),
            ]
            infoStarted = True
        cells = []
        for name in (base, test):
            v = r[name]
            cells.append(
                r["format"].format(v)
                if v is not None
                else (r["missing"][name] or "n/a")
            )
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "n/a"
        if r["ratio"] is not None and len(r["round_ratios"]) > 1:
            lo, hi = min(r["round_ratios"]), max(r["round_ratios"])
            ratio = f"{ratio} [{lo:.2f}-{hi:.2f}]"
        out.append(f"{r['metric']:<{width}}{cells[0]:>14}{cells[1]:>24}{ratio:>20}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def defaultTwistd() -> str | None:
    local = REPO / ".venv" / "bin" / "twistd"
    if local.exists():
        return str(local)
    return shutil.which("twistd")


def parseArgs(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark tlsrelay against nginx (see bench/README.md)."
    )
    p.add_argument("--quick", action="store_true", help="1 short round (<60 s), for CI")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 1)")
    p.add_argument(
        "--duration", type=float, help="seconds per measurement (default 5; quick 1)"
    )
    p.add_argument("--warmup", type=float, help="seconds of load before measuring")
    p.add_argument(
        "--twistd",
        help="twistd to run tlsrelay with (default: "
        ".venv/bin/twistd in the repo, else twistd on PATH)",
    )
    p.add_argument(
        "--relay-cmd",
        help="command for the relay under test instead of twistd; {config} and {dir} "
        "are replaced; a command starting with nginx gets the nginx copy of the config "
        "(e.g. 'nginx -e {dir}/e.log -p {dir} -c {config}' to check the plumbing)",
    )
    p.add_argument("--relay-name", default="tlsrelay")
    p.add_argument(
        "--client-python",
        help="python for the load generator (default: the relay's python when it has "
        "pyOpenSSL, else this python)",
    )
    p.add_argument(
        "--client-backend",
        choices=["auto", "pyopenssl", "stdlib"],
        default="auto",
        help="TLS library of the load generator (auto: pyOpenSSL when importable)",
    )
    p.add_argument("--relay-cpus", default="0", help="taskset list for the relays")
    p.add_argument(
        "--client-cpus", default="1", help="taskset list for load and upstream"
    )
    p.add_argument("--procs", type=int, default=4, help="load generator processes")
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios: " + ",".join(s.name for s in SCENARIOS),
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when the relay under test fails anything",
    )
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--results", default=str(BENCH / "results"))
    return p.parse_args(argv)


def _hasPyOpenSSL(python: str) -> bool:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        return (
            subprocess.run(
                [python, "-c", "import OpenSSL.SSL, OpenSSL._util"],
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
    return False


@contextlib.contextmanager
def cleanup() -> Iterator[None]:
    def onSignal(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, onSignal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        stopAll()
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str]) -> int:
    a = parseArgs(argv)
    rounds = a.rounds or (1 if a.quick else 5)
    duration = a.duration or (1.0 if a.quick else 5.0)
    warmup = a.warmup if a.warmup is not None else (0.3 if a.quick else 1.0)
    ncpu = os.cpu_count() or 1
    relayCpus, clientCpus = a.relay_cpus, a.client_cpus
    if ncpu < 2:
        log("only one CPU: relay and load share it (per CPU-second figures still hold)")
        relayCpus = clientCpus = "0"

    if a.relay_cmd:
        testArgv = shlex.split(a.relay_cmd)
        flavor = "nginx" if Path(testArgv[0]).name == "nginx" else "tlsrelay"
        relayPython = None
    else:
        twistd = a.twistd or defaultTwistd()
        if not twistd:
            log("no twistd found: pass --twistd PATH (or create .venv)")
            return 1
        testArgv = [twistd, "-n", "tlsrelay", "--config", "{config}"]
        flavor = "tlsrelay"
        cand = Path(twistd).parent / "python"
        relayPython = str(cand) if cand.exists() else None
    clientPython = a.client_python or (
        relayPython if relayPython and _hasPyOpenSSL(relayPython) else sys.executable
    )

    try:
        streamModule = ensureTools(not a.no_install)
    except HarnessError as e:
        log(f"harness: {e}")
        return 1

    with contextlib.suppress(ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    work = Path(tempfile.mkdtemp(prefix="tlsrelay-bench-"))
    work.chmod(0o755)
    opts = Options(
        quick=a.quick,
        rounds=rounds,
        duration=duration,
        warmup=warmup,
        relayCpus=relayCpus,
        clientCpus=clientCpus,
        procs=a.procs,
        clientPython=clientPython,
        clientBackend=a.client_backend,
        startTimeout=a.start_timeout,
        strict=a.strict,
        only=[x for x in a.only.split(",") if x],
    )
    relays = [
        Relay(
            "nginx",
            ["nginx", "-e", "{dir}/error.log", "-p", "{dir}/", "-c", "{config}"],
            "nginx",
        ),
        Relay(a.relay_name if a.relay_name != "nginx" else "nginx-2", testArgv, flavor),
    ]
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    with cleanup():
        try:
            env = Env(
                work=work,
                certs=makeCerts(work),
                upPort=freePort(),
                upTlsPort=freePort(),
                upAccessLog=work / "upstream-access.log",
                streamModule=streamModule,
            )
            www = work / "www"
            www.mkdir()
            (www / "1m.bin").write_bytes(os.urandom(1 << 20))
            www.chmod(0o755)
            (work / "upstream.conf").write_text(upstreamConfig(env, work))
            upstream = startUpstream(env, clientCpus)
            bench = Bench(opts, env, relays, upstream)
            info = versions(relayPython, clientPython)
            log(
                f"work dir {work}; relay CPUs {relayCpus}, load CPUs {clientCpus}; "
                f"{rounds} round(s) x {duration:g} s"
            )
            scenarios = [s for s in SCENARIOS if not opts.only or s.name in opts.only]
            results: list[dict[str, Any]] = []
            for rnd in range(rounds):
                order = relays if rnd % 2 == 0 else relays[::-1]
                here: dict[str, Any] = {}
                for s in scenarios:
                    here[s.name] = {}
                    for relay in order:
                        log(f"round {rnd + 1}/{rounds}: {s.name} / {relay.name}")
                        here[s.name][relay.name] = bench.runScenarioOnce(relay, s, rnd)
                results.append(here)
        except HarnessError as e:
            log(f"harness: {e}")
            return 1
        finally:
            if not a.keep:
                stopAll()
                shutil.rmtree(work, ignore_errors=True)

    table = summarize(results, relays)
    elapsed = time.monotonic() - t0
    print()
    print(
        f"{relays[1].name} vs nginx: {info['cpus']} x {info['cpu']}, {info['kernel']}; "
        f"relay on CPU {relayCpus}, load+upstream on CPU {clientCpus}; "
        f"{rounds} round(s) x {duration:g} s; {elapsed:.0f} s total"
    )
    for name, text in bench.negotiated.items():
        print(f"  {name}: {text}")
    print(f"  load generator: {clientPython} ({info['client_python']})")
    print(
        "  values: median over rounds; ratio: median of per-round ratios "
        "[min-max]; CPU-s = relay CPU-second (/proc, whole process tree)"
    )
    print()
    print(render(table, relays))
    if bench.problems:
        print()
        print("problems:")
        seen: dict[tuple[str, str, str], int] = {}
        for pr in bench.problems:
            key = (pr["relay"], pr["scenario"], pr["message"].strip().split("\n")[-1])
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:
                continue
            first, _, rest = pr["message"].partition("\n")
            print(f"- {pr['relay']} / {pr['scenario']}: {first}")
            for line in rest.splitlines()[-12:]:
                print(f"    {line}")
        for (who, scen, last), n in seen.items():
            if n > 1:
                print(f"- {who} / {scen}: the same again, {n} times in all: {last}")
    notes = {
        (rel.name, scen): r["log_notes"]
        for rnd in results
        for scen, per in rnd.items()
        for rel in relays
        if "log_notes" in (r := per.get(rel.name, {}))
    }
    if notes:
        print()
        print("log lines worth reading:")
        for (name, scen), lines in notes.items():
            for line in lines[:4]:
                print(f"- {name} / {scen}: {line}")

    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    doc = {
        "started": started.isoformat(),
        "seconds": elapsed,
        "argv": argv,
        "options": {k: v for k, v in vars(opts).items()}
        | {"relay_argv": testArgv, "relay_flavor": flavor},
        "versions": info,
        "negotiated": bench.negotiated,
        "dropped_directives": {r.name: sorted(r.dropped) for r in relays},
        "table": table,
        "rounds": results,
        "problems": bench.problems,
    }
    path = out / f"{stamp}{'-quick' if a.quick else ''}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    (out / "latest.json").write_text(json.dumps(doc, indent=1, default=str))
    print()
    print(f"raw results: {path}")
    if bench.fatal:
        log("harness: a relay failed where it must not (see problems): exit 1")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
