"""
Services built from the configuration model, with an injected reactor.

L{build} makes a L{Generation} from a configuration — every TLS context, pool,
template, relay factory and log — and L{bindAll} binds its listeners: everything
that can fail happens before the reactor runs, so a bad configuration stops
start-up with one line naming the file and line.  L{RelayService} adopts the sockets
when it starts, reloads on SIGHUP by building a new generation and swapping the
factories of its listening ports (established connections keep the old one, so
nothing is dropped), and drains on shutdown.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import sys
from collections.abc import Callable, Iterable
from functools import partial
from typing import IO, Any

from attrs import define, field
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, FirstError, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from tlsrelay._accesslog import AccessLogFiles
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import (
    Config,
    Listen,
    StreamServer,
    UpstreamGroup,
    UpstreamServer,
)
from tlsrelay._health import HealthChecker
from tlsrelay._listen import BoundListener, bindSocket
from tlsrelay._log import Logger
from tlsrelay._openssl import OpenSSLUnavailable
from tlsrelay._pool import UpstreamPool
from tlsrelay._relay import RelayFactory, WorkerConnections
from tlsrelay._sessions import SessionSharing
from tlsrelay._tls import ServerContextFactory, buildServerContext, sessionIdContext
from tlsrelay._tlsfactory import RelayPort, TLSServerFactory
from tlsrelay._upstreamtls import tlsForServer
from tlsrelay._variables import compileTemplate

log = Logger()

LEVELS = {
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


def buildContexts(
    config: Config, sharing: SessionSharing
) -> dict[int, ServerContextFactory]:
    """
    A TLS server context for every C{server} with an C{ssl} listener, keyed by the
    server's index, with its ticket keys and shared cache from C{sharing}; raises
    L{ConfigError} for the first bad certificate, key or setting.
    """
    contexts: dict[int, ServerContextFactory] = {}
    for index, server in enumerate(config.servers):
        if any(listen.ssl for listen in server.listens):
            try:
                context = buildServerContext(server.tls, server.where)
                sharing.install(
                    context, server.tls, sessionIdContext(server.tls), server.where
                )
            except OpenSSLUnavailable as e:
                raise ConfigError.at(
                    f"this TLS library cannot do what the server needs: {e}",
                    server.where,
                ) from None
            contexts[index] = ServerContextFactory(context)
    return contexts


def checkHosts(config: Config) -> None:
    """
    Resolve every host name the upstream servers use, as nginx does at load, so
    that a name that does not resolve stops start-up (and C{--check}) with
    C{host not found in upstream "x:80"}.  The pools resolve again when they
    start, through the reactor.
    """
    groups = list(config.upstreams)
    for server in config.servers:
        if server.proxyPass is not None and server.proxyPass.address is not None:
            groups.append(groupFor(server, config))
    for group in groups:
        for upstream in group.servers:
            address = upstream.address
            if address.kind != "tcp" or _isLiteral(address.host):
                continue
            try:
                socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                raise ConfigError.at(
                    f'host not found in upstream "{address}"',
                    upstream.where or group.where,
                ) from None


def _isLiteral(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@define
class Generation:
    """
    What one configuration makes: a relay factory per C{listen}, the pools, the
    error-log observers.  Sockets are not part of it, so a reload can keep them.
    """

    config: Config
    factories: list[tuple[Listen, IProtocolFactory]]
    pools: list[UpstreamPool]
    errorLogs: list[tuple[IO[str], ILogObserver]] = field(factory=list)
    checkers: list[HealthChecker] = field(factory=list)

    def startChecks(self) -> None:
        for checker in self.checkers:
            checker.startService()

    def stopChecks(self) -> None:
        for checker in self.checkers:
            if checker.running:
                checker.stopService()

    def closeErrorLogs(self) -> None:
        for stream, _ in self.errorLogs:
            if stream is not sys.stderr:
                stream.close()


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
                for opened, _ in observers:
                    if opened is not sys.stderr:
                        opened.close()
                raise ConfigError(
                    f'could not open error log file: open() "{errorLog.path}" '
                    f"failed ({e.errno}: {e.strerror})",
                    config.path,
                ) from None
        predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[errorLog.level])
        observers.append(
            (stream, FilteringLogObserver(textFileLogObserver(stream), [predicate]))
        )
    return observers


def build(
    config: Config,
    reactor: Any,
    accessLogs: AccessLogFiles,
    connections: WorkerConnections,
    sharing: SessionSharing,
    randomSource: random.Random | None = None,
) -> Generation:
    """
    Build contexts, pools, relay factories and logs for C{config}; open the access
    logs it names (in C{accessLogs}, shared across reloads).
    """
    contexts = buildContexts(config, sharing)
    rng = randomSource if randomSource is not None else random.SystemRandom()
    generation = Generation(config, [], [])
    for index, server in enumerate(config.servers):
        templates = []
        for accessLog in server.accessLogs:
            assert accessLog.path is not None
            writer = accessLogs.writerFor(accessLog.path)
            templates.append((writer, compileTemplate(accessLog.format)))
        connect = None
        hashKey = None
        if server.proxyPass is not None:
            group = groupFor(server, config)
            tlsFor = (
                tlsForServer(server.proxy.tls, group.name, server.where)
                if server.proxy.tls.enabled
                else None
            )
            pool = UpstreamPool(group, reactor, rng, tlsFor=tlsFor)
            generation.pools.append(pool)
            if server.healthCheck is not None:
                generation.checkers.append(
                    HealthChecker(pool, server.healthCheck, reactor, rng)
                )
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
                clock=reactor,
                now=reactor.seconds,
                connections=connections,
                accessLogs=templates,
                returnTemplate=returnTemplate,
                hashKey=hashKey,
            )
            if listen.ssl:
                factory = TLSServerFactory(
                    contexts[index], factory, server.tls.handshakeTimeout, reactor
                )
            generation.factories.append((listen, factory))
    _openAccessLogs(accessLogs, config)
    generation.errorLogs = openErrorLogs(config)
    return generation


def listenKey(listen: Listen) -> str:
    """
    What identifies a listening socket across reloads.
    """
    return str(listen.address)


def configListens(config: Config) -> list[Listen]:
    """
    Every C{listen} of the configuration.
    """
    return [listen for server in config.servers for listen in server.listens]


def bindAll(
    listens: Iterable[Listen],
    bound: dict[str, BoundListener],
    bind: Callable[[Listen], Any] = bindSocket,
) -> dict[str, BoundListener]:
    """
    Bind every listener not already in C{bound}; on failure close what this call
    bound and raise the L{ConfigError}.
    """
    new: dict[str, BoundListener] = {}
    try:
        for listen in listens:
            key = listenKey(listen)
            if key not in bound and key not in new:
                new[key] = BoundListener(listen, bind(listen))
    except BaseException:
        for listener in new.values():
            listener.close()
        raise
    return new


def _openAccessLogs(files: AccessLogFiles, config: Config) -> None:
    try:
        files.open()
    except OSError as e:
        raise ConfigError(
            f'could not open access log: open() "{e.filename}" failed '
            f"({e.errno}: {e.strerror})",
            config.path,
        ) from None


def _firstError(failure: Failure) -> Failure:
    """
    The failure a L{FirstError} wraps, so that its message is the one logged.
    """
    if isinstance(failure.value, FirstError):
        subFailure: Failure = failure.value.subFailure
        return subFailure
    return failure


def _connector(pool: UpstreamPool, server: StreamServer) -> Any:
    return partial(pool.connectFor, proxy=server.proxy)


class RelayService(MultiService):
    """
    Runs one generation at a time: error logs, upstream name resolution,
    listeners; reload and drain.

    @ivar drainTimeout: how long shutdown waits for open connections
        (C{worker_shutdown_timeout}).
    """

    drainTimeout = 30.0

    def __init__(
        self,
        generation: Generation,
        listeners: dict[str, BoundListener],
        reactor: Any,
        accessLogs: AccessLogFiles,
        connections: WorkerConnections,
        sharing: SessionSharing,
        bind: Callable[[Listen], Any] = bindSocket,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.sharing = sharing
        self.generation = generation
        self.listeners = listeners
        self.reactor = reactor
        self.accessLogs = accessLogs
        self.connections = connections
        self.bind = bind
        self.ports: dict[str, IListeningPort] = {}
        self.reloading: Deferred[bool] | None = None
        self.listening: Deferred[Any] = Deferred()

    def startService(self) -> None:
        if not self.sharing.running:
            self.sharing.startService()  # type: ignore[no-untyped-call]
        self._observe(self.generation)
        super().startService()  # type: ignore[no-untyped-call]
        generation = self.generation

        def listen(_: object) -> None:
            if not self.running:
                return  # stopped while the upstream names resolved
            generation.startChecks()
            self._listen(generation)

        self.listening = self._resolve(generation).addCallback(listen)
        self.listening.addErrback(self._failed)

    def _observe(self, generation: Generation) -> None:
        for _, observer in generation.errorLogs:
            globalLogPublisher.addObserver(observer)

    def _unobserve(self, generation: Generation) -> None:
        for _, observer in generation.errorLogs:
            globalLogPublisher.removeObserver(observer)
        generation.closeErrorLogs()

    def _resolve(self, generation: Generation) -> Deferred[Any]:
        resolving = [pool.resolveAll() for pool in generation.pools]
        waiting = DeferredList(resolving, fireOnOneErrback=True, consumeErrors=True)
        return waiting.addErrback(_firstError)

    def _listen(self, generation: Generation) -> None:
        """
        Adopt new sockets, swap factories on kept ones, stop listening on removed
        ones.
        """
        wanted = {
            listenKey(listen): factory for listen, factory in generation.factories
        }
        multiAccept = generation.config.multiAccept
        for key, factory in wanted.items():
            port = self.ports.get(key)
            if port is None:
                self.ports[key] = self.listeners[key].startListening(
                    self.reactor, factory, multiAccept
                )
            else:
                old = port.factory  # type: ignore[attr-defined]
                factory.doStart()
                port.factory = factory  # type: ignore[attr-defined]
                if isinstance(port, RelayPort):
                    port.multiAccept = multiAccept
                old.doStop()
        for key in list(self.ports):
            if key not in wanted:
                log.info("no longer listening on {address}", address=key)
                self.ports.pop(key).stopListening()
                self.listeners.pop(key, None)

    def _failed(self, failure: Any) -> None:
        log.critical("start-up failed: {error}", error=failure.getErrorMessage())
        self.reactor.stop()

    def reload(self) -> Deferred[bool]:
        """
        Load the configuration file again and switch to it; on any error, log it
        and keep the running configuration.  Fires with whether it switched.
        """
        if self.reloading is not None:
            return self.reloading
        from tlsrelay._config._load import loadConfig

        path = self.generation.config.path
        log.info("reloading {path}", path=path)
        generation: Generation | None = None
        try:
            config = loadConfig(path)
            checkHosts(config)
            self.sharing.reload()
            generation = build(
                config, self.reactor, self.accessLogs, self.connections, self.sharing
            )
            new = bindAll(configListens(config), self.listeners, self.bind)
        except ConfigError as e:
            if generation is not None:
                generation.closeErrorLogs()
            log.error(
                "reload failed, keeping the running configuration: {error}",
                error=str(e),
            )
            return succeed(False)

        def switch(_: object) -> bool:
            if not self.running:
                # Stopped while the new configuration was resolving.
                for listener in new.values():
                    listener.close()
                generation.closeErrorLogs()
                return False
            from tlsrelay.tap import setLogLevel

            self.listeners.update(new)
            self.connections.limit = config.workerConnections
            self.drainTimeout = config.shutdownTimeout
            setLogLevel(config)
            old, self.generation = self.generation, generation
            self._observe(generation)
            generation.startChecks()
            self._listen(generation)
            old.stopChecks()
            self._unobserve(old)
            self.accessLogs.reopen()
            log.info("reloaded {path}", path=path)
            return True

        def failed(failure: Any) -> bool:
            for listener in new.values():
                listener.close()
            generation.closeErrorLogs()
            log.error(
                "reload failed, keeping the running configuration: {error}",
                error=failure.getErrorMessage(),
            )
            return False

        switching = self._resolve(generation).addCallbacks(switch, failed)
        if not switching.called:
            self.reloading = switching

            def done(result: bool) -> bool:
                self.reloading = None
                return result

            switching.addBoth(done)
        return switching

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting, then wait for open connections to finish, at most
        L{drainTimeout} seconds.
        """
        self.generation.stopChecks()
        waiting = [port.stopListening() for port in self.ports.values()]
        self.ports = {}
        super().stopService()  # type: ignore[no-untyped-call]
        stopped: Deferred[Any] = DeferredList([w for w in waiting if w is not None])
        return stopped.addCallback(lambda _: self._drain()).addCallback(
            lambda _: self._closeLogs()
        )

    def _closeLogs(self) -> None:
        self.accessLogs.close()
        self._unobserve(self.generation)
        # Only now: draining connections still used the ticket keys and cache.
        self.sharing.stopService()

    def _drain(self) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        if self.connections.active <= 0:
            done.callback(None)
            return done
        log.info(
            "draining {count} connections (at most {timeout}s)",
            count=self.connections.active,
            timeout=self.drainTimeout,
        )
        deadline = self.reactor.seconds() + self.drainTimeout

        def check() -> None:
            if self.connections.active <= 0:
                done.callback(None)
            elif self.reactor.seconds() >= deadline:
                log.warn(
                    "drain timeout: closing {count} connections",
                    count=self.connections.active,
                )
                done.callback(None)
            else:
                self.reactor.callLater(0.1, check)

        check()
        return done
