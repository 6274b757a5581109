"""
Tests for L{tlsrelay._workers.WorkerSupervisor}: spawning workers on the bound
sockets, respawning with backoff, reload that waits for the new generation's
readiness, and stop (SIGTERM, then SIGKILL), on a memory reactor whose processes
the tests drive.
"""

from __future__ import annotations

import io
import os
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from attrs import define, field
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IAddress,
    IProcessProtocol,
    IProcessTransport,
    IReactorProcess,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    capturedLogs,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tlsrelay._config._errors import ConfigError
from tlsrelay._config._load import loadConfig
from tlsrelay._config._model import Config
from tlsrelay._listen import BoundListener
from tlsrelay._log import Logger
from tlsrelay._service import Generation, configListens, listenKey
from tlsrelay._workers import (
    RESPAWN_DELAY_MAX,
    WorkerSupervisor,
    workerCommand,
)


@implementer(IAddress)
class _NoAddress:
    pass


@implementer(IProcessTransport)
class FakeProcess:
    """
    What L{ProcessReactor.spawnProcess} returns: it records the signals it is
    sent, and the test makes the child report readiness or exit.
    """

    def __init__(
        self,
        protocol: IProcessProtocol,
        args: Sequence[str],
        env: Mapping[str, str] | None,
        childFDs: Mapping[int, int | str],
        pid: int,
    ) -> None:
        self.protocol = protocol
        self.args = list(args)
        self.env = env
        self.childFDs = dict(childFDs)
        self.pid: int | None = pid
        self.signals: list[str | int] = []
        self.ended = False

    @property
    def generation(self) -> int:
        """
        The generation of the worker this process runs.
        """
        return int(cast(Any, self.protocol).worker.generation)

    @property
    def readyFD(self) -> int:
        [fd] = [fd for fd, kind in self.childFDs.items() if kind == "r"]
        return fd

    def option(self, name: str) -> list[str]:
        """
        Every value of the command-line option C{name}.
        """
        return [self.args[i + 1] for i, arg in enumerate(self.args) if arg == name]

    def ready(self) -> None:
        self.protocol.childDataReceived(self.readyFD, b"ready\n")

    def exit(self, code: int = 0, signal: int | None = None) -> None:
        """
        End the child, as the reactor reports it: cleanly with code 0, else
        terminated with C{code} or by C{signal}.
        """
        self.ended = True
        self.pid = None
        reason: Exception
        if code == 0 and signal is None:
            reason = ProcessDone(0)
        else:
            reason = ProcessTerminated(exitCode=code or None, signal=signal)
        self.protocol.processEnded(Failure(reason))

    # IProcessTransport

    def signalProcess(self, signalID: str | int) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(signalID)

    def closeStdin(self) -> None:
        pass

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, descriptor: int) -> None:
        pass

    def writeToChild(self, childFD: int, data: bytes) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: Iterable[bytes]) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def getPeer(self) -> IAddress:
        return _NoAddress()

    def getHost(self) -> IAddress:
        return _NoAddress()


@implementer(IReactorProcess)
class ProcessReactor(MemoryReactorClock):
    """
    A memory reactor that records the processes it is asked to spawn.
    """

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.executables: list[str] = []

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[Any, Any] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> FakeProcess:
        assert childFDs is not None
        process = FakeProcess(
            processProtocol,
            [str(a) for a in args],
            env,
            childFDs,
            pid=1000 + len(self.processes),
        )
        self.executables.append(str(executable))
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process


@define
class FakeSharing:
    """
    Stands in for the master's L{tlsrelay._sessions.SessionSharing}.
    """

    directory: str | None = None
    running: bool = False
    stopped: int = field(default=0)

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> None:
        self.running = False
        self.stopped += 1


def server(port: int) -> str:
    return f"    server {{ listen 127.0.0.1:{port}; return p{port}; }}\n"


def messages(events: Sequence[dict[str, Any]]) -> list[str]:
    return [str(e.get("log_format", "")) for e in events]


class SupervisorTestCase(SynchronousTestCase):
    """
    A L{WorkerSupervisor} of configurations written as text, on a
    L{ProcessReactor}, with a C{load} that hands out what the test set and a
    C{bindNew} that binds nothing.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "relay.conf")
        self.reactor = ProcessReactor()
        self.sharing = FakeSharing(directory="/run/tlsrelay-test")
        self.next: Config | ConfigError | None = None
        self.loaded: list[str] = []
        self.bindCalls: list[list[str]] = []
        self.sockets: list[socket.socket] = []
        self.addCleanup(self.closeSockets)

    def closeSockets(self) -> None:
        for sock in self.sockets:
            sock.close()

    def config(self, *ports: int, workers: int = 2, main: str = "") -> Config:
        """
        Write and load a configuration with a C{return} server per port.
        """
        with open(self.path, "w") as f:
            f.write(
                f"worker_processes {workers};\n{main}\n"
                f"stream {{\n{''.join(server(p) for p in ports)}}}\n"
            )
        return loadConfig(self.path)

    def load(self, path: str) -> Config:
        self.loaded.append(path)
        result, self.next = self.next, None
        if isinstance(result, ConfigError):
            raise result
        assert result is not None
        return result

    def listener(self, key: str, config: Config) -> BoundListener:
        [listen] = [x for x in configListens(config) if listenKey(x) == key]
        sock = socket.socket()
        self.sockets.append(sock)
        return BoundListener(listen, sock)

    def bindNew(
        self, config: Config, bound: dict[str, BoundListener]
    ) -> dict[str, BoundListener]:
        keys = [
            listenKey(x) for x in configListens(config) if listenKey(x) not in bound
        ]
        self.bindCalls.append(keys)
        return {key: self.listener(key, config) for key in keys}

    def supervisor(
        self, config: Config, start: bool = True, **kwargs: Any
    ) -> WorkerSupervisor:
        listeners = {
            listenKey(x): self.listener(listenKey(x), config)
            for x in configListens(config)
        }
        kwargs.setdefault("sharing", self.sharing)
        supervisor = WorkerSupervisor(
            config,
            listeners,
            self.reactor,
            self.load,
            self.bindNew,
            environ={"TEST": "1"},
            **kwargs,
        )
        if start:
            supervisor.startService()
        return supervisor

    def live(self, generation: int | None = None) -> list[FakeProcess]:
        """
        The processes not ended (of C{generation}'s workers, if given).
        """
        if generation is None:
            return [p for p in self.reactor.processes if not p.ended]
        return [
            p
            for p in self.reactor.processes
            if not p.ended and p.generation == generation
        ]

    def reload(self, supervisor: WorkerSupervisor, config: Config) -> Deferred[bool]:
        self.next = config
        return supervisor.reload()


class SpawnTests(SupervisorTestCase):
    def test_interfaces(self) -> None:
        """
        L{WorkerSupervisor} is an L{IService}; the test's fakes provide the
        interfaces they stand in for.
        """
        supervisor = self.supervisor(self.config(8001), start=False)
        self.assertTrue(verifyObject(IService, supervisor))
        self.assertTrue(verifyObject(IReactorProcess, self.reactor))
        supervisor.startService()
        self.assertTrue(verifyObject(IProcessTransport, self.reactor.processes[0]))

    def test_spawn(self) -> None:
        """
        Starting spawns C{worker_processes} workers of generation 1, each
        inheriting the listening sockets as descriptors 3, 4, ... (named by
        C{--listen-fd}) and a pipe to report readiness on (C{--ready-fd}).
        """
        config = self.config(8002, 8001)
        supervisor = self.supervisor(config, start=False)
        filenos = {k: v.socket.fileno() for k, v in supervisor.listeners.items()}
        with capturedLogs() as events:
            supervisor.startService()
        self.assertTrue(self.sharing.running)
        self.assertEqual(supervisor.generation, 1)
        self.assertEqual(
            [(w.generation, w.slot, w.pid) for w in supervisor.workers],
            [(1, 0, 1000), (1, 1, 1001)],
        )
        self.assertEqual(self.reactor.executables, [sys.executable] * 2)
        for process in self.reactor.processes:
            self.assertEqual(
                process.args,
                [
                    sys.executable,
                    "-m",
                    "tlsrelay._worker",
                    "--config",
                    self.path,
                    "--ready-fd",
                    "5",
                    "--instance-dir",
                    "/run/tlsrelay-test",
                    "--listen-fd",
                    "3=127.0.0.1:8001",
                    "--listen-fd",
                    "4=127.0.0.1:8002",
                ],
            )
            self.assertEqual(
                process.childFDs,
                {
                    0: "w",
                    1: 1,
                    2: 2,
                    3: filenos["127.0.0.1:8001"],
                    4: filenos["127.0.0.1:8002"],
                    5: "r",
                },
            )
            self.assertEqual(process.env, {"TEST": "1"})
        # The master keeps its sockets, for workers it starts later.
        self.assertNotIn(-1, filenos.values())
        self.assertEqual(
            list(filenos.values()),
            [v.socket.fileno() for v in supervisor.listeners.values()],
        )
        self.assertIn("starting {count} worker processes", messages(events))

    def test_onlyCurrentSockets(self) -> None:
        """
        A socket the configuration no longer listens on is not passed on.
        """
        config = self.config(8001, workers=1)
        supervisor = self.supervisor(config, start=False)
        supervisor.listeners["127.0.0.1:9999"] = self.listener("127.0.0.1:8001", config)
        supervisor.startService()
        [process] = self.reactor.processes
        self.assertEqual(process.option("--listen-fd"), ["3=127.0.0.1:8001"])
        self.assertEqual(process.option("--ready-fd"), ["4"])

    def test_noInstanceDirectory(self) -> None:
        """
        Without session sharing, workers get no C{--instance-dir}.
        """
        self.supervisor(self.config(8001, workers=1), sharing=None)
        [process] = self.reactor.processes
        self.assertEqual(process.option("--instance-dir"), [])
        self.assertEqual(
            process.args,
            workerCommand(self.config(8001, workers=1), {"127.0.0.1:8001": 3}, None, 4),
        )

    def test_readyOnlyOnTheReadyPipe(self) -> None:
        """
        A worker is ready when it writes C{ready} on its ready pipe, not when
        the word appears in its other output.
        """
        supervisor = self.supervisor(self.config(8001, workers=1))
        [worker] = supervisor.workers
        [process] = self.reactor.processes
        process.protocol.childDataReceived(1, b"ready\n")
        process.protocol.childDataReceived(2, b"ready\n")
        self.assertNoResult(worker.ready)
        process.ready()
        self.assertIsNone(self.successResultOf(worker.ready))
        process.ready()  # said twice: no error

    def test_errorLogs(self) -> None:
        """
        The master's C{error_log} observers record events while it runs and
        are removed and closed when it stops.
        """
        config = self.config(8001, workers=1)
        stream = io.StringIO()
        seen: list[LogEvent] = []
        observer = cast(ILogObserver, seen.append)
        errorLogs = Generation(config, [], [], errorLogs=[(stream, observer)])
        supervisor = self.supervisor(config, errorLogs=errorLogs)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.assertIn(
            "worker {pid} started (generation {generation}, slot {slot})",
            messages(seen),
        )
        stopping = supervisor.stopService()
        self.reactor.processes[0].exit()
        self.successResultOf(stopping)
        self.assertTrue(stream.closed)
        count = len(seen)
        Logger().info("after the stop")
        self.assertEqual(len(seen), count)


class RespawnTests(SupervisorTestCase):
    def test_respawnAfterDeath(self) -> None:
        """
        A ready worker that dies is replaced after a second, in the same slot
        and generation, on the same sockets.
        """
        supervisor = self.supervisor(self.config(8001, 8002))
        first, second = self.reactor.processes
        first.ready()
        second.ready()
        with capturedLogs() as events:
            second.exit(3)
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual((warning["pid"], warning["reason"]), (1001, "exit 3"))
        self.assertEqual([w.slot for w in supervisor.workers], [0])
        self.reactor.advance(0.999)
        self.assertEqual(len(self.reactor.processes), 2)
        self.reactor.advance(0.001)
        third = self.reactor.processes[2]
        self.assertEqual(third.args, second.args)
        self.assertEqual(third.childFDs, second.childFDs)
        self.assertEqual(
            [(w.generation, w.slot, w.pid) for w in supervisor.workers],
            [(1, 0, 1000), (1, 1, 1002)],
        )

    def test_deathReasons(self) -> None:
        """
        The warning says how the worker ended: its exit status, or the signal.
        """
        self.supervisor(self.config(8001, workers=3))
        one, two, three = self.reactor.processes
        with capturedLogs() as events:
            one.exit(0)
            two.exit(2)
            three.exit(signal=9)
        reasons = [e["reason"] for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(reasons[:2], ["exit 0", "exit 2"])
        self.assertIn("signal 9", reasons[2])

    def test_backoff(self) -> None:
        """
        Each death before readiness doubles the delay before the next attempt
        (1, 2, 4 ... seconds, at most L{RESPAWN_DELAY_MAX}); a worker that
        was ready and dies is replaced after a second again.
        """
        self.supervisor(self.config(8001, workers=1))
        delays = []
        for _ in range(8):
            self.reactor.processes[-1].exit(1)
            [call] = self.reactor.getDelayedCalls()
            delays.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
        self.assertEqual(delays, [1, 2, 4, 8, 16, RESPAWN_DELAY_MAX, 30, 30])
        self.reactor.processes[-1].ready()
        self.reactor.processes[-1].exit(1)
        [call] = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime() - self.reactor.seconds(), 1)

    def test_slotsBackOffSeparately(self) -> None:
        """
        One slot's failures do not delay another's restart.
        """
        self.supervisor(self.config(8001, workers=2))
        first, second = self.reactor.processes
        first.exit(1)
        self.reactor.advance(1)
        self.reactor.processes[-1].exit(1)
        second.ready()
        second.exit(1)
        self.assertEqual(
            sorted(
                c.getTime() - self.reactor.seconds()
                for c in self.reactor.getDelayedCalls()
            ),
            [1, 2],
        )


class ReloadTests(SupervisorTestCase):
    def test_newGenerationBeforeOldStops(self) -> None:
        """
        A reload starts a new generation on the new configuration and stops
        the old workers (SIGTERM) only once every new one is ready; the old
        ones are not replaced when they exit.
        """
        supervisor = self.supervisor(self.config(8001))
        old = list(self.reactor.processes)
        for process in old:
            process.ready()
        config = self.config(8001, main="worker_shutdown_timeout 3s;")
        with capturedLogs() as events:
            reloading = self.reload(supervisor, config)
            self.assertEqual(self.loaded, [self.path])
            self.assertEqual(supervisor.generation, 2)
            self.assertIs(supervisor.config, config)
            new = self.live(2)
            self.assertEqual(len(new), 2)
            self.assertEqual(new[0].childFDs, old[0].childFDs)
            new[0].ready()
            self.assertNoResult(reloading)
            self.assertEqual([p.signals for p in old], [[], []])
            self.assertIs(supervisor.reload(), reloading)
            new[1].ready()
        self.assertTrue(self.successResultOf(reloading))
        self.assertIsNone(supervisor.reloading)
        self.assertEqual([p.signals for p in old], [["TERM"], ["TERM"]])
        self.assertEqual([p.signals for p in new], [[], []])
        self.assertIn("reloaded {path}", messages(events))
        with capturedLogs() as events:
            for process in old:
                process.exit()
        self.assertEqual(messages(events), ["worker {pid} exited"] * 2)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 4)
        self.assertEqual(
            [(w.generation, w.slot) for w in supervisor.workers], [(2, 0), (2, 1)]
        )

    def test_listenersAddedAndRemoved(self) -> None:
        """
        A reload binds the new addresses and hands the new generation only the
        addresses it listens on; a removed address stays open until the new
        generation is ready (the old one still accepts on it).
        """
        supervisor = self.supervisor(self.config(8001, 8002, workers=1))
        self.reactor.processes[0].ready()
        removed = supervisor.listeners["127.0.0.1:8002"].socket
        reloading = self.reload(supervisor, self.config(8001, 8003, workers=1))
        self.assertEqual(self.bindCalls, [["127.0.0.1:8003"]])
        [new] = self.live(2)
        added = supervisor.listeners["127.0.0.1:8003"].socket
        self.assertEqual(
            new.option("--listen-fd"), ["3=127.0.0.1:8001", "4=127.0.0.1:8003"]
        )
        self.assertEqual(new.childFDs[4], added.fileno())
        self.assertNotEqual(removed.fileno(), -1)
        new.ready()
        self.assertTrue(self.successResultOf(reloading))
        self.assertEqual(removed.fileno(), -1)
        self.assertEqual(
            sorted(supervisor.listeners), ["127.0.0.1:8001", "127.0.0.1:8003"]
        )

    def test_configurationError(self) -> None:
        """
        A configuration that does not load (or bind) is logged; the running
        workers stay and nothing is spawned.
        """
        supervisor = self.supervisor(self.config(8001))
        self.next = ConfigError("unknown directive", self.path, 3)
        with capturedLogs() as events:
            self.assertFalse(self.successResultOf(supervisor.reload()))
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn("unknown directive", error["error"])
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(supervisor.generation, 1)
        self.assertIsNone(supervisor.reloading)

    def test_workerExitsBeforeReady(self) -> None:
        """
        When a new worker exits before it is ready, the reload fails: the old
        generation keeps running (and its number), the other new workers are
        stopped, the new sockets closed, the configuration restored.
        """
        config = self.config(8001)
        supervisor = self.supervisor(config)
        old = list(self.reactor.processes)
        for process in old:
            process.ready()
        reloading = self.reload(supervisor, self.config(8001, 8003))
        added = supervisor.listeners["127.0.0.1:8003"].socket
        failing, other = self.live(2)
        other.ready()
        with capturedLogs() as events:
            failing.exit(1)
        self.assertFalse(self.successResultOf(reloading))
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(error["error"], "worker 1002 exited before it was ready")
        self.assertEqual(supervisor.generation, 1)
        self.assertIs(supervisor.config, config)
        self.assertEqual(other.signals, ["TERM"])
        self.assertEqual([p.signals for p in old], [[], []])
        self.assertEqual(added.fileno(), -1)
        self.assertEqual(list(supervisor.listeners), ["127.0.0.1:8001"])
        other.exit()
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 4)

        # The old generation is still the one restarted when a worker dies.
        old[0].exit(1)
        self.reactor.advance(1)
        [respawned] = self.reactor.processes[4:]
        self.assertEqual(respawned.option("--listen-fd"), ["3=127.0.0.1:8001"])
        self.assertEqual(
            sorted((w.generation, w.slot) for w in supervisor.workers),
            [(1, 0), (1, 1)],
        )

    def test_readinessTimeout(self) -> None:
        """
        New workers not all ready within C{readyTimeout} fail the reload: they
        are stopped and the old generation stays.
        """
        supervisor = self.supervisor(self.config(8001))
        supervisor.readyTimeout = 10.0
        old = list(self.reactor.processes)
        reloading = self.reload(supervisor, self.config(8001))
        new = self.live(2)
        new[0].ready()
        self.reactor.advance(9.9)
        self.assertNoResult(reloading)
        with capturedLogs() as events:
            self.reactor.advance(0.1)
        self.assertFalse(self.successResultOf(reloading))
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(error["error"], "new workers not ready in 10 seconds")
        self.assertEqual(supervisor.generation, 1)
        self.assertEqual([p.signals for p in new], [["TERM"], ["TERM"]])
        self.assertEqual([p.signals for p in old], [[], []])
        for process in new:
            process.exit()
        self.reactor.advance(60)
        self.assertEqual(len(self.live()), 2)
        self.assertEqual(len(self.reactor.processes), 4)

    def test_failedReloadRestoresDeadWorkers(self) -> None:
        """
        A worker of the running generation that dies while a reload waits is
        not replaced by it; if the reload then fails, it is replaced, once.
        """
        supervisor = self.supervisor(self.config(8001, workers=1))
        [old] = self.reactor.processes
        old.ready()
        reloading = self.reload(supervisor, self.config(8001, workers=1))
        [new] = self.live(2)
        old.exit(1)
        self.reactor.advance(5)
        self.assertEqual(self.live(), [new])
        new.exit(1)
        self.assertFalse(self.successResultOf(reloading))
        self.reactor.advance(60)
        [replacement] = self.live()
        self.assertEqual(replacement.generation, 1)
        self.assertEqual(len(self.reactor.processes), 3)
        self.assertEqual([(w.generation, w.slot) for w in supervisor.workers], [(1, 0)])

    def test_pendingRespawnAfterFailedReload(self) -> None:
        """
        A replacement already scheduled when a reload fails does not start a
        second worker for a slot the failed reload filled again.
        """
        supervisor = self.supervisor(self.config(8001, workers=1))
        [old] = self.reactor.processes
        old.ready()
        old.exit(1)
        reloading = self.reload(supervisor, self.config(8001, workers=1))
        [new] = self.live(2)
        new.exit(1)
        self.assertFalse(self.successResultOf(reloading))
        self.reactor.advance(60)
        self.assertEqual(len(self.live()), 1)
        self.assertEqual([(w.generation, w.slot) for w in supervisor.workers], [(1, 0)])

    def test_instanceDirectoryMadeOnReload(self) -> None:
        """
        When the session state directory is first needed by a reloaded
        configuration (the first C{ssl} server), the new workers are told
        where it is.
        """
        self.sharing.directory = None
        supervisor = self.supervisor(self.config(8001, workers=1))
        self.assertEqual(self.reactor.processes[0].option("--instance-dir"), [])
        config = self.config(8001, workers=1)

        def load(path: str) -> Config:
            self.sharing.directory = "/run/tlsrelay-made"
            return config

        supervisor.load = load
        supervisor.reload()
        [new] = self.live(2)
        self.assertEqual(new.option("--instance-dir"), ["/run/tlsrelay-made"])

    def test_noReloadWhileStopping(self) -> None:
        """
        Once stopping, a reload does nothing.
        """
        supervisor = self.supervisor(self.config(8001))
        supervisor.stopService()
        self.next = self.config(8001)
        self.assertFalse(self.successResultOf(supervisor.reload()))
        self.assertEqual(self.loaded, [])


class StopTests(SupervisorTestCase):
    def test_termThenKill(self) -> None:
        """
        Stopping sends every worker SIGTERM and, to those still running
        C{worker_shutdown_timeout} plus five seconds later, SIGKILL; it is done
        when the last has exited, and then closes the sockets and stops the
        session sharing.
        """
        config = self.config(8001, workers=3, main="worker_shutdown_timeout 10s;")
        supervisor = self.supervisor(config)
        sockets = [v.socket for v in supervisor.listeners.values()]
        one, two, three = self.reactor.processes
        one.ready()
        stopping = supervisor.stopService()
        self.assertFalse(supervisor.running)
        self.assertEqual([p.signals for p in (one, two, three)], [["TERM"]] * 3)
        one.exit()
        self.reactor.advance(14.9)
        self.assertEqual(two.signals, ["TERM"])
        with capturedLogs() as events:
            self.reactor.advance(0.1)
        self.assertEqual(one.signals, ["TERM"])
        self.assertEqual([two.signals, three.signals], [["TERM", "KILL"]] * 2)
        self.assertEqual(
            [e["pid"] for e in events if e["log_level"] == LogLevel.warn],
            [1001, 1002],
        )
        self.assertNoResult(stopping)
        self.assertEqual(self.sharing.stopped, 0)
        two.exit(signal=9)
        three.exit(signal=9)
        self.successResultOf(stopping)
        self.assertEqual([s.fileno() for s in sockets], [-1])
        self.assertEqual(self.sharing.stopped, 1)
        self.assertEqual(len(self.reactor.processes), 3)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_prompt(self) -> None:
        """
        Workers that all exit in time are not killed, and no timer is left.
        """
        supervisor = self.supervisor(self.config(8001))
        stopping = supervisor.stopService()
        for process in self.reactor.processes:
            process.exit()
        self.successResultOf(stopping)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(
            [p.signals for p in self.reactor.processes], [["TERM"], ["TERM"]]
        )

    def test_noRespawnOnceStopping(self) -> None:
        """
        A replacement scheduled before the stop is not started.
        """
        supervisor = self.supervisor(self.config(8001))
        self.reactor.processes[0].exit(1)
        stopping = supervisor.stopService()
        self.reactor.processes[1].exit()
        self.successResultOf(stopping)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_stopWhileReloading(self) -> None:
        """
        Stopping during a reload stops both generations and fails the reload.
        """
        supervisor = self.supervisor(self.config(8001, workers=1))
        reloading = self.reload(supervisor, self.config(8001, 8002, workers=1))
        stopping = supervisor.stopService()
        self.assertEqual(
            [p.signals for p in self.reactor.processes], [["TERM"], ["TERM"]]
        )
        for process in self.reactor.processes:
            process.exit()
        self.assertFalse(self.successResultOf(reloading))
        self.successResultOf(stopping)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(
            [v.socket.fileno() for v in supervisor.listeners.values()], [-1]
        )


class SignalTests(SupervisorTestCase):
    def test_signalWorkers(self) -> None:
        """
        L{WorkerSupervisor.signalWorkers} passes a signal to every running
        worker; one that is already gone is skipped.
        """
        supervisor = self.supervisor(self.config(8001, workers=3))
        one, two, three = self.reactor.processes
        two.ended = True  # exited, its end not yet reported
        supervisor.signalWorkers("USR1")
        self.assertEqual(
            [one.signals, two.signals, three.signals], [["USR1"], [], ["USR1"]]
        )
