"""
Endpoints for other Twisted applications.

L{TLSRelayServerEndpoint} listens on any inner server endpoint and terminates TLS
with a handshake timeout.  The C{tlsrelay:} endpoint-string parser
(L{tlsrelay._parsers}) returns one built with nginx's TLS semantics; Python code
can build one directly::

    from tlsrelay.endpoints import TLSRelayServerEndpoint

    endpoint = TLSRelayServerEndpoint(
        TCP4ServerEndpoint(reactor, 8443), contextFactory, 60.0, reactor
    )
    endpoint.listen(factory)

L{TLSRelayPoolEndpoint} connects to one server of an upstream pool (balancing,
passive health, next-upstream retries, upstream TLS with session reuse); the
C{tlsrelay-pool:} parser returns one, and Python code can build one from the
configuration model::

    endpoint = TLSRelayPoolEndpoint.fromGroup(reactor, group, proxy)
    endpoint.connect(factory)
"""

from __future__ import annotations

import random as _random

from attrs import define, field, frozen
from twisted.application.service import IService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IFileDescriptorReceiver,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IListeningPort,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from tlsrelay._balance import RandomSource
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import Proxy, UpstreamGroup
from tlsrelay._pool import TLSFor, UpstreamConnection, UpstreamPool
from tlsrelay._tlsfactory import ServerCreator, TLSServerFactory
from tlsrelay._upstreamtls import tlsForServer

__all__ = ["TLSRelayPoolEndpoint", "TLSRelayServerEndpoint"]


@implementer(IStreamServerEndpoint)
@frozen
class TLSRelayServerEndpoint:
    """
    A server endpoint that speaks TLS on the connections of C{inner}.

    @ivar inner: the endpoint that listens (TCP, UNIX, systemd, ...).
    @ivar contextFactory: makes each connection's C{OpenSSL.SSL.Connection}: an
        L{IOpenSSLServerConnectionCreator
        <twisted.internet.interfaces.IOpenSSLServerConnectionCreator>} (such as
        the one the C{tlsrelay:} parser builds) or Twisted's
        C{CertificateOptions}.
    @ivar handshakeTimeout: seconds a client has to complete its handshake, as
        nginx's C{ssl_handshake_timeout}; L{None} for no limit.
    @ivar clock: the clock for handshake timers (usually the reactor).
    @ivar sessions: the service that rotates ticket keys and keeps the shared
        session cache, started on the first L{listen} (or L{None}).
    """

    inner: IStreamServerEndpoint
    contextFactory: ServerCreator
    handshakeTimeout: float | None
    clock: IReactorTime
    sessions: IService | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """
        Listen on the inner endpoint with TLS around C{protocolFactory}.
        """
        if self.sessions is not None and not self.sessions.running:
            self.sessions.startService()
            # Rotation timers and a shared cache's files end with the reactor.
            adder = getattr(self.clock, "addSystemEventTrigger", None)
            if adder is not None:
                adder("before", "shutdown", self.sessions.stopService)
        return self.inner.listen(
            TLSServerFactory(
                self.contextFactory, protocolFactory, self.handshakeTimeout, self.clock
            )
        )


class _Releasing(Protocol):
    """
    Stands between the transport and the caller's protocol to learn when the
    connection ends, and then releases the L{UpstreamConnection} (the peer's
    connection count for C{least_conn} and C{max_conns}, and passive health).

    Modelled on Twisted's own C{endpoints._WrappingProtocol}: the caller's
    protocol is connected to the real transport (a TCP connection, or the
    C{TLSMemoryBIOProtocol} with upstream TLS), so its writes, producers and
    C{ISSLTransport} calls do not pass through here; only the transport's calls
    to the protocol (data, half-close, connection lost) do.  With TLS, the
    pool connects the protocol after the handshake, so an C{IHandshakeListener}
    is told of the handshake when it is connected.

    @ivar wrapped: the caller's protocol.
    @ivar connection: the pool's connection, once it is known.
    @ivar received: whether any byte arrived from the upstream.
    @ivar lostFailed: when the connection was lost before C{connection} was
        known: whether it counts as a failure.
    """

    def __init__(self, wrapped: IProtocol) -> None:
        self.wrapped = wrapped
        self.connection: UpstreamConnection | None = None
        self.received = False
        self.lostFailed: bool | None = None
        for interface in (IHalfCloseableProtocol, IFileDescriptorReceiver):
            if interface.providedBy(wrapped):
                alsoProvides(self, interface)

    def attach(self, connection: UpstreamConnection) -> None:
        """
        The pool's connection for this protocol; released at once if the
        connection is already lost.
        """
        self.connection = connection
        if self.lostFailed is not None:
            connection.release(self.lostFailed)

    def logPrefix(self) -> str:
        if ILoggingContext.providedBy(self.wrapped):
            prefix: str = ILoggingContext(self.wrapped).logPrefix()
            return prefix
        return self.wrapped.__class__.__name__

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self.wrapped.makeConnection(transport)
        # The pool connects the protocol once the TLS handshake is complete: a
        # protocol that listens for the handshake hears of it now, as it would
        # from Twisted's TLS layer.
        if isinstance(transport, TLSMemoryBIOProtocol) and (
            IHandshakeListener.providedBy(self.wrapped)
        ):
            IHandshakeListener(self.wrapped).handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        self.received = True
        self.wrapped.dataReceived(data)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        IFileDescriptorReceiver(self.wrapped).fileDescriptorReceived(descriptor)

    def readConnectionLost(self) -> None:
        IHalfCloseableProtocol(self.wrapped).readConnectionLost()

    def writeConnectionLost(self) -> None:
        IHalfCloseableProtocol(self.wrapped).writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # A connection the upstream broke (reset, TLS error) before sending a
        # byte counts as a failure of that server, as in the relay; a clean
        # close, or an abort by the caller, does not.
        failed = not self.received and not reason.check(
            ConnectionDone, ConnectionAborted
        )
        try:
            self.wrapped.connectionLost(reason)
        finally:
            self.lostFailed = failed
            if self.connection is not None:
                self.connection.release(failed)


class _ReleasingFactory(Factory[_Releasing]):
    """
    Builds the caller's protocols behind a L{_Releasing}.
    """

    noisy = False

    def __init__(self, wrapped: IProtocolFactory) -> None:
        self.wrapped = wrapped

    def buildProtocol(self, addr: IAddress | None) -> _Releasing | None:
        protocol = None if addr is None else self.wrapped.buildProtocol(addr)
        return None if protocol is None else _Releasing(protocol)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()


@define(eq=False)
class _Resolution:
    """
    Resolves a pool's host names once, when the first connection needs them;
    connections asked for meanwhile wait for the same resolution.  A failed
    resolution fails the connections waiting for it, and the next connection
    tries again.

    @ivar done: whether the names are resolved.
    """

    pool: UpstreamPool
    done: bool = False
    _waiting: list[Deferred[None]] | None = field(default=None, init=False)

    def ready(self) -> Deferred[None]:
        """
        Fires when the pool's names are resolved.
        """
        if self.done:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._forget)
        if self._waiting is None:
            self._waiting = [waiter]
            self.pool.resolveAll().addBoth(self._resolved)
        else:
            self._waiting.append(waiter)
        return waiter

    def _forget(self, waiter: Deferred[None]) -> None:
        if self._waiting is not None and waiter in self._waiting:
            self._waiting.remove(waiter)

    def _resolved(self, result: Failure | None) -> None:
        waiting, self._waiting = self._waiting or [], None
        if isinstance(result, Failure):
            for waiter in waiting:
                waiter.errback(result)
        else:
            self.done = True
            for waiter in waiting:
                waiter.callback(None)


def _attached(connection: UpstreamConnection) -> IProtocol:
    releasing = connection.protocol
    assert isinstance(releasing, _Releasing), releasing
    releasing.attach(connection)
    return releasing.wrapped


@implementer(IStreamClientEndpoint)
class TLSRelayPoolEndpoint:
    """
    A client endpoint that connects to a server of an upstream pool, as nginx's
    C{proxy_pass} to an C{upstream} group does: the balancing method picks the
    server, a failed attempt moves to the next one (C{proxy_next_upstream*},
    each within C{proxy_connect_timeout}), failures keep a server out for
    C{fail_timeout}, and with upstream TLS each server's session is offered
    again on the next connection to it.

    The endpoint keeps one pool for all its connections, so balancing, health
    and session reuse carry across C{connect} calls.  Host names of the group
    are resolved at the first C{connect}.

    @ivar pool: the pool.
    @ivar proxy: the C{proxy_*} settings (connect timeout, retries).
    @ivar hashKey: the key of the C{hash} balancing method.
    """

    def __init__(
        self,
        pool: UpstreamPool,
        proxy: Proxy | None = None,
        hashKey: bytes = b"",
        *,
        resolution: _Resolution | None = None,
    ) -> None:
        """
        @param proxy: the C{proxy_*} settings; nginx's defaults when L{None}.
        @param resolution: shares the state of another endpoint's lazy name
            resolution (see L{withHashKey}).
        """
        self.pool = pool
        self.proxy = proxy if proxy is not None else Proxy()
        self.hashKey = hashKey
        self._resolution = resolution if resolution is not None else _Resolution(pool)

    @classmethod
    def fromGroup(
        cls,
        reactor: IReactorTime,
        group: UpstreamGroup,
        proxy: Proxy | None = None,
        random: RandomSource | None = None,
        hashKey: bytes = b"",
    ) -> TLSRelayPoolEndpoint:
        """
        An endpoint for C{group}, with upstream TLS when C{proxy.tls.enabled}
        (its context is built now; C{proxy_ssl_name} defaults to the group's
        name, as nginx's defaults to the C{proxy_pass} host).

        @param reactor: provides L{IReactorTime}, C{IReactorTCP},
            C{IReactorUNIX} and C{IReactorPluggableNameResolver}.
        @param random: the random source of the C{random} method;
            L{random.SystemRandom} by default.

        @raise ValueError: when a TLS file cannot be loaded or a setting is
            refused.
        """
        if proxy is None:
            proxy = Proxy()
        tlsFor: TLSFor | None = None
        if proxy.tls.enabled:
            try:
                tlsFor = tlsForServer(proxy.tls, group.name, None)
            except ConfigError as e:
                raise ValueError(e.message) from None
        source = random if random is not None else _random.SystemRandom()
        return cls(UpstreamPool(group, reactor, source, tlsFor), proxy, hashKey)

    def withHashKey(self, hashKey: bytes) -> TLSRelayPoolEndpoint:
        """
        An endpoint on the same pool whose connections use C{hashKey} for the
        C{hash} balancing method (e.g. a user or session identifier).
        """
        return TLSRelayPoolEndpoint(
            self.pool, self.proxy, hashKey, resolution=self._resolution
        )

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect C{protocolFactory}'s protocol to a server of the pool.

        @return: fires with the protocol once it is connected (with upstream
            TLS, once the handshake is complete), or fails with
            L{tlsrelay._pool.NoUpstreamAvailable} when no server could be
            reached, or L{tlsrelay._pool.HostNotFound} when a host name has no
            address.  Cancelling it stops the attempt.
        """
        ready = self._resolution.ready()

        def resolved(_: None) -> Deferred[UpstreamConnection]:
            return self.pool.connect(
                _ReleasingFactory(protocolFactory), self.hashKey, self.proxy
            )

        return ready.addCallback(resolved).addCallback(_attached)

    def __repr__(self) -> str:
        return (
            f"<TLSRelayPoolEndpoint {self.pool.config.name!r}"
            f" ({self.pool.config.balancer.method})>"
        )
