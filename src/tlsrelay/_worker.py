"""
A worker process (C{python -m tlsrelay._worker}): inherits the master's listening
sockets, loads the configuration and relays until told to drain (SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

from twisted.logger import globalLogBeginner, textFileLogObserver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tlsrelay-worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--listen-fd", action="append", default=[])
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    from tlsrelay._accesslog import AccessLogFiles
    from tlsrelay._config._errors import ConfigError
    from tlsrelay._config._load import loadConfig
    from tlsrelay._listen import BoundListener
    from tlsrelay._relay import WorkerConnections
    from tlsrelay._service import RelayService, build, listenKey
    from tlsrelay.tap import setLogLevel

    # A terminal hang-up reaches the whole process group: the master reloads,
    # workers carry on.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    inherited = {}
    for item in args.listen_fd:
        fd, _, key = item.partition("=")
        inherited[key] = socket.socket(fileno=int(fd))
    try:
        config = loadConfig(args.config)
        setLogLevel(config)
        accessLogs = AccessLogFiles()
        connections = WorkerConnections(config.workerConnections)
        generation = build(config, reactor, accessLogs, connections)
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

    service = RelayService(generation, listeners, reactor, accessLogs, connections)
    service.drainTimeout = config.shutdownTimeout
    reactor.callWhenRunning(service.startService)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", service.stopService
    )
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
