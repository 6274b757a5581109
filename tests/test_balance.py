# mypy: allow-untyped-calls
"""
Tests for L{tlsrelay._balance}.

Sequences marked "nginx 1.22.1" were recorded from a real nginx (stream module,
C{worker_processes 1}, C{proxy_next_upstream off}, C{max_fails=0}, unreachable
servers, C{hash $remote_port}, logging C{$remote_port|$upstream_addr}).
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tlsrelay._balance import (
    MAX_REHASH,
    POINTS_PER_WEIGHT,
    ConsistentHash,
    Hash,
    IPolicy,
    LeastConn,
    PeerGroup,
    PeerState,
    Random,
    RoundRobin,
    chashPoints,
    policyFor,
)
from tlsrelay._config._model import Address, Balancer, UpstreamServer


def tcp(port: int, host: str = "127.0.0.1") -> Address:
    return Address("tcp", host, port)


def server(
    port: int | Address,
    weight: int = 1,
    maxFails: int = 1,
    failTimeout: float = 10.0,
    backup: bool = False,
    down: bool = False,
    maxConns: int = 0,
) -> UpstreamServer:
    address = port if isinstance(port, Address) else tcp(port)
    return UpstreamServer(
        address,
        weight=weight,
        maxFails=maxFails,
        failTimeout=failTimeout,
        backup=backup,
        down=down,
        maxConns=maxConns,
    )


def group(*servers: UpstreamServer) -> PeerGroup:
    return PeerGroup.fromServers("up", ((s, [s.address]) for s in servers))


def ports(peers: Sequence[PeerState | None]) -> list[int | None]:
    return [None if peer is None else peer.address.port for peer in peers]


def sequence(
    policy: IPolicy, count: int, now: float = 0.0, key: bytes = b""
) -> list[int | None]:
    """
    Pick C{count} times, one connection each, closing it at once.
    """
    picked: list[PeerState | None] = []
    for _ in range(count):
        peer = policy.pick(policy.begin(key), now)
        if peer is not None:
            peer.conns -= 1
        picked.append(peer)
    return ports(picked)


def pickOnce(policy: IPolicy, key: bytes, now: float = 0.0) -> PeerState:
    peer = policy.pick(policy.begin(key), now)
    assert peer is not None
    peer.conns -= 1
    return peer


def probeWhenUsable(
    case: SynchronousTestCase, policy: IPolicy, peer: PeerState, now: float
) -> None:
    """
    Pick until C{peer} comes (its effective weight is low after failures), and
    leave that connection open.
    """
    for _ in range(5):
        picked = policy.pick(policy.begin(b""), now)
        if picked is peer:
            return
        assert picked is not None
        picked.conns -= 1
    case.fail(f"{peer.name} not picked")


class FixedRandom:
    """
    A random source that answers from a list.
    """

    def __init__(self, values: Sequence[int]) -> None:
        self.values = list(values)
        self.asked: list[int] = []

    def randrange(self, start: int, /) -> int:
        self.asked.append(start)
        return self.values.pop(0)


class PolicyInterfaceTests(SynchronousTestCase):
    def test_verifyObject(self) -> None:
        """
        Every policy provides L{IPolicy}.
        """
        peers = group(server(1), server(2))
        for policy in [
            RoundRobin(peers),
            LeastConn(peers),
            Hash(peers),
            ConsistentHash(peers),
            Random(peers, random.Random(1), False),
            Random(peers, random.Random(1), True),
        ]:
            self.assertTrue(verifyObject(IPolicy, policy))

    def test_policyFor(self) -> None:
        """
        The configured method chooses the policy.
        """
        peers = group(server(1), server(2))
        source = random.Random(1)
        cases: list[tuple[Balancer, type[RoundRobin]]] = [
            (Balancer(), RoundRobin),
            (Balancer("least_conn"), LeastConn),
            (Balancer("hash", key="$remote_addr"), Hash),
            (Balancer("hash", key="$remote_addr", consistent=True), ConsistentHash),
            (Balancer("random"), Random),
        ]
        for balancer, kind in cases:
            self.assertIs(type(policyFor(balancer, peers, source)), kind)
        two = policyFor(Balancer("random", two=True), peers, source)
        assert isinstance(two, Random)
        self.assertTrue(two.two)

    def test_noServers(self) -> None:
        """
        A group needs a primary server, as nginx says.
        """
        exc = self.assertRaises(
            ValueError, PeerGroup.fromServers, "up", [(server(1, backup=True), [])]
        )
        self.assertEqual(str(exc), 'no servers in upstream "up"')


class RoundRobinTests(SynchronousTestCase):
    def test_smoothWeighted(self) -> None:
        """
        Weights 5:1:1 give nginx's smooth sequence a a b a c a a, repeating
        (same as nginx 1.22.1).
        """
        policy = RoundRobin(group(server(1, weight=5), server(2), server(3)))
        self.assertEqual(
            sequence(policy, 14), [1, 1, 2, 1, 3, 1, 1, 1, 1, 2, 1, 3, 1, 1]
        )

    def test_equalWeights(self) -> None:
        """
        Equal weights rotate strictly.
        """
        policy = RoundRobin(group(server(1), server(2), server(3)))
        self.assertEqual(sequence(policy, 7), [1, 2, 3, 1, 2, 3, 1])

    def test_triedExcluded(self) -> None:
        """
        One connection never tries a peer twice; when all were tried there is
        none left.
        """
        policy = RoundRobin(group(server(1, weight=5), server(2), server(3)))
        selection = policy.begin(b"")
        picked = [policy.pick(selection, 0) for _ in range(4)]
        self.assertEqual(ports(picked), [1, 2, 3, None])

    def test_downSkipped(self) -> None:
        """
        A C{down} peer is never picked.
        """
        policy = RoundRobin(group(server(1), server(2, down=True), server(3)))
        self.assertEqual(sequence(policy, 4), [1, 3, 1, 3])

    def test_unhealthySkipped(self) -> None:
        """
        A peer marked unhealthy is never picked, even alone.
        """
        peers = group(server(1), server(2))
        peers.primary[0].healthy = False
        self.assertEqual(sequence(RoundRobin(peers), 3), [2, 2, 2])
        alone = group(server(1))
        alone.primary[0].healthy = False
        self.assertEqual(sequence(RoundRobin(alone), 1), [None])

    def test_maxConns(self) -> None:
        """
        A peer with C{maxConns} open connections is skipped; alone, there is no
        peer.
        """
        policy = RoundRobin(group(server(1, maxConns=1), server(2)))
        first = policy.pick(policy.begin(b""), 0)
        self.assertEqual(ports([first]), [1])
        # 1 is busy: every new connection goes to 2.
        self.assertEqual(sequence(policy, 3), [2, 2, 2])
        alone = RoundRobin(group(server(1, maxConns=1)))
        self.assertEqual(ports([alone.pick(alone.begin(b""), 0)]), [1])
        self.assertEqual(ports([alone.pick(alone.begin(b""), 0)]), [None])

    def test_failureLowersEffectiveWeight(self) -> None:
        """
        A failure lowers the effective weight by C{weight / maxFails}; each pick
        (of any peer) raises it back by one.
        """
        peers = group(server(1, weight=4, maxFails=2), server(2))
        a = peers.primary[0]
        self.assertFalse(peers.failed(a, 0))
        self.assertEqual((a.fails, a.effectiveWeight), (1, 2))
        policy = RoundRobin(peers)
        sequence(policy, 1)
        self.assertEqual(a.effectiveWeight, 3)
        sequence(policy, 1)
        self.assertEqual(a.effectiveWeight, 4)
        sequence(policy, 1)
        self.assertEqual(a.effectiveWeight, 4)

    def test_failTimeout(self) -> None:
        """
        C{maxFails} failures within C{failTimeout} keep a peer out until
        C{failTimeout} after the last one; then one connection probes it, and
        others still avoid it until the probe ends well.
        """
        peers = group(server(1, maxFails=2, failTimeout=10), server(2))
        a = peers.primary[0]
        policy = RoundRobin(peers)
        self.assertFalse(peers.failed(a, 1.0))
        # One failure of two allowed: still picked.
        self.assertIn(1, sequence(policy, 4, now=2.0))
        self.assertTrue(peers.failed(a, 3.0))
        self.assertTrue(a.disabled(3.0))
        self.assertEqual(sequence(policy, 4, now=5.0), [2, 2, 2, 2])
        self.assertEqual(sequence(policy, 4, now=13.0), [2, 2, 2, 2])
        # 13.5: more than failTimeout since the last failure; probe.
        probeWhenUsable(self, policy, a, 13.5)
        self.assertEqual(a.checked, 13.5)
        # While the probe is open, others avoid the peer.
        self.assertEqual(sequence(policy, 4, now=14.0), [2, 2, 2, 2])
        a.conns -= 1
        self.assertTrue(peers.succeeded(a))
        self.assertEqual(a.fails, 0)
        self.assertIn(1, sequence(policy, 4, now=14.0))

    def test_failedProbe(self) -> None:
        """
        A probe that fails keeps the peer out for another C{failTimeout}.
        """
        peers = group(server(1, failTimeout=10), server(2))
        a = peers.primary[0]
        policy = RoundRobin(peers)
        peers.failed(a, 0.0)
        self.assertEqual(sequence(policy, 2, now=10.0), [2, 2])
        probeWhenUsable(self, policy, a, 10.5)
        a.conns -= 1
        self.assertTrue(peers.failed(a, 10.5))
        self.assertEqual(sequence(policy, 2, now=20.0), [2, 2])
        probeWhenUsable(self, policy, a, 20.6)

    def test_successWithoutProbe(self) -> None:
        """
        A connection that ends well forgets failures only if the peer was
        picked after C{failTimeout} had passed (nginx's C{accessed < checked}).
        """
        peers = group(server(1, maxFails=3), server(2))
        a = peers.primary[0]
        peers.failed(a, 1.0)
        self.assertFalse(peers.succeeded(a))
        self.assertEqual(a.fails, 1)

    def test_maxFailsZero(self) -> None:
        """
        C{max_fails=0} disables passive health.
        """
        peers = group(server(1, maxFails=0), server(2))
        a = peers.primary[0]
        for _ in range(5):
            self.assertFalse(peers.failed(a, 0))
        self.assertEqual(a.effectiveWeight, 1)
        self.assertIn(1, sequence(RoundRobin(peers), 2))

    def test_singleNotCounted(self) -> None:
        """
        A lone peer's failures are not counted and it is always picked, as in
        nginx.
        """
        peers = group(server(1))
        a = peers.primary[0]
        self.assertTrue(peers.single)
        self.assertFalse(peers.failed(a, 0))
        self.assertEqual(a.fails, 0)
        self.assertEqual(sequence(RoundRobin(peers), 2), [1, 1])
        self.assertEqual(sequence(RoundRobin(group(server(1, down=True))), 1), [None])

    def test_backupOnlyWhenPrimariesUnavailable(self) -> None:
        """
        Backup peers are used only when no primary peer is usable.
        """
        peers = group(
            server(1), server(2), server(3, backup=True), server(4, backup=True)
        )
        self.assertFalse(peers.single)
        self.assertEqual(peers.tries, 4)
        policy = RoundRobin(peers)
        self.assertEqual(sequence(policy, 4), [1, 2, 1, 2])
        peers.primary[0].down = True
        self.assertEqual(sequence(policy, 2), [2, 2])
        peers.failed(peers.primary[1], 0.0)
        self.assertEqual(sequence(policy, 4, now=1.0), [3, 4, 3, 4])
        # The failed primary comes back after failTimeout.
        self.assertEqual(sequence(policy, 1, now=10.5), [2])

    def test_backupAfterTried(self) -> None:
        """
        Within one connection, backups follow once every primary was tried.
        """
        policy = RoundRobin(group(server(1), server(2), server(3, backup=True)))
        selection = policy.begin(b"")
        picked = [policy.pick(selection, 0) for _ in range(4)]
        self.assertEqual(ports(picked), [1, 2, 3, None])
        self.assertTrue(selection.usingBackup)

    def test_singleWithBackup(self) -> None:
        """
        One primary with a backup is not "single": its failures count.
        """
        peers = group(server(1), server(2, backup=True))
        self.assertFalse(peers.single)
        self.assertTrue(peers.failed(peers.primary[0], 0))
        self.assertEqual(sequence(RoundRobin(peers), 2, now=1.0), [2, 2])


class LeastConnTests(SynchronousTestCase):
    def test_fewestConnections(self) -> None:
        """
        The peer with the fewest open connections is picked.
        """
        peers = group(server(1), server(2), server(3))
        peers.primary[0].conns = 3
        peers.primary[1].conns = 1
        peers.primary[2].conns = 2
        self.assertEqual(sequence(LeastConn(peers), 3), [2, 2, 2])

    def test_weighted(self) -> None:
        """
        Connections are compared relative to weight: 3 connections on weight 4
        beat 1 on weight 1.
        """
        peers = group(server(1, weight=4), server(2))
        peers.primary[0].conns = 3
        peers.primary[1].conns = 1
        self.assertEqual(sequence(LeastConn(peers), 1), [1])

    def test_openConnectionsSpread(self) -> None:
        """
        Connections that stay open spread over the peers.
        """
        policy = LeastConn(group(server(1), server(2), server(3)))
        picked = [policy.pick(policy.begin(b""), 0) for _ in range(6)]
        self.assertEqual(sorted(ports(picked)), [1, 1, 2, 2, 3, 3])

    def test_tiesRoundRobin(self) -> None:
        """
        Ties are broken by weighted round robin (same as nginx 1.22.1 with
        weights 3, 1, 2 and short connections).
        """
        policy = LeastConn(group(server(1, weight=3), server(2), server(3, weight=2)))
        self.assertEqual(sequence(policy, 12), [1, 3, 1, 2, 3, 1, 1, 3, 1, 2, 3, 1])

    def test_backup(self) -> None:
        """
        Backups are used when no primary is usable.
        """
        peers = group(server(1, down=True), server(2, backup=True))
        self.assertEqual(sequence(LeastConn(peers), 2), [2, 2])

    def test_maxConnsAndTried(self) -> None:
        """
        Peers at C{maxConns} and peers already tried are skipped.
        """
        peers = group(server(1, maxConns=1), server(2), server(3))
        peers.primary[0].conns = 1
        policy = LeastConn(peers)
        selection = policy.begin(b"")
        picked = [policy.pick(selection, 0) for _ in range(3)]
        self.assertEqual(ports(picked), [2, 3, None])


#: Peers 9101, 9102 (weight 2, down), 9103 (down), 9104: hash $remote_port.
NGINX_HASH = [
    (56136, 9104),
    (56148, 9101),
    (56164, 9101),
    (56180, 9101),
    (56194, 9101),
    (56198, 9101),
    (56210, 9101),
    (56216, 9101),
    (56230, 9104),
    (56242, 9104),
    (56246, 9104),
    (56248, 9104),
]

#: Peers 9101, 9102 (weight 2, down), 9103, localhost:9105 (weight 3, one
#: address 127.0.0.1): hash $remote_port consistent.
NGINX_CHASH_DOWN = [
    (59804, 9105),
    (59808, 9105),
    (59822, 9103),
    (59828, 9103),
    (59838, 9105),
    (59852, 9103),
    (59856, 9105),
    (59866, 9103),
    (59882, 9105),
    (59896, 9101),
    (59910, 9105),
    (59926, 9103),
]

#: Peers 127.0.0.1:9101, 127.0.0.1:9102 (weight 2), 127.0.0.1:9103, [::1]:9104,
#: unix:/tmp/ngxtest/nosock: hash $remote_port consistent.
NGINX_CHASH = [
    (51818, "127.0.0.1:9101"),
    (51826, "127.0.0.1:9102"),
    (51836, "[::1]:9104"),
    (51842, "127.0.0.1:9101"),
    (51852, "127.0.0.1:9102"),
    (51860, "unix:/tmp/ngxtest/nosock"),
    (51866, "[::1]:9104"),
    (51880, "127.0.0.1:9102"),
    (51896, "127.0.0.1:9103"),
]


def keys(count: int) -> list[bytes]:
    return [f"10.{i >> 8 & 255}.{i & 255}.{i % 7}".encode() for i in range(count)]


class HashTests(SynchronousTestCase):
    def test_stable(self) -> None:
        """
        The same key always picks the same peer; different keys spread.
        """
        policy = Hash(group(server(1), server(2), server(3)))
        for key in keys(50):
            first = pickOnce(policy, key)
            for _ in range(3):
                self.assertIs(pickOnce(policy, key), first)
        spread = Counter(pickOnce(policy, key).address.port for key in keys(3000))
        self.assertEqual(set(spread), {1, 2, 3})
        for count in spread.values():
            self.assertTrue(800 < count < 1200, spread)

    def test_nginx(self) -> None:
        """
        Keys map as in nginx 1.22.1, rehashing past C{down} peers.
        """
        policy = Hash(
            group(
                server(9101),
                server(9102, weight=2, down=True),
                server(9103, down=True),
                server(9104),
            )
        )
        for key, port in NGINX_HASH:
            self.assertEqual(pickOnce(policy, str(key).encode()).address.port, port)

    def test_firstStep(self) -> None:
        """
        The first step is C{(crc32(KEY) >> 16) & 0x7fff} modulo the total weight.
        """
        policy = Hash(group(server(1, weight=2), server(2), server(3, weight=4)))
        for key in keys(100):
            w = ((zlib.crc32(key) >> 16) & 0x7FFF) % 7
            expected = 1 if w < 2 else 2 if w < 3 else 3
            self.assertEqual(pickOnce(policy, key).address.port, expected)

    def test_nextTriesOthers(self) -> None:
        """
        The next pick of one connection rehashes to an untried peer.
        """
        policy = Hash(group(server(1), server(2), server(3)))
        selection = policy.begin(b"key")
        picked = [policy.pick(selection, 0) for _ in range(3)]
        self.assertEqual(sorted(ports(picked)), [1, 2, 3])

    def test_fallBackToRoundRobin(self) -> None:
        """
        After 20 rehashes without a usable peer, round robin takes over.
        """
        peers = group(server(1, maxConns=1), server(2, maxConns=1))
        for peer in peers.primary:
            peer.conns = 1
        policy = Hash(peers)
        selection = policy.begin(b"key")
        self.assertIsNone(policy.pick(selection, 0))
        self.assertEqual(selection.tries, MAX_REHASH + 1)

    def test_emptyKey(self) -> None:
        """
        An empty key means round robin.
        """
        policy = Hash(group(server(1), server(2)))
        self.assertEqual(sequence(policy, 4, key=b""), [1, 2, 1, 2])

    def test_totalWeight(self) -> None:
        """
        The primary peers' total weight, which each pick divides by, is the
        group's; a group that replaces it (names resolved) has its own, and
        the policy picks by that one after C{update}.
        """
        before = group(server(1, weight=2), server(2), server(3, weight=4, backup=True))
        self.assertEqual(before.totalWeight, 3)
        policy = Hash(before)
        resolved = PeerGroup.fromServers(
            "up",
            [
                (before.primary[0].config, [tcp(1)]),
                (before.primary[1].config, [tcp(2), tcp(22)]),
            ],
            before,
        )
        self.assertEqual(resolved.totalWeight, 4)
        policy.update(resolved)
        for key in keys(100):
            w = ((zlib.crc32(key) >> 16) & 0x7FFF) % 4
            expected = 1 if w < 2 else 2 if w < 3 else 22
            self.assertEqual(pickOnce(policy, key).address.port, expected)

    def test_moves(self) -> None:
        """
        Without C{consistent}, adding a server moves most keys.
        """
        before = Hash(group(server(1), server(2), server(3)))
        after = Hash(group(server(1), server(2), server(3), server(4)))
        moved = sum(
            pickOnce(before, key).address.port != pickOnce(after, key).address.port
            for key in keys(10000)
        )
        self.assertGreater(moved, 5000)


class ConsistentHashTests(SynchronousTestCase):
    def test_points(self) -> None:
        """
        160 points per unit of weight, sorted, computed as nginx does.
        """
        peers = group(server(1, weight=2), server(2))
        points = chashPoints(peers)
        self.assertEqual(len(points), 3 * POINTS_PER_WEIGHT)
        self.assertEqual(points, sorted(points))
        base = zlib.crc32(b"127.0.0.1\x002")
        first = zlib.crc32(b"\0\0\0\0", base)
        second = zlib.crc32(first.to_bytes(4, "little"), base)
        self.assertIn((first, "127.0.0.1:2"), points)
        self.assertIn((second, "127.0.0.1:2"), points)
        self.assertEqual(first, zlib.crc32(b"127.0.0.1\x002\0\0\0\0"))

    def test_nginx(self) -> None:
        """
        Keys map as in nginx 1.22.1, with IPv6 and UNIX servers.
        """
        policy = ConsistentHash(
            group(
                server(9101),
                server(9102, weight=2),
                server(9103),
                server(tcp(9104, "::1")),
                server(Address("unix", path="/tmp/ngxtest/nosock")),
            )
        )
        for key, name in NGINX_CHASH:
            self.assertEqual(pickOnce(policy, str(key).encode()).name, name)

    def test_nginxDownAndName(self) -> None:
        """
        Keys map as in nginx 1.22.1 past a C{down} server; a server written as a
        name hashes by that name, whatever its addresses.
        """
        named = server(tcp(9105, "localhost"), weight=3)
        servers = [
            (server(9101), [tcp(9101)]),
            (server(9102, weight=2, down=True), [tcp(9102)]),
            (server(9103), [tcp(9103)]),
            (named, [tcp(9105)]),
        ]
        policy = ConsistentHash(PeerGroup.fromServers("up", servers))
        self.assertEqual(policy.group.primary[3].server, "localhost:9105")
        for key, port in NGINX_CHASH_DOWN:
            self.assertEqual(pickOnce(policy, str(key).encode()).address.port, port)

    def test_stable(self) -> None:
        """
        The same key always picks the same peer.
        """
        policy = ConsistentHash(group(server(1), server(2), server(3)))
        for key in keys(50):
            first = pickOnce(policy, key)
            self.assertIs(pickOnce(policy, key), first)

    def test_addingMovesFew(self) -> None:
        """
        Adding a fourth server to three moves about a quarter of 10000 keys, all
        of them to the new server.
        """
        three = ConsistentHash(group(server(1), server(2), server(3)))
        four = ConsistentHash(group(server(1), server(2), server(3), server(4)))
        moved = 0
        for key in keys(10000):
            old = pickOnce(three, key).address.port
            new = pickOnce(four, key).address.port
            if old != new:
                moved += 1
                self.assertEqual(new, 4)
        self.assertTrue(2500 - 700 < moved < 2500 + 700, moved)

    def test_downMovesOnlyItsKeys(self) -> None:
        """
        When a server is down, only its keys move.
        """
        peers = group(server(1), server(2), server(3), server(4))
        policy = ConsistentHash(peers)
        before = {key: pickOnce(policy, key).address.port for key in keys(2000)}
        peers.primary[1].down = True
        for key, port in before.items():
            now = pickOnce(policy, key).address.port
            if port != 2:
                self.assertEqual(now, port)
            else:
                self.assertNotEqual(now, 2)

    def test_multipleAddresses(self) -> None:
        """
        The addresses of one name share its points; round robin between them.
        """
        named = server(tcp(80, "backend.example"))
        other = server(tcp(80, "other.example"))
        peers = PeerGroup.fromServers(
            "up",
            [
                (named, [tcp(80, "10.0.0.1"), tcp(80, "10.0.0.2")]),
                (other, [tcp(80, "10.0.0.3")]),
            ],
        )
        self.assertEqual(len(chashPoints(peers)), 2 * POINTS_PER_WEIGHT)
        policy = ConsistentHash(peers)
        key = next(
            k for k in keys(100) if pickOnce(policy, k).server == str(named.address)
        )
        hosts = {pickOnce(policy, key).address.host for _ in range(4)}
        self.assertEqual(hosts, {"10.0.0.1", "10.0.0.2"})

    def test_fallBackToRoundRobin(self) -> None:
        """
        After 20 points without a usable peer, round robin takes over.
        """
        peers = group(server(1, maxConns=1), server(2, maxConns=1))
        for peer in peers.primary:
            peer.conns = 1
        policy = ConsistentHash(peers)
        selection = policy.begin(b"key")
        self.assertIsNone(policy.pick(selection, 0))
        self.assertEqual(selection.tries, MAX_REHASH + 1)


class RandomTests(SynchronousTestCase):
    def test_seeded(self) -> None:
        """
        The same seed gives the same picks; picks follow the weights.
        """
        peers = group(server(1, weight=3), server(2), server(3))
        first = sequence(Random(peers, random.Random(7), False), 50)
        second = sequence(Random(peers, random.Random(7), False), 50)
        self.assertEqual(first, second)
        spread = Counter(sequence(Random(peers, random.Random(7), False), 10000))
        self.assertTrue(5600 < spread[1] < 6400, spread)
        self.assertTrue(1700 < spread[2] < 2300, spread)
        self.assertTrue(1700 < spread[3] < 2300, spread)

    def test_ranges(self) -> None:
        """
        A draw C{x} in C{[0, total weight)} picks the peer whose range holds it.
        """
        peers = group(server(1, weight=2), server(2), server(3, weight=3))
        source = FixedRandom([0, 1, 2, 3, 5])
        policy = Random(peers, source, False)
        self.assertEqual(sequence(policy, 5), [1, 1, 2, 3, 3])
        self.assertEqual(source.asked, [6] * 5)

    def test_skipsTriedAndUnusable(self) -> None:
        """
        Draws that land on a tried or unusable peer draw again.
        """
        peers = group(server(1), server(2, down=True), server(3))
        policy = Random(peers, FixedRandom([0, 0, 1, 2]), False)
        selection = policy.begin(b"")
        picked = [policy.pick(selection, 0), policy.pick(selection, 0)]
        self.assertEqual(ports(picked), [1, 3])
        self.assertEqual(selection.tries, 2)

    def test_twoLeastConn(self) -> None:
        """
        C{random two least_conn} draws two distinct usable peers and picks the
        one with fewer connections relative to weight; the second on a tie.
        """
        peers = group(server(1), server(2), server(3))
        peers.primary[0].conns = 2
        policy = Random(peers, FixedRandom([0, 0, 1]), True)
        self.assertEqual(sequence(policy, 1), [2])
        peers.primary[1].conns = 5
        policy = Random(peers, FixedRandom([0, 1]), True)
        self.assertEqual(sequence(policy, 1), [1])
        policy = Random(peers, FixedRandom([2, 0]), True)
        peers.primary[2].conns = 2
        self.assertEqual(sequence(policy, 1), [1])

    def test_fallBackToRoundRobin(self) -> None:
        """
        After 20 draws without a usable peer, round robin takes over.
        """
        peers = group(server(1, down=True), server(2, down=True))
        policy = Random(peers, random.Random(1), True)
        selection = policy.begin(b"")
        self.assertIsNone(policy.pick(selection, 0))
        self.assertEqual(selection.tries, MAX_REHASH + 1)
