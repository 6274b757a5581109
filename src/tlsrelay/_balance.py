"""
Balancing policies over upstream peers, as nginx's stream upstream modules do it.

Pure and deterministic: no I/O, no clock, no global randomness.  The time is an
argument (seconds, from the pool's injected clock) and the random source is
injected.  Each policy follows one nginx module step by step, so that the same
configuration picks the same peers in the same order:

  - L{RoundRobin}: C{ngx_stream_upstream_round_robin.c} (smooth weighted round robin,
    backup servers, passive health with C{max_fails}/C{fail_timeout}, C{max_conns});
  - L{LeastConn}: C{ngx_stream_upstream_least_conn_module.c};
  - L{Hash} and L{ConsistentHash}: C{ngx_stream_upstream_hash_module.c};
  - L{Random}: C{ngx_stream_upstream_random_module.c} (with C{two least_conn}).

Differences from nginx, on purpose: times are float seconds, not whole seconds; a
peer can also be marked unhealthy by an active health check (L{PeerState.healthy});
consistent-hash points with equal hashes keep the first server in configuration
order (nginx keeps whichever its C{qsort} leaves first).
"""

from __future__ import annotations

import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from typing import Protocol

from attrs import Factory, define, field
from zope.interface import Interface, implementer

from tlsrelay._config._model import Address, Balancer, UpstreamServer

#: How many times hash and random policies look for a usable peer before they fall
#: back to round robin, as nginx does.
MAX_REHASH = 20

#: Points on the consistent-hash ring per unit of weight (nginx, ketama).
POINTS_PER_WEIGHT = 160


class RandomSource(Protocol):
    """
    What the random policies need from a random source (a L{random.Random}).
    """

    def randrange(self, start: int, /) -> int:
        """
        A random integer in C{[0, start)}.
        """


@define(eq=False)
class PeerState:
    """
    One upstream peer (one address of one C{server} line) and its shared state.

    @ivar address: the address to connect to: a literal IP address once names are
        resolved (or the configured name before that), or a UNIX path.
    @ivar name: the peer as nginx's C{$upstream_addr} prints it (C{127.0.0.1:9000},
        C{[::1]:9000}, C{unix:/path}).
    @ivar server: the C{server} line's address as written; consistent hashing
        hashes this, so all addresses of one name share their ring points.
    @ivar config: the C{server} line this peer comes from.
    @ivar healthy: set by an active health check; an unhealthy peer is never picked.
    @ivar currentWeight: smooth round robin's running weight.
    @ivar effectiveWeight: the weight round robin uses now: lowered on failure,
        back up by one at each pick until it reaches C{weight}.
    @ivar conns: connections now open (or being opened) to this peer.
    @ivar fails: failures counted for passive health.
    @ivar accessed: time of the last failure.
    @ivar checked: time of the last failure, or of the first pick after
        C{failTimeout} had passed since then (nginx's probing).
    @ivar session: free for the upstream TLS code: the TLS session last negotiated
        with this peer (C{proxy_ssl_session_reuse}).
    """

    address: Address
    name: str
    server: str
    config: UpstreamServer
    weight: int = 1
    maxFails: int = 1
    failTimeout: float = 10.0
    maxConns: int = 0
    backup: bool = False
    down: bool = False
    healthy: bool = True
    currentWeight: int = 0
    effectiveWeight: int = field()
    conns: int = 0
    fails: int = 0
    accessed: float = 0.0
    checked: float = 0.0
    session: object | None = None

    @effectiveWeight.default
    def _effectiveWeightDefault(self) -> int:
        return self.weight

    @classmethod
    def fromServer(cls, server: UpstreamServer, address: Address) -> PeerState:
        """
        A peer for one address of a C{server} line.
        """
        return cls(
            address=address,
            name=str(address),
            server=str(server.address),
            config=server,
            weight=server.weight,
            maxFails=server.maxFails,
            failTimeout=server.failTimeout,
            maxConns=server.maxConns,
            backup=server.backup,
            down=server.down,
        )

    def usable(self, now: float) -> bool:
        """
        Whether this peer may be picked at C{now}: not C{down}, healthy, not failed
        C{maxFails} times within C{failTimeout}, below C{maxConns}.
        """
        return not (
            self.down
            or not self.healthy
            or (
                self.maxFails
                and self.fails >= self.maxFails
                and now - self.checked <= self.failTimeout
            )
            or (self.maxConns and self.conns >= self.maxConns)
        )

    def disabled(self, now: float) -> bool:
        """
        Whether passive health keeps this peer out at C{now}.
        """
        return bool(
            self.maxFails
            and self.fails >= self.maxFails
            and now - self.checked <= self.failTimeout
        )


def _picked(peer: PeerState, now: float) -> None:
    """
    Bookkeeping common to every policy once C{peer} is chosen.
    """
    peer.conns += 1
    if now - peer.checked > peer.failTimeout:
        peer.checked = now


@define(eq=False)
class PeerGroup:
    """
    The peers of an C{upstream} group: primary peers, then backup peers, each in
    configuration order (a name with several addresses gives several peers).

    The lists are not changed once the group is made (resolving names makes a new
    group), so what is derived from them is computed once.
    """

    name: str
    primary: list[PeerState]
    backup: list[PeerState] = Factory(list)
    _totalWeight: int = field(init=False, default=0)
    single: bool = field(init=False, default=False)
    """
    One peer and no backup: nginx neither counts its failures nor retries it.
    """
    tries: int = field(init=False, default=0)
    """
    How many peers a connection may try, at most (nginx's C{peer.tries}).
    """

    def __attrs_post_init__(self) -> None:
        if not self.primary:
            raise ValueError(f'no servers in upstream "{self.name}"')
        self._totalWeight = sum(peer.weight for peer in self.primary)
        self.single = len(self.primary) == 1 and not self.backup
        self.tries = len(self.primary) + len(self.backup)

    @classmethod
    def fromServers(
        cls,
        name: str,
        servers: Iterable[tuple[UpstreamServer, Sequence[Address]]],
        previous: PeerGroup | None = None,
    ) -> PeerGroup:
        """
        Build a group from C{server} lines and the addresses of each.

        @param previous: a group whose peers are kept (with their state) when the
            same server line still has the same address.
        """
        old: dict[tuple[int, Address], PeerState] = {}
        if previous is not None:
            for peer in previous.peers():
                old[(id(peer.config), peer.address)] = peer
        primary: list[PeerState] = []
        backup: list[PeerState] = []
        for server, addresses in servers:
            for address in addresses:
                kept = old.get((id(server), address))
                peer = kept or PeerState.fromServer(server, address)
                (backup if server.backup else primary).append(peer)
        return cls(name, primary, backup)

    @property
    def totalWeight(self) -> int:
        """
        The sum of the primary peers' weights.
        """
        return self._totalWeight

    def peers(self) -> list[PeerState]:
        """
        Every peer, primary first.
        """
        return self.primary + self.backup

    def failed(self, peer: PeerState, now: float) -> bool:
        """
        Count a failure of C{peer} (passive health), as nginx's
        C{ngx_stream_upstream_free_round_robin_peer} does with C{NGX_PEER_FAILED}.
        Does not touch C{conns}.

        @return: whether C{peer} has now failed C{maxFails} times (nginx then logs
            "upstream server temporarily disabled").
        """
        if self.single:
            return False
        peer.fails += 1
        peer.accessed = now
        peer.checked = now
        disabled = False
        if peer.maxFails:
            peer.effectiveWeight -= peer.weight // peer.maxFails
            disabled = peer.fails >= peer.maxFails
        if peer.effectiveWeight < 0:
            peer.effectiveWeight = 0
        return disabled

    def succeeded(self, peer: PeerState) -> bool:
        """
        Count a connection to C{peer} that ended well: its failures are forgotten
        if it was picked after C{failTimeout} had passed since the last one.
        Does not touch C{conns}.

        @return: whether C{peer} was disabled by failures and no longer is.
        """
        if self.single or peer.accessed >= peer.checked:
            return False
        wasDisabled = bool(peer.maxFails and peer.fails >= peer.maxFails)
        peer.fails = 0
        return wasDisabled


@define(eq=False)
class Selection:
    """
    The per-connection state of a policy (nginx's C{rrp}, C{hp}, C{rp}): which peers
    were tried, whether backups are in use, the hash and how many rehashes.

    @ivar peers: the peer list being picked from (the group's primary peers,
        then its backup peers).
    @ivar tried: indexes into C{peers} tried by this connection.
    @ivar current: the peer picked last.
    """

    group: PeerGroup
    key: bytes
    peers: list[PeerState]
    usingBackup: bool = False
    tried: set[int] = Factory(set)
    current: PeerState | None = None
    hash: int = 0
    rehash: int = 0
    tries: int = 0

    def useBackup(self) -> bool:
        """
        Switch to the backup peers, if there are any and they are not in use yet.
        """
        if self.usingBackup or not self.group.backup:
            return False
        self.usingBackup = True
        self.peers = self.group.backup
        self.tried = set()
        return True


class IPolicy(Interface):
    """
    A balancing method over a L{PeerGroup}.
    """

    group: PeerGroup

    def begin(key: bytes) -> Selection:
        """
        Start picking peers for one connection; C{key} is the evaluated C{hash}
        key (ignored by other methods).
        """

    def pick(selection: Selection, now: float) -> PeerState | None:
        """
        Pick the next peer for C{selection}, not tried by it yet, and count one
        more connection to it; L{None} when no peer is usable ("no live
        upstreams").
        """

    def update(group: PeerGroup) -> None:
        """
        Use C{group} from now on (after its host names were resolved).
        """


def _smooth(selection: Selection, now: float, server: str | None = None) -> int:
    """
    Smooth weighted round robin over the usable, untried peers of C{selection}
    (only those of C{server} if given); the index of the best, or -1.
    """
    best = -1
    bestPeer: PeerState | None = None
    total = 0
    for index, peer in enumerate(selection.peers):
        if index in selection.tried or not peer.usable(now):
            continue
        if server is not None and peer.server != server:
            continue
        peer.currentWeight += peer.effectiveWeight
        total += peer.effectiveWeight
        if peer.effectiveWeight < peer.weight:
            peer.effectiveWeight += 1
        if bestPeer is None or peer.currentWeight > bestPeer.currentWeight:
            best, bestPeer = index, peer
    if bestPeer is not None:
        bestPeer.currentWeight -= total
    return best


def _choose(selection: Selection, index: int, now: float) -> PeerState:
    peer = selection.peers[index]
    selection.tried.add(index)
    selection.current = peer
    _picked(peer, now)
    return peer


@implementer(IPolicy)
class RoundRobin:
    """
    nginx's default: smooth weighted round robin, then backup servers.
    """

    def __init__(self, group: PeerGroup) -> None:
        self.group = group

    def begin(self, key: bytes) -> Selection:
        group = self.group
        return Selection(group, key, group.primary)

    def update(self, group: PeerGroup) -> None:
        self.group = group

    def pick(self, selection: Selection, now: float) -> PeerState | None:
        while True:
            if selection.group.single and not selection.usingBackup:
                peer = selection.peers[0]
                # nginx checks neither tried nor passive health for a lone peer.
                if not (
                    peer.down
                    or not peer.healthy
                    or (peer.maxConns and peer.conns >= peer.maxConns)
                ):
                    selection.current = peer
                    peer.conns += 1
                    return peer
            else:
                index = _smooth(selection, now)
                if index >= 0:
                    return _choose(selection, index, now)
            if not selection.useBackup():
                return None


@implementer(IPolicy)
class LeastConn(RoundRobin):
    """
    C{least_conn}: fewest connections relative to weight, round robin among ties.
    """

    def pick(self, selection: Selection, now: float) -> PeerState | None:
        if selection.group.single:
            return super().pick(selection, now)
        while True:
            index = self._leastConn(selection, now)
            if index >= 0:
                return _choose(selection, index, now)
            if not selection.useBackup():
                return None

    def _leastConn(self, selection: Selection, now: float) -> int:
        peers = selection.peers
        best = -1
        many = False
        for index, peer in enumerate(peers):
            if index in selection.tried or not peer.usable(now):
                continue
            if best < 0:
                best, many = index, False
                continue
            other = peers[best]
            if peer.conns * other.weight < other.conns * peer.weight:
                best, many = index, False
            elif peer.conns * other.weight == other.conns * peer.weight:
                many = True
        if best < 0 or not many:
            return best
        # Several peers share the least load: round robin among them, starting
        # from the first of them, as nginx does.
        first = peers[best]
        total = 0
        for index in range(best, len(peers)):
            peer = peers[index]
            if index in selection.tried or not peer.usable(now):
                continue
            if peer.conns * first.weight != first.conns * peer.weight:
                continue
            peer.currentWeight += peer.effectiveWeight
            total += peer.effectiveWeight
            if peer.effectiveWeight < peer.weight:
                peer.effectiveWeight += 1
            if peer.currentWeight > peers[best].currentWeight:
                best = index
        peers[best].currentWeight -= total
        return best


def _rehashStep(key: bytes, rehash: int) -> int:
    """
    One step of nginx's (Cache::Memcached compatible) hash:
    C{(crc32([REHASH] KEY) >> 16) & 0x7fff}.
    """
    prefix = str(rehash).encode("ascii") if rehash > 0 else b""
    return (zlib.crc32(prefix + key) >> 16) & 0x7FFF


@implementer(IPolicy)
class Hash(RoundRobin):
    """
    C{hash KEY}: the key picks a peer by weight; rehash up to 20 times past unusable
    or tried peers, then round robin.
    """

    def pick(self, selection: Selection, now: float) -> PeerState | None:
        group = selection.group
        if (
            selection.tries > MAX_REHASH
            or len(group.primary) < 2
            or not selection.key
            or selection.usingBackup
        ):
            return super().pick(selection, now)
        peers = group.primary
        totalWeight = group.totalWeight
        while True:
            selection.hash = (
                selection.hash + _rehashStep(selection.key, selection.rehash)
            ) & 0xFFFFFFFF
            selection.rehash += 1
            w = selection.hash % totalWeight
            index = 0
            while w >= peers[index].weight:
                w -= peers[index].weight
                index += 1
            if index not in selection.tried and peers[index].usable(now):
                return _choose(selection, index, now)
            selection.tries += 1
            if selection.tries > MAX_REHASH:
                return super().pick(selection, now)


def _splitServer(server: str) -> tuple[bytes, bytes]:
    """
    Split a C{server} address as nginx's consistent hash does: C{unix:} paths have
    no port; otherwise the port is the digits after the last C{:}, if any.
    """
    data = server.encode("utf-8")
    if data[:5].lower() == b"unix:":
        return data[5:], b""
    host, colon, port = data.rpartition(b":")
    if colon and (not port or port.isdigit()):
        return host, port
    return data, b""


def chashPoints(group: PeerGroup) -> list[tuple[int, str]]:
    """
    The consistent-hash ring of C{group}'s primary peers, as nginx's
    C{ngx_stream_upstream_update_chash} computes it: for each peer, C{160 * weight}
    points C{crc32(HOST "\\0" PORT PREV_HASH)} (Cache::Memcached::Fast compatible),
    where C{PREV_HASH} is the previous point's 4 bytes, little-endian, starting
    from 0; sorted, equal hashes kept once.
    """
    points: list[tuple[int, str]] = []
    for peer in group.primary:
        host, port = _splitServer(peer.server)
        base = zlib.crc32(host + b"\0" + port)
        previous = 0
        for _ in range(peer.weight * POINTS_PER_WEIGHT):
            previous = zlib.crc32(previous.to_bytes(4, "little"), base)
            points.append((previous, peer.server))
    points.sort(key=lambda point: point[0])
    unique: list[tuple[int, str]] = []
    for point in points:
        if not unique or unique[-1][0] != point[0]:
            unique.append(point)
    return unique


@implementer(IPolicy)
class ConsistentHash(RoundRobin):
    """
    C{hash KEY consistent}: ketama; the first ring point at or after C{crc32(KEY)}
    names the server, then the following points.
    """

    def __init__(self, group: PeerGroup) -> None:
        super().__init__(group)
        self.update(group)

    def update(self, group: PeerGroup) -> None:
        self.group = group
        self.points = chashPoints(group)
        self._hashes = [point[0] for point in self.points]

    def begin(self, key: bytes) -> Selection:
        selection = super().begin(key)
        if self.points:
            selection.hash = bisect_left(self._hashes, zlib.crc32(key))
        return selection

    def pick(self, selection: Selection, now: float) -> PeerState | None:
        if (
            selection.tries > MAX_REHASH
            or selection.group.single
            or not selection.key
            or selection.usingBackup
        ):
            return super().pick(selection, now)
        points = self.points
        while True:
            server = points[selection.hash % len(points)][1]
            index = _smooth(selection, now, server)
            if index >= 0:
                return _choose(selection, index, now)
            selection.hash += 1
            selection.tries += 1
            if selection.tries > MAX_REHASH:
                return super().pick(selection, now)


@implementer(IPolicy)
class Random(RoundRobin):
    """
    C{random} and C{random two least_conn}: peers drawn by weight from C{source};
    with C{two}, the less loaded (relative to weight) of two distinct draws.
    """

    def __init__(self, group: PeerGroup, source: RandomSource, two: bool) -> None:
        super().__init__(group)
        self.source = source
        self.two = two
        self.update(group)

    def update(self, group: PeerGroup) -> None:
        self.group = group
        self._starts: list[int] = []
        total = 0
        for peer in group.primary:
            self._starts.append(total)
            total += peer.weight
        self._total = total

    def _peek(self) -> int:
        x = self.source.randrange(self._total)
        return bisect_right(self._starts, x) - 1

    def pick(self, selection: Selection, now: float) -> PeerState | None:
        group = selection.group
        if (
            selection.tries > MAX_REHASH
            or len(group.primary) < 2
            or selection.usingBackup
        ):
            return super().pick(selection, now)
        peers = group.primary
        previous = -1
        while True:
            index = self._peek()
            peer = peers[index]
            if index != previous and index not in selection.tried and peer.usable(now):
                if not self.two:
                    return _choose(selection, index, now)
                if previous >= 0:
                    other = peers[previous]
                    if peer.conns * other.weight > other.conns * peer.weight:
                        index = previous
                    return _choose(selection, index, now)
                previous = index
            selection.tries += 1
            if selection.tries > MAX_REHASH:
                return super().pick(selection, now)


def policyFor(balancer: Balancer, group: PeerGroup, source: RandomSource) -> IPolicy:
    """
    The policy for an C{upstream} group's balancing method.
    """
    if balancer.method == "least_conn":
        return LeastConn(group)
    if balancer.method == "hash":
        return ConsistentHash(group) if balancer.consistent else Hash(group)
    if balancer.method == "random":
        return Random(group, source, balancer.two)
    return RoundRobin(group)
