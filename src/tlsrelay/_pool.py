"""
The upstream pool: the peers of an C{upstream} group, their health, and connecting
to one of them with nginx's C{proxy_next_upstream} semantics.

Host names in C{server} lines: nginx resolves them when it loads the configuration
and every address becomes a peer.  Here, peers for literal addresses and UNIX paths
exist from the start; L{UpstreamPool.resolveAll} (called by the service before it
listens) resolves every name through the reactor's C{nameResolver}, IPv4 and IPv6,
in the resolver's order, and replaces the name by one peer per address; a name
without addresses fails start-up as nginx does (C{host not found in upstream}).  A
name still unresolved when a connection is needed is connected through a
L{HostnameEndpoint}.  Names are not re-resolved later (nginx needs C{resolver} and
the C{resolve} parameter for that, which we do not support).

Passive health follows nginx: a failed connection counts one failure of its peer;
C{maxFails} failures keep the peer out until C{failTimeout} has passed since the
last one; then one connection probes it, and if that connection ends well
(L{UpstreamConnection.release} without C{failed}) the failures are forgotten.  A
group of one peer (C{proxy_pass host:port} with one address) counts no failures
and is never retried, as in nginx.

Upstream TLS: when C{tlsFor} gives a creator for a peer, the connection runs through a
C{TLSMemoryBIOFactory(creator, True, ...)}, and, as in nginx, the attempt succeeds
only when the handshake completes: the caller's protocol is connected then (it never
sees a connection whose handshake failed), C{proxy_connect_timeout} covers TCP
connect and handshake together, and a failed handshake (a refused certificate, an
upstream that closes) counts as a failure of that peer and moves on to the next one
as C{proxy_next_upstream} allows.  A failed handshake also forgets the peer's TLS
session (L{PeerState.session}), so a session the upstream chokes on is not offered
again.

Active health checks (L{tlsrelay._health.HealthChecker}) make the same attempt as a
relayed connection through L{UpstreamPool.connectPeer}, counting nothing, and say
what they found through L{UpstreamPool.markHealthy}.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from errno import EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from functools import partial
from os import strerror
from typing import Any
from typing import Protocol as _Structural

from attrs import define, field
from OpenSSL import SSL
from twisted.internet import abstract, error, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IHostResolution,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsrelay._balance import (
    IPolicy,
    PeerGroup,
    PeerState,
    RandomSource,
    Selection,
    policyFor,
)
from tlsrelay._config._model import (
    Address,
    Proxy,
    UpstreamGroup,
    UpstreamServer,
)
from tlsrelay._log import Logger
from tlsrelay._openssl import sessionReused
from tlsrelay._tlsfactory import Deadlines, FastTLSProtocol, LeanSocketMixin

log = Logger()

TLSFor = Callable[[PeerState], IOpenSSLClientConnectionCreator | None]

_Connected = tuple[IProtocol, bool | None]
"""
A connected attempt: the caller's protocol, and whether TLS resumed a session
(L{None} without TLS).
"""


class NoUpstreamAvailable(Exception):
    """
    No connection to any peer of an upstream group could be made.

    @ivar upstream: the group's name.
    @ivar addresses: what was tried, for C{$upstream_addr}; the group's name comes
        last when no usable peer was left ("no live upstreams"), as nginx prints it.
    @ivar reasons: why each tried peer failed, parallel to the peers in
        C{addresses}.
    @ivar peer: C{$upstream_addr}: C{addresses} joined with C{", "}.
    @ivar connectTimes: C{$upstream_connect_time}: L{None} for each of
        C{addresses}, since none connected (nginx prints C{-} for each).
    """

    def __init__(
        self, upstream: str, addresses: Sequence[str], reasons: Sequence[str]
    ) -> None:
        self.upstream = upstream
        self.addresses = list(addresses)
        self.reasons = list(reasons)
        self.peer = ", ".join(self.addresses)
        self.connectTimes: list[float | None] = [None] * len(self.addresses)
        tried = ", ".join(
            f"{address} ({reason})"
            for address, reason in zip(self.addresses, self.reasons)
        )
        if len(self.addresses) > len(self.reasons):
            message = f'no live upstreams in "{upstream}"'
            if tried:
                message += f"; tried {tried}"
        else:
            message = f'upstream "{upstream}" failed: tried {tried}'
        super().__init__(message)


class UpstreamHandshakeFailed(Exception):
    """
    TCP connected to an upstream, but the TLS handshake did not complete.

    @ivar reason: what the TLS layer reported (an L{SSL.Error}, or the connection
        lost).
    """

    def __init__(self, reason: Failure) -> None:
        super().__init__(_handshakeReason(reason))
        self.reason = reason


def _handshakeReason(reason: Failure) -> str:
    """
    One line on why a handshake failed, for logs and C{NoUpstreamAvailable}.
    """
    value = reason.value
    if isinstance(value, SSL.Error):
        args = value.args
        text = str(value)
        if not args or text != str(args[0]):
            return text  # worded by a subclass, e.g. a refused certificate
        if isinstance(args[0], list):
            parts = [
                str(part[2])
                for part in args[0]
                if isinstance(part, tuple) and len(part) == 3
            ]
            if parts:
                return f"SSL handshake failed: {', '.join(parts)}"
        return f"SSL handshake failed: {value}"
    return f"peer closed connection in SSL handshake ({reason.getErrorMessage()})"


class HostNotFound(Exception):
    """
    A host name of a C{server} line has no address.
    """


def groupForAddress(address: Address) -> UpstreamGroup:
    """
    The group of one server that C{proxy_pass host:port} stands for (nginx's
    implicit upstream: weight 1, C{max_fails=1}, C{fail_timeout=10s}).
    """
    return UpstreamGroup(name=str(address), servers=(UpstreamServer(address),))


def _literal(address: Address) -> bool:
    return address.kind == "unix" or bool(
        isIPAddress(address.host) or isIPv6Address(address.host)
    )


@define(eq=False)
class UpstreamConnection:
    """
    A connected upstream, as L{UpstreamPool.connect} gives it.

    @ivar protocol: the protocol built by the caller's factory, connected.
    @ivar peer: the peer connected to, as C{$upstream_addr} prints it (see
        L{upstreamAddr} for every peer tried).
    @ivar connectTime: seconds the successful connection took.
    @ivar addresses: every peer tried, in order (C{$upstream_addr} joins them with
        C{", "}).
    @ivar connectTimes: seconds per try, L{None} for the failed ones
        (C{$upstream_connect_time} prints C{-} for them).
    @ivar state: the peer's shared state.
    @ivar sessionReused: with upstream TLS, whether the handshake resumed a
        session (C{$upstream_ssl_session_reused}: C{r} or C{.}); L{None} without.
    """

    protocol: IProtocol
    peer: str
    connectTime: float
    addresses: list[str]
    connectTimes: list[float | None]
    state: PeerState
    _onRelease: Callable[[bool], None] = field(alias="onRelease", repr=False)
    sessionReused: bool | None = None
    _released: bool = field(default=False, init=False, repr=False)

    @property
    def upstreamAddr(self) -> str:
        """
        C{$upstream_addr}: every peer tried, joined with C{", "}.
        """
        return ", ".join(self.addresses)

    def release(self, failed: bool = False) -> None:
        """
        The relay is done with this connection: count it out of the peer's
        connections (C{least_conn}, C{max_conns}) and count a success, or a failure
        if C{failed} (passive health).  Only the first call counts.
        """
        if self._released:
            return
        self._released = True
        self._onRelease(failed)


@implementer(IResolutionReceiver)
class _Addresses:
    """
    Collects the addresses of one host name.
    """

    def __init__(self) -> None:
        self.addresses: list[IAddress] = []
        self.done: Deferred[list[IAddress]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


class UpstreamPool:
    """
    The peers of one C{upstream} group, their state, and connections to them.

    @ivar group: the configuration.
    @ivar peers: the peers, with their state.
    @ivar policy: the balancing method.
    """

    def __init__(
        self,
        group: UpstreamGroup,
        reactor: IReactorTime,
        random: RandomSource,
        tlsFor: TLSFor | None = None,
    ) -> None:
        """
        @param reactor: provides L{IReactorTime}, C{IReactorTCP}, C{IReactorUNIX}
            and L{IReactorPluggableNameResolver}.
        @param random: the random source of the C{random} method.
        @param tlsFor: the upstream TLS client creator for a peer, or L{None} for
            plain TCP; connections are then wrapped in a
            L{twisted.protocols.tls.TLSMemoryBIOFactory}.
        """
        self.config = group
        self._reactor = reactor
        self._tlsFor = tlsFor
        self.peers = PeerGroup.fromServers(
            group.name, ((server, [server.address]) for server in group.servers)
        )
        self.policy: IPolicy = policyFor(group.balancer, self.peers, random)
        # Built once per peer (and timeout and port), not per attempt; forgotten
        # for peers that resolving names replaced.
        self._endpoints: dict[
            tuple[PeerState, float, int | None], IStreamClientEndpoint
        ] = {}
        self._creators: dict[PeerState, IOpenSSLClientConnectionCreator | None] = {}
        self._targets: dict[tuple[PeerState, int | None], _Target | None] = {}
        self._releasers: dict[PeerState, Callable[[bool], None]] = {}
        self._deadlines: dict[float, Deadlines[_Dial]] = {}

    def resolveAll(self) -> Deferred[None]:
        """
        Resolve every host name of the group's C{server} lines into peers, one per
        address (IPv4 and IPv6); fails with L{HostNotFound} if a name has none.
        """
        names = [
            server for server in self.config.servers if not _literal(server.address)
        ]
        if not names:
            return succeed(None)
        resolver = IReactorPluggableNameResolver(self._reactor).nameResolver
        waiting: list[Deferred[list[IAddress]]] = []
        for server in names:
            receiver = _Addresses()
            resolver.resolveHostName(
                receiver,
                server.address.host,
                server.address.port,
                addressTypes=[IPv4Address, IPv6Address],
                transportSemantics="TCP",
            )
            waiting.append(receiver.done)

        def resolved(results: list[list[IAddress]]) -> None:
            found = dict(zip((id(server) for server in names), results))
            servers: list[tuple[UpstreamServer, list[Address]]] = []
            for server in self.config.servers:
                if id(server) not in found:
                    servers.append((server, [server.address]))
                    continue
                addresses: list[Address] = []
                for address in found[id(server)]:
                    if isinstance(address, (IPv4Address, IPv6Address)):
                        one = Address("tcp", address.host, server.address.port)
                        if one not in addresses:
                            addresses.append(one)
                if not addresses:
                    where = f" in {server.where}" if server.where else ""
                    raise HostNotFound(
                        f'host not found in upstream "{server.address}"{where}'
                    )
                servers.append((server, addresses))
            self.peers = PeerGroup.fromServers(self.config.name, servers, self.peers)
            self.policy.update(self.peers)
            self._forgetReplacedPeers()
            log.info(
                "upstream {upstream} resolved: {peers}",
                upstream=self.config.name,
                peers=", ".join(peer.name for peer in self.peers.peers()),
            )

        return gatherResults(waiting, consumeErrors=True).addCallback(resolved)

    def markHealthy(
        self, peer: PeerState, healthy: bool, reason: str | None = None
    ) -> None:
        """
        An active health check says whether C{peer} is healthy; an unhealthy peer
        is not picked until it is marked healthy again.

        @param reason: why, for the log line of a change (e.g. what the last
            check found).
        """
        if peer.healthy == healthy:
            return
        peer.healthy = healthy
        why = "" if reason is None else " ({reason})"
        if healthy:
            log.info(
                "upstream server {peer} of {upstream} is healthy again" + why,
                peer=peer.name,
                upstream=self.config.name,
                reason=reason,
            )
        else:
            log.warn(
                "upstream server {peer} of {upstream} is unhealthy" + why,
                peer=peer.name,
                upstream=self.config.name,
                reason=reason,
            )

    def connect(
        self, factory: IProtocolFactory, hashKey: bytes, proxy: Proxy
    ) -> Deferred[UpstreamConnection]:
        """
        Connect C{factory}'s protocol to a peer picked by the balancing method
        (C{hashKey} is the evaluated C{hash} key), trying the next peers on failure
        as C{proxy_next_upstream*} allow, each within C{proxy_connect_timeout}.

        Fails with L{NoUpstreamAvailable}; cancelling stops the attempt.
        """
        result = _Connecting(self, factory, hashKey, proxy).result
        assert result is not None
        return result

    def connectFor(
        self,
        factory: IProtocolFactory,
        hashKey: bytes,
        listener: ConnectionListener,
        proxy: Proxy,
    ) -> _Connecting:
        """
        L{connect}, telling C{listener} the outcome instead of a L{Deferred}
        (a relayed connection needs none): C{upstreamConnected} with the
        L{UpstreamConnection}, or C{upstreamFailed} with what the L{Deferred}
        would have failed with.  Either may be called before this returns.

        @return: the attempt, whose C{cancel()} stops it (C{upstreamFailed} is
            then told a L{CancelledError}, as a cancelled L{Deferred} fails).
        """
        return _Connecting(self, factory, hashKey, proxy, listener)

    def _forgetReplacedPeers(self) -> None:
        current = set(self.peers.peers())
        self._endpoints = {
            key: endpoint
            for key, endpoint in self._endpoints.items()
            if key[0] in current
        }
        self._creators = {
            peer: creator for peer, creator in self._creators.items() if peer in current
        }
        self._targets = {
            key: target for key, target in self._targets.items() if key[0] in current
        }
        self._releasers = {
            peer: releaser
            for peer, releaser in self._releasers.items()
            if peer in current
        }

    def _creator(self, peer: PeerState) -> IOpenSSLClientConnectionCreator | None:
        if self._tlsFor is None:
            return None
        try:
            return self._creators[peer]
        except KeyError:
            creator = self._creators[peer] = self._tlsFor(peer)
            return creator

    def connectPeer(
        self,
        peer: PeerState,
        factory: IProtocolFactory,
        timeout: float,
        port: int | None = None,
    ) -> Deferred[tuple[IProtocol, bool | None]]:
        """
        One attempt at one peer, as a relayed connection makes it: connect
        C{factory}'s protocol to C{peer} and, when C{tlsFor} gives a creator for
        it, complete the TLS handshake (with verification) before the protocol is
        connected.  Counts nothing: passive health is the caller's business.

        @param timeout: seconds for TCP connect and handshake together.
        @param port: connect to this port instead of the peer's (TCP peers; a
            UNIX peer has none), as C{health_check port=} does.
        @return: fires with the connected protocol and whether TLS resumed a
            session (L{None} without TLS); fails with L{error.TimeoutError} when
            C{timeout} passes first, with the TCP failure, or with
            L{UpstreamHandshakeFailed}.  Cancelling aborts the attempt.
        """
        reactor = self._reactor
        try:
            dial = self._dialPlain(peer, factory, timeout, port)
            if dial is not None:
                assert dial.result is not None
                return dial.result.addCallback(_plain)
            creator = self._creator(peer)
            target = self._target(peer, port)
            connect: Callable[[IProtocolFactory], Deferred[IProtocol]]
            if target is not None:
                connect = partial(_dial, reactor, target)  # type: ignore[arg-type]
            else:
                connect = self._endpoint(peer, timeout, port).connect
            pending: Deferred[_Connected]
            if creator is None:
                pending = connect(factory).addCallback(_plain)
            else:
                pending = _Securing(connect, creator, factory, peer, reactor).result
        except BaseException:
            return fail()
        return pending.addTimeout(timeout, reactor, _timedOut)

    def _dialPlain(
        self,
        peer: PeerState,
        factory: IProtocolFactory,
        timeout: float,
        port: int | None = None,
        listener: _DialListener | None = None,
    ) -> _Dial | None:
        """
        A L{_Dial} to C{peer} if it is plain TCP to an address on a POSIX
        reactor (it keeps its own time, and tells C{listener} if given),
        else L{None}.
        """
        if self._creator(peer) is not None:
            return None
        target = self._target(peer, port)
        if target is None:
            return None
        return _Dial(
            self._reactor,  # type: ignore[arg-type]
            target,
            factory,
            self._dialDeadlines(timeout),
            listener,
        )

    def _dialDeadlines(self, timeout: float) -> Deadlines[_Dial]:
        deadlines = self._deadlines.get(timeout)
        if deadlines is None:
            deadlines = self._deadlines[timeout] = Deadlines(
                self._reactor, timeout, _Dial.timedOut
            )
        return deadlines

    def _releaser(self, peer: PeerState) -> Callable[[bool], None]:
        # One per peer, rather than one per connection.
        releaser = self._releasers.get(peer)
        if releaser is None:
            releaser = self._releasers[peer] = partial(self._release, peer)
        return releaser

    def _target(self, peer: PeerState, port: int | None) -> _Target | None:
        """
        Where a L{_Dial} connects for C{peer} (and C{port}): a literal TCP
        address on a POSIX reactor; L{None} (an endpoint connects) otherwise.
        """
        key = (peer, port)
        try:
            return self._targets[key]
        except KeyError:
            pass
        address = peer.address
        target: _Target | None = None
        if (
            address.kind != "unix"
            and isinstance(self._reactor, PosixReactorBase)
            and _literal(address)
        ):
            number = address.port if port is None else port
            if isIPv6Address(address.host):
                target = (socket.AF_INET6, tcp._resolveIPv6(address.host, number))
            else:
                target = (socket.AF_INET, (address.host, number))
        self._targets[key] = target
        return target

    def _endpoint(
        self, peer: PeerState, timeout: float, port: int | None = None
    ) -> IStreamClientEndpoint:
        key = (peer, timeout, port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._newEndpoint(peer, timeout, port)
        return endpoint

    def _newEndpoint(
        self, peer: PeerState, timeout: float, port: int | None
    ) -> IStreamClientEndpoint:
        address = peer.address
        if port is None:
            port = address.port
        endpoint: IStreamClientEndpoint
        if address.kind == "unix":
            endpoint = UNIXClientEndpoint(  # type: ignore[no-untyped-call]
                self._reactor, address.path, timeout=timeout
            )
        elif _literal(address):
            # connectTCP takes IPv6 literals as well as IPv4 ones.
            endpoint = TCP4ClientEndpoint(
                self._reactor, address.host, port, timeout=timeout
            )
        else:
            endpoint = HostnameEndpoint(
                self._reactor, address.host, port, timeout=timeout
            )
        return endpoint

    def _failed(self, peer: PeerState, reason: str) -> None:
        log.warn(
            "connect() to {peer} failed ({reason}) while connecting to upstream"
            " {upstream}",
            peer=peer.name,
            reason=reason,
            upstream=self.config.name,
        )
        self._countFailure(peer)

    def _countFailure(self, peer: PeerState) -> None:
        if self.peers.failed(peer, self._reactor.seconds()):
            log.warn(
                "upstream server {peer} of {upstream} temporarily disabled for"
                " {failTimeout}s after {fails} failures",
                peer=peer.name,
                upstream=self.config.name,
                failTimeout=peer.failTimeout,
                fails=peer.fails,
            )

    def _release(self, peer: PeerState, failed: bool) -> None:
        peer.conns -= 1
        if failed:
            self._countFailure(peer)
        elif self.peers.succeeded(peer):
            log.info(
                "upstream server {peer} of {upstream} is available again",
                peer=peer.name,
                upstream=self.config.name,
            )


class ConnectionListener(_Structural):
    """
    What L{UpstreamPool.connectFor} tells the outcome of an attempt.
    """

    def upstreamConnected(self, connection: UpstreamConnection) -> None:
        """
        The attempt connected.
        """

    def upstreamFailed(self, reason: Failure) -> None:
        """
        The attempt failed (L{NoUpstreamAvailable}) or was cancelled
        (L{CancelledError}).
        """


class _Connecting:
    """
    One connection attempt across peers (nginx's C{ngx_stream_proxy_connect} and
    C{ngx_stream_proxy_next_upstream}).

    Its outcome goes to C{result} or, when given one, to a listener (and
    C{result} is L{None}).
    """

    def __init__(
        self,
        pool: UpstreamPool,
        factory: IProtocolFactory,
        hashKey: bytes,
        proxy: Proxy,
        listener: ConnectionListener | None = None,
    ) -> None:
        self.pool = pool
        self.factory = factory
        self.proxy = proxy
        self.reactor = pool._reactor
        self._listener = listener
        self.result: Deferred[UpstreamConnection] | None = (
            Deferred(self._cancel) if listener is None else None
        )
        self.selection: Selection = pool.policy.begin(hashKey)
        self.tries = pool.peers.tries
        if proxy.nextUpstreamTries and self.tries > proxy.nextUpstreamTries:
            self.tries = proxy.nextUpstreamTries
        self.addresses: list[str] = []
        self.connectTimes: list[float | None] = []
        self.reasons: list[str] = []
        self.started = self.reactor.seconds()
        self.attemptStarted = self.started
        self.peer: PeerState | None = None
        self.pending: Deferred[_Connected] | _Dial | None = None
        self.cancelled = False
        self._next()

    def _next(self) -> None:
        now = self.reactor.seconds()
        peer = self.pool.policy.pick(self.selection, now)
        if peer is None:
            log.error(
                "no live upstreams while connecting to upstream {upstream}",
                upstream=self.pool.config.name,
            )
            self.addresses.append(self.pool.config.name)
            self.connectTimes.append(None)
            self._fail()
            return
        self.peer = peer
        self.addresses.append(peer.name)
        self.connectTimes.append(None)
        self.attemptStarted = now
        pool, timeout = self.pool, self.proxy.connectTimeout
        try:
            # Plain TCP to an address: the dial tells this attempt itself.
            dial = pool._dialPlain(peer, self.factory, timeout, listener=self)
        except Exception:
            dial = None  # connectPeer fails the attempt with the same error
        if dial is not None:
            if not dial.settled:
                # (Unless it failed at once, and the next attempt is pending.)
                self.pending = dial
            return
        pending = pool.connectPeer(peer, self.factory, timeout)
        self.pending = pending
        pending.addCallbacks(self._connected, self._notConnected)

    def dialed(self, outcome: IProtocol | Failure) -> None:
        if isinstance(outcome, Failure):
            self._notConnected(outcome)
        else:
            self._connected((outcome, None))

    def _connected(self, result: _Connected) -> None:
        protocol, reused = result
        self.pending = None
        peer = self.peer
        assert peer is not None
        connectTime = self.reactor.seconds() - self.attemptStarted
        self.connectTimes[-1] = connectTime
        connection = UpstreamConnection(
            protocol=protocol,
            peer=peer.name,
            connectTime=connectTime,
            addresses=self.addresses,
            connectTimes=self.connectTimes,
            state=peer,
            onRelease=self.pool._releaser(peer),
            sessionReused=reused,
        )
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.upstreamConnected(connection)
        else:
            assert self.result is not None
            self.result.callback(connection)

    def _notConnected(self, reason: Failure) -> None:
        self.pending = None
        peer = self.peer
        assert peer is not None
        if self.cancelled:
            # The client went away: not the peer's fault.
            peer.conns -= 1
            return
        if isinstance(reason.value, error.TimeoutError):
            why = "upstream timed out"
        elif isinstance(reason.value, (error.ConnectingCancelledError, CancelledError)):
            why = "cancelled"
        else:
            why = reason.getErrorMessage()
        self.reasons.append(why)
        peer.conns -= 1
        self.pool._failed(peer, why)
        if self.pool.peers.single:
            self.tries = 0
        elif self.tries:
            self.tries -= 1
        timeout = self.proxy.nextUpstreamTimeout
        if (
            self.tries == 0
            or not self.proxy.nextUpstream
            or (timeout and self.reactor.seconds() - self.started >= timeout)
        ):
            self._fail()
            return
        self._next()

    def _fail(self) -> None:
        self._failWith(
            Failure(
                NoUpstreamAvailable(self.pool.config.name, self.addresses, self.reasons)
            )
        )

    def _failWith(self, reason: Failure) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.upstreamFailed(reason)
        else:
            assert self.result is not None
            self.result.errback(reason)

    def cancel(self) -> None:
        """
        Give up, as cancelling C{result} does: what is pending is cancelled,
        and the outcome is a L{CancelledError} unless one came first.
        """
        if self.result is not None:
            self.result.cancel()
            return
        if self._listener is None:
            return
        self._cancel(None)
        if self._listener is not None:
            self._failWith(Failure(CancelledError()))

    def _cancel(self, result: Deferred[UpstreamConnection] | None) -> None:
        self.cancelled = True
        if self.pending is not None:
            self.pending.cancel()


_Target = tuple[int, tuple[Any, ...]]
"""
A socket address family and address to connect to.
"""


def _plain(protocol: IProtocol) -> _Connected:
    return protocol, None


def _timedOut(result: _Connected | Failure, timeout: float) -> _Connected | Failure:
    """
    An attempt cancelled by its timeout fails with L{error.TimeoutError}, whatever
    the cancelled layer reported (C{ConnectingCancelledError}, a lost handshake).
    """
    if isinstance(result, Failure):
        return Failure(error.TimeoutError(string=f"no connection within {timeout}s"))
    return result


@implementer(IHandshakeListener)
class _Handshaking(Protocol):
    """
    Stands in for the caller's protocol under C{TLSMemoryBIOProtocol} until the
    handshake completes; then the TLS layer is handed to the caller's protocol.
    """

    def __init__(self, securing: _Securing, wrapped: IProtocol) -> None:
        self.securing = securing
        self.wrapped = wrapped

    def connectionMade(self) -> None:
        assert isinstance(self.transport, TLSMemoryBIOProtocol)
        self.securing.tls = self.transport

    def handshakeCompleted(self) -> None:
        self.securing.secured(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.securing.lost(reason)


class _HandshakingFactory(Factory[_Handshaking]):
    """
    The factory under C{TLSMemoryBIOFactory}: builds the caller's protocol and a
    L{_Handshaking} in front of it.
    """

    noisy = False

    def __init__(self, securing: _Securing) -> None:
        self.securing = securing

    def buildProtocol(self, addr: IAddress | None) -> _Handshaking:
        wrapped = None if addr is None else self.securing.factory.buildProtocol(addr)
        if wrapped is None:
            raise ValueError("the upstream protocol factory built no protocol")
        return _Handshaking(self.securing, wrapped)


class _Securing:
    """
    One TLS connection attempt to a peer: connected when the handshake completes.

    @ivar result: fires with the caller's protocol (connected over TLS) and whether
        the session was resumed, or fails: with the TCP failure, or with
        L{UpstreamHandshakeFailed}; cancelling aborts what is under way.
    @ivar tls: the TLS layer once TCP is connected.
    """

    def __init__(
        self,
        connect: Callable[[IProtocolFactory], Deferred[IProtocol]],
        creator: IOpenSSLClientConnectionCreator,
        factory: IProtocolFactory,
        peer: PeerState,
        clock: IReactorTime,
    ) -> None:
        self.factory = factory
        self.peer = peer
        self.tls: TLSMemoryBIOProtocol | None = None
        self.connecting: Deferred[IProtocol] | None = None
        self.result: Deferred[_Connected] = Deferred(self._cancel)
        tlsFactory = _ClientTLSFactory(
            creator, True, _HandshakingFactory(self), clock=clock
        )
        connecting = self.connecting = connect(tlsFactory)
        connecting.addErrback(self._notConnected)

    def _notConnected(self, reason: Failure) -> None:
        if not self.result.called:
            self.result.errback(reason)

    def secured(self, handshaking: _Handshaking) -> None:
        tls = self.tls
        assert tls is not None
        self._settled()
        if self.result.called:
            return  # cancelled: the connection is being aborted
        reused = sessionReused(tls.getHandle())
        tls.wrappedProtocol = handshaking.wrapped
        try:
            handshaking.wrapped.makeConnection(tls)
        except BaseException:
            failure = Failure()
            tls.abortConnection()
            self.result.errback(failure)
            return
        self.result.callback((handshaking.wrapped, reused))

    def lost(self, reason: Failure) -> None:
        self._settled()
        if self.result.called:
            return
        # A session the upstream refused or choked on is not offered again.
        self.peer.session = None
        self.result.errback(Failure(UpstreamHandshakeFailed(reason)))

    def _settled(self) -> None:
        # The TLS layer (through its factories) and the TCP attempt's result
        # refer back to this attempt: once its outcome is known, let go of
        # them, so that what a connection leaves is freed by reference
        # counting rather than by the cyclic garbage collector.
        self.tls = self.connecting = None

    def _cancel(self, result: Deferred[_Connected]) -> None:
        if self.tls is not None:
            self.tls.abortConnection()
        elif self.connecting is not None:
            self.connecting.cancel()


class _ClientTLSFactory(TLSMemoryBIOFactory):
    """
    Upstream TLS with the relay's cheaper TLS protocol.
    """

    protocol = FastTLSProtocol


def _dial(
    reactor: PosixReactorBase, target: _Target, factory: IProtocolFactory
) -> Deferred[IProtocol]:
    """
    Connect C{factory}'s protocol to C{target} (see L{_Dial}), with no time
    limit of its own.
    """
    result = _Dial(reactor, target, factory).result
    assert result is not None
    return result


class _Dial:
    """
    One TCP connection attempt made straight on a POSIX reactor's socket
    transport: what C{TCP4ClientEndpoint.connect} does through
    C{reactor.connectTCP} and its C{Connector}, without those layers, without
    their round trip through the reactor before C{connect(2)}, without the
    endpoint's protocol wrapper (which every byte would pass through), and with
    its timeout in C{deadlines} rather than a connector's and a L{Deferred}'s
    timers.

    Fires C{result} with the protocol C{factory} built, once it is connected;
    fails as the endpoint does: with the connect error, with
    L{error.ConnectingCancelledError} when cancelled, and with
    L{error.TimeoutError} when the timeout passes first.
    """

    def __init__(
        self,
        reactor: PosixReactorBase,
        target: _Target,
        factory: IProtocolFactory,
        deadlines: Deadlines[_Dial] | None = None,
        listener: _DialListener | None = None,
    ) -> None:
        """
        @param listener: told the outcome instead of C{result} (which is then
            L{None}): the pool's own attempts need no L{Deferred}.
        """
        self.factory = factory
        self._listener = listener
        self.settled = False
        self.result: Deferred[IProtocol] | None = (
            Deferred(self._cancel) if listener is None else None
        )
        self._deadlines = None
        self.transport = transport = _UpstreamClient(target, self, reactor)
        if transport.connectedAtOnce:
            # Never timed.
            transport.doConnect()
        elif deadlines is not None and not self.settled:
            self._deadlines = deadlines
            deadlines.add(self)

    def connected(self, protocol: IProtocol) -> None:
        self._settle(protocol)

    def connectionFailed(self, reason: Failure) -> None:
        self._settle(reason)

    def _settle(self, outcome: IProtocol | Failure) -> bool:
        if self.settled:
            return False
        self.settled = True
        if self._deadlines is not None:
            self._deadlines.discard(self)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.dialed(outcome)
        elif self.result is not None and not self.result.called:
            if isinstance(outcome, Failure):
                self.result.errback(outcome)
            else:
                self.result.callback(outcome)
        return True

    def timedOut(self) -> None:
        """
        The timeout passed before the connection was made.
        """
        assert self._deadlines is not None
        timeout = self._deadlines.delay
        if self._settle(
            Failure(error.TimeoutError(string=f"no connection within {timeout}s"))
        ):
            self.transport.stopConnecting()  # type: ignore[no-untyped-call]

    def cancel(self) -> None:
        """
        Give up: fails with L{error.ConnectingCancelledError}.
        """
        if self.result is not None:
            self.result.cancel()
        else:
            self._cancel(None)

    def _cancel(self, result: Deferred[IProtocol] | None) -> None:
        transport = self.transport
        if self._settle(
            Failure(error.ConnectingCancelledError(transport.getPeer()))  # type: ignore[no-untyped-call]
        ):
            transport.stopConnecting()  # type: ignore[no-untyped-call]


class _DialListener(_Structural):
    """
    What a L{_Dial} without a L{Deferred} tells its outcome.
    """

    def dialed(self, outcome: IProtocol | Failure) -> None:
        """
        The connected protocol, or why there is none.
        """


class _ConnectedConnector:
    """
    The connector of a L{_UpstreamClient} once connected: Twisted tells it
    when the connection is lost, and nothing else needs to know.
    """

    @staticmethod
    def connectionLost(reason: Failure) -> None:
        pass


# Upstream socket address -> its Twisted address (_UpstreamClient.getPeer).
_peerAddresses: dict[Any, IPv4Address | IPv6Address] = {}


def _connect(skt: socket.SocketType, address: Any) -> int:
    """
    C{connect(2)} on the non-blocking C{skt}: 0 or an errno value.
    """
    try:
        return skt.connect_ex(address)
    except OSError as e:
        return int(e.args[0])


class _LeanConnection:
    """
    What C{tcp.BaseClient.connectionLost} calls for a connected
    L{_UpstreamClient}: L{LeanSocketMixin}'s C{tcp.Connection.connectionLost}.
    """

    connectionLost = LeanSocketMixin._connectionLost


class _UpstreamClient(LeanSocketMixin, tcp.Client):
    """
    The socket transport of a L{_Dial}: connects at once, and hands its
    protocol over when connected; reads and closes as L{LeanSocketMixin} does.
    """

    _commonConnection = _LeanConnection  # type: ignore[assignment]

    connectedAtOnce = False
    """
    Whether C{connect(2)} had finished when the constructor returned (see
    L{_connect}): the dial then completes at once, without waiting for the
    reactor to report the socket writable.
    """

    def __init__(
        self, target: _Target, connector: _Dial, reactor: PosixReactorBase
    ) -> None:
        self.connector = connector
        self._requiresResolution = False
        family, address = target
        if family == socket.AF_INET6:
            self.addressFamily = family  # type: ignore[assignment]
            self._addressType = IPv6Address  # type: ignore[assignment]
        self.addr = self.realAddress = address
        # What Connection.__init__ does, with the socket made non-blocking by
        # socket(2) itself rather than by one more ioctl(2), and no Python
        # wrapper around it (the transport uses none of its additions).
        abstract.FileDescriptor.__init__(self, reactor=reactor)  # type: ignore[arg-type]
        skt = socket.SocketType(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.socket = skt  # type: ignore[assignment]
        self.fileno = skt.fileno
        self.protocol = None  # type: ignore[assignment]
        self.doRead = self.doWrite = self.doConnect  # type: ignore[method-assign]
        result = _connect(skt, address)
        if result == EINPROGRESS:
            # On loopback (and any path as fast), the handshake is over by
            # the time connect(2) returns "in progress": a second call says
            # so (0), saving the wait for a writable event, two epoll_ctl(2)
            # calls and getsockopt(2).  Anything slower answers EALREADY.
            result = _connect(skt, address)
            if result in (0, EISCONN):
                self.connectedAtOnce = True
                return
        if result in (0, EISCONN, EINPROGRESS, EWOULDBLOCK, EALREADY):
            # Readable or writable: connected, or failed (doConnect tells).
            self.startReading()  # type: ignore[no-untyped-call]
            self.startWriting()  # type: ignore[no-untyped-call]
        else:
            self.failIfNotConnected(error.getConnectError((result, strerror(result))))  # type: ignore[no-untyped-call]

    def _logSuffix(self) -> str:
        return ",client"

    def getPeer(self) -> IPv4Address | IPv6Address:
        # One address object per upstream address (Twisted builds one per
        # call); they are immutable.
        key = self.realAddress
        peer = _peerAddresses.get(key)
        if peer is None:
            peer = super().getPeer()  # type: ignore[no-untyped-call]
            if len(_peerAddresses) < 256:
                _peerAddresses[key] = peer
        return peer  # type: ignore[no-any-return]

    def doConnect(self) -> None:
        if not hasattr(self, "connector"):
            # Failed already, in the read half of this very event.
            return
        if not self.connectedAtOnce:
            err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.failIfNotConnected(error.getConnectError((err, strerror(err))))  # type: ignore[no-untyped-call]
                return
            self.stopWriting()  # type: ignore[no-untyped-call]
        del self.doWrite
        del self.doRead
        # What tcp.BaseClient._connectDone does, with the dial's factory
        # asked directly.
        protocol = self.protocol = self.connector.factory.buildProtocol(self.getPeer())
        self.connected = 1
        if protocol is None:
            # As Twisted: a stand-in protocol, and the connection dropped.
            self.protocol = Protocol()
            self.loseConnection()
        else:
            self.startReading()  # type: ignore[no-untyped-call]
            protocol.makeConnection(self)
        protocol = self.protocol
        if self.connected and protocol is not None:
            # Let the attempt (and what it holds) go.
            dial, self.connector = self.connector, _ConnectedConnector  # type: ignore[assignment]
            dial.connected(protocol)
