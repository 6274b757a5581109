"""
TLS around any server protocol factory, with nginx's C{ssl_handshake_timeout}.

L{TLSServerFactory} is Twisted's L{TLSMemoryBIOFactory} (server side) plus one
timer per connection on an injected clock: a client that has not finished its
handshake in time is aborted, so idle or half-open clients cannot hold
connections forever.  Bytes that are not TLS make the TLS layer close that one
connection; the factory keeps serving.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

from tlsrelay._log import Logger
from tlsrelay._variables import describePeer

log = Logger()

ServerCreator = IOpenSSLServerConnectionCreator | IOpenSSLContextFactory


class HandshakeTimeoutTLSProtocol(BufferingTLSTransport):
    """
    A server TLS connection that is aborted unless its handshake completes
    within the factory's C{handshakeTimeout}.

    @ivar timedOut: the handshake timed out and the connection was aborted
        (this was logged here), so that the application's C{connectionLost}
        can tell a timeout from other handshake failures.
    """

    factory: TLSServerFactory
    timedOut = False
    _handshakeTimer: IDelayedCall | None = None

    def makeConnection(self, transport: ITransport) -> None:
        # Armed before the application sees the connection, so that a
        # connectionLost during connectionMade finds the timer to cancel.
        timeout = self.factory.handshakeTimeout
        if timeout is not None:
            self._handshakeTimer = self.factory.clock.callLater(
                timeout, self._handshakeTimedOut
            )
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        # TLSMemoryBIOProtocol documents _handshakeDone; it is set by the very
        # call above when these bytes finished the handshake.
        if self._handshakeDone:
            self._cancelHandshakeTimer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelHandshakeTimer()
        super().connectionLost(reason)

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        self.timedOut = True
        assert self.transport is not None
        log.info(
            "TLS handshake with {peer} timed out after {timeout}s",
            peer=describePeer(self.transport.getPeer()),
            timeout=self.factory.handshakeTimeout,
        )
        self.abortConnection()  # type: ignore[no-untyped-call]

    def _cancelHandshakeTimer(self) -> None:
        timer, self._handshakeTimer = self._handshakeTimer, None
        if timer is not None and timer.active():
            timer.cancel()


class TLSServerFactory(TLSMemoryBIOFactory):
    """
    Server-side TLS around C{wrappedFactory}, with a handshake timeout.

    @ivar handshakeTimeout: seconds a client has to complete its handshake
        (nginx's C{ssl_handshake_timeout}, 60 by default there), or L{None} for
        no limit.
    @ivar clock: the clock for the handshake timers and for Twisted's
        aggregation of small TLS writes.
    """

    protocol = HandshakeTimeoutTLSProtocol

    def __init__(
        self,
        contextFactory: ServerCreator,
        wrappedFactory: IProtocolFactory,
        handshakeTimeout: float | None,
        clock: IReactorTime,
    ) -> None:
        """
        @param contextFactory: makes each connection's C{OpenSSL.SSL.Connection},
            e.g. L{tlsrelay._tls.ServerContextFactory} or Twisted's
            C{CertificateOptions}.
        @param wrappedFactory: the application's protocol factory.
        @param handshakeTimeout: see L{TLSServerFactory.handshakeTimeout}.
        @param clock: see L{TLSServerFactory.clock}.
        """
        if handshakeTimeout is not None and handshakeTimeout < 0:
            raise ValueError(
                f"handshakeTimeout must not be negative: {handshakeTimeout}"
            )
        super().__init__(contextFactory, False, wrappedFactory, clock)
        self.handshakeTimeout = handshakeTimeout
        self.clock = clock

    def __repr__(self) -> str:
        return (
            f"<TLSServerFactory around {self.wrappedFactory!r}, "
            f"handshakeTimeout={self.handshakeTimeout!r}>"
        )
