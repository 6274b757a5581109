"""
Tests for L{tlsrelay._sessions.SessionSharing}: which ticket-key sets and shared
session caches each role makes, their reuse by settings across configuration
builds, the OpenSSL self-test, and clean-up; with in-memory handshakes for what
OpenSSL makes of the installed keys.
"""

from __future__ import annotations

import os
import sqlite3

import attrs
from OpenSSL import SSL
from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests._helpers import closeCleanly
from tlsrelay import _openssl
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import CertificatePair, ServerTLS, SessionCache, Where
from tlsrelay._openssl import sessionReused
from tlsrelay._sessioncache import CheckpointService, cachePath
from tlsrelay._sessions import Role, SessionSharing
from tlsrelay._tickets import KeyDirectory, ticketKeyDirectory
from tlsrelay._tls import buildServerContext
from tlsrelay.testing import memoryHandshake, writeCertificates

WHERE = Where("/etc/tlsrelay/relay.conf", 12)
SESSION_ID_CONTEXT = b"the same everywhere"
MEGABYTE = 1024 * 1024


def shared(name: str = "SSL", size: int = MEGABYTE, tickets: bool = True) -> ServerTLS:
    """
    Settings with C{ssl_session_cache shared:NAME:SIZE}.
    """
    return ServerTLS(
        sessionCache=SessionCache(mode="shared", sharedName=name, sharedSize=size),
        sessionTickets=tickets,
    )


class SharingTestCase(SynchronousTestCase):
    """
    L{SessionSharing}s on one L{Clock}, with L{_openssl.selfTest} counted (it
    is replaced by a counter unless a test restores it).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.selfTests = 0
        self.selfTestError: _openssl.OpenSSLUnavailable | None = None
        self.patch(_openssl, "selfTest", self.countingSelfTest)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.files = writeCertificates(self.dir)

    def countingSelfTest(self) -> None:
        self.selfTests += 1
        if self.selfTestError is not None:
            raise self.selfTestError

    def sharing(
        self, role: Role = "single", directory: str | None = None
    ) -> SessionSharing:
        sharing = SessionSharing(self.clock, role, directory)
        self.addCleanup(self.stop, sharing)
        return sharing

    def stop(self, sharing: SessionSharing) -> None:
        sharing.stopService()

    def keyFile(self, name: str, seed: int) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(bytes((seed + i) % 256 for i in range(80)))
        return path

    def server(
        self, sharing: SessionSharing, tls: ServerTLS, version: str
    ) -> SSL.Context:
        """
        A server context for C{tls}, protocol C{version} only, built as the
        relay builds it and set up by C{sharing}.
        """
        tls = attrs.evolve(
            tls,
            certificates=(CertificatePair(self.files.certificate, self.files.key),),
            protocols=(version,),
        )
        context = buildServerContext(tls, WHERE)
        sharing.install(context, tls, SESSION_ID_CONTEXT, WHERE)
        return context

    def client(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(self.files.caFile)
        context.set_verify(SSL.VERIFY_PEER)
        return context

    def resumes(self, first: SSL.Context, second: SSL.Context) -> bool:
        """
        Whether a session from a handshake with C{first} resumes on C{second}.
        """
        client = self.client()
        serverConnection, clientConnection = memoryHandshake(first, client)
        self.addCleanup(closeCleanly, serverConnection, clientConnection)
        session = clientConnection.get_session()
        assert session is not None
        serverConnection, clientConnection = memoryHandshake(
            second, client, session=session
        )
        self.addCleanup(closeCleanly, serverConnection, clientConnection)
        return sessionReused(serverConnection)


VERSIONS = (("TLS 1.2", "TLSv1.2"), ("TLS 1.3", "TLSv1.3"))


class SingleTests(SharingTestCase):
    """
    One process without workers owns its keys and caches.
    """

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IService, SessionSharing(self.clock)))

    def test_generatedKeys(self) -> None:
        """
        Without key files a single process generates its keys (no self-test,
        no directory): one rotation service, a child that runs with the
        sharing.
        """
        sharing = self.sharing()
        self.server(sharing, ServerTLS(), "TLSv1.3")
        [service] = sharing.ticketServices.values()
        self.assertEqual(list(sharing), [service])
        self.assertIsNotNone(service.ring.current)
        self.assertEqual(self.selfTests, 0)
        self.assertIsNone(sharing.directory)
        self.assertFalse(service.running)
        sharing.startService()
        self.assertTrue(service.running)
        sharing.stopService()
        self.assertFalse(service.running)

    def test_keysReusedBySettings(self) -> None:
        """
        Contexts whose ticket settings are the same get the same key set, even
        from separate builds (a reload), so their tickets resume on each other;
        other settings get another set.
        """
        sharing = self.sharing()
        for label, version in VERSIONS:
            before = self.server(sharing, ServerTLS(), version)
            after = self.server(sharing, ServerTLS(), version)
            self.assertTrue(self.resumes(before, after), label)
        self.assertEqual(len(sharing.ticketServices), 1)
        self.assertEqual(
            sharing.ticketKeys(ServerTLS(), WHERE),
            sharing.ticketKeys(ServerTLS(), WHERE),
        )
        for tls in (
            ServerTLS(sessionTimeout=600.0),
            ServerTLS(ticketKeyRotation=60.0),
        ):
            other = self.server(sharing, tls, "TLSv1.3")
            self.assertFalse(
                self.resumes(self.server(sharing, ServerTLS(), "TLSv1.3"), other)
            )
        self.assertEqual(len(sharing.ticketServices), 3)

    def test_noTickets(self) -> None:
        """
        With C{ssl_session_tickets off} no key set is made.
        """
        sharing = self.sharing()
        self.server(sharing, ServerTLS(sessionTickets=False), "TLSv1.2")
        self.assertEqual(sharing.ticketServices, {})
        self.assertEqual(list(sharing), [])

    def test_keyFilesReadAgainOnReload(self) -> None:
        """
        Key files are read (after the self-test) when first named and again
        on L{SessionSharing.reload}.
        """
        path = self.keyFile("current.key", 1)
        tls = ServerTLS(ticketKeyFiles=(path,))
        sharing = self.sharing()
        self.server(sharing, tls, "TLSv1.3")
        self.assertEqual(self.selfTests, 1)
        [service] = sharing.ticketServices.values()
        current = service.ring.current
        assert current is not None
        with open(path, "rb") as f:
            self.assertEqual(current.toBytes(), f.read())
        self.keyFile("current.key", 2)
        sharing.reload()
        current = service.ring.current
        assert current is not None
        with open(path, "rb") as f:
            self.assertEqual(current.toBytes(), f.read())

    def test_badKeyFile(self) -> None:
        """
        A key file that cannot be read stops the build with an error at the
        setting's place.
        """
        missing = os.path.join(self.dir, "missing.key")
        sharing = self.sharing()
        error = self.assertRaises(
            ConfigError,
            self.server,
            sharing,
            ServerTLS(ticketKeyFiles=(missing,)),
            "TLSv1.3",
        )
        self.assertIn(missing, error.message)
        self.assertEqual((error.file, error.line), (WHERE.file, WHERE.line))
        self.assertEqual(sharing.ticketServices, {})

    def test_sharedCache(self) -> None:
        """
        C{shared:NAME:SIZE} makes, once per name and size, a cache file in the
        sharing's own directory and a checkpoint service for it; the self-test
        runs once.
        """
        sharing = self.sharing()
        first = self.server(sharing, shared(tickets=False), "TLSv1.2")
        self.assertIsNotNone(first)
        directory = sharing.directory
        assert directory is not None
        [store] = sharing.caches.values()
        self.assertEqual(store.path, cachePath(directory, "SSL", 4000))
        self.assertEqual(store.capacity, 4000)
        self.server(sharing, shared(tickets=False), "TLSv1.2")
        self.assertEqual(list(sharing.caches.values()), [store])
        self.server(sharing, shared(size=2 * MEGABYTE, tickets=False), "TLSv1.2")
        self.server(sharing, shared("other", tickets=False), "TLSv1.2")
        self.assertEqual(
            sorted(sharing.caches), [("SSL", 4000), ("SSL", 8000), ("other", 4000)]
        )
        self.assertEqual([type(s) for s in sharing], [CheckpointService] * 3)
        self.assertEqual(self.selfTests, 1)
        self.assertEqual(sharing.directory, directory)

    def test_sharedCacheResumes(self) -> None:
        """
        Contexts given the same shared cache resume each other's sessions
        (tickets off).
        """
        sharing = self.sharing()
        for label, version in VERSIONS:
            before = self.server(sharing, shared(tickets=False), version)
            after = self.server(sharing, shared(tickets=False), version)
            self.assertTrue(self.resumes(before, after), label)
        [store] = sharing.caches.values()
        self.assertGreater(store.count(), 0)

    def test_stop(self) -> None:
        """
        Stopping stops the key and checkpoint services, closes the caches and
        removes the directory the sharing made.
        """
        sharing = self.sharing()
        self.server(sharing, shared(), "TLSv1.3")
        sharing.startService()
        directory = sharing.directory
        assert directory is not None
        self.assertTrue(os.path.isdir(directory))
        services = list(sharing)
        self.assertEqual(len(services), 2)
        sharing.stopService()
        self.assertEqual([s.running for s in services], [False, False])
        [store] = sharing.caches.values()
        self.assertRaises(sqlite3.ProgrammingError, store.count)
        self.assertFalse(os.path.exists(directory))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cacheCannotBeMade(self) -> None:
        """
        A cache that cannot be created stops the build with an error at the
        setting's place.
        """
        sharing = self.sharing(directory=os.path.join(self.dir, "missing"))
        error = self.assertRaises(
            ConfigError, self.server, sharing, shared(), "TLSv1.3"
        )
        self.assertIn("cannot create the shared session cache", error.message)
        self.assertEqual((error.file, error.line), (WHERE.file, WHERE.line))


class MasterWorkerTests(SharingTestCase):
    """
    A master publishes keys and caches in its directory; its workers follow.
    """

    def test_masterPublishes(self) -> None:
        """
        A master runs the self-test even for generated keys, makes its
        directory and publishes the keys there, under a name a worker derives
        from the same settings.
        """
        sharing = self.sharing("master")
        self.server(sharing, ServerTLS(), "TLSv1.3")
        self.assertEqual(self.selfTests, 1)
        directory = sharing.directory
        assert directory is not None
        [service] = sharing.ticketServices.values()
        published = KeyDirectory(ticketKeyDirectory(directory, (), 300.0, None))
        self.assertEqual(set(published.read()), set(service.ring.schedule))

    def test_workerFollowsItsMaster(self) -> None:
        """
        A worker given the master's directory uses the keys and caches the
        master publishes there: tickets and cached sessions from one resume on
        the other.  Stopping a worker leaves the directory; stopping the master
        removes it.
        """
        master = self.sharing("master")
        tickets = {v: self.server(master, ServerTLS(), v) for _, v in VERSIONS}
        cached = {v: self.server(master, shared(tickets=False), v) for _, v in VERSIONS}
        worker = self.sharing("worker", master.directory)
        for label, version in VERSIONS:
            self.assertTrue(
                self.resumes(
                    tickets[version], self.server(worker, ServerTLS(), version)
                ),
                label,
            )
            self.assertTrue(
                self.resumes(
                    cached[version], self.server(worker, shared(tickets=False), version)
                ),
                label,
            )
        [masterStore] = master.caches.values()
        [workerStore] = worker.caches.values()
        self.assertEqual(workerStore.path, masterStore.path)
        self.assertEqual(list(worker), list(worker.ticketServices.values()))
        directory = master.directory
        assert directory is not None
        worker.stopService()
        self.assertTrue(os.path.isdir(directory))
        master.stopService()
        self.assertFalse(os.path.exists(directory))

    def test_workerWithoutKeys(self) -> None:
        """
        A worker whose master published no keys for its settings cannot start.
        """
        worker = self.sharing("worker", self.dir)
        error = self.assertRaises(
            ConfigError, self.server, worker, ServerTLS(), "TLSv1.3"
        )
        self.assertEqual((error.file, error.line), (WHERE.file, WHERE.line))
        self.assertEqual(self.selfTests, 1)

    def test_workerWithoutCache(self) -> None:
        """
        A worker whose master made no cache of that name and size cannot start.
        """
        worker = self.sharing("worker", self.dir)
        error = self.assertRaises(
            ConfigError,
            self.server,
            worker,
            shared(tickets=False),
            "TLSv1.2",
        )
        self.assertIn("there is no shared session cache", error.message)
        self.assertEqual((error.file, error.line), (WHERE.file, WHERE.line))
        self.assertTrue(os.path.isdir(self.dir))


class CheckTests(SharingTestCase):
    """
    C{--check} validates what can be validated and makes nothing that lasts.
    """

    def test_nothingMade(self) -> None:
        """
        Without key files nothing is generated; a shared cache is not
        created, but the self-test runs for it.
        """
        sharing = self.sharing("check")
        self.server(sharing, shared(), "TLSv1.3")
        self.assertIsNone(sharing.ticketKeys(ServerTLS(), WHERE))
        self.assertIsNone(sharing.sessionCache(shared(), WHERE))
        self.assertEqual((sharing.ticketServices, sharing.caches), ({}, {}))
        self.assertIsNone(sharing.directory)
        self.assertEqual(self.selfTests, 1)

    def test_keyFilesValidated(self) -> None:
        """
        Key files are read, so a bad one fails the check.
        """
        sharing = self.sharing("check")
        short = os.path.join(self.dir, "short.key")
        with open(short, "wb") as f:
            f.write(b"0123456789")
        error = self.assertRaises(
            ConfigError,
            self.server,
            sharing,
            ServerTLS(ticketKeyFiles=(short,)),
            "TLSv1.3",
        )
        self.assertIn("must be 48 or 80 bytes, not 10 bytes", error.message)
        good = ServerTLS(ticketKeyFiles=(self.keyFile("good.key", 3),))
        self.server(sharing, good, "TLSv1.3")
        self.assertEqual(len(sharing.ticketServices), 1)
        self.assertIsNone(sharing.directory)


class SelfTestTests(SharingTestCase):
    def test_failure(self) -> None:
        """
        When OpenSSL lacks what ticket keys and shared caches need, the build
        stops with a L{ConfigError} at the setting's place saying why.
        """
        self.selfTestError = _openssl.OpenSSLUnavailable("no SSL_CTX_set_foo")
        cases: list[tuple[Role, ServerTLS]] = [
            ("single", ServerTLS(ticketKeyFiles=(self.keyFile("k", 1),))),
            ("single", shared(tickets=False)),
            ("master", ServerTLS()),
            ("worker", ServerTLS()),
            ("check", shared()),
        ]
        for role, tls in cases:
            sharing = self.sharing(role, self.dir)
            error = self.assertRaises(ConfigError, self.server, sharing, tls, "TLSv1.3")
            self.assertEqual(
                str(error),
                "ticket keys and shared session caches need OpenSSL entry points "
                f"that cannot be used here: no SSL_CTX_set_foo in {WHERE}",
            )
            self.assertEqual((sharing.ticketServices, sharing.caches), ({}, {}))

    def test_failureWithoutPlace(self) -> None:
        """
        Without a place (an endpoint string), the error names none.
        """
        self.selfTestError = _openssl.OpenSSLUnavailable("missing")
        sharing = self.sharing("master")
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        error = self.assertRaises(
            ConfigError,
            sharing.install,
            context,
            ServerTLS(),
            SESSION_ID_CONTEXT,
            None,
        )
        self.assertEqual((error.file, error.line), (None, None))

    def test_runsOnceWhenItPasses(self) -> None:
        """
        A passing self-test is not run again; a failing one is, next time.
        """
        self.selfTestError = _openssl.OpenSSLUnavailable("missing")
        sharing = self.sharing("master")
        self.assertRaises(ConfigError, self.server, sharing, ServerTLS(), "TLSv1.3")
        self.selfTestError = None
        for _ in range(3):
            self.server(sharing, ServerTLS(), "TLSv1.3")
            self.server(sharing, shared(), "TLSv1.3")
        self.assertEqual(self.selfTests, 2)

    def test_realSelfTest(self) -> None:
        """
        The real self-test passes here (the other tests count calls instead).
        """
        self.patch(_openssl, "selfTest", self.originalSelfTest)
        sharing = self.sharing("master")
        self.server(sharing, ServerTLS(), "TLSv1.3")
        self.server(sharing, shared(), "TLSv1.3")
        self.assertEqual(self.selfTests, 0)

    originalSelfTest = staticmethod(_openssl.selfTest)
