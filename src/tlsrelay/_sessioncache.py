"""
nginx's C{ssl_session_cache shared:NAME:SIZE}: a session-ID cache that every
worker process of one relay reads and writes, so a client resumes whichever
worker it reaches.

Design: one SQLite database per cache, in WAL mode, on a file in a private
runtime directory (C{/dev/shm} when it is there, so it never touches a disk;
else the temporary directory). The master makes the directory with
L{makeInstanceDirectory} (C{mkdtemp}: mode 0700 and a random token in its name,
so two unrelated relays never share a cache by accident), creates each cache
with L{SharedSessionCache.create}, and passes the path to its workers, which
L{SharedSessionCache.open} it. Each process has its own connection; WAL lets
readers go on while one process writes, and SQLite's locks order the writers.

    - Bound: nginx's guide says a megabyte holds about 4000 sessions, so a
      cache holds L{capacityForSize} entries. Each row gets the next C{seq};
      a trigger deletes rows more than C{capacity} inserts old, so the table
      never holds more than C{capacity} rows and the oldest go first. Sessions
      over 4096 bytes (nginx's C{NGX_SSL_MAX_SESSION_SIZE}) are not stored.
    - Expiry: a row expires C{timeout} seconds (OpenSSL passes the context's
      timeout, that is C{ssl_session_timeout}) after it was stored, by the
      injected C{now}; a lookup ignores expired rows and, as nginx does on
      each new session, the same trigger drops up to two expired oldest rows.
    - Never raises: these methods run inside OpenSSL callbacks. An error
      (the file removed, the disk full, a writer holding the lock longer than
      the 50 ms busy timeout) is logged, at most once a minute while it
      repeats, and means a miss.
    - A connection is never used across C{fork()}: a process that finds
      itself with another pid opens its own.
    - Checkpoints (copying the write-ahead log into the database) are taken
      off the handshake path: L{CheckpointService} runs one, passive (it
      waits for no reader or writer), every second in the master, which
      serves no connection. Left to SQLite, the connection that happens to
      commit the 1000th page pays for it inside a handshake (measured: up to
      8 ms); the workers' connections keep that only as a backstop, at 16 MiB.

Measured here (x86_64, 2 shared cores under other load, SQLite 3.40, on
C{/dev/shm}, 200-byte sessions, a 4000-session cache, two connections taking
turns, 20,000 operations each; medians, the means 1.5 to 2 times higher on
this busy machine): C{get} 5 µs for a hit, 4.5 µs for a miss; C{put} 25 to
37 µs (the insert, the eviction trigger and the commit); C{remove} 15 µs; a
master's checkpoint 0.3 ms. Two worker processes writing back to back with
no pause collided on the write lock past the 50 ms busy timeout twice in
20,000 puts (a logged miss); with a full handshake between puts, never. A
resumed TLS 1.2 handshake costs about 250 µs of CPU and a full one over
1 ms, and C{put} only follows a full handshake, so the cache adds about 2%
(a lookup) and 3% (a store).

An C{mmap}ed fixed-size hash table under C{flock} was measured too: the lock
pair costs 1.4 µs, so a lookup would be 3 or 4 µs. It was not chosen: it
needs a hand-written table with variable-size entries, eviction, and
recovery from a worker killed in the middle of a write, all of which SQLite
already does, for a saving of a few microseconds per handshake.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
from collections.abc import Callable
from hashlib import sha256
from typing import Protocol

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from tlsrelay._log import Logger

__all__ = [
    "DEFAULT_CHECKPOINT_INTERVAL",
    "MAX_SESSION_SIZE",
    "SESSIONS_PER_MEGABYTE",
    "CheckpointService",
    "SharedSessionCache",
    "cachePath",
    "capacityForSize",
    "makeInstanceDirectory",
    "runtimeDirectory",
]

_log = Logger()

SESSIONS_PER_MEGABYTE = 4000
"""
How many sessions nginx's guide says a megabyte of shared cache holds.
"""

DEFAULT_CHECKPOINT_INTERVAL = 1.0
"""
How often L{CheckpointService} checkpoints, in seconds.
"""

MAX_SESSION_SIZE = 4096
"""
Larger sessions (long client-certificate chains) are not stored, as in nginx.
"""

_FORMAT = 1
_BUSY_TIMEOUT_MS = 50
_ERROR_LOG_INTERVAL = 60.0
_BACKSTOP_CHECKPOINT_PAGES = 4096
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS meta (
        format INTEGER NOT NULL,
        capacity INTEGER NOT NULL,
        name TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS sessions (
        seq INTEGER PRIMARY KEY,
        id BLOB NOT NULL UNIQUE,
        stored REAL NOT NULL,
        expires REAL NOT NULL,
        data BLOB NOT NULL
    )
    """,
    """
    CREATE TRIGGER IF NOT EXISTS evict AFTER INSERT ON sessions BEGIN
        DELETE FROM sessions
            WHERE seq <= NEW.seq - (SELECT capacity FROM meta);
        DELETE FROM sessions
            WHERE seq IN (
                SELECT seq FROM sessions WHERE seq < NEW.seq ORDER BY seq LIMIT 2
            )
            AND expires <= NEW.stored;
    END
    """,
)

_GET = "SELECT data FROM sessions WHERE id = ? AND expires > ?"
_PUT = "INSERT OR REPLACE INTO sessions (id, stored, expires, data) VALUES (?, ?, ?, ?)"
_REMOVE = "DELETE FROM sessions WHERE id = ?"


def capacityForSize(size: int) -> int:
    """
    How many sessions a C{shared:NAME:SIZE} cache of C{size} bytes holds: about
    4000 per megabyte, and at least one.
    """
    return max(1, size * SESSIONS_PER_MEGABYTE // (1024 * 1024))


def runtimeDirectory() -> str:
    """
    Where shared runtime files go: C{/dev/shm} (memory, never written to disk)
    when it is a writable directory, else the temporary directory.
    """
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def makeInstanceDirectory(parent: str | None = None) -> str:
    """
    Make a new private directory (mode 0700, a random name) for one relay's
    shared files, in C{parent} or else L{runtimeDirectory}. The master makes
    it and removes it at exit; workers are given paths inside it.
    """
    return tempfile.mkdtemp(
        prefix="tlsrelay-", dir=parent if parent is not None else runtimeDirectory()
    )


def cachePath(directory: str, name: str, capacity: int) -> str:
    """
    The file of cache C{name} holding C{capacity} sessions in C{directory}.

    The capacity is part of the name, so a reload that resizes a cache starts
    a new file instead of reusing one with the old bound. A name that is not
    a plain word is replaced by a digest of it.
    """
    if not _SAFE_NAME.match(name):
        name = "x" + sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return os.path.join(directory, f"session-cache-{name}-{capacity}.sqlite")


def _connect(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=0
    )
    connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    # The cache is disposable: nothing in it must survive a crash.
    connection.execute("PRAGMA synchronous = OFF")
    connection.execute(f"PRAGMA journal_size_limit = {4 * 1024 * 1024}")
    # Checkpoints are left to CheckpointService, off the handshake path; this
    # is the backstop if it does not run (16 MiB of WAL).
    connection.execute(f"PRAGMA wal_autocheckpoint = {_BACKSTOP_CHECKPOINT_PAGES}")
    return connection


def _readMeta(connection: sqlite3.Connection, path: str) -> tuple[int, str]:
    try:
        row = connection.execute("SELECT format, capacity, name FROM meta").fetchone()
    except sqlite3.Error as e:
        raise ValueError(f'"{path}" is not a tlsrelay session cache: {e}') from None
    if row is None or row[0] != _FORMAT:
        raise ValueError(f'"{path}" is not a tlsrelay session cache of this version')
    return int(row[1]), str(row[2])


@define
class SharedSessionCache:
    """
    A L{tlsrelay._openssl.SessionStore} shared by the processes that open the
    same file. Make one with L{create} (the master) or L{open} (a worker).

    @ivar path: the database file.
    @ivar capacity: the most sessions it holds.
    @ivar name: the cache's name in the configuration.
    """

    path: str
    capacity: int
    name: str
    _now: Callable[[], float]
    _connection: sqlite3.Connection
    _pid: int = field(init=False, factory=os.getpid)
    _abandoned: list[sqlite3.Connection] = field(init=False, factory=list)
    _lastError: str = field(init=False, default="")
    _lastErrorLogged: float = field(init=False, default=float("-inf"))

    @classmethod
    def create(
        cls, path: str, capacity: int, *, now: Callable[[], float], name: str = ""
    ) -> SharedSessionCache:
        """
        Create the cache at C{path} (mode 0600), or open it if it already holds a
        cache of the same capacity.

        @raise ValueError: if the file cannot be created or holds something else.
        """
        if capacity < 1:
            raise ValueError(
                f"a session cache holds at least 1 session, not {capacity}"
            )
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(descriptor)
            connection = _connect(path)
            try:
                connection.execute("PRAGMA journal_mode = WAL")
                connection.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    connection.execute(statement)
                if connection.execute("SELECT count(*) FROM meta").fetchone()[0] == 0:
                    connection.execute(
                        "INSERT INTO meta (format, capacity, name) VALUES (?, ?, ?)",
                        (_FORMAT, capacity, name),
                    )
                connection.execute("COMMIT")
                existing, _ = _readMeta(connection, path)
            except BaseException:
                connection.close()
                raise
        except (OSError, sqlite3.Error) as e:
            raise ValueError(
                f'cannot create the shared session cache "{path}": {e}'
            ) from None
        if existing != capacity:
            connection.close()
            raise ValueError(
                f'the shared session cache "{path}" holds {existing} sessions, '
                f"not {capacity}"
            )
        return cls(path, capacity, name, now=now, connection=connection)

    @classmethod
    def open(cls, path: str, *, now: Callable[[], float]) -> SharedSessionCache:
        """
        Open the cache another process created at C{path} (a worker's side).

        @raise ValueError: if there is no cache there.
        """
        if not os.path.isfile(path):
            raise ValueError(f'there is no shared session cache "{path}"')
        try:
            connection = _connect(path)
        except sqlite3.Error as e:
            raise ValueError(
                f'cannot open the shared session cache "{path}": {e}'
            ) from None
        try:
            capacity, name = _readMeta(connection, path)
        except BaseException:
            connection.close()
            raise
        return cls(path, capacity, name, now=now, connection=connection)

    def _db(self) -> sqlite3.Connection:
        """
        This process's connection (a forked child opens its own: the parent's
        must neither be used nor closed there).
        """
        pid = os.getpid()
        if pid != self._pid:
            self._abandoned.append(self._connection)
            self._connection = _connect(self.path)
            self._pid = pid
        return self._connection

    def _failed(self, operation: str, error: Exception) -> None:
        """
        Log a failed operation, once a minute at most while the same error
        repeats.
        """
        message = f"{type(error).__name__}: {error}"
        now = self._now()
        if (
            message == self._lastError
            and now - self._lastErrorLogged < _ERROR_LOG_INTERVAL
        ):
            return
        self._lastError = message
        self._lastErrorLogged = now
        _log.warn(
            "shared session cache {cache} ({path}): {operation} failed: {error}",
            cache=self.name,
            path=self.path,
            operation=operation,
            error=message,
        )

    def get(self, sessionId: bytes) -> bytes | None:
        """
        The session stored under C{sessionId}, unless it expired; C{None} on
        any error.
        """
        try:
            row = self._db().execute(_GET, (sessionId, self._now())).fetchone()
        except Exception as e:
            self._failed("get", e)
            return None
        if row is None:
            return None
        data: bytes = row[0]
        return data

    def put(self, sessionId: bytes, session: bytes, timeout: int) -> None:
        """
        Store C{session} for C{timeout} seconds, evicting the oldest when full.
        """
        if timeout <= 0 or len(session) > MAX_SESSION_SIZE:
            return
        try:
            now = self._now()
            self._db().execute(_PUT, (sessionId, now, now + timeout, session))
        except Exception as e:
            self._failed("put", e)

    def remove(self, sessionId: bytes) -> None:
        """
        Forget the session stored under C{sessionId}.
        """
        try:
            self._db().execute(_REMOVE, (sessionId,))
        except Exception as e:
            self._failed("remove", e)

    def checkpoint(self) -> None:
        """
        Copy what the write-ahead log holds into the database, without waiting
        for readers or writers, so the log does not grow (L{CheckpointService}
        calls it).
        """
        try:
            self._db().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception as e:
            self._failed("checkpoint", e)

    def count(self) -> int:
        """
        How many sessions are stored, expired or not (for tests and statistics).
        """
        row = self._db().execute("SELECT count(*) FROM sessions").fetchone()
        return int(row[0])

    def close(self) -> None:
        """
        Close this process's connection.
        """
        self._connection.close()

    def unlink(self) -> None:
        """
        Close, and remove the cache's files (the master, at exit).
        """
        self.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(self.path + suffix)
            except FileNotFoundError:
                pass


class _Checkpointable(Protocol):
    def checkpoint(self) -> None:
        """
        Checkpoint, never raising.
        """


class CheckpointService(Service):
    """
    Checkpoints a L{SharedSessionCache} every C{interval} seconds, so that no
    handshake pays for it. Run it in the master (which serves no connection),
    or in the single process when there are no workers.
    """

    def __init__(
        self,
        cache: _Checkpointable,
        clock: IReactorTime,
        interval: float = DEFAULT_CHECKPOINT_INTERVAL,
    ) -> None:
        self.cache = cache
        self._clock = clock
        self._interval = interval
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.cache.checkpoint)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        super().stopService()  # type: ignore[no-untyped-call]
