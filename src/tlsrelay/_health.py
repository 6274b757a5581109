"""
Active health checks: nginx Plus's C{health_check} in a stream C{server}, with the
TCP check and, when the server has C{proxy_ssl on}, the TLS handshake check.

Every C{interval} a round begins; each peer of the pool not marked C{down} (backup
peers included) is checked after a random delay in C{[0, jitter)}.  A check is the
attempt a relayed connection makes, through L{UpstreamPool.connectPeer}: a TCP
connection (to C{port=} instead of the peer's port when given) and, with upstream
TLS, a complete handshake with the same verification, all within C{interval}; then
the connection is closed at once (with a TLS close_notify).  C{fails} failures in a
row mark the peer unhealthy, C{passes} successes in a row healthy again, through
L{UpstreamPool.markHealthy}, which logs the change with what the last check found.

As in nginx without C{mandatory} (which we do not support), a peer starts healthy,
also after a reload: clients are relayed to it before its first check.  The first
round begins when the service starts.  Checks of one peer never overlap: a peer
whose check is still running when a round begins is checked again when that check
ends, after a new jitter delay (and one still waiting out its delay, when C{jitter}
exceeds C{interval}, is not scheduled twice).  Each round reads the pool's peers
afresh, so peers that L{UpstreamPool.resolveAll} replaced are checked from the
next round on and the replaced ones are forgotten.  Checks count nothing for
passive health (C{max_fails}) and open no relayed connection (C{least_conn},
C{max_conns}).

Differences from nginx Plus: the connect (and handshake) timeout is C{interval},
not C{proxy_connect_timeout}; there are no C{match} tests, so
C{health_check_timeout} has nothing to time; each worker process checks on its own
(nginx shares one check per peer through the C{zone}); the checker marks the pool
of its own C{server} only.
"""

from __future__ import annotations

from typing import Protocol as _Protocol

from attrs import define
from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from tlsrelay._balance import PeerState
from tlsrelay._config._model import HealthCheck
from tlsrelay._log import Logger
from tlsrelay._pool import UpstreamPool

__all__ = ["HealthChecker", "JitterSource"]

log = Logger()


class JitterSource(_Protocol):
    """
    What the checker needs from a random source (a L{random.Random}).
    """

    def random(self) -> float:
        """
        A random float in C{[0, 1)}.
        """


class _Probe(Protocol):
    """
    The protocol of a check's connection: it says nothing and ignores what the
    upstream sends; the checker closes it as soon as it is connected.
    """

    def __init__(self, closing: set[_Probe]) -> None:
        self.closing = closing

    def dataReceived(self, data: bytes) -> None:
        pass  # an upstream that greets first is healthy too

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closing.discard(self)


class _ProbeFactory(Factory[_Probe]):
    """
    Builds L{_Probe}s that register in C{closing} while they close.
    """

    noisy = False

    def __init__(self, closing: set[_Probe]) -> None:
        self.closing = closing

    def buildProtocol(self, addr: IAddress | None) -> _Probe:
        return _Probe(self.closing)


@define(eq=False)
class _PeerCheck:
    """
    The checks of one peer.

    @ivar fails: failed checks in a row.
    @ivar passes: passed checks in a row.
    @ivar waiting: the jitter delay before the next check, while it runs.
    @ivar checking: the check under way.
    @ivar due: a round began while C{checking}: check again when it ends.
    @ivar forgotten: the service stopped or the peer left the pool: whatever is
        under way counts for nothing.
    """

    peer: PeerState
    fails: int = 0
    passes: int = 0
    waiting: IDelayedCall | None = None
    checking: Deferred[tuple[IProtocol, bool | None]] | None = None
    due: bool = False
    forgotten: bool = False


def _why(reason: Failure) -> str:
    """
    What a failed check found, in one line.
    """
    if reason.check(error.TimeoutError):
        return "timed out"
    return reason.getErrorMessage()


def _count(n: int, one: str, many: str) -> str:
    return one if n == 1 else many.format(n=n)


class HealthChecker(Service):
    """
    Checks the peers of one pool every C{interval} (see the module's
    documentation) while the service runs; stopping cancels timers and checks
    under way, and aborts the connections still closing.

    @ivar pool: the pool whose peers are checked and marked.
    @ivar check: the C{health_check} settings.
    """

    def __init__(
        self,
        pool: UpstreamPool,
        check: HealthCheck,
        reactor: IReactorTime,
        random: JitterSource,
    ) -> None:
        """
        @param pool: the pool to check; its C{tlsFor} decides whether a check
            includes a TLS handshake, so checks verify the upstream exactly as
            relayed connections do.
        @param check: C{interval}, C{jitter}, C{fails}, C{passes}, C{port}.
        @param reactor: the clock of rounds and jitter (connections go through
            the pool's reactor, normally the same one).
        @param random: the source of the jitter delays.
        """
        self.pool = pool
        self.check = check
        self._clock = reactor
        self._random = random
        self._round: IDelayedCall | None = None
        self._peers: dict[PeerState, _PeerCheck] = {}
        self._closing: set[_Probe] = set()
        self._factory = _ProbeFactory(self._closing)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._newRound()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._round is not None and self._round.active():
            self._round.cancel()
        self._round = None
        checks, self._peers = list(self._peers.values()), {}
        for state in checks:
            self._forget(state)
        for probe in list(self._closing):
            if probe.transport is not None:
                probe.transport.abortConnection()  # type: ignore[attr-defined]
        self._closing.clear()

    def _newRound(self) -> None:
        """
        Check every peer not C{down}, each after its own random delay; forget
        the peers no longer in the pool; schedule the next round.
        """
        self._round = None
        present = set()
        for peer in self.pool.peers.peers():
            if peer.down:
                continue
            present.add(peer)
            state = self._peers.get(peer)
            if state is None:
                state = self._peers[peer] = _PeerCheck(peer)
            if state.checking is not None:
                state.due = True
            elif state.waiting is None:
                self._schedule(state)
        for peer in [peer for peer in self._peers if peer not in present]:
            self._forget(self._peers.pop(peer))
        if self.running:
            self._round = self._clock.callLater(self.check.interval, self._newRound)

    def _schedule(self, state: _PeerCheck) -> None:
        jitter = self.check.jitter
        if jitter > 0:
            delay = self._random.random() * jitter
            state.waiting = self._clock.callLater(delay, self._start, state)
        else:
            self._start(state)

    def _start(self, state: _PeerCheck) -> None:
        state.waiting = None
        checking = self.pool.connectPeer(
            state.peer, self._factory, self.check.interval, self.check.port
        )
        state.checking = checking
        checking.addCallbacks(
            self._passed,
            self._failed,
            callbackArgs=(state,),
            errbackArgs=(state,),
        )

    def _passed(self, result: tuple[IProtocol, bool | None], state: _PeerCheck) -> None:
        state.checking = None
        probe = result[0]
        assert isinstance(probe, _Probe)
        if probe.transport is not None:
            # Closed cleanly: a FIN, after a close_notify with TLS.
            self._closing.add(probe)
            probe.transport.loseConnection()
        if not state.forgotten:
            self._found(state, None)

    def _failed(self, reason: Failure, state: _PeerCheck) -> None:
        state.checking = None
        if not state.forgotten:
            self._found(state, _why(reason))

    def _found(self, state: _PeerCheck, failure: str | None) -> None:
        """
        Count what one check found (C{failure} is why it failed, L{None} if it
        passed), mark the peer when a threshold is reached, and start the check
        a round asked for while this one ran.
        """
        peer = state.peer
        upstream = self.pool.config.name
        if failure is None:
            state.fails = 0
            state.passes += 1
            log.debug(
                "health check of upstream server {peer} of {upstream} passed",
                peer=peer.name,
                upstream=upstream,
            )
            if not peer.healthy and state.passes >= self.check.passes:
                reason = _count(
                    state.passes, "health check passed", "{n} health checks passed"
                )
                self.pool.markHealthy(peer, True, reason)
        else:
            state.passes = 0
            state.fails += 1
            log.debug(
                "health check of upstream server {peer} of {upstream} failed: {reason}",
                peer=peer.name,
                upstream=upstream,
                reason=failure,
            )
            if peer.healthy and state.fails >= self.check.fails:
                reason = _count(
                    state.fails, "health check failed", "{n} health checks failed"
                )
                self.pool.markHealthy(peer, False, f"{reason}: {failure}")
        if state.due:
            state.due = False
            self._schedule(state)

    def _forget(self, state: _PeerCheck) -> None:
        """
        Stop checking one peer: cancel its delay and its check under way.
        """
        state.forgotten = True
        state.due = False
        if state.waiting is not None and state.waiting.active():
            state.waiting.cancel()
        state.waiting = None
        checking, state.checking = state.checking, None
        if checking is not None:
            checking.cancel()
