"""
Tests for L{tlsrelay._tickets}: the key ring, nginx key files, and rotation
on a L{Clock}, with in-memory handshakes for what OpenSSL makes of it.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Sequence

import trustme
from OpenSSL import SSL
from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests._helpers import closeCleanly
from tlsrelay._openssl import TicketKey, installTicketKeys, sessionReused
from tlsrelay._tickets import (
    DEFAULT_FOLLOW_INTERVAL,
    DEFAULT_STAGING_DELAY,
    FileKeySource,
    KeyDirectory,
    KeyRing,
    KeyState,
    ScheduledKey,
    TicketKeyRotationService,
    ticketKeyDirectory,
)
from tlsrelay.testing import memoryHandshake

STAGED, CURRENT, RETIRED, GONE = (
    KeyState.STAGED,
    KeyState.CURRENT,
    KeyState.RETIRED,
    KeyState.GONE,
)


def keyBytes(seed: int, size: int = 80) -> bytes:
    """
    C{size} distinct, reproducible bytes: an nginx key file.
    """
    return bytes((seed * 7 + i) % 256 for i in range(size))


def key(seed: int) -> TicketKey:
    return TicketKey.fromBytes(keyBytes(seed))


class CountingRandom:
    """
    A deterministic C{randomBytes}: each call returns new bytes.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, size: int) -> bytes:
        self.calls += 1
        return keyBytes(self.calls, size)


def secretsIn(keys: Sequence[TicketKey]) -> list[str]:
    """
    Every way a key's secrets could appear in a log line.
    """
    found = []
    for k in keys:
        for secret in (k.hmacKey, k.aesKey, k.toBytes()):
            found += [secret.hex(), repr(secret)]
    return found


class KeyRingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(10)
        self.ring = KeyRing(self.clock.seconds, lifetime=50)

    def states(self, *keys: TicketKey) -> list[KeyState]:
        return [self.ring.state(k.name) for k in keys]

    def test_noKeysYet(self) -> None:
        """
        Before it has keys, the ring raises (OpenSSL then neither issues nor
        accepts tickets) and has no current key.
        """
        self.assertRaises(RuntimeError, self.ring.keys)
        self.assertIsNone(self.ring.current)
        self.ring.refresh()
        self.assertIsNone(self.ring.nextChange())

    def test_stagedCurrentRetiredGone(self) -> None:
        """
        A key is staged until its time, then current; the key before it is
        retired, decrypting for the lifetime, then gone.
        """
        first, second = key(1), key(2)
        self.ring.update([ScheduledKey(first, 0.0), ScheduledKey(second, 100.0)])
        self.assertEqual(self.states(first, second), [CURRENT, STAGED])
        self.assertEqual(self.ring.keys(), (first, (second,)))
        self.assertEqual(self.ring.current, first)
        self.assertEqual(self.ring.nextChange(), 100.0)

        self.clock.advance(89.5)
        self.ring.refresh()
        self.assertEqual(self.states(first, second), [CURRENT, STAGED])
        self.clock.advance(0.5)
        self.ring.refresh()
        self.assertEqual(self.states(first, second), [RETIRED, CURRENT])
        self.assertEqual(self.ring.keys(), (second, (first,)))
        self.assertEqual(self.ring.nextChange(), 150.0)

        self.clock.advance(49.5)
        self.ring.refresh()
        self.assertEqual(self.states(first, second), [RETIRED, CURRENT])
        self.clock.advance(0.5)
        self.ring.refresh()
        self.assertEqual(self.states(first, second), [GONE, CURRENT])
        self.assertEqual(self.ring.keys(), (second, ()))
        self.assertIsNone(self.ring.nextChange())

    def test_decryptOnly(self) -> None:
        """
        A key with no start time only decrypts: staged if it never encrypted
        here, retired if it did; it never expires by time.
        """
        first, second = key(1), key(2)
        self.ring.update([ScheduledKey(first, 0.0), ScheduledKey(second)])
        self.assertEqual(self.states(first, second), [CURRENT, STAGED])
        self.ring.update([ScheduledKey(second, 10.0), ScheduledKey(first)])
        self.assertEqual(self.states(first, second), [RETIRED, CURRENT])
        self.clock.advance(1e9)
        self.ring.refresh()
        self.assertEqual(self.states(first, second), [RETIRED, CURRENT])
        self.assertIsNone(self.ring.nextChange())

    def test_droppedFromSchedule(self) -> None:
        """
        A key no longer in the schedule is gone at once.
        """
        first, second = key(1), key(2)
        self.ring.update([ScheduledKey(first, 0.0), ScheduledKey(second)])
        self.ring.update([ScheduledKey(first, 0.0)])
        self.assertEqual(self.states(first, second), [CURRENT, GONE])
        self.assertEqual(self.ring.keys(), (first, ()))

    def test_latestDueEncrypts(self) -> None:
        """
        Of several keys whose time has come, the latest encrypts; the others
        are retired from when the next one started.
        """
        keys = [key(n) for n in range(3)]
        self.ring.lifetime = 5
        self.ring.update(
            [
                ScheduledKey(keys[0], 0.0),
                ScheduledKey(keys[2], 9.0),
                ScheduledKey(keys[1], 3.0),
            ]
        )
        self.assertEqual(self.states(*keys), [GONE, RETIRED, CURRENT])
        self.assertEqual(self.ring.nextChange(), 14.0)

    def test_noKeyDueYet(self) -> None:
        """
        If no key's time has come, the earliest staged one encrypts anyway,
        with a warning: a ring always has a key that encrypts.
        """
        first, second = key(1), key(2)
        with capturedLogs() as events:
            self.ring.update([ScheduledKey(second, 200.0), ScheduledKey(first, 100.0)])
        self.assertEqual(self.ring.current, first)
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["name"], first.name.hex())

    def test_badSchedule(self) -> None:
        """
        An empty schedule, or one naming a key twice, is refused and the ring
        keeps its keys.
        """
        first = key(1)
        self.ring.update([ScheduledKey(first, 0.0)])
        self.assertRaises(ValueError, self.ring.update, [])
        twice = [ScheduledKey(first, 0.0), ScheduledKey(first)]
        self.assertRaises(ValueError, self.ring.update, twice)
        self.assertEqual(self.ring.keys(), (first, ()))

    def test_logsNamesNotSecrets(self) -> None:
        """
        Each change is logged with the key's name in hex, never its secrets.
        """
        first, second = key(1), key(2)
        with capturedLogs() as events:
            self.ring.update([ScheduledKey(first, 0.0), ScheduledKey(second, 100.0)])
            self.clock.advance(90)
            self.ring.refresh()
            self.clock.advance(50)
            self.ring.refresh()
        text = [formatEvent(e) for e in events]
        self.assertEqual(len(text), 5, text)
        self.assertIn(first.name.hex(), text[0])
        self.assertIn("staged", text[1])
        self.assertIn("gone", text[4])
        for line in text:
            for secret in secretsIn([first, second]):
                self.assertNotIn(secret, line)


def writeFile(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


class FileKeySourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def path(self, name: str, data: bytes | None = None) -> str:
        path = os.path.join(self.directory, name)
        if data is not None:
            writeFile(path, data)
        return path

    def test_bothSizes(self) -> None:
        """
        80- and 48-byte files are read in order.
        """
        paths = (self.path("a.key", keyBytes(1)), self.path("b.key", keyBytes(2, 48)))
        keys = FileKeySource(paths).read()
        self.assertEqual(
            keys,
            (TicketKey.fromBytes(keyBytes(1)), TicketKey.fromBytes(keyBytes(2, 48))),
        )
        self.assertEqual(keys[1].cipher, "aes-128-cbc")

    def test_missing(self) -> None:
        path = self.path("missing.key")
        error = self.assertRaises(ValueError, FileKeySource((path,)).read)
        self.assertEqual(
            str(error),
            f'cannot read ssl_session_ticket_key "{path}": No such file or directory',
        )

    def test_badLength(self) -> None:
        path = self.path("short.key", keyBytes(1, 47))
        error = self.assertRaises(ValueError, FileKeySource((path,)).read)
        self.assertEqual(
            str(error),
            f'ssl_session_ticket_key "{path}" must be 48 or 80 bytes, not 47 bytes',
        )

    def test_huge(self) -> None:
        """
        A huge file is not read whole.
        """
        path = self.path("huge.key", b"x" * 100000)
        error = self.assertRaises(ValueError, FileKeySource((path,)).read)
        self.assertIn("not more than 4096 bytes", str(error))

    def test_none(self) -> None:
        self.assertRaises(ValueError, FileKeySource(()).read)

    def test_sameKeyTwice(self) -> None:
        """
        The same key in two files counts once; two different keys with the
        same name are an error naming both files.
        """
        first = self.path("a.key", keyBytes(1))
        same = self.path("b.key", keyBytes(1))
        self.assertEqual(len(FileKeySource((first, same)).read()), 1)
        other = self.path("c.key", keyBytes(1)[:16] + keyBytes(2)[16:])
        error = self.assertRaises(ValueError, FileKeySource((first, other)).read)
        self.assertIn(f'"{other}" has the same key name', str(error))
        self.assertIn(f'as "{first}"', str(error))


class KeyDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(os.path.abspath(self.mktemp()), "tickets")
        self.directory = KeyDirectory(self.path)

    def test_roundTrip(self) -> None:
        """
        A schedule written is read back, latest start first; files are mode
        0600 in a 0700 directory, with no temporary file left.
        """
        schedule = [
            ScheduledKey(key(1), 1000.5),
            ScheduledKey(TicketKey.fromBytes(keyBytes(3, 48))),
            ScheduledKey(key(2), 1300.25),
        ]
        self.directory.write(schedule)
        self.assertEqual(
            KeyDirectory(self.path).read(),
            (schedule[2], schedule[0], schedule[1]),
        )
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o700)
        names = sorted(os.listdir(self.path))
        self.assertEqual(len(names), 3)
        for name in names:
            self.assertTrue(name.endswith(".key"), name)
            mode = os.stat(os.path.join(self.path, name)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o600)

    def test_removesOldKeys(self) -> None:
        """
        Keys no longer in the schedule are removed; other files are left.
        """
        self.directory.write([ScheduledKey(key(1), 0.0), ScheduledKey(key(2), 5.0)])
        writeFile(os.path.join(self.path, "README"), b"")
        self.directory.write([ScheduledKey(key(2), 5.0)])
        self.assertEqual(self.directory.read(), (ScheduledKey(key(2), 5.0),))
        self.assertIn("README", os.listdir(self.path))

    def test_empty(self) -> None:
        os.makedirs(self.path)
        error = self.assertRaises(ValueError, self.directory.read)
        self.assertIn("no ticket keys", str(error))

    def test_missing(self) -> None:
        error = self.assertRaises(ValueError, self.directory.read)
        self.assertIn(self.path, str(error))

    def test_badFile(self) -> None:
        """
        A key file of the wrong size, or holding another key than its name
        says, is an error naming the file.
        """
        self.directory.write([ScheduledKey(key(1), 0.0)])
        (name,) = os.listdir(self.path)
        path = os.path.join(self.path, name)
        writeFile(path, b"short")
        error = self.assertRaises(ValueError, KeyDirectory(self.path).read)
        self.assertIn(f'"{path}" must be 48 or 80 bytes', str(error))
        writeFile(path, keyBytes(2))
        error = self.assertRaises(ValueError, KeyDirectory(self.path).read)
        self.assertIn(f'"{path}" holds key', str(error))


class RotationTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def start(self, service: TicketKeyRotationService) -> TicketKeyRotationService:
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def keyFile(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        writeFile(path, data)
        return path


class FileRotationTests(RotationTestCase):
    def fromFiles(
        self, *seeds: int, stagingDelay: float | None = None
    ) -> TicketKeyRotationService:
        self.paths = [
            self.keyFile(name, keyBytes(seed))
            for name, seed in zip(("current.key", "previous.key"), seeds)
        ]
        return self.start(
            TicketKeyRotationService.fromFiles(
                self.paths,
                clock=self.clock,
                checkInterval=10,
                stagingDelay=stagingDelay,
            )
        )

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IService, self.fromFiles(1)))

    def test_firstEncryptsAllDecrypt(self) -> None:
        service = self.fromFiles(1, 2)
        self.assertEqual(service.keys(), (key(1), (key(2),)))

    def test_badFileAtStart(self) -> None:
        """
        A bad file fails the construction, so start-up fails with its name.
        """
        path = self.keyFile("bad.key", b"x" * 79)
        error = self.assertRaises(
            ValueError, TicketKeyRotationService.fromFiles, [path], clock=self.clock
        )
        self.assertIn(f'"{path}" must be 48 or 80 bytes, not 79', str(error))

    def test_changeDetected(self) -> None:
        """
        Files changed on disk (seed 000's rotation: a new current, the old one
        previous) are noticed within the check interval, logged by key name.
        """
        service = self.fromFiles(1)
        writeFile(self.paths[0], keyBytes(2))
        self.clock.advance(9)
        self.assertEqual(service.keys(), (key(1), ()))
        with capturedLogs() as events:
            self.clock.advance(1)
        self.assertEqual(service.keys(), (key(2), ()))
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn(key(2).name.hex(), text)
        for secret in secretsIn([key(1), key(2)]):
            self.assertNotIn(secret, text)

    def test_rotationAsSeed000(self) -> None:
        """
        current.key and previous.key: the new key encrypts, the old decrypts;
        a new rotation drops the oldest.
        """
        service = self.fromFiles(2, 1)
        self.assertEqual(service.keys(), (key(2), (key(1),)))
        writeFile(self.paths[1], keyBytes(2))
        writeFile(self.paths[0], keyBytes(3))
        self.clock.advance(10)
        self.assertEqual(service.keys(), (key(3), (key(2),)))
        self.assertEqual(service.ring.state(key(2).name), RETIRED)
        self.assertEqual(service.ring.state(key(1).name), GONE)

    def test_badFileKeepsKeys(self) -> None:
        """
        A file gone bad is logged once, as an error naming it, and the keys in
        use stay; once fixed, the new keys are used.
        """
        service = self.fromFiles(1, 2)
        writeFile(self.paths[1], b"truncated")
        with capturedLogs() as events:
            self.clock.advance(10)
            self.clock.advance(10)
        self.assertEqual(service.keys(), (key(1), (key(2),)))
        [error] = events
        self.assertEqual(error["log_level"], LogLevel.error)
        self.assertIn(self.paths[1], formatEvent(error))
        self.assertIn("must be 48 or 80 bytes, not 9 bytes", formatEvent(error))
        os.unlink(self.paths[0])
        with capturedLogs() as events:
            self.clock.advance(10)
        self.assertIn("No such file", formatEvent(events[0]))
        self.assertEqual(service.keys(), (key(1), (key(2),)))
        writeFile(self.paths[0], keyBytes(3))
        writeFile(self.paths[1], keyBytes(1))
        with capturedLogs() as events:
            self.clock.advance(10)
        self.assertEqual(service.keys(), (key(3), (key(1),)))
        self.assertIn(
            "read again after an error", " ".join(formatEvent(e) for e in events)
        )

    def test_reload(self) -> None:
        """
        reload() (SIGHUP) reads the files at once, and says whether it could.
        """
        service = self.fromFiles(1)
        writeFile(self.paths[0], keyBytes(2))
        self.assertTrue(service.reload())
        self.assertEqual(service.keys(), (key(2), ()))
        writeFile(self.paths[0], b"")
        with capturedLogs():
            self.assertFalse(service.reload())
        self.assertEqual(service.keys(), (key(2), ()))

    def test_stop(self) -> None:
        service = self.fromFiles(1)
        self.assertTrue(self.clock.getDelayedCalls())
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        writeFile(self.paths[0], keyBytes(2))
        self.clock.advance(100)
        self.assertEqual(service.keys(), (key(1), ()))

    def test_stagingDelay(self) -> None:
        """
        With a staging delay, a new first key only decrypts for that long while
        the current key, still listed, keeps encrypting.
        """
        service = self.fromFiles(1, 0, stagingDelay=30)
        writeFile(self.paths[0], keyBytes(2))
        writeFile(self.paths[1], keyBytes(1))
        self.clock.advance(10)
        self.assertEqual(service.keys(), (key(1), (key(2),)))
        self.assertEqual(service.ring.state(key(2).name), STAGED)
        self.clock.advance(29.9)
        self.assertEqual(service.keys()[0], key(1))
        self.clock.advance(0.1)
        self.assertEqual(service.keys(), (key(2), (key(1),)))
        self.assertEqual(service.ring.state(key(1).name), RETIRED)

    def test_stagingNeedsTheOldKey(self) -> None:
        """
        If the files drop the current key, the new one encrypts at once: the
        old one can no longer.
        """
        service = self.fromFiles(1, stagingDelay=30)
        writeFile(self.paths[0], keyBytes(2))
        self.clock.advance(10)
        self.assertEqual(service.keys(), (key(2), ()))

    def test_alreadyStagedByOperator(self) -> None:
        """
        A key the files already listed (staged by the operator) encrypts at
        once when it becomes the first.
        """
        service = self.fromFiles(1, 2, stagingDelay=30)
        writeFile(self.paths[0], keyBytes(2))
        writeFile(self.paths[1], keyBytes(1))
        self.clock.advance(10)
        self.assertEqual(service.keys(), (key(2), (key(1),)))


class GeneratedRotationTests(RotationTestCase):
    def generating(
        self, lifetime: float = 300, interval: float | None = None
    ) -> TicketKeyRotationService:
        self.random = CountingRandom()
        return self.start(
            TicketKeyRotationService.generating(
                clock=self.clock,
                randomBytes=self.random,
                lifetime=lifetime,
                interval=interval,
            )
        )

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IService, self.generating()))

    def test_rotation(self) -> None:
        """
        As in nginx: a current key and the next one, staged a whole interval
        (default: the lifetime) before it encrypts; at each interval the next
        becomes current, the current retires for the lifetime, and a new next
        is made. At most three keys at a time.
        """
        service = self.generating(lifetime=300)
        first = TicketKey.fromBytes(keyBytes(1))
        second = TicketKey.fromBytes(keyBytes(2))
        self.assertEqual(service.keys(), (first, (second,)))
        self.assertEqual(service.ring.state(second.name), STAGED)
        self.clock.advance(299)
        self.assertEqual(service.keys()[0], first)
        self.clock.advance(1)
        third = TicketKey.fromBytes(keyBytes(3))
        self.assertEqual(service.keys(), (second, (third, first)))
        self.assertEqual(
            [service.ring.state(k.name) for k in (first, second, third)],
            [RETIRED, CURRENT, STAGED],
        )
        for _ in range(10):
            self.clock.advance(300)
            self.assertEqual(len(service.keys()[1]), 2)
        self.assertEqual(service.ring.state(first.name), GONE)
        self.assertEqual(self.random.calls, 13)

    def test_retirementLastsTheLifetime(self) -> None:
        """
        With keys rotated more often than tickets live, a key decrypts for the
        whole lifetime after it stopped encrypting.
        """
        service = self.generating(lifetime=300, interval=100)
        first = service.keys()[0]
        self.clock.advance(100)
        self.assertEqual(service.ring.state(first.name), RETIRED)
        self.clock.pump([1] * 299)
        self.assertEqual(service.ring.state(first.name), RETIRED)
        current, decrypting = service.keys()
        self.assertIn(first, decrypting)
        # three retired (the first one among them) and the next
        self.assertEqual(len(decrypting), 4)
        self.clock.advance(1)
        self.assertEqual(service.ring.state(first.name), GONE)
        self.assertNotIn(first, service.keys()[1])
        self.assertEqual(service.ring.state(current.name), RETIRED)
        self.assertEqual(len(service.keys()[1]), 4)

    def test_badInterval(self) -> None:
        for interval, lifetime in ((0, 300), (300, 0), (-1, 300)):
            self.assertRaises(
                ValueError,
                TicketKeyRotationService.generating,
                clock=self.clock,
                randomBytes=os.urandom,
                lifetime=lifetime,
                interval=interval,
            )

    def test_late(self) -> None:
        """
        A reactor that was late (a suspended machine) catches up without
        making a key per missed interval, still staging the next one.
        """
        service = self.generating(lifetime=300)
        self.clock.advance(10000)
        current, decrypting = service.keys()
        self.assertEqual(current, TicketKey.fromBytes(keyBytes(2)))
        self.assertEqual(service.ring.state(decrypting[0].name), STAGED)
        self.assertLessEqual(self.random.calls, 4)


class PublishTests(RotationTestCase):
    """
    A master publishing its keys in a L{KeyDirectory}, workers following it.
    """

    def setUp(self) -> None:
        super().setUp()
        self.published = os.path.join(self.directory, "tickets")
        self.random = CountingRandom()

    def master(self, lifetime: float = 300) -> TicketKeyRotationService:
        return self.start(
            TicketKeyRotationService.generating(
                clock=self.clock,
                randomBytes=self.random,
                lifetime=lifetime,
                publishTo=self.published,
            )
        )

    def worker(self) -> TicketKeyRotationService:
        return self.start(
            TicketKeyRotationService.following(self.published, clock=self.clock)
        )

    def assertEveryoneDecrypts(
        self, services: Sequence[TicketKeyRotationService]
    ) -> None:
        """
        Every service decrypts what every other encrypts.
        """
        for encrypting in services:
            current = encrypting.keys()[0]
            for decrypting in services:
                own, others = decrypting.keys()
                self.assertIn(current, (own, *others), self.clock.seconds())

    def test_stagedEverywhereFirst(self) -> None:
        """
        Through several rotations, with workers reading the directory at
        different moments, no process ever encrypts with a key another cannot
        decrypt, and all switch at the same instant.
        """
        master = self.master(lifetime=60)
        self.clock.advance(0.3)
        first = self.worker()
        self.clock.advance(0.4)
        second = self.worker()
        services = [master, first, second]
        seen = set()
        for _ in range(int(5 * 60 / 0.1)):
            self.clock.advance(0.1)
            self.assertEveryoneDecrypts(services)
            seen.add(master.keys()[0])
        self.assertGreaterEqual(len(seen), 5)
        self.clock.advance(DEFAULT_FOLLOW_INTERVAL)
        self.assertEqual(first.keys(), master.keys())
        self.assertEqual(second.keys(), master.keys())

    def test_files(self) -> None:
        """
        Published files are 0600, at most three (previous, current, next).
        """
        self.master(lifetime=60)
        for _ in range(5):
            self.clock.advance(60)
            names = os.listdir(self.published)
            self.assertLessEqual(len(names), 3)
            for name in names:
                mode = os.stat(os.path.join(self.published, name)).st_mode
                self.assertEqual(stat.S_IMODE(mode), 0o600)

    def test_lateWorker(self) -> None:
        """
        A worker started late (restarted, or after a reload) knows at once which
        key is current.
        """
        master = self.master(lifetime=60)
        self.clock.advance(150)
        worker = self.worker()
        self.assertEqual(worker.keys(), master.keys())
        self.assertEqual(worker.ring.current, master.ring.current)

    def test_masterReloaded(self) -> None:
        """
        A master rebuilt on the same directory (a configuration reload)
        continues the keys there instead of starting over.
        """
        master = self.master(lifetime=60)
        self.clock.advance(70)
        before = master.keys()
        master.stopService()
        again = self.master(lifetime=60)
        self.assertEqual(again.keys(), before)

    def test_filesPublishedWithStaging(self) -> None:
        """
        A master reading nginx key files publishes a new first key staged for
        the staging delay, so every worker has it before any encrypts with it.
        """
        current = self.keyFile("current.key", keyBytes(1))
        previous = self.keyFile("previous.key", keyBytes(2))
        master = self.start(
            TicketKeyRotationService.fromFiles(
                [current, previous], clock=self.clock, publishTo=self.published
            )
        )
        worker = self.worker()
        self.assertEqual(worker.keys(), (key(1), (key(2),)))
        writeFile(previous, keyBytes(1))
        writeFile(current, keyBytes(3))
        self.assertTrue(master.reload())
        self.clock.advance(DEFAULT_FOLLOW_INTERVAL)
        self.assertEqual(worker.keys(), (key(1), (key(3),)))
        self.assertEqual(worker.ring.state(key(3).name), STAGED)
        self.clock.advance(DEFAULT_STAGING_DELAY - DEFAULT_FOLLOW_INTERVAL)
        self.assertEqual(worker.keys(), (key(3), (key(1),)))
        self.assertEqual(master.keys(), (key(3), (key(1),)))

    def test_directoryNames(self) -> None:
        """
        A key set's directory is named by the configuration alone: the files,
        or the lifetime and interval of generated keys.
        """
        base = "/dev/shm/tlsrelay-x"
        files = ticketKeyDirectory(base, ["/a.key", "/b.key"], 300)
        self.assertEqual(os.path.dirname(files), base)
        self.assertEqual(files, ticketKeyDirectory(base, ["/a.key", "/b.key"], 60))
        names = {
            files,
            ticketKeyDirectory(base, ["/b.key", "/a.key"], 300),
            ticketKeyDirectory(base, [], 300),
            ticketKeyDirectory(base, [], 300, 100),
            ticketKeyDirectory(base, [], 600),
        }
        self.assertEqual(len(names), 5)

    def test_workerWithoutKeys(self) -> None:
        error = self.assertRaises(
            ValueError,
            TicketKeyRotationService.following,
            self.published,
            clock=self.clock,
        )
        self.assertIn(self.published, str(error))

    def test_workerBadFile(self) -> None:
        """
        A bad file in the directory is logged, and the worker keeps its keys.
        """
        master = self.master()
        worker = self.worker()
        writeFile(os.path.join(self.published, f"d-{'0' * 32}.key"), b"bad")
        with capturedLogs() as events:
            self.clock.advance(DEFAULT_FOLLOW_INTERVAL)
        self.assertEqual(worker.keys(), master.keys())
        [error] = events
        self.assertEqual(error["log_level"], LogLevel.error)

    def test_marginTooShort(self) -> None:
        """
        With workers, a staging margin they may not notice in time is refused.
        """
        error = self.assertRaises(
            ValueError,
            TicketKeyRotationService.generating,
            clock=self.clock,
            randomBytes=os.urandom,
            lifetime=300,
            interval=1,
            publishTo=self.published,
        )
        self.assertIn("rotation interval must be at least 2s", str(error))
        path = self.keyFile("current.key", keyBytes(1))
        self.assertRaises(
            ValueError,
            TicketKeyRotationService.fromFiles,
            [path],
            clock=self.clock,
            publishTo=self.published,
            stagingDelay=0,
        )

    def test_publishFails(self) -> None:
        """
        A directory that cannot be written fails a master's start-up.
        """
        writeFile(self.published, b"not a directory")
        self.assertRaises(
            OSError,
            TicketKeyRotationService.generating,
            clock=self.clock,
            randomBytes=os.urandom,
            lifetime=60,
            publishTo=self.published,
        )


class ResumptionTests(RotationTestCase):
    """
    What OpenSSL makes of the rings, in memory: two server contexts stand for
    two processes or two instances.
    """

    VERSIONS = (("TLS 1.2", SSL.TLS1_2_VERSION), ("TLS 1.3", SSL.TLS1_3_VERSION))

    def setUp(self) -> None:
        super().setUp()
        self.ca = trustme.CA()
        self.leaf = self.ca.issue_cert("relay.example")

    def server(
        self,
        version: int,
        keys: Callable[[], tuple[TicketKey, Sequence[TicketKey]]],
    ) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.leaf.configure_cert(context)
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        installTicketKeys(context, keys, sessionIdContext=b"same everywhere")
        return context

    def client(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.ca.configure_trust(context)
        context.set_verify(SSL.VERIFY_PEER)
        return context

    def handshake(
        self, server: SSL.Context, client: SSL.Context, session: SSL.Session | None
    ) -> tuple[bool, SSL.Session]:
        """
        Whether a handshake offering C{session} resumed, and the client's
        session after it.
        """
        serverConnection, clientConnection = memoryHandshake(
            server, client, session=session
        )
        self.addCleanup(closeCleanly, serverConnection, clientConnection)
        reused = sessionReused(serverConnection)
        self.assertEqual(sessionReused(clientConnection), reused)
        after = clientConnection.get_session()
        assert after is not None
        return reused, after

    def test_oldTicketRenewed(self) -> None:
        """
        After a rotation a ticket under the retired key resumes and is renewed
        under the current key: once the old key is gone, the renewed ticket
        still resumes and the old one means a full handshake, with no error.
        """
        for label, version in self.VERSIONS:
            service = self.start(
                TicketKeyRotationService.generating(
                    clock=self.clock, randomBytes=os.urandom, lifetime=300
                )
            )
            first = self.server(version, service.keys)
            second = self.server(version, service.keys)
            client = self.client()
            _, old = self.handshake(first, client, None)
            oldKey = service.keys()[0]
            self.clock.advance(300)
            self.assertEqual(service.ring.state(oldKey.name), RETIRED)
            reused, renewed = self.handshake(second, client, old)
            self.assertTrue(reused, label)
            self.clock.advance(300)
            self.assertEqual(service.ring.state(oldKey.name), GONE)
            with capturedLogs() as events:
                reused, _ = self.handshake(first, client, renewed)
                self.assertTrue(reused, label)
                reused, _ = self.handshake(second, client, old)
                self.assertFalse(reused, label)
            self.assertEqual(events, [], label)
            service.stopService()

    def test_sharedFilesAcrossInstances(self) -> None:
        """
        Two instances reading the same key files resume each other's tickets.
        After seed 000's rotation (the new key in current.key, the old one in
        previous.key) an old ticket still resumes on both, renewed; after the
        next rotation it means a full handshake, with no error, while the
        renewed ticket resumes.
        """
        current = self.keyFile("current.key", b"")
        previous = self.keyFile("previous.key", b"")
        for label, version in self.VERSIONS:
            writeFile(current, keyBytes(1))
            writeFile(previous, keyBytes(0))
            instances = [
                self.start(
                    TicketKeyRotationService.fromFiles(
                        [current, previous], clock=self.clock, checkInterval=10
                    )
                )
                for _ in range(2)
            ]
            servers = [self.server(version, s.keys) for s in instances]
            client = self.client()
            _, old = self.handshake(servers[0], client, None)
            reused, _ = self.handshake(servers[1], client, old)
            self.assertTrue(reused, label)

            writeFile(previous, keyBytes(1))
            writeFile(current, keyBytes(2))
            self.clock.advance(10)
            renewed = []
            for server in servers:
                reused, session = self.handshake(server, client, old)
                self.assertTrue(reused, label)
                renewed.append(session)

            writeFile(previous, keyBytes(2))
            writeFile(current, keyBytes(3))
            self.clock.advance(10)
            with capturedLogs() as events:
                for server, session in zip(servers, renewed):
                    reused, _ = self.handshake(server, client, old)
                    self.assertFalse(reused, label)
                    reused, _ = self.handshake(server, client, session)
                    self.assertTrue(reused, label)
            self.assertEqual(events, [], label)
            for instance in instances:
                instance.stopService()

    def test_stagedKeyDecrypts(self) -> None:
        """
        A ticket from a process already encrypting with a new key resumes on
        one where the key is still staged.
        """
        for label, version in self.VERSIONS:
            ahead = KeyRing(self.clock.seconds)
            behind = KeyRing(self.clock.seconds)
            ahead.update([ScheduledKey(key(2), 0.0), ScheduledKey(key(1))])
            behind.update([ScheduledKey(key(1), 0.0), ScheduledKey(key(2))])
            self.assertEqual(behind.state(key(2).name), STAGED)
            client = self.client()
            _, session = self.handshake(self.server(version, ahead.keys), client, None)
            reused, _ = self.handshake(
                self.server(version, behind.keys), client, session
            )
            self.assertTrue(reused, label)
            self.assertTrue(math.isinf(behind.lifetime))
