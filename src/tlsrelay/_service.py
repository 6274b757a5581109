"""
Services built from the configuration model, with an injected reactor.

L{prepare} does everything that can fail before the reactor runs — load certificates,
build every TLS context, compile every template, open access logs, bind every
socket — so that a bad configuration stops start-up with one line naming the file and
line.  L{RelayService} then adopts the bound sockets when it starts.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import IO, Any

from attrs import define, field
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.protocols.tls import TLSMemoryBIOFactory

from tlsrelay._accesslog import AccessLogFiles
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import (
    Config,
    StreamServer,
    UpstreamGroup,
    UpstreamServer,
)
from tlsrelay._listen import BoundListener, bindSocket
from tlsrelay._pool import UpstreamPool
from tlsrelay._relay import RelayFactory, WorkerConnections
from tlsrelay._tls import ServerContextFactory, buildServerContext
from tlsrelay._variables import compileTemplate

log = Logger()

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "notice": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "crit": LogLevel.critical,
    "alert": LogLevel.critical,
    "emerg": LogLevel.critical,
}


def groupFor(server: StreamServer, config: Config) -> UpstreamGroup:
    """
    The upstream group C{proxy_pass} names; a single address is a group of one,
    named by the address as nginx names it.
    """
    target = server.proxyPass
    assert target is not None
    if target.group is not None:
        group = config.upstream(target.group)
        assert group is not None
        return group
    assert target.address is not None
    return UpstreamGroup(
        str(target.address), (UpstreamServer(target.address),), where=target.where
    )


def buildContexts(config: Config) -> dict[int, ServerContextFactory]:
    """
    A TLS server context for every C{server} with an C{ssl} listener, keyed by the
    server's index; raises L{ConfigError} for the first bad certificate, key or
    setting.
    """
    contexts: dict[int, ServerContextFactory] = {}
    for index, server in enumerate(config.servers):
        if any(listen.ssl for listen in server.listens):
            contexts[index] = ServerContextFactory(
                buildServerContext(server.tls, server.where)
            )
    return contexts


@define
class Prepared:
    """
    Everything start-up made from a configuration, before the reactor runs.
    """

    config: Config
    listeners: list[tuple[BoundListener, IProtocolFactory]]
    pools: list[UpstreamPool]
    accessLogs: AccessLogFiles
    errorLogs: list[tuple[IO[str], ILogObserver]] = field(factory=list)

    def close(self) -> None:
        """
        Release what was opened when start-up stops before the service runs.
        """
        for listener, _ in self.listeners:
            listener.close()
        self.accessLogs.close()


def openErrorLogs(config: Config) -> list[tuple[IO[str], ILogObserver]]:
    """
    An observer per C{error_log}, filtered to its level (stderr is left to twistd).
    """
    observers: list[tuple[IO[str], ILogObserver]] = []
    for errorLog in config.errorLogs:
        if errorLog.path == "stderr":
            stream: IO[str] = sys.stderr
        else:
            try:
                stream = open(errorLog.path, "a", buffering=1, encoding="utf-8")
            except OSError as e:
                raise ConfigError(
                    f'could not open error log file: open() "{errorLog.path}" '
                    f"failed ({e.errno}: {e.strerror})",
                    config.path,
                ) from None
        predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[errorLog.level])
        observers.append(
            (stream, FilteringLogObserver(textFileLogObserver(stream), [predicate]))
        )
    return observers


def prepare(
    config: Config,
    reactor: Any,
    randomSource: random.Random | None = None,
    bind: Callable[..., Any] = bindSocket,
) -> Prepared:
    """
    Build contexts, pools, relay factories and access logs, and bind every listener.
    """
    contexts = buildContexts(config)
    rng = randomSource if randomSource is not None else random.SystemRandom()
    prepared = Prepared(config, [], [], AccessLogFiles())
    connections = WorkerConnections(config.workerConnections)
    try:
        for index, server in enumerate(config.servers):
            accessLogs = []
            for accessLog in server.accessLogs:
                assert accessLog.path is not None
                writer = prepared.accessLogs.writerFor(accessLog.path)
                accessLogs.append((writer, compileTemplate(accessLog.format)))
            connect = None
            hashKey = None
            if server.proxyPass is not None:
                group = groupFor(server, config)
                pool = UpstreamPool(group, reactor, rng)
                prepared.pools.append(pool)
                connect = _connector(pool, server)
                if group.balancer.method == "hash":
                    hashKey = compileTemplate(group.balancer.key)
            returnTemplate = (
                compileTemplate(server.returnValue)
                if server.returnValue is not None
                else None
            )
            for listen in server.listens:
                factory: IProtocolFactory = RelayFactory(
                    connectUpstream=connect,
                    proxy=server.proxy,
                    tls=listen.ssl,
                    handshakeTimeout=server.tls.handshakeTimeout,
                    clock=reactor,
                    now=reactor.seconds,
                    accessLogs=accessLogs,
                    returnTemplate=returnTemplate,
                    connections=connections,
                    hashKey=hashKey,
                )
                if listen.ssl:
                    factory = TLSMemoryBIOFactory(contexts[index], False, factory)
                prepared.listeners.append(
                    (BoundListener(listen, bind(listen)), factory)
                )
        _openAccessLogs(prepared.accessLogs, config)
        prepared.errorLogs = openErrorLogs(config)
    except BaseException:
        prepared.close()
        raise
    return prepared


def _openAccessLogs(files: AccessLogFiles, config: Config) -> None:
    try:
        files.open()
    except OSError as e:
        raise ConfigError(
            f'could not open access log: open() "{e.filename}" failed '
            f"({e.errno}: {e.strerror})",
            config.path,
        ) from None


def _connector(pool: UpstreamPool, server: StreamServer) -> Any:
    proxy = server.proxy

    def connect(factory: IProtocolFactory, hashKey: bytes) -> Deferred[Any]:
        return pool.connect(factory, hashKey, proxy)

    return connect


class RelayService(MultiService):
    """
    Runs a prepared configuration: error logs, upstream name resolution, listeners.
    """

    def __init__(self, prepared: Prepared, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.prepared = prepared
        self.reactor = reactor
        self.ports: list[IListeningPort] = []

    def startService(self) -> None:
        for _, observer in self.prepared.errorLogs:
            globalLogPublisher.addObserver(observer)
        super().startService()  # type: ignore[no-untyped-call]
        resolving = [pool.resolveAll() for pool in self.prepared.pools]

        def listen(_: object) -> None:
            for listener, factory in self.prepared.listeners:
                self.ports.append(listener.startListening(self.reactor, factory))

        DeferredList(resolving, fireOnOneErrback=True, consumeErrors=True).addCallback(
            listen
        ).addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        log.critical("start-up failed: {error}", error=failure.getErrorMessage())
        self.reactor.stop()

    def stopService(self) -> Deferred[None] | None:
        waiting = [port.stopListening() for port in self.ports]
        self.ports = []
        super().stopService()  # type: ignore[no-untyped-call]
        self.prepared.accessLogs.close()
        for stream, observer in self.prepared.errorLogs:
            globalLogPublisher.removeObserver(observer)
            if stream is not sys.stderr:
                stream.close()
        d: Deferred[Any] = DeferredList([w for w in waiting if w is not None])
        return d.addCallback(lambda _: None)
