"""
The twistd plugin: C{twistd -n tlsrelay --config relay.conf [--check]}.
"""

from __future__ import annotations

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

    from tlsrelay._config._errors import ConfigError
    from tlsrelay._config._load import loadConfig
    from tlsrelay._describe import describe
    from tlsrelay._service import RelayService, buildContexts, prepare

    top = MultiService()
    path = options["config"]
    if path is None:
        from tlsrelay._demo import makeDemo

        path, echo, banner = makeDemo(reactor)
        echo.setServiceParent(top)  # type: ignore[no-untyped-call]
        sys.stdout.write(banner)
        sys.stdout.flush()

    if options["check"]:
        globalLogPublisher.addObserver(cast(ILogObserver, _printWarnings))
        try:
            config = loadConfig(path)
            buildContexts(config)
        except ConfigError as e:
            raise _fail(str(e)) from None
        sys.stdout.write(describe(config))
        sys.stdout.write(
            f"tlsrelay: the configuration file {config.path} syntax is ok\n"
            f"tlsrelay: configuration file {config.path} test is successful\n"
        )
        raise SystemExit(0)

    try:
        config = loadConfig(path)
        prepared = prepare(config, reactor)
    except ConfigError as e:
        raise _fail(str(e)) from None

    parent = getattr(options, "parent", None)
    if parent is not None:
        if not config.daemon:
            parent["nodaemon"] = True
        if config.pidFile is not None:
            parent["pidfile"] = config.pidFile
    RelayService(prepared, reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
