"""
C{worker_processes N}: a master process that binds every listening socket and
supervises N worker processes that share them.

Each worker is C{python -m tlsrelay._worker}: it inherits the bound sockets, loads
the configuration and runs the same L{RelayService} a single process runs.  The
master restarts a worker that dies; on SIGHUP it validates the new configuration,
binds any new address, starts a new generation of workers and tells the old one to
drain (SIGTERM: stop accepting, finish connections up to C{worker_shutdown_timeout})
— the nginx model, so no established connection is dropped.  A configuration that
fails to load is reported and the running workers stay.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    FirstError,
    succeed,
)
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import Config
from tlsrelay._listen import BoundListener
from tlsrelay._log import Logger

log = Logger()

RESPAWN_DELAY = 1.0
RESPAWN_DELAY_MAX = 30.0


class _WorkerProtocol(ProcessProtocol):
    def __init__(
        self, supervisor: WorkerSupervisor, worker: Worker, readyFD: int
    ) -> None:
        self.supervisor = supervisor
        self.worker = worker
        self.readyFD = readyFD

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if (
            childFD == self.readyFD
            and b"ready" in data
            and not self.worker.ready.called
        ):
            self.worker.ready.callback(None)

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.workerEnded(self.worker, reason)


@define(eq=False)
class Worker:
    """
    One worker process of one generation.
    """

    generation: int
    slot: int
    process: Any = None
    pid: int = 0
    ended: Deferred[None] = field(factory=Deferred)
    ready: Deferred[None] = field(factory=Deferred)
    stopping: bool = False


def workerCommand(
    config: Config, fds: dict[str, int], instanceDirectory: str | None, readyFD: int
) -> list[str]:
    """
    The command line of a worker: the configuration, which inherited descriptor
    is which C{listen} address, and where the master shares session state.
    """
    args = [sys.executable, "-m", "tlsrelay._worker", "--config", config.path]
    args += ["--ready-fd", str(readyFD)]
    if instanceDirectory is not None:
        args += ["--instance-dir", instanceDirectory]
    for key, fd in sorted(fds.items()):
        args += ["--listen-fd", f"{fd}={key}"]
    return args


class WorkerSupervisor(Service):
    """
    Starts, restarts, reloads and stops the workers.

    @ivar listeners: the bound sockets, by C{listen} address; kept open here so a
        restarted worker can inherit them.
    """

    def __init__(
        self,
        config: Config,
        listeners: dict[str, BoundListener],
        reactor: Any,
        load: Callable[[str], Config],
        bindNew: Callable[[Config, dict[str, BoundListener]], dict[str, BoundListener]],
        environ: dict[str, str] | None = None,
        sharing: Any = None,
        errorLogs: Any = None,
    ) -> None:
        """
        @param sharing: the master's L{SessionSharing}: started before the
            workers, stopped after the last one has drained.
        @param errorLogs: the generation whose C{error_log} observers record the
            master's own events (its relay factories are not used).
        """
        self.sharing = sharing
        self.errorLogs = errorLogs
        self.config = config
        self.listeners = listeners
        self.reactor = reactor
        self.load = load
        self.bindNew = bindNew
        self.environ = dict(os.environ if environ is None else environ)
        self.generation = 0
        self.workers: list[Worker] = []
        self.stopping = False
        self.reloading: Deferred[bool] | None = None
        self.readyTimeout = 60.0
        # Consecutive deaths before readiness, per slot: the respawn delay
        # doubles with each, so a worker that cannot start does not spin.
        self.failures: dict[int, int] = {}

    @property
    def instanceDirectory(self) -> str | None:
        """
        Where the master shares session state; read at each spawn, since the
        sharing makes it only when a configuration first needs it.
        """
        if self.sharing is None:
            return None
        directory: str | None = self.sharing.directory
        return directory

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.errorLogs is not None:
            for _, observer in self.errorLogs.errorLogs:
                globalLogPublisher.addObserver(observer)
        if self.sharing is not None and not self.sharing.running:
            self.sharing.startService()
        log.info("starting {count} worker processes", count=self.config.workerProcesses)
        self._startGeneration()

    def _startGeneration(self) -> None:
        self.generation += 1
        for slot in range(self.config.workerProcesses):
            self._spawn(Worker(self.generation, slot))

    def _spawn(self, worker: Worker) -> None:
        childFDs: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        fds: dict[str, int] = {}
        # Only the sockets this configuration listens on: a worker that inherited
        # a removed address would keep it open with nobody accepting.
        wanted = sorted(
            {
                str(listen.address)
                for server in self.config.servers
                for listen in server.listens
            }
        )
        for number, key in enumerate(wanted, 3):
            childFDs[number] = self.listeners[key].socket.fileno()
            fds[key] = number
        readyFD = 3 + len(fds)
        childFDs[readyFD] = "r"
        worker.process = self.reactor.spawnProcess(
            _WorkerProtocol(self, worker, readyFD),
            sys.executable,
            workerCommand(self.config, fds, self.instanceDirectory, readyFD),
            env=self.environ,
            childFDs=childFDs,
        )
        worker.pid = worker.process.pid
        self.workers.append(worker)
        log.info(
            "worker {pid} started (generation {generation}, slot {slot})",
            pid=worker.pid,
            generation=worker.generation,
            slot=worker.slot,
        )

    def workerEnded(self, worker: Worker, reason: Failure) -> None:
        """
        A worker exited: restart it unless it was told to stop.
        """
        self.workers.remove(worker)
        clean = isinstance(reason.value, ProcessDone)
        code = (
            reason.value.exitCode if isinstance(reason.value, ProcessTerminated) else 0
        )
        worker.ended.callback(None)
        wasReady = worker.ready.called
        if not wasReady:
            worker.ready.errback(
                RuntimeError(f"worker {worker.pid} exited before it was ready")
            )
            worker.ready.addErrback(lambda _: None)  # reported by whoever waited
        if worker.stopping or self.stopping:
            log.info("worker {pid} exited", pid=worker.pid)
            return
        log.warn(
            "worker {pid} died ({reason}); restarting it",
            pid=worker.pid,
            reason="exit 0" if clean else f"exit {code}" if code else str(reason.value),
        )
        if worker.generation == self.generation:
            failures = self.failures.get(worker.slot, 0)
            failures = 0 if wasReady else failures + 1
            self.failures[worker.slot] = failures
            delay = min(RESPAWN_DELAY * 2 ** max(failures - 1, 0), RESPAWN_DELAY_MAX)
            self.reactor.callLater(
                delay, self._respawn, Worker(worker.generation, worker.slot)
            )

    def _respawn(self, worker: Worker) -> None:
        if not self.stopping and worker.generation == self.generation:
            if not self._running(worker.generation, worker.slot):
                self._spawn(worker)

    def _running(self, generation: int, slot: int) -> bool:
        """
        Whether a worker of C{generation} runs in C{slot}, not told to stop.
        """
        return any(
            w.generation == generation and w.slot == slot and not w.stopping
            for w in self.workers
        )

    def reload(self) -> Deferred[bool]:
        """
        Validate the configuration file; when it loads, start a new generation of
        workers and drain the old one.
        """
        if self.stopping:
            return succeed(False)
        if self.reloading is not None:
            return self.reloading
        path = self.config.path
        log.info("reloading {path}", path=path)
        try:
            config = self.load(path)
            new = self.bindNew(config, self.listeners)
        except ConfigError as e:
            log.error(
                "reload failed, keeping the running configuration: {error}",
                error=str(e),
            )
            return succeed(False)
        wanted = {
            str(listen.address)
            for server in config.servers
            for listen in server.listens
        }
        removed = [key for key in self.listeners if key not in wanted]
        self.listeners.update(new)
        old = list(self.workers)
        previous, self.config = self.config, config
        previousGeneration = self.generation
        self._startGeneration()
        fresh = [w for w in self.workers if w.generation == self.generation]

        def ready(_: object) -> bool:
            # Only now do the old workers stop accepting: there is never a moment
            # without a worker accepting.
            for key in removed:
                self.listeners.pop(key).socket.close()
            self._stopWorkers(old)
            log.info("reloaded {path}", path=path)
            return True

        def failed(failure: Failure) -> bool:
            error = failure.value
            if isinstance(error, FirstError):
                error = error.subFailure.value
            message = str(error)
            if isinstance(error, CancelledError):
                # The timeout cancelled the wait, and with it each readiness.
                message = f"new workers not ready in {self.readyTimeout:g} seconds"
            log.error(
                "reload failed, keeping the running workers: {error}",
                error=message,
            )
            self.config = previous
            self.generation = previousGeneration
            self._stopWorkers(fresh)
            for key in new:
                self.listeners.pop(key).socket.close()
            # A worker of this generation that died meanwhile was not restarted
            # (its generation was not the current one then): restart it now.
            for slot in range(previous.workerProcesses):
                if not self.stopping and not self._running(previousGeneration, slot):
                    self._spawn(Worker(previousGeneration, slot))
            return False

        waiting: Deferred[Any] = DeferredList(
            [w.ready for w in fresh], fireOnOneErrback=True, consumeErrors=True
        )
        waiting.addTimeout(self.readyTimeout, self.reactor)

        def done(result: bool) -> bool:
            self.reloading = None
            return result

        self.reloading = waiting.addCallbacks(ready, failed).addBoth(done)
        return self.reloading

    def signalWorkers(self, name: str) -> None:
        """
        Pass a signal (e.g. C{"USR1"}: reopen logs) on to every worker.
        """
        for worker in self.workers:
            try:
                worker.process.signalProcess(name)
            except Exception:
                pass  # already gone

    def _stopWorkers(self, workers: list[Worker]) -> Deferred[Any]:
        for worker in workers:
            worker.stopping = True
            try:
                worker.process.signalProcess("TERM")
            except Exception:
                pass  # already gone
        return DeferredList([w.ended for w in workers])

    def stopService(self) -> Deferred[Any]:
        """
        Tell every worker to drain; kill those still running after the drain
        timeout and a grace period.
        """
        self.stopping = True
        super().stopService()  # type: ignore[no-untyped-call]
        workers = list(self.workers)
        stopped = self._stopWorkers(workers)
        killer = self.reactor.callLater(
            self.config.shutdownTimeout + 5, self._kill, workers
        )

        def done(result: object) -> object:
            if killer.active():
                killer.cancel()
            for listener in self.listeners.values():
                listener.socket.close()
            if self.sharing is not None:
                self.sharing.stopService()
            if self.errorLogs is not None:
                for _, observer in self.errorLogs.errorLogs:
                    globalLogPublisher.removeObserver(observer)
                self.errorLogs.closeErrorLogs()
            return result

        return stopped.addBoth(done)

    def _kill(self, workers: list[Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn(
                    "worker {pid} did not drain in time: killing it",
                    pid=worker.pid,
                )
                try:
                    worker.process.signalProcess("KILL")
                except Exception:
                    pass
