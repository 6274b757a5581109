"""
Tests for L{tlsrelay._service.RelayService}: start-up, reload (factories swapped
on kept ports, listeners added and removed, health checkers and error logs
handed over) and drain on shutdown, on a memory reactor with no sockets bound.
"""

from __future__ import annotations

import gc
import os
import socket
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from twisted.application.service import IService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IListeningPort,
    IResolutionReceiver,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests._helpers import Resolution
from tlsrelay._accesslog import AccessLogFiles
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._load import loadConfig
from tlsrelay._config._model import Listen
from tlsrelay._log import enabled, setLevel
from tlsrelay._relay import RelayFactory, WorkerConnections
from tlsrelay._service import RelayService, bindAll, build, configListens
from tlsrelay._sessions import SessionSharing
from tlsrelay._tlsfactory import RelayPort, TLSServerFactory
from tlsrelay.testing import writeCertificates


@implementer(IListeningPort)
class FakePort:
    """
    What L{PortReactor.adoptStreamPort} returns: like a real port, it starts
    its factory when adopted and stops the factory it has when it stops
    listening; its factory can be swapped, and its C{stopListening} held.
    """

    def __init__(
        self, reactor: PortReactor, fileno: int, family: int, factory: Any
    ) -> None:
        self.reactor = reactor
        self.fileno = fileno
        self.family = family
        self.factory = factory
        self.listening = True
        self.stopping: Deferred[None] | None = None

    def startListening(self) -> None:
        self.listening = True

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        self.stopping = Deferred() if self.reactor.holdStops else succeed(None)
        self.stopping.addCallback(lambda _: self.factory.doStop())
        return self.stopping

    def getHost(self) -> IAddress:
        return IPv4Address("TCP", "127.0.0.1", 0)


class PortReactor(MemoryReactorClock):
    """
    A memory reactor whose adopted ports are L{FakePort}s, for any family.

    @ivar holdStops: when set, C{stopListening} returns a L{Deferred} the test
        fires.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []
        self.holdStops = False

    def adoptStreamPort(
        self, fileno: int, addressFamily: Any, factory: Any
    ) -> FakePort:
        self.adoptedPorts.append((fileno, addressFamily, factory))
        port = FakePort(self, fileno, addressFamily, factory)
        factory.doStart()
        self.ports.append(port)
        return port


@implementer(IHostnameResolver)
class PendingResolver:
    """
    A resolver that answers only when the test says so.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[IResolutionReceiver, str, int]] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        self.pending.append((resolutionReceiver, hostName, portNumber))
        return resolution

    def answer(self, *hosts: str) -> None:
        """
        Complete every pending resolution with C{hosts}.
        """
        pending, self.pending = self.pending, []
        for receiver, _, port in pending:
            for host in hosts:
                receiver.addressResolved(IPv4Address("TCP", host, port))
            receiver.resolutionComplete()


def plain(*ports: int, extra: str = "", main: str = "", server: str = "") -> str:
    """
    A configuration with a C{return} server per port.
    """
    servers = "".join(
        f"    server {{ listen 127.0.0.1:{port}; return p{port}; {server} }}\n"
        for port in ports
    )
    return f"{main}\nstream {{\n{servers}{extra}}}\n"


def proxying(host: str, port: int = 8001, check: str = "") -> str:
    return (
        "stream {\n"
        f"    upstream app {{ server {host}:9000; }}\n"
        f"    server {{ listen 127.0.0.1:{port}; proxy_pass app; {check} }}\n"
        "}\n"
    )


@contextmanager
def unclosedFiles() -> Iterator[list[str]]:
    """
    Collect the C{ResourceWarning}s of files left for the garbage collector to
    close, while the block runs.
    """
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield found
        gc.collect()
    found += [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def messages(events: Sequence[dict[str, Any]]) -> list[str]:
    return [str(e.get("log_format", "")) for e in events]


class ServiceTestCase(SynchronousTestCase):
    """
    A L{RelayService} built from configuration text, on a L{PortReactor}, with
    a bind that records what it was asked to bind and binds nothing.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "relay.conf")
        self.reactor = PortReactor()
        self.accessLogs = AccessLogFiles()
        self.connections = WorkerConnections()
        self.sharing = SessionSharing(self.reactor, "single")
        self.bound: list[Listen] = []
        self.failBind: set[int] = set()
        self.sockets: list[socket.socket] = []
        self.addCleanup(setLevel, LogLevel.info)
        self.addCleanup(self.closeSockets)

    def closeSockets(self) -> None:
        for sock in self.sockets:
            sock.close()

    def bind(self, listen: Listen) -> socket.socket:
        """
        Record C{listen}; an unbound socket stands for the bound one.
        """
        if listen.address.port in self.failBind:
            raise ConfigError.at(
                f"bind() to {listen.address} failed (98: Address already in use)",
                listen.where,
            )
        self.bound.append(listen)
        sock = socket.socket()
        self.sockets.append(sock)
        return sock

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def service(self, text: str, start: bool = True) -> RelayService:
        self.write(text)
        config = loadConfig(self.path)
        generation = build(
            config, self.reactor, self.accessLogs, self.connections, self.sharing
        )
        listeners = bindAll(configListens(config), {}, self.bind)
        service = RelayService(
            generation,
            listeners,
            self.reactor,
            self.accessLogs,
            self.connections,
            self.sharing,
            bind=self.bind,
        )
        if start:
            service.startService()
            self.addCleanup(self.stop, service)
        return service

    def stop(self, service: RelayService) -> None:
        if service.running:
            self.reactor.holdStops = False
            self.connections.active = 0
            self.successResultOf(service.stopService())

    def reload(self, service: RelayService, text: str) -> bool:
        self.write(text)
        result: bool = self.successResultOf(service.reload())
        return result

    def portFor(self, service: RelayService, key: str) -> FakePort:
        port = service.ports[key]
        assert isinstance(port, FakePort)
        return port


class StartTests(ServiceTestCase):
    def test_interface(self) -> None:
        """
        L{RelayService} is an L{IService}; the test's fakes provide the
        interfaces they stand in for.
        """
        service = self.service(plain(8001), start=False)
        self.assertTrue(verifyObject(IService, service))
        self.assertTrue(verifyObject(IHostnameResolver, PendingResolver()))
        self.assertTrue(
            verifyObject(IListeningPort, FakePort(self.reactor, 3, 2, None))
        )

    def test_adoptsEveryListener(self) -> None:
        """
        Starting adopts every bound socket with the relay factory of its
        C{listen}, closes the service's own copy of the descriptor, starts the
        session sharing and fires C{listening}.
        """
        service = self.service(plain(8001, 8002), start=False)
        sockets = {k: v.socket for k, v in service.listeners.items()}
        filenos = {k: s.fileno() for k, s in sockets.items()}
        self.assertFalse(self.sharing.running)
        with capturedLogs() as events:
            service.startService()
        self.addCleanup(self.stop, service)
        self.assertTrue(self.sharing.running)
        self.assertEqual(sorted(service.ports), ["127.0.0.1:8001", "127.0.0.1:8002"])
        for key, port in service.ports.items():
            assert isinstance(port, FakePort)
            self.assertEqual(port.fileno, filenos[key])
            self.assertEqual(port.family, socket.AF_INET)
            self.assertIsInstance(port.factory, RelayFactory)
            self.assertEqual(sockets[key].fileno(), -1)
        self.assertIsNone(self.successResultOf(service.listening))
        self.assertEqual(messages(events).count("listening on {address}{ssl}"), 2)

    def test_listensAfterResolution(self) -> None:
        """
        Nothing listens (and no health check starts) until every upstream name
        has resolved.
        """
        resolver = PendingResolver()
        self.reactor.installNameResolver(resolver)
        service = self.service(proxying("app.example", check="health_check;"))
        self.assertEqual(self.reactor.ports, [])
        self.assertNoResult(service.listening)
        [checker] = service.generation.checkers
        self.assertFalse(checker.running)
        self.assertEqual(
            [(host, port) for _, host, port in resolver.pending],
            [("app.example", 9000)],
        )
        resolver.answer("10.0.0.1")
        self.successResultOf(service.listening)
        self.assertEqual(list(service.ports), ["127.0.0.1:8001"])
        self.assertTrue(checker.running)
        self.assertEqual(
            [(host, port) for host, port, *_ in self.reactor.tcpClients],
            [("10.0.0.1", 9000)],
        )

    def test_resolutionFailureStopsTheReactor(self) -> None:
        """
        An upstream name that does not resolve at start-up is critical: it is
        logged and the reactor is stopped, with nothing listening.
        """
        resolver = PendingResolver()
        self.reactor.installNameResolver(resolver)
        service = self.service(proxying("app.example"))
        with capturedLogs() as events:
            resolver.answer()
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(self.reactor.ports, [])
        [critical] = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(
            critical["error"],
            f'host not found in upstream "app.example:9000" in {self.path}:2',
        )
        self.assertIsNone(self.successResultOf(service.listening))

    def test_stoppedBeforeResolution(self) -> None:
        """
        A service stopped while its upstream names resolve does not start
        listening or checking when they do.
        """
        resolver = PendingResolver()
        self.reactor.installNameResolver(resolver)
        service = self.service(proxying("app.example", check="health_check;"))
        self.successResultOf(service.stopService())
        resolver.answer("10.0.0.1")
        self.assertEqual(self.reactor.ports, [])
        self.assertFalse(service.generation.checkers[0].running)
        self.assertEqual(self.reactor.tcpClients, [])


class ReloadTests(ServiceTestCase):
    def test_keptPortGetsTheNewFactory(self) -> None:
        """
        A reload that keeps an address keeps its port and socket (nothing is
        bound or adopted again) and swaps the port's factory: the new one is
        started, the old one stopped.
        """
        service = self.service(plain(8001))
        port = self.portFor(service, "127.0.0.1:8001")
        old = port.factory
        assert isinstance(old, RelayFactory)
        self.assertEqual(old.numPorts, 1)
        with capturedLogs() as events:
            self.assertTrue(self.reload(service, plain(8001, main="pid off;")))
        self.assertIs(service.ports["127.0.0.1:8001"], port)
        self.assertEqual(len(self.reactor.ports), 1)
        self.assertEqual(len(self.bound), 1)
        new = port.factory
        assert isinstance(new, RelayFactory)
        self.assertIsNot(new, old)
        self.assertEqual((new.numPorts, old.numPorts), (1, 0))
        self.assertIs(service.generation.factories[0][1], new)
        self.assertTrue(port.listening)
        self.assertIn("reloaded {path}", messages(events))
        self.successResultOf(service.stopService())
        self.assertEqual((new.numPorts, old.numPorts), (0, 0))

    def test_listenersAddedAndRemoved(self) -> None:
        """
        A reload binds and adopts only the new addresses and stops listening on
        (and forgets) the removed ones.
        """
        service = self.service(plain(8001, 8002))
        removed = self.portFor(service, "127.0.0.1:8002")
        with capturedLogs() as events:
            self.assertTrue(self.reload(service, plain(8001, 8003)))
        self.assertEqual(
            [listen.address.port for listen in self.bound], [8001, 8002, 8003]
        )
        self.assertEqual(sorted(service.ports), ["127.0.0.1:8001", "127.0.0.1:8003"])
        self.assertEqual(
            sorted(service.listeners), ["127.0.0.1:8001", "127.0.0.1:8003"]
        )
        self.assertFalse(removed.listening)
        self.assertEqual(len(self.reactor.ports), 3)
        [info] = [e for e in events if e["log_format"].startswith("no longer")]
        self.assertEqual(info["address"], "127.0.0.1:8002")

        # An address removed by one reload can come back in the next.
        self.assertTrue(self.reload(service, plain(8001, 8002)))
        self.assertEqual(
            [listen.address.port for listen in self.bound], [8001, 8002, 8003, 8002]
        )
        self.assertTrue(self.portFor(service, "127.0.0.1:8002").listening)

    def test_badConfigurationKeepsTheRunningOne(self) -> None:
        """
        A configuration that does not load is logged and changes nothing.
        """
        service = self.service(plain(8001))
        generation, port = service.generation, service.ports["127.0.0.1:8001"]
        factory = self.portFor(service, "127.0.0.1:8001").factory
        with capturedLogs() as events:
            self.assertFalse(self.reload(service, plain(8001, 8002) + "bogus;"))
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn('unknown directive "bogus"', error["error"])
        self.assertIs(service.generation, generation)
        self.assertEqual(service.ports, {"127.0.0.1:8001": port})
        self.assertIs(self.portFor(service, "127.0.0.1:8001").factory, factory)
        self.assertEqual(len(self.bound), 1)
        self.assertIsNone(service.reloading)

    def test_bindFailureKeepsTheRunningOne(self) -> None:
        """
        When one new address cannot be bound, the reload fails: the sockets it
        bound are closed, the error logs its configuration opened are closed,
        and the running configuration stays.
        """
        service = self.service(plain(8001))
        generation = service.generation
        self.failBind.add(8003)
        errorLog = os.path.join(self.dir, "new-error.log")
        text = plain(8001, 8002, 8003, main=f"error_log {errorLog} info;")
        with unclosedFiles() as unclosed, capturedLogs() as events:
            self.assertFalse(self.reload(service, text))
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn("bind() to 127.0.0.1:8003 failed", error["error"])
        self.assertEqual([listen.address.port for listen in self.bound], [8001, 8002])
        self.assertEqual(self.sockets[1].fileno(), -1)
        self.assertIs(service.generation, generation)
        self.assertEqual(list(service.ports), ["127.0.0.1:8001"])
        self.assertEqual(list(service.listeners), ["127.0.0.1:8001"])
        self.assertEqual(unclosed, [])

    def test_errorLogFailureClosesTheOthers(self) -> None:
        """
        When one C{error_log} of the new configuration cannot be opened, the
        reload fails and the ones already opened are closed.
        """
        service = self.service(plain(8001))
        opened = os.path.join(self.dir, "opened.log")
        missing = os.path.join(self.dir, "missing", "error.log")
        main = f"error_log {opened} info;\nerror_log {missing} info;"
        with unclosedFiles() as unclosed, capturedLogs() as events:
            self.assertFalse(self.reload(service, plain(8001, main=main)))
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn(
            f'could not open error log file: open() "{missing}"', error["error"]
        )
        self.assertEqual(unclosed, [])

    def test_oneReloadAtATime(self) -> None:
        """
        A reload asked for while one waits for upstream names gets the pending
        result; once that is done, a new reload starts.
        """
        resolver = PendingResolver()
        self.reactor.installNameResolver(resolver)
        service = self.service(plain(8001))
        self.write(proxying("localhost"))
        first = service.reload()
        self.assertNoResult(first)
        self.assertIs(service.reload(), first)
        self.assertEqual(len(resolver.pending), 1)
        resolver.answer("127.0.0.1")
        self.assertTrue(self.successResultOf(first))
        self.assertIsNone(service.reloading)
        self.assertTrue(self.reload(service, plain(8001)))

    def test_resolutionFailureKeepsTheRunningOne(self) -> None:
        """
        A new configuration whose upstream names do not resolve through the
        reactor is not used; the sockets bound for it are closed.
        """
        resolver = PendingResolver()
        self.reactor.installNameResolver(resolver)
        service = self.service(plain(8001))
        generation = service.generation
        self.write(proxying("localhost", port=8002))
        reloading = service.reload()
        with capturedLogs() as events:
            resolver.answer()
        self.assertFalse(self.successResultOf(reloading))
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(
            error["error"],
            f'host not found in upstream "localhost:9000" in {self.path}:2',
        )
        self.assertIs(service.generation, generation)
        self.assertEqual(list(service.ports), ["127.0.0.1:8001"])
        self.assertEqual(list(service.listeners), ["127.0.0.1:8001"])
        self.assertEqual(self.sockets[-1].fileno(), -1)
        self.assertIsNone(service.reloading)

    def test_stoppedWhileReloading(self) -> None:
        """
        A service stopped while a new configuration resolves does not switch to
        it when it resolves, and closes what was bound for it.
        """
        resolver = PendingResolver()
        self.reactor.installNameResolver(resolver)
        service = self.service(plain(8001))
        self.write(proxying("localhost", port=8002))
        reloading = service.reload()
        self.successResultOf(service.stopService())
        resolver.answer("127.0.0.1")
        self.assertFalse(self.successResultOf(reloading))
        self.assertEqual(len(self.reactor.ports), 1)
        self.assertEqual(self.sockets[-1].fileno(), -1)
        self.assertEqual(service.ports, {})

    def test_settingsApplied(self) -> None:
        """
        A reload applies C{worker_connections}, C{worker_shutdown_timeout} and the
        C{error_log} level.
        """
        service = self.service(plain(8001))
        self.assertFalse(enabled(LogLevel.debug))
        errorLog = os.path.join(self.dir, "error.log")
        main = (
            "worker_shutdown_timeout 7s;\n"
            "events { worker_connections 99; }\n"
            f"error_log {errorLog} debug;"
        )
        self.assertTrue(self.reload(service, plain(8001, main=main)))
        self.assertEqual(self.connections.limit, 99)
        self.assertEqual(service.drainTimeout, 7.0)
        self.assertTrue(enabled(LogLevel.debug))

    def test_multiAcceptApplied(self) -> None:
        """
        A reload applies C{multi_accept} to a relay port already listening.
        """
        service = self.service(plain(8001))
        [(key, fake)] = service.ports.items()
        port = RelayPort.__new__(RelayPort)
        port.factory = fake.factory  # type: ignore[attr-defined]
        service.ports[key] = port
        self.assertFalse(port.multiAccept)
        main = "events { multi_accept on; }"
        self.assertTrue(self.reload(service, plain(8001, main=main)))
        self.assertTrue(port.multiAccept)
        self.assertTrue(self.reload(service, plain(8001)))
        self.assertFalse(port.multiAccept)
        service.ports[key] = fake

    def test_errorLogsHandedOver(self) -> None:
        """
        After a reload, events go to the new configuration's C{error_log} and no
        longer to the old one's, which is closed.
        """
        first = os.path.join(self.dir, "first.log")
        second = os.path.join(self.dir, "second.log")
        service = self.service(plain(8001, main=f"error_log {first} info;"))
        [(firstStream, _)] = service.generation.errorLogs
        self.assertTrue(
            self.reload(service, plain(8001, main=f"error_log {second} info;"))
        )
        self.assertTrue(firstStream.closed)
        with open(first) as f:
            self.assertIn("reloading", f.read())
        with open(second) as f:
            self.assertIn("reloaded", f.read())
        self.successResultOf(service.stopService())
        [(secondStream, _)] = service.generation.errorLogs
        self.assertTrue(secondStream.closed)

    def test_accessLogsReopened(self) -> None:
        """
        A reload reopens the access logs, as C{nginx -s reload} does: a log
        moved away is created again.
        """
        accessLog = os.path.join(self.dir, "access.log")
        service = self.service(plain(8001, server=f"access_log {accessLog};"))
        self.assertTrue(os.path.exists(accessLog))
        os.rename(accessLog, accessLog + ".1")
        self.assertTrue(
            self.reload(service, plain(8001, server=f"access_log {accessLog};"))
        )
        self.assertTrue(os.path.exists(accessLog))

    def test_healthCheckersHandedOver(self) -> None:
        """
        The new generation's health checkers start and the old one's stop.
        """
        service = self.service(proxying("127.0.0.1", check="health_check;"))
        [old] = service.generation.checkers
        self.assertTrue(old.running)
        text = proxying("127.0.0.1", check="health_check interval=2s;")
        self.assertTrue(self.reload(service, text))
        [new] = service.generation.checkers
        self.assertTrue(new.running)
        self.assertFalse(old.running)
        self.successResultOf(service.stopService())
        self.assertFalse(new.running)

    def test_ticketKeysSurviveReload(self) -> None:
        """
        A reloaded C{ssl} server gets a new TLS factory on its port, with the
        same ticket-key service as before (so issued tickets still resume), and
        the key files are read again.
        """
        files = writeCertificates(self.dir)
        keyFile = os.path.join(self.dir, "ticket.key")
        with open(keyFile, "wb") as f:
            f.write(bytes(range(80)))
        text = (
            "stream {\n"
            f"    ssl_certificate {files.certificate};\n"
            f"    ssl_certificate_key {files.key};\n"
            f"    ssl_session_ticket_key {keyFile};\n"
            "    server { listen 127.0.0.1:8443 ssl; return %s; }\n"
            "}\n"
        )
        service = self.service(text % "one")
        port = self.portFor(service, "127.0.0.1:8443")
        old = port.factory
        self.assertIsInstance(old, TLSServerFactory)
        [keys] = self.sharing.ticketServices.values()
        with open(keyFile, "wb") as f:
            f.write(bytes(range(1, 81)))
        self.assertTrue(self.reload(service, text % "two"))
        self.assertIsInstance(port.factory, TLSServerFactory)
        self.assertIsNot(port.factory, old)
        self.assertEqual(list(self.sharing.ticketServices.values()), [keys])
        current = keys.ring.current
        assert current is not None
        self.assertEqual(current.toBytes(), bytes(range(1, 81)))


class StopTests(ServiceTestCase):
    def test_stopListeningThenDrain(self) -> None:
        """
        Stopping stops every port, waits for them, then for open connections;
        session sharing and access logs are closed only after the drain.
        """
        accessLog = os.path.join(self.dir, "access.log")
        service = self.service(plain(8001, 8002, server=f"access_log {accessLog};"))
        ports = list(self.reactor.ports)
        self.reactor.holdStops = True
        self.connections.acquire()
        self.connections.acquire()
        writer = self.accessLogs.writerFor(accessLog)
        with capturedLogs() as events:
            stopping = service.stopService()
            self.assertFalse(service.running)
            self.assertEqual(service.ports, {})
            self.assertEqual([p.listening for p in ports], [False, False])
            self.assertNoResult(stopping)
            self.assertNotIn(
                "draining {count} connections (at most {timeout}s)", messages(events)
            )
            for port in ports:
                assert port.stopping is not None
                port.stopping.callback(None)
        [draining] = [e for e in events if e["log_format"].startswith("draining")]
        self.assertEqual((draining["count"], draining["timeout"]), (2, 30.0))
        self.reactor.advance(5)
        self.assertNoResult(stopping)
        self.assertTrue(self.sharing.running)
        self.assertTrue(writer.isOpen)
        self.connections.release()
        self.connections.release()
        self.reactor.advance(0.1)
        self.successResultOf(stopping)
        self.assertFalse(self.sharing.running)
        self.assertFalse(writer.isOpen)
        self.assertFalse([e for e in events if e["log_level"] == LogLevel.warn])

    def test_drainTimeout(self) -> None:
        """
        Connections still open after C{drainTimeout} do not hold the stop up:
        it is logged and the stop completes.
        """
        service = self.service(plain(8001))
        service.drainTimeout = 3.0
        self.connections.acquire()
        with capturedLogs() as events:
            stopping = service.stopService()
            self.reactor.advance(2.9)
            self.assertNoResult(stopping)
            self.reactor.advance(0.1)
            self.successResultOf(stopping)
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["count"], 1)
        self.assertFalse(self.sharing.running)

    def test_nothingToDrain(self) -> None:
        """
        With no connection open, stopping completes as soon as the ports stop.
        """
        service = self.service(plain(8001))
        with capturedLogs() as events:
            self.successResultOf(service.stopService())
        self.assertNotIn(
            "draining {count} connections (at most {timeout}s)", messages(events)
        )
        self.assertFalse(self.reactor.ports[0].listening)
