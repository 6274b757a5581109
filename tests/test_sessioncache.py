"""
Tests for L{tlsrelay._sessioncache}: the C{shared:NAME:SIZE} session cache.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys

import trustme
from OpenSSL import SSL
from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tlsrelay._openssl import SessionStore, installSessionStore, sessionReused
from tlsrelay._sessioncache import (
    MAX_SESSION_SIZE,
    CheckpointService,
    SharedSessionCache,
    cachePath,
    capacityForSize,
    makeInstanceDirectory,
    runtimeDirectory,
)
from tlsrelay.testing import memoryHandshake


def sessionId(number: int) -> bytes:
    return number.to_bytes(32, "big")


class CacheTestCase(SynchronousTestCase):
    """
    A fresh cache on a L{Clock} in a directory of the test's own.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def create(self, capacity: int = 10, name: str = "SSL") -> SharedSessionCache:
        cache = SharedSessionCache.create(
            cachePath(self.directory, name, capacity),
            capacity,
            now=self.clock.seconds,
            name=name,
        )
        self.addCleanup(cache.close)
        return cache

    def open(self, path: str) -> SharedSessionCache:
        cache = SharedSessionCache.open(path, now=self.clock.seconds)
        self.addCleanup(cache.close)
        return cache


class SizeTests(SynchronousTestCase):
    def test_capacityForSize(self) -> None:
        """
        About 4000 sessions per megabyte, as nginx's guide says, and at least one.
        """
        self.assertEqual(capacityForSize(1024 * 1024), 4000)
        self.assertEqual(capacityForSize(20 * 1024 * 1024), 80000)
        self.assertEqual(capacityForSize(1), 1)

    def test_cachePath(self) -> None:
        """
        The name and the capacity name the file; a name that is not a plain word
        is replaced by a digest, so it cannot escape the directory.
        """
        self.assertEqual(
            cachePath("/run/x", "SSL", 4000), "/run/x/session-cache-SSL-4000.sqlite"
        )
        odd = cachePath("/run/x", "../../etc/passwd", 1)
        self.assertEqual(os.path.dirname(odd), "/run/x")
        self.assertNotIn("..", os.path.basename(odd))
        self.assertNotEqual(odd, cachePath("/run/x", "../../etc/shadow", 1))

    def test_instanceDirectory(self) -> None:
        """
        Each relay gets a new private directory, by default in the runtime
        directory.
        """
        parent = os.path.abspath(self.mktemp())
        os.makedirs(parent)
        first = makeInstanceDirectory(parent)
        second = makeInstanceDirectory(parent)
        self.assertNotEqual(first, second)
        self.assertEqual(stat.S_IMODE(os.stat(first).st_mode), 0o700)
        self.assertEqual(os.path.dirname(first), parent)
        self.assertTrue(os.path.isdir(runtimeDirectory()))


class StoreTests(CacheTestCase):
    def test_isSessionStore(self) -> None:
        """
        The cache is a L{SessionStore}.
        """
        store: SessionStore = self.create()
        self.assertIsNone(store.get(sessionId(1)))

    def test_putGetRemove(self) -> None:
        cache = self.create()
        cache.put(sessionId(1), b"one", 300)
        cache.put(sessionId(2), b"two", 300)
        self.assertEqual(cache.get(sessionId(1)), b"one")
        self.assertEqual(cache.get(sessionId(2)), b"two")
        self.assertIsNone(cache.get(sessionId(3)))
        cache.remove(sessionId(1))
        self.assertIsNone(cache.get(sessionId(1)))
        self.assertEqual(cache.get(sessionId(2)), b"two")
        cache.remove(sessionId(1))
        self.assertEqual(cache.count(), 1)

    def test_replace(self) -> None:
        """
        Storing under an ID already there replaces the session.
        """
        cache = self.create()
        cache.put(sessionId(1), b"old", 300)
        cache.put(sessionId(1), b"new", 300)
        self.assertEqual(cache.get(sessionId(1)), b"new")
        self.assertEqual(cache.count(), 1)

    def test_expiry(self) -> None:
        """
        A session expires its timeout after it was stored, by the injected clock.
        """
        cache = self.create()
        cache.put(sessionId(1), b"one", 300)
        self.clock.advance(299)
        self.assertEqual(cache.get(sessionId(1)), b"one")
        self.clock.advance(1)
        self.assertIsNone(cache.get(sessionId(1)))

    def test_expiredDroppedOnPut(self) -> None:
        """
        As in nginx, each new session drops up to two expired old ones.
        """
        cache = self.create()
        for number in range(3):
            cache.put(sessionId(number), b"x", 10)
        self.clock.advance(10)
        cache.put(sessionId(10), b"new", 10)
        self.assertEqual(cache.count(), 2)
        cache.put(sessionId(11), b"new", 10)
        self.assertEqual(cache.count(), 2)

    def test_capacity(self) -> None:
        """
        The cache never holds more than its capacity: the oldest go first.
        """
        cache = self.create(capacity=5)
        for number in range(12):
            cache.put(sessionId(number), b"%d" % number, 300)
            self.assertLessEqual(cache.count(), 5)
        self.assertEqual(cache.count(), 5)
        for number in range(7):
            self.assertIsNone(cache.get(sessionId(number)))
        for number in range(7, 12):
            self.assertEqual(cache.get(sessionId(number)), b"%d" % number)

    def test_capacityAfterRemovals(self) -> None:
        """
        Removals leave the bound intact.
        """
        cache = self.create(capacity=3)
        for number in range(3):
            cache.put(sessionId(number), b"x", 300)
        cache.remove(sessionId(2))
        for number in range(3, 8):
            cache.put(sessionId(number), b"x", 300)
            self.assertLessEqual(cache.count(), 3)

    def test_tooLarge(self) -> None:
        """
        Sessions over nginx's 4096 bytes are not stored, nor is a session with
        no time to live.
        """
        cache = self.create()
        cache.put(sessionId(1), b"x" * (MAX_SESSION_SIZE + 1), 300)
        cache.put(sessionId(2), b"x" * MAX_SESSION_SIZE, 300)
        cache.put(sessionId(3), b"x", 0)
        self.assertIsNone(cache.get(sessionId(1)))
        self.assertIsNotNone(cache.get(sessionId(2)))
        self.assertIsNone(cache.get(sessionId(3)))

    def test_fileMode(self) -> None:
        """
        The database file is readable by its owner only.
        """
        cache = self.create()
        self.assertEqual(stat.S_IMODE(os.stat(cache.path).st_mode), 0o600)

    def test_badCapacity(self) -> None:
        self.assertRaises(
            ValueError,
            SharedSessionCache.create,
            os.path.join(self.directory, "x"),
            0,
            now=self.clock.seconds,
        )


class SharingTests(CacheTestCase):
    def test_twoInstancesShare(self) -> None:
        """
        Two caches on the same file (as two workers have) see each other's
        sessions and removals; the second learns the capacity from the file.
        """
        first = self.create(capacity=4)
        second = self.open(first.path)
        self.assertEqual((second.capacity, second.name), (4, "SSL"))
        first.put(sessionId(1), b"from first", 300)
        second.put(sessionId(2), b"from second", 300)
        self.assertEqual(second.get(sessionId(1)), b"from first")
        self.assertEqual(first.get(sessionId(2)), b"from second")
        second.remove(sessionId(1))
        self.assertIsNone(first.get(sessionId(1)))
        for number in range(10, 20):
            (first, second)[number % 2].put(sessionId(number), b"x", 300)
        self.assertEqual(first.count(), 4)

    def test_createAgainOpens(self) -> None:
        """
        Creating a cache that exists with the same capacity opens it (a master
        reloading its configuration keeps its sessions).
        """
        first = self.create(capacity=4)
        first.put(sessionId(1), b"kept", 300)
        again = self.create(capacity=4)
        self.assertEqual(again.get(sessionId(1)), b"kept")

    def test_createDifferentCapacity(self) -> None:
        first = self.create(capacity=4)
        error = self.assertRaises(
            ValueError,
            SharedSessionCache.create,
            first.path,
            5,
            now=self.clock.seconds,
        )
        self.assertIn("holds 4 sessions, not 5", str(error))

    def test_openMissing(self) -> None:
        path = os.path.join(self.directory, "missing.sqlite")
        error = self.assertRaises(
            ValueError, SharedSessionCache.open, path, now=self.clock.seconds
        )
        self.assertIn(path, str(error))

    def test_openNotACache(self) -> None:
        path = os.path.join(self.directory, "other.sqlite")
        with open(path, "wb") as f:
            f.write(b"this is not a database" * 100)
        error = self.assertRaises(
            ValueError, SharedSessionCache.open, path, now=self.clock.seconds
        )
        self.assertIn(path, str(error))
        self.assertIn("not a database", str(error))

    def test_otherProcess(self) -> None:
        """
        A session stored by another process is seen here, and the other way
        round.
        """
        first = self.create(capacity=4)
        first.put(sessionId(1), b"from the parent", 300)
        script = (
            "import sys\n"
            "from tlsrelay._sessioncache import SharedSessionCache\n"
            "cache = SharedSessionCache.open(sys.argv[1], now=lambda: 1000.0)\n"
            "assert cache.get((1).to_bytes(32, 'big')) == b'from the parent'\n"
            "cache.put((2).to_bytes(32, 'big'), b'from the child', 300)\n"
        )
        subprocess.run(
            [sys.executable, "-c", script, first.path], check=True, timeout=60
        )
        self.assertEqual(first.get(sessionId(2)), b"from the child")

    def test_openNotOurs(self) -> None:
        """
        An SQLite database that is not a session cache is refused.
        """
        path = os.path.join(self.directory, "other.sqlite")
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE t (x)")
        connection.close()
        error = self.assertRaises(
            ValueError, SharedSessionCache.open, path, now=self.clock.seconds
        )
        self.assertIn(f'"{path}" is not a tlsrelay session cache', str(error))

    def test_unlink(self) -> None:
        cache = self.create()
        cache.put(sessionId(1), b"x", 300)
        cache.unlink()
        self.assertEqual(os.listdir(self.directory), [])


class CheckpointTests(CacheTestCase):
    def test_checkpoint(self) -> None:
        """
        A checkpoint moves the write-ahead log into the database; the sessions
        stay.
        """
        cache = self.create()
        cache.put(sessionId(1), b"x", 300)
        self.assertGreater(os.path.getsize(cache.path + "-wal"), 0)
        cache.checkpoint()
        self.assertEqual(cache.get(sessionId(1)), b"x")
        reader = sqlite3.connect(cache.path)
        self.addCleanup(reader.close)
        (busy, frames, done) = reader.execute(
            "PRAGMA wal_checkpoint(PASSIVE)"
        ).fetchone()
        self.assertEqual((busy, frames), (0, done))

    def test_service(self) -> None:
        """
        The service checkpoints on the clock until stopped.
        """
        calls: list[None] = []

        class Cache:
            def checkpoint(self) -> None:
                calls.append(None)

        service = CheckpointService(Cache(), self.clock, 1.0)
        self.assertTrue(verifyObject(IService, service))
        service.startService()
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(len(calls), 2)
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_checkpointNeverRaises(self) -> None:
        cache = self.create()
        cache.close()
        with capturedLogs() as events:
            cache.checkpoint()
        self.assertEqual(len(events), 1)


class FailureTests(CacheTestCase):
    def test_neverRaises(self) -> None:
        """
        With the database gone from under it, every operation logs a warning
        and means a miss; a repeated error is logged once a minute.
        """
        cache = self.create()
        cache.put(sessionId(1), b"x", 300)
        cache.close()
        with capturedLogs() as events:
            self.assertIsNone(cache.get(sessionId(1)))
            cache.put(sessionId(2), b"x", 300)
            cache.remove(sessionId(1))
            self.assertIsNone(cache.get(sessionId(1)))
            self.clock.advance(60)
            self.assertIsNone(cache.get(sessionId(1)))
        self.assertEqual(len(events), 2)
        for event in events:
            self.assertEqual(event["log_level"], LogLevel.warn)
            self.assertEqual(event["path"], cache.path)
            self.assertIn("ProgrammingError", event["error"])

    def test_afterFork(self) -> None:
        """
        A process that finds itself with another pid (a forked child) opens
        its own connection and leaves the parent's alone.
        """
        cache = self.create()
        cache.put(sessionId(1), b"x", 300)
        inherited = cache._connection
        cache._pid = -1
        self.assertEqual(cache.get(sessionId(1)), b"x")
        self.assertIsNot(cache._connection, inherited)
        self.assertEqual(cache._abandoned, [inherited])
        inherited.close()


class ResumptionTests(CacheTestCase):
    """
    Two server contexts, as in two workers, with tickets off and the cache
    shared.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ca = trustme.CA()
        self.leaf = self.ca.issue_cert("relay.example")

    def server(self, version: int, store: SessionStore) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.leaf.configure_cert(context)
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        context.set_options(SSL.OP_NO_TICKET)
        # ssl_session_timeout: the timeout OpenSSL passes to the store.
        context.set_timeout(300)
        installSessionStore(context, store, sessionIdContext=b"same everywhere")
        return context

    def client(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.ca.configure_trust(context)
        context.set_verify(SSL.VERIFY_PEER)
        return context

    def handshake(
        self, server: SSL.Context, client: SSL.Context, session: SSL.Session | None
    ) -> tuple[SSL.Connection, SSL.Connection]:
        connections = memoryHandshake(server, client, session=session)
        self.addCleanup(shutDown, *connections)
        return connections

    def test_tls12(self) -> None:
        """
        A TLS 1.2 session ID from one context resumes on the other through the
        cache, until the cache's timeout passes.
        """
        first = self.create(capacity=100)
        second = self.open(first.path)
        firstServer = self.server(SSL.TLS1_2_VERSION, first)
        secondServer = self.server(SSL.TLS1_2_VERSION, second)
        client = self.client()
        _, clientConnection = self.handshake(firstServer, client, None)
        session = clientConnection.get_session()
        self.assertEqual(first.count(), 1)
        serverConnection, clientConnection = self.handshake(
            secondServer, client, session
        )
        self.assertTrue(sessionReused(serverConnection))
        self.assertTrue(sessionReused(clientConnection))
        self.clock.advance(301)
        serverConnection, _ = self.handshake(secondServer, client, session)
        self.assertFalse(sessionReused(serverConnection))

    def test_tls13StatefulTickets(self) -> None:
        """
        In TLS 1.3 with tickets off, OpenSSL sends stateful tickets (the ticket
        is just the session's ID) and keeps the session in the cache: the other
        context resumes it from there. A resumption issues a new ticket, stored
        too, and does not use up the old one (OpenSSL removes it only when
        early data is on).
        """
        first = self.create(capacity=100)
        second = self.open(first.path)
        firstServer = self.server(SSL.TLS1_3_VERSION, first)
        secondServer = self.server(SSL.TLS1_3_VERSION, second)
        client = self.client()
        _, clientConnection = self.handshake(firstServer, client, None)
        session = clientConnection.get_session()
        stored = first.count()
        self.assertGreaterEqual(stored, 1)
        serverConnection, clientConnection = self.handshake(
            secondServer, client, session
        )
        self.assertTrue(sessionReused(serverConnection))
        self.assertGreater(first.count(), stored)
        renewed = clientConnection.get_session()
        for server, offered in ((firstServer, session), (firstServer, renewed)):
            serverConnection, _ = self.handshake(server, client, offered)
            self.assertTrue(sessionReused(serverConnection))
        self.clock.advance(301)
        serverConnection, _ = self.handshake(secondServer, client, renewed)
        self.assertFalse(sessionReused(serverConnection))

    def test_withoutSharingNoResumption(self) -> None:
        """
        Two unrelated caches (two relays) do not resume each other's sessions.
        """
        first = self.create(capacity=100, name="one")
        second = self.create(capacity=100, name="two")
        client = self.client()
        _, clientConnection = self.handshake(
            self.server(SSL.TLS1_2_VERSION, first), client, None
        )
        serverConnection, _ = self.handshake(
            self.server(SSL.TLS1_2_VERSION, second),
            client,
            clientConnection.get_session(),
        )
        self.assertFalse(sessionReused(serverConnection))


def shutDown(*connections: SSL.Connection) -> None:
    """
    Send close_notify, so OpenSSL does not drop the session from the cache
    when the connection is freed.
    """
    for connection in connections:
        try:
            connection.shutdown()
        except SSL.Error:
            pass
