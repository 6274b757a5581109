"""
Session-ticket keys: nginx's key files, a key ring, and their rotation.

A L{KeyRing} is what OpenSSL asks, at each ticket, for the key that encrypts
and the keys that decrypt (give L{KeyRing.keys} to
L{tlsrelay._openssl.installTicketKeys}). It is computed from a schedule: a
list of L{ScheduledKey}s, each a key and the time it may start encrypting
(or C{None}: it only decrypts). At time C{now}, a key is:

    - B{staged}: its time has not come; it decrypts but does not encrypt yet;
    - B{current}: the key whose time came last; it encrypts (and decrypts);
    - B{retired}: a later key's time has come; it decrypts until the ring's
      lifetime (the ticket lifetime, C{ssl_session_timeout}) has passed since
      it stopped encrypting, so every ticket it issued can still be read;
    - B{gone}: past that, or no longer in the schedule: a ticket under it
      means a full handshake, with no error.

A key that only decrypts (C{None}) counts as retired if it ever encrypted
here, else as staged; it never expires by time. Tickets under any key but
the current one are renewed under the current one.

A L{TicketKeyRotationService} keeps a ring's schedule up to date, in one of
three ways:

    - L{TicketKeyRotationService.fromFiles}: nginx's C{ssl_session_ticket_key
      file;} (repeatable, 48 or 80 bytes each): the first file's key
      encrypts, all decrypt. The files are read again every C{checkInterval}
      and on L{TicketKeyRotationService.reload} (SIGHUP); a change (an
      external rotator, a Kubernetes secret update) swaps the keys without
      rebuilding any context. A file that cannot be read, or is wrong, is
      logged and the keys in use stay.
    - L{TicketKeyRotationService.generating}: no files, as nginx does with a
      shared cache: a key made from C{randomBytes}, rotated every C{interval}
      (default: the lifetime). As in nginx, the next key always exists one
      interval before it starts encrypting, and the previous one decrypts for
      the lifetime after it stopped: with the default interval, three keys
      at a time (previous, current, next).
    - L{TicketKeyRotationService.following}: a worker process reading the
      schedule its master publishes.

Across worker processes: a worker must never issue a ticket another cannot
read, so a new key must decrypt everywhere before it encrypts anywhere. The
master runs the rotation (from files or generating) with C{publishTo} a
L{KeyDirectory}: one file per key, named by when it starts encrypting
(C{t<milliseconds>-<name hex>.key}, or C{d-<name hex>.key} for a key that
only decrypts), holding the key in nginx's 80- or 48-byte form, mode 0600,
written under a temporary name and renamed into place, so a reader sees
whole files only; new keys are written before old ones are removed. Each
worker runs L{TicketKeyRotationService.following} on that directory, reading
it every C{checkInterval} (1 s; a read lists the directory and opens only
files it has not seen: about 40 µs with five keys; L{KeyRing.keys}, called
at each ticket, takes 0.1 µs). Since the start times are in the
schedule and every process on the machine has the same clock, every worker
switches at the same instant, and a worker that starts late (restarted, or
after a reload) knows at once which key is current. The staging margin is
what makes this safe: a generated key is published a whole interval before
its time; a new first key in the files is published C{stagingDelay}
(default 10 s) before its time, while the previous first key keeps
encrypting, unless the files dropped it (then it cannot). Both margins must
exceed the workers' C{checkInterval}. The directory belongs in the relay's
private runtime directory (L{tlsrelay._sessioncache.makeInstanceDirectory}:
mode 0700, on C{/dev/shm} so keys never reach a disk), named by
L{ticketKeyDirectory} from the configuration alone, so master and workers
agree on it.

Across machines, operators share key files (seed 000) and drive rotation
from outside; the safe order is the same: add the new key as a later file
first, then, once every machine has it, make it the first.

Logs name keys by the hex of their 16-byte name, never their secrets.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Protocol

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall

from tlsrelay._log import Logger
from tlsrelay._openssl import TicketKey

__all__ = [
    "DEFAULT_FILE_CHECK_INTERVAL",
    "DEFAULT_FOLLOW_INTERVAL",
    "DEFAULT_STAGING_DELAY",
    "FileKeySource",
    "KeyDirectory",
    "KeyRing",
    "KeyState",
    "ScheduledKey",
    "TicketKeyRotationService",
    "ticketKeyDirectory",
]

_log = Logger()

DEFAULT_FILE_CHECK_INTERVAL = 10.0
"""
How often key files are read again, in seconds.
"""

DEFAULT_FOLLOW_INTERVAL = 1.0
"""
How often a worker reads its master's key directory, in seconds.
"""

DEFAULT_STAGING_DELAY = 10.0
"""
How long a new first key from the files only decrypts, when published to
workers, before it encrypts.
"""

_KEY_SIZES = (48, 80)
_READ_LIMIT = 4096


class KeyState(Enum):
    """
    Where a key is in its life; see the module's docstring.
    """

    STAGED = "staged"
    CURRENT = "current"
    RETIRED = "retired"
    GONE = "gone"


@frozen
class ScheduledKey:
    """
    A key, and when it may start encrypting (C{None}: it only decrypts).
    """

    key: TicketKey
    encryptFrom: float | None = None


def _hex(name: bytes) -> str:
    return name.hex()


def _when(seconds: float) -> str:
    """
    A reactor time (seconds since the epoch) for the logs, in UTC.
    """
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _quantize(when: float) -> float:
    """
    C{when} down to the millisecond, as a L{KeyDirectory} file name records
    it, so the master and its workers compute the same schedule.
    """
    return math.floor(when * 1000) / 1000


@frozen
class _Evaluation:
    """
    A schedule at one instant.

    @ivar current: the key that encrypts.
    @ivar states: each key's state, by name.
    @ivar until: when each retired key that expires by time does.
    @ivar nextChange: the next instant a state changes by time, if any.
    """

    current: TicketKey
    states: dict[bytes, KeyState]
    until: dict[bytes, float]
    nextChange: float | None


def _evaluate(
    schedule: Sequence[ScheduledKey],
    now: float,
    lifetime: float,
    everCurrent: Iterable[bytes] = (),
) -> _Evaluation:
    """
    Each key's state in C{schedule} at C{now}; see the module's docstring.

    If no key's time has come, the earliest staged key (else the first) is
    made current: a schedule always has a key that encrypts.
    """
    timed = [s for s in schedule if s.encryptFrom is not None]
    due = [s for s in timed if s.encryptFrom is not None and s.encryptFrom <= now]
    if due:
        current = max(due, key=lambda s: s.encryptFrom or 0.0)
    elif timed:
        current = min(timed, key=lambda s: s.encryptFrom or 0.0)
    else:
        current = schedule[0]
    wasCurrent = set(everCurrent)
    states: dict[bytes, KeyState] = {}
    until: dict[bytes, float] = {}
    changes: list[float] = []
    for entry in schedule:
        name = entry.key.name
        if entry is current:
            states[name] = KeyState.CURRENT
        elif entry.encryptFrom is None:
            states[name] = KeyState.RETIRED if name in wasCurrent else KeyState.STAGED
        elif entry.encryptFrom > now:
            states[name] = KeyState.STAGED
            changes.append(entry.encryptFrom)
        else:
            start = entry.encryptFrom
            # When a later key (or one due at the same time and chosen over it)
            # started; there is one, since the current key is due too.
            stopped = min(
                s.encryptFrom
                for s in due
                if s is not entry
                and s.encryptFrom is not None
                and s.encryptFrom >= start
            )
            expires = stopped + lifetime
            if expires <= now:
                states[name] = KeyState.GONE
            else:
                states[name] = KeyState.RETIRED
                if not math.isinf(expires):
                    until[name] = expires
                    changes.append(expires)
    return _Evaluation(current.key, states, until, min(changes) if changes else None)


def _checkSchedule(schedule: Sequence[ScheduledKey]) -> None:
    if not schedule:
        raise ValueError("no ticket keys")
    seen: dict[bytes, TicketKey] = {}
    for entry in schedule:
        name = entry.key.name
        if name in seen:
            raise ValueError(f"two ticket keys are named {_hex(name)}")
        seen[name] = entry.key


@define(eq=False)
class KeyRing:
    """
    The ticket keys of one or more server contexts; give L{keys} to
    L{tlsrelay._openssl.installTicketKeys}.

    @ivar lifetime: how long a retired key with a start time still decrypts
        (the ticket lifetime; infinite for keys from files).
    @ivar label: where the keys come from, for the logs.
    """

    _now: Callable[[], float]
    lifetime: float = math.inf
    label: str = "ticket keys"
    _schedule: tuple[ScheduledKey, ...] = field(init=False, default=())
    _states: dict[bytes, KeyState] = field(init=False, factory=dict)
    _everCurrent: set[bytes] = field(init=False, factory=set)
    _keys: tuple[TicketKey, tuple[TicketKey, ...]] | None = field(
        init=False, default=None
    )
    _nextChange: float | None = field(init=False, default=None)
    _fallback: bool = field(init=False, default=False)

    def keys(self) -> tuple[TicketKey, tuple[TicketKey, ...]]:
        """
        The key that encrypts and the others that decrypt. Called by OpenSSL
        at each ticket, so it only returns what L{refresh} computed.

        @raise RuntimeError: before the ring has keys (OpenSSL then neither
            issues nor accepts tickets).
        """
        if self._keys is None:
            raise RuntimeError(f"{self.label}: no ticket keys yet")
        return self._keys

    @property
    def schedule(self) -> tuple[ScheduledKey, ...]:
        """
        The schedule the ring follows.
        """
        return self._schedule

    @property
    def current(self) -> TicketKey | None:
        """
        The key that encrypts, if the ring has keys.
        """
        return None if self._keys is None else self._keys[0]

    def state(self, name: bytes) -> KeyState:
        """
        The state of the key named C{name} as of the last L{refresh}.
        """
        return self._states.get(name, KeyState.GONE)

    def nextChange(self) -> float | None:
        """
        When a key's state next changes by time alone (call L{refresh} then).
        """
        return self._nextChange

    def update(self, schedule: Sequence[ScheduledKey]) -> None:
        """
        Follow C{schedule} from now on.

        @raise ValueError: if it is empty or names a key twice; the ring keeps
            its keys.
        """
        schedule = tuple(schedule)
        _checkSchedule(schedule)
        self._schedule = schedule
        self.refresh()

    def refresh(self) -> None:
        """
        Recompute the keys' states at the current time, logging each change.
        """
        if not self._schedule:
            return
        now = self._now()
        evaluation = _evaluate(self._schedule, now, self.lifetime, self._everCurrent)
        states = evaluation.states
        self._everCurrent.add(evaluation.current.name)
        self._everCurrent &= {s.key.name for s in self._schedule}
        fallback = all(
            s.encryptFrom is None or s.encryptFrom > now for s in self._schedule
        ) and any(s.encryptFrom is not None for s in self._schedule)
        if fallback and not self._fallback:
            due = min(
                s.encryptFrom for s in self._schedule if s.encryptFrom is not None
            )
            _log.warn(
                "{label}: no ticket key may encrypt yet; using {name}, due at "
                "{encryptsFrom}",
                label=self.label,
                name=_hex(evaluation.current.name),
                encryptFrom=due,
                encryptsFrom=_when(due),
            )
        self._fallback = fallback
        self._logChanges(states, evaluation.until)
        self._states = {n: s for n, s in states.items() if s is not KeyState.GONE}
        decrypting = [
            entry.key
            for entry in sorted(
                self._schedule,
                key=lambda s: -math.inf if s.encryptFrom is None else s.encryptFrom,
                reverse=True,
            )
            if states[entry.key.name] in (KeyState.STAGED, KeyState.RETIRED)
        ]
        self._keys = (evaluation.current, tuple(decrypting))
        self._nextChange = evaluation.nextChange

    def _logChanges(
        self, states: dict[bytes, KeyState], until: dict[bytes, float]
    ) -> None:
        encryptFrom = {s.key.name: s.encryptFrom for s in self._schedule}
        for name, state in states.items():
            if self._states.get(name, KeyState.GONE) is state:
                continue
            start = encryptFrom[name]
            if state is KeyState.STAGED and start is not None:
                _log.info(
                    "{label}: ticket key {name} staged: decrypts, encrypts from "
                    "{encryptsFrom}",
                    label=self.label,
                    name=_hex(name),
                    encryptFrom=start,
                    encryptsFrom=_when(start),
                )
            elif state is KeyState.STAGED:
                _log.info(
                    "{label}: ticket key {name} staged: only decrypts",
                    label=self.label,
                    name=_hex(name),
                )
            elif state is KeyState.CURRENT:
                _log.info(
                    "{label}: ticket key {name} encrypts",
                    label=self.label,
                    name=_hex(name),
                )
            elif state is KeyState.RETIRED and name in until:
                _log.info(
                    "{label}: ticket key {name} retired: decrypts until "
                    "{decryptsUntil}",
                    label=self.label,
                    name=_hex(name),
                    until=until[name],
                    decryptsUntil=_when(until[name]),
                )
            elif state is KeyState.RETIRED:
                _log.info(
                    "{label}: ticket key {name} only decrypts",
                    label=self.label,
                    name=_hex(name),
                )
        for name in self._states:
            if states.get(name, KeyState.GONE) is KeyState.GONE:
                _log.info(
                    "{label}: ticket key {name} gone", label=self.label, name=_hex(name)
                )


def _describeError(error: OSError) -> str:
    return error.strerror or str(error)


@frozen
class FileKeySource:
    """
    nginx's C{ssl_session_ticket_key} files: the first key encrypts, all
    decrypt.
    """

    paths: tuple[str, ...]

    def read(self) -> tuple[TicketKey, ...]:
        """
        Read every file now.

        @raise ValueError: naming the file, if one cannot be read, is not 48 or
            80 bytes, or names the same key as another with other secrets.
        """
        if not self.paths:
            raise ValueError("no ssl_session_ticket_key files")
        keys: list[TicketKey] = []
        where: dict[bytes, str] = {}
        for path in self.paths:
            try:
                with open(path, "rb") as f:
                    data = f.read(_READ_LIMIT + 1)
            except OSError as e:
                raise ValueError(
                    f'cannot read ssl_session_ticket_key "{path}": {_describeError(e)}'
                ) from None
            if len(data) not in _KEY_SIZES:
                size = (
                    f"more than {_READ_LIMIT} bytes"
                    if len(data) > _READ_LIMIT
                    else f"{len(data)} bytes"
                )
                raise ValueError(
                    f'ssl_session_ticket_key "{path}" must be 48 or 80 bytes, '
                    f"not {size}"
                )
            key = TicketKey.fromBytes(data)
            if key.name in where:
                [same] = [k for k in keys if k.name == key.name]
                if same != key:
                    raise ValueError(
                        f'ssl_session_ticket_key "{path}" has the same key name '
                        f'({_hex(key.name)}) as "{where[key.name]}" but other secrets'
                    )
                continue
            where[key.name] = path
            keys.append(key)
        return tuple(keys)


_KEY_FILE = re.compile(r"(?:t(\d+)|d)-([0-9a-f]{32})\.key\Z")


def _keyFileName(entry: ScheduledKey) -> str:
    when = "d" if entry.encryptFrom is None else f"t{round(entry.encryptFrom * 1000)}"
    return f"{when}-{_hex(entry.key.name)}.key"


@define
class KeyDirectory:
    """
    A directory of key files through which a master publishes its schedule
    to its workers; see the module's docstring.
    """

    path: str
    _seen: dict[str, ScheduledKey] = field(init=False, factory=dict)

    def read(self) -> tuple[ScheduledKey, ...]:
        """
        The schedule in the directory, latest start first. A file already
        read is not read again (files are never rewritten under one name).

        @raise ValueError: naming the directory or the file, if the directory
            cannot be listed, holds no key, or a key file is wrong.
        """
        try:
            names = os.listdir(self.path)
        except OSError as e:
            raise ValueError(
                f'cannot list the ticket key directory "{self.path}": '
                f"{_describeError(e)}"
            ) from None
        entries: list[ScheduledKey] = []
        seen: dict[str, ScheduledKey] = {}
        for name in names:
            match = _KEY_FILE.match(name)
            if match is None:
                continue
            entry = self._seen.get(name)
            if entry is None:
                entry = self._readFile(name, match)
                if entry is None:
                    continue
            seen[name] = entry
            entries.append(entry)
        self._seen = seen
        if not entries:
            raise ValueError(f'no ticket keys in "{self.path}"')
        entries.sort(
            key=lambda s: (
                -math.inf if s.encryptFrom is None else s.encryptFrom,
                s.key.name,
            ),
            reverse=True,
        )
        return tuple(entries)

    def _readFile(self, name: str, match: re.Match[str]) -> ScheduledKey | None:
        """
        The key in file C{name}, or C{None} if it was removed since the
        directory was listed (the master retired it meanwhile).
        """
        path = os.path.join(self.path, name)
        try:
            with open(path, "rb") as f:
                data = f.read(_READ_LIMIT + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ValueError(
                f'cannot read ticket key "{path}": {_describeError(e)}'
            ) from None
        if len(data) not in _KEY_SIZES:
            raise ValueError(
                f'ticket key "{path}" must be 48 or 80 bytes, not {len(data)}'
            )
        key = TicketKey.fromBytes(data)
        if _hex(key.name) != match.group(2):
            raise ValueError(f'ticket key "{path}" holds key {_hex(key.name)}')
        millis = match.group(1)
        return ScheduledKey(key, None if millis is None else int(millis) / 1000)

    def write(self, schedule: Sequence[ScheduledKey]) -> None:
        """
        Publish C{schedule}: write the files of new keys (mode 0600, whole
        files only), then remove those of keys no longer in it.

        @raise OSError: if the directory cannot be written.
        """
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        wanted = {_keyFileName(entry): entry for entry in schedule}
        present = set(os.listdir(self.path))
        for name, entry in wanted.items():
            if name not in present:
                self._writeFile(name, entry.key.toBytes())
        for name in present:
            if name not in wanted and (_KEY_FILE.match(name) or name.endswith(".tmp")):
                try:
                    os.unlink(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass

    def _writeFile(self, name: str, data: bytes) -> None:
        final = os.path.join(self.path, name)
        temporary = f"{final}.{os.getpid()}.tmp"
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600
        )
        try:
            with os.fdopen(descriptor, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, final)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise


class _ScheduleSource(Protocol):
    """
    Where a rotation service gets its schedule from.
    """

    description: str

    def read(self, now: float, ring: KeyRing) -> tuple[ScheduledKey, ...]:
        """
        The schedule as of C{now}.

        @raise ValueError: if it cannot be had now (the ring keeps its keys).
        """


@define
class _FromFiles:
    """
    The schedule of nginx key files: the first encrypts, the others decrypt.

    A first key not seen before, while the current key is still in the files,
    is staged for C{stagingDelay} first (if positive), the current key
    encrypting meanwhile.
    """

    files: FileKeySource
    stagingDelay: float
    description: str
    _lastKeys: tuple[TicketKey, ...] | None = field(init=False, default=None)
    _lastSchedule: tuple[ScheduledKey, ...] = field(init=False, default=())

    def adopt(self, schedule: Sequence[ScheduledKey]) -> None:
        """
        Continue from a schedule published before (a master reloading).
        """
        self._lastSchedule = tuple(schedule)

    def read(self, now: float, ring: KeyRing) -> tuple[ScheduledKey, ...]:
        keys = self.files.read()
        if keys == self._lastKeys:
            return self._lastSchedule
        names = {key.name for key in keys}
        prior = {s.key.name: s for s in self._lastSchedule if s.key in keys}
        current = ring.current
        if current is None and self._lastSchedule:
            current = _evaluate(self._lastSchedule, now, math.inf).current
        first = keys[0]
        firstFrom = prior[first.name].encryptFrom if first.name in prior else None
        keepCurrent = False
        if firstFrom is None:
            if (
                self.stagingDelay > 0
                and self._lastSchedule
                and first.name not in prior
                and current is not None
                and current.name in names
                and current.name != first.name
            ):
                firstFrom = _quantize(now + self.stagingDelay)
                keepCurrent = True
            else:
                firstFrom = _quantize(now)
        elif firstFrom > now and current is not None and current.name in names:
            keepCurrent = current.name != first.name
        schedule = [ScheduledKey(first, firstFrom)]
        for key in keys[1:]:
            encryptFrom: float | None = None
            if keepCurrent and current is not None and key.name == current.name:
                earlier = prior.get(key.name)
                encryptFrom = (
                    earlier.encryptFrom
                    if earlier is not None and earlier.encryptFrom is not None
                    else _quantize(now)
                )
            schedule.append(ScheduledKey(key, encryptFrom))
        self._lastKeys = keys
        self._lastSchedule = tuple(schedule)
        return self._lastSchedule


@define
class _Generated:
    """
    Keys made from C{randomBytes}, each current for C{interval}, staged for
    one C{interval} before and retired for C{lifetime} after.
    """

    randomBytes: Callable[[int], bytes] = field(repr=False)
    interval: float
    lifetime: float
    description: str = "generated ticket keys"
    _schedule: tuple[ScheduledKey, ...] = field(init=False, default=())

    def adopt(self, schedule: Sequence[ScheduledKey]) -> None:
        """
        Continue from a schedule published before (a master reloading).
        """
        self._schedule = tuple(s for s in schedule if s.encryptFrom is not None)

    def read(self, now: float, ring: KeyRing) -> tuple[ScheduledKey, ...]:
        schedule = list(self._schedule)
        if not any(
            s.encryptFrom is not None and s.encryptFrom <= now for s in schedule
        ):
            schedule.append(
                ScheduledKey(TicketKey.generate(self.randomBytes), _quantize(now))
            )
        starts = [s.encryptFrom for s in schedule if s.encryptFrom is not None]
        if max(starts) <= now:
            schedule.append(
                ScheduledKey(
                    TicketKey.generate(self.randomBytes),
                    _quantize(max(now, max(starts)) + self.interval),
                )
            )
        evaluation = _evaluate(schedule, now, self.lifetime)
        self._schedule = tuple(
            s for s in schedule if evaluation.states[s.key.name] is not KeyState.GONE
        )
        return self._schedule


@define
class _Following:
    """
    The schedule a master publishes in a L{KeyDirectory}.
    """

    directory: KeyDirectory
    description: str

    def read(self, now: float, ring: KeyRing) -> tuple[ScheduledKey, ...]:
        return self.directory.read()


class TicketKeyRotationService(Service):
    """
    Keeps L{ring} up to date from key files, generated keys, or a master's
    key directory; make one with L{fromFiles}, L{generating} or L{following}.

    The constructors read the keys at once, so L{keys} can be installed in
    contexts before the service starts, and a bad key file fails start-up.

    @ivar ring: the keys; L{keys} is its C{keys} method.
    """

    def __init__(
        self,
        *,
        ring: KeyRing,
        clock: IReactorTime,
        source: _ScheduleSource,
        checkInterval: float,
        publishTo: KeyDirectory | None = None,
    ) -> None:
        if not checkInterval > 0:
            raise ValueError(f"check interval must be positive, not {checkInterval}")
        self.ring = ring
        self.keys = ring.keys
        self._clock = clock
        self._source = source
        self._checkInterval = checkInterval
        self._publishTo = publishTo
        self._published: tuple[ScheduledKey, ...] | None = None
        self._lastError: str | None = None
        self._loop: LoopingCall | None = None
        self._timer: IDelayedCall | None = None
        ring.update(source.read(clock.seconds(), ring))
        if publishTo is not None:
            publishTo.write(ring.schedule)
            self._published = ring.schedule

    @classmethod
    def fromFiles(
        cls,
        paths: Sequence[str],
        *,
        clock: IReactorTime,
        checkInterval: float = DEFAULT_FILE_CHECK_INTERVAL,
        publishTo: str | None = None,
        stagingDelay: float | None = None,
    ) -> TicketKeyRotationService:
        """
        Keys from nginx's C{ssl_session_ticket_key} files, read again every
        C{checkInterval} seconds and on L{reload}.

        @param publishTo: in a master with workers, the L{KeyDirectory} the
            workers follow.
        @param stagingDelay: how long a new first key only decrypts before it
            encrypts; by default 0, or L{DEFAULT_STAGING_DELAY} when
            publishing.
        @raise ValueError: naming the file, if one cannot be read or is wrong.
        """
        files = FileKeySource(tuple(paths))
        if stagingDelay is None:
            stagingDelay = 0.0 if publishTo is None else DEFAULT_STAGING_DELAY
        if publishTo is not None:
            _checkMargin("ticket key staging delay", stagingDelay)
        description = "ticket key files " + ", ".join(f'"{p}"' for p in files.paths)
        source = _FromFiles(files, stagingDelay, description)
        directory = _adopt(source, publishTo)
        return cls(
            ring=KeyRing(clock.seconds, label=description),
            clock=clock,
            source=source,
            checkInterval=checkInterval,
            publishTo=directory,
        )

    @classmethod
    def generating(
        cls,
        *,
        clock: IReactorTime,
        randomBytes: Callable[[int], bytes],
        lifetime: float,
        interval: float | None = None,
        publishTo: str | None = None,
    ) -> TicketKeyRotationService:
        """
        Keys made from C{randomBytes} (e.g. L{os.urandom}), a new one every
        C{interval} (default C{lifetime}); each is staged one interval before
        it encrypts, and decrypts for C{lifetime} after.

        @param lifetime: the ticket lifetime, C{ssl_session_timeout}.
        @param publishTo: in a master with workers, the L{KeyDirectory} the
            workers follow. Keys already there are continued, not replaced.
        """
        if interval is None:
            interval = lifetime
        if not (interval > 0 and lifetime > 0):
            raise ValueError(
                "ticket key interval and lifetime must be positive, not "
                f"{interval} and {lifetime}"
            )
        if publishTo is not None:
            _checkMargin("ticket key rotation interval", interval)
        source = _Generated(randomBytes, interval, lifetime)
        directory = _adopt(source, publishTo)
        return cls(
            ring=KeyRing(clock.seconds, lifetime, source.description),
            clock=clock,
            source=source,
            checkInterval=interval,
            publishTo=directory,
        )

    @classmethod
    def following(
        cls,
        directory: str,
        *,
        clock: IReactorTime,
        checkInterval: float = DEFAULT_FOLLOW_INTERVAL,
    ) -> TicketKeyRotationService:
        """
        In a worker: the keys its master publishes in C{directory}.

        @raise ValueError: if the directory holds no keys or a bad one.
        """
        description = f'ticket keys from "{directory}"'
        return cls(
            ring=KeyRing(clock.seconds, label=description),
            clock=clock,
            source=_Following(KeyDirectory(directory), description),
            checkInterval=checkInterval,
        )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self._checkInterval, now=False)
        self._reschedule()

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        super().stopService()  # type: ignore[no-untyped-call]

    def reload(self) -> bool:
        """
        Read the keys again now (SIGHUP).

        @return: whether they could be read; if not, the error is logged and
            the keys in use stay.
        """
        return self.check()

    def check(self) -> bool:
        """
        Read the keys, update the ring, publish, and schedule the next change.

        @return: whether the keys could be read; if not, the error is logged
            (once while it repeats) and the keys in use stay.
        """
        ok = True
        try:
            schedule = self._source.read(self._clock.seconds(), self.ring)
            if schedule != self.ring.schedule:
                self.ring.update(schedule)
        except Exception as e:
            ok = False
            if not isinstance(e, ValueError | OSError):
                _log.failure(
                    "{source}: reading ticket keys failed",
                    source=self._source.description,
                )
                return self._after(ok)
            message = str(e)
            if message != self._lastError:
                _log.error(
                    "{source}: {error}; the ticket keys in use stay",
                    source=self._source.description,
                    error=message,
                )
            self._lastError = message
        else:
            if self._lastError is not None:
                _log.info(
                    "{source}: read again after an error",
                    source=self._source.description,
                )
            self._lastError = None
        return self._after(ok)

    def _after(self, ok: bool) -> bool:
        """
        What follows every check: time-based changes, publishing, the timer.
        """
        self.ring.refresh()
        self._publish()
        if self.running:
            self._reschedule()
        return ok

    def _publish(self) -> None:
        if self._publishTo is None or self._published == self.ring.schedule:
            return
        try:
            self._publishTo.write(self.ring.schedule)
        except OSError as e:
            _log.error(
                "cannot publish ticket keys to {directory}: {error}",
                directory=self._publishTo.path,
                error=_describeError(e),
            )
        else:
            self._published = self.ring.schedule

    def _reschedule(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        when = self.ring.nextChange()
        if when is not None:
            delay = max(0.0, when - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self.check)


def _checkMargin(what: str, seconds: float) -> None:
    """
    Refuse a staging margin workers may not notice in time.
    """
    if seconds < 2 * DEFAULT_FOLLOW_INTERVAL:
        raise ValueError(
            f"{what} must be at least {2 * DEFAULT_FOLLOW_INTERVAL:g}s with worker "
            f"processes (they read new keys every {DEFAULT_FOLLOW_INTERVAL:g}s), "
            f"not {seconds:g}s"
        )


def ticketKeyDirectory(
    instanceDirectory: str,
    paths: Sequence[str],
    lifetime: float,
    interval: float | None = None,
) -> str:
    """
    Where a master publishes one set of ticket keys in C{instanceDirectory}:
    a name derived from the configuration alone (the key files; or, with
    none, the lifetime and interval of generated keys), so a worker loading
    the same configuration finds the same directory, and a reloaded master
    continues the keys of an unchanged set.
    """
    if paths:
        identity = "files\0" + "\0".join(paths)
    else:
        identity = f"generated\0{lifetime!r}\0{interval!r}"
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape"))
    return os.path.join(instanceDirectory, "tickets-" + digest.hexdigest()[:16])


def _adopt(
    source: _FromFiles | _Generated, publishTo: str | None
) -> KeyDirectory | None:
    """
    The directory to publish to, after C{source} continued the schedule found
    there (a master reloading its configuration).
    """
    if publishTo is None:
        return None
    directory = KeyDirectory(publishTo)
    try:
        source.adopt(directory.read())
    except ValueError:
        pass
    return directory
