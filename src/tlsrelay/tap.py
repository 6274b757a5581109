"""
The twistd plugin: C{twistd -n tlsrelay --config relay.conf [--check]}.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, cast

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python import usage

from tlsrelay._version import __version__


class Options(usage.Options):
    synopsis = "[--config relay.conf] [--check]"
    longdesc = (
        "Run tlsrelay with an nginx-syntax configuration file. Without --config, "
        "run the built-in demo (throwaway certificates and a local echo upstream)."
    )
    optParameters = [
        ["config", "c", None, "The configuration file (nginx syntax)."],
        [
            "signal",
            "s",
            None,
            "Send a signal to the running tlsrelay named by the config's pid file "
            "(or --pidfile) and exit: reload (SIGHUP), stop (SIGTERM), reopen "
            "(SIGUSR1).",
        ],
    ]
    optFlags = [
        [
            "check",
            "t",
            "Validate the configuration (load every certificate and key, "
            "build every TLS context), print the effective settings and exit.",
        ],
        ["version", "v", "Print the version and exit."],
    ]

    def postOptions(self) -> None:
        if self["version"]:
            sys.stdout.write(f"tlsrelay {__version__.public()}\n")
            raise SystemExit(0)
        if self["signal"] is not None and self["signal"] not in SIGNALS:
            raise usage.UsageError(
                f"--signal must be one of {', '.join(SIGNALS)}, not {self['signal']!r}"
            )
        # Both finish here, before twistd looks at (or refuses to run because of)
        # a pid file of a running relay.
        if self["check"]:
            check(self["config"])
        if self["signal"] is not None:
            signalRunning(self)


SIGNALS = {"reload": signal.SIGHUP, "stop": signal.SIGTERM, "reopen": signal.SIGUSR1}


def sendSignal(options: Options, pidFile: str | None) -> None:
    """
    C{--signal}: signal the process in the pid file, like C{nginx -s reload}.
    """
    if not pidFile:
        raise _fail('no pid file: set "pid" in the configuration or --pidfile')
    try:
        with open(pidFile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as e:
        raise _fail(f'cannot read pid file "{pidFile}": {e}') from None
    try:
        os.kill(pid, SIGNALS[options["signal"]])
    except OSError as e:
        raise _fail(f"cannot signal process {pid}: {e.strerror}") from None
    raise SystemExit(0)


def check(path: str | None) -> None:
    """
    C{--check}: load the configuration, resolve upstream names, build every TLS
    context, print the effective settings, and exit 0 (or 1 with the error).
    """
    from twisted.internet import reactor

    from tlsrelay._accesslog import AccessLogFiles
    from tlsrelay._config._errors import ConfigError
    from tlsrelay._config._load import loadConfig
    from tlsrelay._describe import describe
    from tlsrelay._relay import WorkerConnections
    from tlsrelay._service import build, checkHosts
    from tlsrelay._sessions import SessionSharing

    if path is None:
        raise _fail("--check needs --config")
    globalLogPublisher.addObserver(cast(ILogObserver, _printWarnings))
    files = AccessLogFiles()
    try:
        config = loadConfig(path)
        checkHosts(config)
        checked = build(
            config,
            reactor,
            files,
            WorkerConnections(1),
            SessionSharing(reactor, "check"),
        )
    except ConfigError as e:
        raise _fail(str(e)) from None
    finally:
        files.close()
    checked.closeErrorLogs()
    sys.stdout.write(describe(config))
    sys.stdout.write(
        f"tlsrelay: the configuration file {config.path} syntax is ok\n"
        f"tlsrelay: configuration file {config.path} test is successful\n"
    )
    raise SystemExit(0)


def signalRunning(options: Options) -> None:
    """
    C{--signal}: find the pid file (the config's C{pid}, else C{--pidfile}) and
    signal that process.
    """
    from tlsrelay._config._errors import ConfigError
    from tlsrelay._config._load import loadConfig

    pidFile: str | None = None
    if options["config"] is not None:
        try:
            pidFile = loadConfig(options["config"]).pidFile
        except ConfigError as e:
            raise _fail(str(e)) from None
    parent = getattr(options, "parent", None)
    if not pidFile and parent is not None:
        pidFile = parent["pidfile"]
    sendSignal(options, pidFile)


def _fail(message: str) -> SystemExit:
    sys.stderr.write(f"tlsrelay: [emerg] {message}\n")
    return SystemExit(1)


def _printWarnings(event: dict[str, Any]) -> None:
    from twisted.logger import LogLevel, formatEvent

    if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
        sys.stderr.write(f"tlsrelay: [warn] {formatEvent(event)}\n")


def makeService(options: Options) -> IService:
    """
    Load the configuration and prepare everything that can fail, before twistd runs
    the reactor; a configuration error exits with status 1 and one line.
    """
    from twisted.internet import reactor

    from tlsrelay._accesslog import AccessLogFiles
    from tlsrelay._config._errors import ConfigError
    from tlsrelay._config._load import loadConfig
    from tlsrelay._reactor import tuneReactor
    from tlsrelay._relay import WorkerConnections
    from tlsrelay._service import (
        RelayService,
        bindAll,
        build,
        checkHosts,
        configListens,
    )
    from tlsrelay._sessions import SessionSharing
    from tlsrelay._workers import WorkerSupervisor

    # Twisted's epoll reactor, with fewer Python calls per event
    # (tlsrelay._reactor).
    tuneReactor(reactor)
    top = MultiService()
    path = options["config"]
    if path is None:
        from tlsrelay._demo import makeDemo

        path, echo, banner = makeDemo(reactor)
        echo.setServiceParent(top)  # type: ignore[no-untyped-call]
        sys.stdout.write(banner)
        sys.stdout.flush()

    try:
        config = loadConfig(path)
    except ConfigError as e:
        raise _fail(str(e)) from None
    parent = getattr(options, "parent", None)
    try:
        checkHosts(config)
    except ConfigError as e:
        raise _fail(str(e)) from None

    setLogLevel(config)
    accessLogs = AccessLogFiles()
    connections = WorkerConnections(config.workerConnections)
    master = config.workerProcesses > 1
    sharing = SessionSharing(reactor, "master" if master else "single")
    try:
        generation = build(config, reactor, accessLogs, connections, sharing)
        listeners = bindAll(configListens(config), {})
    except ConfigError as e:
        accessLogs.close()
        sharing.stopService()
        raise _fail(str(e)) from None

    if parent is not None:
        if not config.daemon:
            parent["nodaemon"] = True
        if config.pidFile is not None:
            parent["pidfile"] = config.pidFile
    relay: Any
    if master:
        # The master validates, binds, owns shared session state and supervises;
        # workers relay.
        accessLogs.close()

        def validate(path: str) -> Any:
            sharing.reload()
            config = loadConfig(path)
            checkHosts(config)
            files = AccessLogFiles()
            try:
                build(
                    config, reactor, files, WorkerConnections(1), sharing
                ).closeErrorLogs()
            finally:
                files.close()
            return config

        relay = WorkerSupervisor(
            config,
            listeners,
            reactor,
            validate,
            _bindNew,
            sharing=sharing,
            errorLogs=generation,
        )
    else:
        relay = RelayService(
            generation, listeners, reactor, accessLogs, connections, sharing
        )
        relay.drainTimeout = config.shutdownTimeout
    relay.setServiceParent(top)  # type: ignore[no-untyped-call]
    installSignals(reactor, relay, accessLogs)
    return top


def _bindNew(config: Any, bound: Any) -> Any:
    from tlsrelay._service import bindAll, configListens

    return bindAll(configListens(config), bound)


def setLogLevel(config: Any) -> None:
    """
    Emit tlsrelay's events down to the most verbose C{error_log} level (C{info}
    when none is configured; per-connection events are C{debug}).
    """
    from tlsrelay._log import setLevel
    from tlsrelay._service import LEVELS

    levels = [LEVELS[e.level] for e in config.errorLogs] or [LEVELS["info"]]
    setLevel(min(levels, key=lambda level: LEVEL_ORDER.index(level.name)))


LEVEL_ORDER = ["debug", "info", "warn", "error", "critical"]


def installSignals(reactor: Any, relay: Any, accessLogs: Any) -> None:
    """
    SIGHUP reloads the configuration; SIGUSR1 reopens the log files (as nginx).
    The handlers only schedule work on the reactor.
    """

    def onHangup(signum: int, frame: object) -> None:
        reactor.callFromThread(relay.reload)

    def onUser1(signum: int, frame: object) -> None:
        reactor.callFromThread(accessLogs.reopen)
        signalWorkers = getattr(relay, "signalWorkers", None)
        if signalWorkers is not None:
            reactor.callFromThread(signalWorkers, "USR1")

    signal.signal(signal.SIGHUP, onHangup)
    signal.signal(signal.SIGUSR1, onUser1)
