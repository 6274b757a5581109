"""
A worker process (C{python -m tlsrelay._worker}): inherits the master's listening
sockets, loads the configuration and relays until told to drain (SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from twisted.logger import globalLogBeginner, textFileLogObserver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tlsrelay-worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--listen-fd", action="append", default=[])
    parser.add_argument("--instance-dir", default=None)
    parser.add_argument("--ready-fd", type=int, default=None)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    from tlsrelay._accesslog import AccessLogFiles
    from tlsrelay._config._errors import ConfigError
    from tlsrelay._config._load import loadConfig
    from tlsrelay._listen import BoundListener
    from tlsrelay._reactor import tuneReactor
    from tlsrelay._relay import WorkerConnections
    from tlsrelay._service import RelayService, build, listenKey
    from tlsrelay._sessions import SessionSharing
    from tlsrelay.tap import setLogLevel

    tuneReactor(reactor)
    # A terminal hang-up reaches the whole process group: the master reloads,
    # workers carry on.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    accessLogs = AccessLogFiles()
    signal.signal(
        signal.SIGUSR1,
        lambda signum, frame: reactor.callFromThread(  # type: ignore[attr-defined]
            accessLogs.reopen
        ),
    )
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    inherited = {}
    for item in args.listen_fd:
        fd, _, key = item.partition("=")
        inherited[key] = socket.socket(fileno=int(fd))
    try:
        config = loadConfig(args.config)
        setLogLevel(config)
        connections = WorkerConnections(config.workerConnections)
        sharing = SessionSharing(reactor, "worker", args.instance_dir)
        generation = build(config, reactor, accessLogs, connections, sharing)
    except ConfigError as e:
        sys.stderr.write(f"tlsrelay worker: [emerg] {e}\n")
        return 1
    listeners = {}
    for listen, _ in generation.factories:
        key = listenKey(listen)
        if key not in inherited:
            sys.stderr.write(f"tlsrelay worker: [emerg] no socket for {key}\n")
            return 1
        listeners[key] = BoundListener(listen, inherited[key])
    for key, sock in inherited.items():
        if key not in listeners:
            sock.close()

    service = RelayService(
        generation, listeners, reactor, accessLogs, connections, sharing
    )
    service.drainTimeout = config.shutdownTimeout

    def start() -> None:
        service.startService()
        if args.ready_fd is not None:
            # Tell the master this worker accepts connections now.
            service.listening.addCallback(lambda _: _tellReady(args.ready_fd))

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", service.stopService
    )
    reactor.run()  # type: ignore[attr-defined]
    return 0


def _tellReady(fd: int) -> None:
    try:
        os.write(fd, b"ready\n")
        os.close(fd)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
