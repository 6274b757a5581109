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
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from zope.interface import implementer

from tlsrelay._tlsfactory import ServerCreator, TLSServerFactory

__all__ = ["TLSRelayServerEndpoint"]


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
    """

    inner: IStreamServerEndpoint
    contextFactory: ServerCreator
    handshakeTimeout: float | None
    clock: IReactorTime

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """
        Listen on the inner endpoint with TLS around C{protocolFactory}.
        """
        return self.inner.listen(
            TLSServerFactory(
                self.contextFactory, protocolFactory, self.handshakeTimeout, self.clock
            )
        )
