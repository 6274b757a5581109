"""
The byte relay of a stream C{server}: client on one side, upstream on the other.

The shape is Twisted's port forwarder (L{twisted.protocols.portforward}) made
strict: the client is paused until the upstream connects, then each side
registers the other's transport as its streaming producer, so that a slow reader
pauses the fast writer (this holds through C{TLSMemoryBIOProtocol}, which wraps
producers).  Both sides end together: when one side closes, cleanly or not, the
other is closed with C{loseConnection} (what was already relayed is flushed, TLS
sends close_notify, as nginx flushes its buffers), bounded by C{proxy_timeout};
after that, C{abortConnection}.

nginx's order is kept: on a TLS listener the upstream is connected only after the
handshake; C{return} answers after the handshake and closes, with no upstream.  The
TLS layer, with C{ssl_handshake_timeout}, is L{tlsrelay._tlsfactory.TLSServerFactory}
around the L{RelayFactory}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from socket import IPPROTO_TCP, TCP_NODELAY
from typing import Protocol as TypingProtocol
from typing import cast

from attrs import define, field
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory, connectionDone
from twisted.internet.tcp import Connection as TCPConnection
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsrelay._accesslog import AccessLogWriter
from tlsrelay._config._model import Proxy
from tlsrelay._log import Logger, levels
from tlsrelay._tlsfactory import Deadlines, writeThrough
from tlsrelay._variables import (
    STATUS_BAD_GATEWAY,
    STATUS_BAD_REQUEST,
    STATUS_FORBIDDEN,
    STATUS_INTERNAL_SERVER_ERROR,
    Session,
    Template,
    describePeer,
    extractTLSFacts,
    tlsFactNames,
    verifyResult,
)

log = Logger()


class UpstreamConnection(TypingProtocol):
    """
    An upstream connection handed to the relay by the pool.

    @ivar protocol: the protocol built by the factory the relay gave (or a
        L{ProtocolWrapper} around it, such as C{TLSMemoryBIOProtocol}).
    @ivar peer: the address connected to.
    @ivar connectTime: seconds the connection to C{peer} took.
    @ivar upstreamAddr: C{$upstream_addr}: every address tried, C{"a, b"} after
        retries.
    @ivar connectTimes: C{$upstream_connect_time}: seconds per address tried,
        L{None} for those that failed.
    @ivar sessionReused: with upstream TLS, whether the handshake resumed a
        session (C{$upstream_ssl_session_reused}); L{None} without TLS.
    """

    @property
    def protocol(self) -> IProtocol: ...

    @property
    def peer(self) -> str: ...

    @property
    def connectTime(self) -> float: ...

    @property
    def upstreamAddr(self) -> str: ...

    @property
    def connectTimes(self) -> Sequence[float | None]: ...

    @property
    def sessionReused(self) -> bool | None: ...

    def release(self, failed: bool = False) -> None:
        """
        The relay is done with the connection (it has closed); C{failed} if the
        upstream broke it before sending anything.
        """


class UpstreamListener(TypingProtocol):
    """
    What a L{ConnectUpstream} tells the outcome of an attempt (a relay).
    """

    def upstreamConnected(self, connection: UpstreamConnection) -> None: ...
    def upstreamFailed(self, reason: Failure) -> None: ...


class _Attempt(TypingProtocol):
    def cancel(self) -> None: ...


ConnectUpstream = Callable[[IProtocolFactory, bytes, UpstreamListener], _Attempt]
"""
Connect to the upstream group: C{(factory, hashKey, listener) -> attempt}.

The pool applies C{proxy_connect_timeout} and C{proxy_next_upstream*}, and
tells C{listener} the outcome, possibly before it returns: C{upstreamConnected}
with the L{UpstreamConnection}, or C{upstreamFailed} when no upstream could be
reached (if the exception has a C{peer} string, it becomes C{$upstream_addr},
and C{connectTimes}, a sequence, C{$upstream_connect_time}).  The relay calls
the attempt's C{cancel()} when the client goes away first (the pool then closes
what it opened, and tells C{upstreamFailed} a L{CancelledError} unless the
connection was made first).
"""


class _Starting:
    """
    The attempt of a relay whose C{ConnectUpstream} call has not returned.
    """

    @staticmethod
    def cancel() -> None:
        pass


class _Transport(TypingProtocol):
    # What the relay uses of a TCP transport or a TLSMemoryBIOProtocol.
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


@define(eq=False)
class WorkerConnections:
    """
    C{worker_connections}: the connections this process may have open, clients and
    upstreams alike (as nginx counts them), shared by every server.

    @ivar active: connections counted now.
    """

    limit: int = 512
    active: int = field(default=0, init=False)
    _serial: int = field(default=0, init=False)

    def acquire(self) -> bool:
        """
        Count one more connection, unless that would exceed the limit.
        """
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        """
        Count one connection less.
        """
        self.active -= 1

    def nextSerial(self) -> int:
        """
        The next C{$connection} number.
        """
        self._serial += 1
        return self._serial


def _innermost(transport: object) -> object:
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport


def _tune(transport: object, bufferSize: int) -> None:
    """
    TCP_NODELAY (as nginx's default C{tcp_nodelay on}) and C{proxy_buffer_size} on
    the socket under C{transport}, which may be a TLS wrapper.

    A Twisted socket transport reads at most C{bufferSize} bytes at once and pauses
    its producer when more than that is waiting to be written, so the relay holds
    about C{proxy_buffer_size} per direction, as nginx does.
    """
    inner = transport if isinstance(transport, TCPConnection) else _innermost(transport)
    if isinstance(inner, TCPConnection):
        # An accepted socket may have it from its listening socket already
        # (RelayPort.noDelay); else Twisted's setTcpNoDelay, without its
        # method call.
        if not getattr(getattr(inner, "server", None), "noDelay", False):
            try:
                inner.socket.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
            except OSError:
                pass
    elif ITCPTransport.providedBy(inner):
        try:
            inner.setTcpNoDelay(True)
        except OSError:
            pass
    if isinstance(inner, FileDescriptor):
        inner.bufferSize = bufferSize


@define(eq=False)
class _Leg:
    """
    One side of a session and where its connection stands.

    @ivar producing: the other side's transport is registered as this transport's
        producer.
    """

    name: str
    transport: _Transport
    producing: bool = False
    readClosed: bool = False
    writeClosed: bool = False
    closing: bool = False
    lost: bool = False

    def registerProducer(self, producer: _Transport) -> None:
        self.transport.registerProducer(producer, True)
        self.producing = True

    def unregisterProducer(self) -> None:
        # A socket transport that still has a paused producer when its buffer
        # drains resumes the producer instead of closing: unregister first.
        if self.producing:
            self.producing = False
            if not self.lost:
                self.transport.unregisterProducer()

    def close(self) -> None:
        """
        Close after what is buffered is written (TLS: then close_notify).
        """
        if self.lost or self.closing:
            return
        self.closing = True
        self.unregisterProducer()
        # A side paused until the upstream connected (or by backpressure) must
        # read again to see its peer's close: TLS waits for close_notify.  One
        # whose peer already closed has nothing more to read.
        if not self.readClosed:
            self.transport.resumeProducing()
        self.transport.loseConnection()

    def abort(self) -> None:
        """
        Close now, dropping what is buffered.
        """
        if self.lost:
            return
        self.closing = True
        self.unregisterProducer()
        self.transport.abortConnection()

    def shutdownWrite(self) -> None:
        """
        Send no more, after what is buffered, and keep reading.

        TLS: close_notify (C{TLSMemoryBIOProtocol.loseConnection}, and a
        L{tlsrelay._tlsfactory.TLSServerConnection}'s C{loseWriteConnection},
        read on until the peer's close_notify).  TCP: C{shutdown(SHUT_WR)}.
        Anything else: close.
        """
        if self.lost or self.closing or self.writeClosed:
            return
        self.writeClosed = True
        self.unregisterProducer()
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            cast(_Transport, self.transport).loseConnection()
            return
        loseWrite = getattr(self.transport, "loseWriteConnection", None)
        if loseWrite is not None:
            loseWrite()
        else:
            self.closing = True
            self.transport.loseConnection()


class _UpstreamProtocol(Protocol):
    """
    The upstream side: passes every event to its L{RelayProtocol}.

    Until the pool hands it over (C{adopted}), what arrives is held.

    Without C{proxy_half_close} it is not half-closeable: the upstream's end
    of stream ends the session, and its transport closes at once (as Twisted
    closes a connection whose protocol cannot be half-closed) rather than
    telling the relay, which would close it on the next reactor turn.
    """

    def __init__(self, relay: RelayProtocol) -> None:
        self.relay = relay
        self.adopted = False
        self.held: list[bytes] | None = None
        self.heldSize = 0
        self.paused = False
        self.readClosed = False
        self.lostReason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.relay._upstreamData(self, data)

    def readConnectionLost(self) -> None:
        self.relay._upstreamReadClosed(self)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay._upstreamLost(self, reason)


@implementer(IHalfCloseableProtocol)
class _HalfCloseableUpstreamProtocol(_UpstreamProtocol):
    """
    The upstream side with C{proxy_half_close}: its end of stream is passed on
    to the client, and the session goes on the other way.
    """


class _UpstreamFactory(Factory[_UpstreamProtocol]):
    """
    Builds the upstream side of one session (one protocol per attempt).
    """

    noisy = False

    def __init__(self, relay: RelayProtocol) -> None:
        self.relay = relay

    def buildProtocol(self, addr: IAddress | None) -> _UpstreamProtocol:
        # No protocol.factory: nothing uses it, and it would keep this factory
        # alive with every idle session.
        relay = self.relay
        if relay.relayFactory.proxy.halfClose:
            return _HalfCloseableUpstreamProtocol(relay)
        return _UpstreamProtocol(relay)


_ERR_LIB_SSL = 20


def _sslReasonText(reason: int, fallback: str) -> str:
    """
    The text pyOpenSSL puts in an L{SSL.Error} for the C{SSL_R_*} code C{reason},
    as this OpenSSL words it, or C{fallback} where it cannot say (before OpenSSL
    3, whose packing of library and reason this uses).
    """
    if SSL.OPENSSL_VERSION_NUMBER < 0x30000000:
        return fallback
    packed = (_ERR_LIB_SSL << 23) | reason
    text = _lib.ERR_reason_error_string(packed)
    if _lib.ERR_GET_REASON(packed) != reason or text == _ffi.NULL:
        return fallback
    return str(_ffi.string(text).decode("ascii", "replace"))


@cache
def _clientCertificateReasons() -> frozenset[str]:
    """
    The texts of the C{SSL_R_*} reasons of a server handshake that failed on the
    client's certificate: it sent none where one is required (TLS 1.2 and 1.3
    alike), or verification refused it.  A client's alert about the server's
    certificate (C{SSL_R_SSLV3_ALERT_BAD_CERTIFICATE}, ...) is not one.

    Looked up when first needed: OpenSSL loads its error strings with its first
    TLS context, after import.
    """
    return frozenset(
        {
            _sslReasonText(199, "peer did not return a certificate"),
            _sslReasonText(134, "certificate verify failed"),
        }
    )


def _isClientCertificateFailure(handle: SSL.Connection | None, reason: Failure) -> bool:
    """
    Whether a failed handshake failed on the client's certificate (C{403}): OpenSSL
    refused it (a verification error that C{optional_no_ca} tolerated does not
    count), or the reason OpenSSL gave is one of L{_clientCertificateReasons}.
    """
    if handle is not None and verifyResult(handle, withTolerated=False)[0] != 0:
        # pyOpenSSL resets the result when the verify callback accepts a
        # certificate, so what is left here was refused.
        return True
    error = reason.value
    if not isinstance(error, SSL.Error) or not error.args:
        return False
    queue = error.args[0]
    if not isinstance(queue, list):
        return False
    reasons = _clientCertificateReasons()
    return any(
        isinstance(entry, tuple) and len(entry) == 3 and entry[2] in reasons
        for entry in queue
    )


_FAILED_HANDSHAKE_FIELDS = frozenset(
    {
        "serverName",
        "clientSubject",
        "clientIssuer",
        "clientVerify",
        "clientSerial",
        "clientFingerprint",
    }
)


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class RelayProtocol(Protocol):
    """
    The client side of a session, and the session itself.

    @ivar session: the session's variables, once the connection is made.
    """

    _clientPaused = False
    """
    Whether the client is paused until the upstream connects.
    """

    def __init__(self, relayFactory: RelayFactory) -> None:
        self.relayFactory = relayFactory
        self.session: Session | None = None
        self._client: _Leg | None = None
        self._upstreamLeg: _Leg | None = None
        self._upstream: _UpstreamProtocol | None = None
        self._connection: UpstreamConnection | None = None
        self._connecting: _Attempt | None = None
        self._held: list[bytes] | None = None
        self._rejected = False
        self._upstreamSlot = False
        self._handshakeDone = False
        self._closing = False
        self._finished = False
        self._released = False
        self._lastActivity = 0.0
        self._timer: IDelayedCall | None = None

    @property
    def _peer(self) -> str:
        """
        The client as log lines name it (made when a line needs it).
        """
        transport = self.transport
        return "?" if transport is None else describePeer(transport.getPeer())

    # --- client events ------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.relayFactory
        transport: _Transport = self.transport  # type: ignore[assignment]
        peer = transport.getPeer()
        if not factory.connections.acquire():
            self._rejected = True
            log.warn(
                "{limit} worker_connections are not enough",
                limit=factory.connections.limit,
                client=self._peer,
            )
            transport.abortConnection()
            return
        self._client = _Leg("client", transport)
        session = Session(
            now=factory.now,
            startTime=factory.now(),
            connection=factory.connections.nextSerial(),
        )
        # getsockname(2) only when a template shows $server_addr/$server_port.
        session.setAddresses(transport.getHost() if factory.needsHost else None, peer)
        self.session = session
        _tune(transport, factory.proxy.bufferSize)
        if levels.debug:
            log.debug(
                "client {client} connected (connection {connection})",
                client=self._peer,
                connection=session.connection,
            )
        if not factory.tls:
            self._start()

    def handshakeCompleted(self) -> None:
        if self._client is None or self._closing or self._handshakeDone:
            return
        self._handshakeDone = True
        assert self.session is not None
        handle = self._tlsHandle()
        if handle is not None:
            self.session.tls = extractTLSFacts(handle, self.relayFactory.tlsFields)
        self._start()

    def dataReceived(self, data: bytes) -> None:
        client, session = self._client, self.session
        if client is None or session is None or self._closing:
            return
        session.bytesReceived += len(data)
        upstream = self._upstreamLeg
        if upstream is None:
            if self.relayFactory.returnTemplate is None:
                if self._held is None:
                    self._held = []
                self._held.append(data)
            return
        if upstream.lost or upstream.writeClosed:
            return
        self._lastActivity = self.relayFactory.clock.seconds()
        writeThrough(upstream.transport, data)
        assert session.upstreamBytesSent is not None
        session.upstreamBytesSent += len(data)

    def readConnectionLost(self) -> None:
        if self._client is not None:
            self._readClosed(self._client)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        client, session = self._client, self.session
        if self._rejected or client is None or session is None or client.lost:
            return
        client.lost = True
        client.producing = False
        self.relayFactory.connections.release()
        if self.relayFactory.tls and not self._handshakeDone:
            self._handshakeFailed(reason)
        self._closing = True
        self._cancelConnect()
        upstream = self._upstreamLeg
        if upstream is not None and not upstream.lost:
            # Even after a reset, what the client sent before it is delivered (as
            # nginx flushes its buffer); the close timer bounds the wait.
            upstream.close()
            self._armCloseTimer()
        self._maybeFinish()

    # --- session steps ------------------------------------------------------------

    def _tlsHandle(self) -> SSL.Connection | None:
        getHandle = getattr(self.transport, "getHandle", None)
        if getHandle is None:
            return None
        handle = getHandle()
        return handle if isinstance(handle, SSL.Connection) else None

    def _handshakeFailed(self, reason: Failure) -> None:
        session = self.session
        assert session is not None
        handle = self._tlsHandle()
        if handle is not None:
            # What a failed handshake tells: the name asked for and the client's
            # certificate; no protocol, cipher or session was agreed.
            fields = self.relayFactory.tlsFields & _FAILED_HANDSHAKE_FIELDS
            session.tls = extractTLSFacts(handle, fields)
        if getattr(self.transport, "timedOut", False):
            # ssl_handshake_timeout: the TLS layer aborted, and logged it.
            session.status = STATUS_BAD_REQUEST
            return
        if _isClientCertificateFailure(handle, reason):
            session.status = STATUS_FORBIDDEN
        else:
            session.status = STATUS_BAD_REQUEST
        log.info(
            "TLS handshake with {client} failed: {reason}",
            client=self._peer,
            reason=reason.getErrorMessage(),
            status=session.status,
        )

    def _start(self) -> None:
        """
        The client is ready (connected, or TLS handshake done): answer C{return},
        or connect upstream.
        """
        factory, client, session = self.relayFactory, self._client, self.session
        assert client is not None and session is not None
        if factory.returnTemplate is not None:
            value = factory.returnTemplate.render(session).encode("utf-8")
            client.transport.write(value)
            session.bytesSent += len(value)
            self._closeSession()
            return
        if not factory.connections.acquire():
            client.transport.pauseProducing()
            log.warn(
                "{limit} worker_connections are not enough",
                limit=factory.connections.limit,
                client=self._peer,
            )
            session.status = STATUS_BAD_GATEWAY
            self._closeSession()
            return
        self._upstreamSlot = True
        session.upstreamBytesSent = 0
        session.upstreamBytesReceived = 0
        key = b""
        if factory.hashKey is not None:
            key = factory.hashKey.render(session).encode("utf-8")
        connect = factory.connectUpstream
        assert connect is not None
        # Until the call returns: the outcome may be told before it does.
        self._connecting = _Starting
        try:
            connecting = connect(_UpstreamFactory(self), key, self)
        except Exception:
            self._connecting = None
            log.failure("connecting upstream for {client}", client=self._peer)
            client.transport.pauseProducing()
            self._releaseSlot()
            session.status = STATUS_INTERNAL_SERVER_ERROR
            self._closeSession()
            return
        if self._connecting is _Starting:
            # Still connecting (not made before connect(2) returned, nor
            # refused as fast): until it is, the client is not read (nginx
            # reads nothing before it has somewhere to send it).
            self._connecting = connecting
            self._clientPaused = True
            client.transport.pauseProducing()

    def upstreamConnected(self, connection: UpstreamConnection) -> None:
        try:
            self._upstreamConnected(connection)
        except BaseException:
            self._bug(Failure())

    def upstreamFailed(self, reason: Failure) -> None:
        try:
            self._upstreamFailed(reason)
        except BaseException:
            self._bug(Failure())

    def _bug(self, reason: Failure) -> None:
        log.failure("relay for {client}", reason, client=self._peer)
        if self.session is not None:
            self.session.status = STATUS_INTERNAL_SERVER_ERROR
        self._abortAll()

    def _cancelConnect(self) -> None:
        # upstreamFailed (CancelledError) clears _connecting.
        if self._connecting is not None:
            self._connecting.cancel()

    def _releaseSlot(self) -> None:
        if self._upstreamSlot:
            self._upstreamSlot = False
            self.relayFactory.connections.release()

    def _upstreamFailed(self, reason: Failure) -> None:
        self._connecting = None
        self._releaseSlot()
        session = self.session
        assert session is not None
        peer = getattr(reason.value, "peer", None)
        if isinstance(peer, str) and peer:
            session.upstreamAddr = peer
        times = getattr(reason.value, "connectTimes", None)
        if isinstance(times, (list, tuple)):
            session.upstreamConnectTimes = times
        if isinstance(reason.value, CancelledError) and self._closing:
            self._maybeFinish()
            return
        session.status = STATUS_BAD_GATEWAY
        log.info(
            "no upstream for {client}: {reason}",
            client=self._peer,
            reason=reason.getErrorMessage(),
        )
        self._closeSession()
        self._maybeFinish()

    def _upstreamConnected(self, connection: UpstreamConnection) -> None:
        self._connecting = None
        factory, client, session = self.relayFactory, self._client, self.session
        assert client is not None and session is not None
        protocol = _innermostProtocol(connection.protocol)
        if not isinstance(protocol, _UpstreamProtocol) or protocol.relay is not self:
            # A pool bug: give the connection back and fail this session.
            log.error(
                "upstream connection {upstream} has a protocol the relay did not "
                "build: {protocol!r}",
                upstream=connection.peer,
                protocol=protocol,
            )
            transport = getattr(connection.protocol, "transport", None)
            if transport is not None:
                transport.loseConnection()
            connection.release(False)
            self._releaseSlot()
            session.status = STATUS_INTERNAL_SERVER_ERROR
            self._closeSession()
            return
        self._connection = connection
        self._upstream = protocol
        protocol.adopted = True
        session.upstreamAddr = connection.upstreamAddr
        session.upstreamConnectTimes = connection.connectTimes
        session.upstreamSessionReused = connection.sessionReused
        upstream = self._upstreamLeg = _Leg(
            "upstream",
            protocol.transport,  # type: ignore[arg-type]
        )
        held, protocol.held = protocol.held or (), None
        if protocol.lostReason is not None:
            for data in held:
                self._toClient(data)
            self._upstreamLost(protocol, protocol.lostReason)
            return
        if self._closing:
            upstream.close()
            return
        _tune(upstream.transport, factory.proxy.bufferSize)
        if levels.debug:
            log.debug(
                "upstream {upstream} connected for {client} in {connectTime:.3f}s",
                upstream=connection.peer,
                client=self._peer,
                connectTime=connection.connectTime,
            )
        upstream.registerProducer(client.transport)
        client.registerProducer(upstream.transport)
        early, self._held = self._held or (), None
        for data in early:
            writeThrough(upstream.transport, data)
            assert session.upstreamBytesSent is not None
            session.upstreamBytesSent += len(data)
        for data in held:
            self._toClient(data)
        if protocol.paused:
            protocol.paused = False
            upstream.transport.resumeProducing()
        self._lastActivity = factory.clock.seconds()
        self._startTimer(factory.proxy.timeout)
        if client.readClosed:
            self._passReadClosed(client)
        if protocol.readClosed:
            self._readClosed(upstream)
        if self._clientPaused and not client.readClosed and not self._closing:
            self._clientPaused = False
            client.transport.resumeProducing()

    def _toClient(self, data: bytes) -> None:
        client, session = self._client, self.session
        assert client is not None and session is not None
        if client.lost or client.writeClosed:
            return
        writeThrough(client.transport, data)
        session.bytesSent += len(data)

    # --- upstream events ------------------------------------------------------------

    def _upstreamData(self, protocol: _UpstreamProtocol, data: bytes) -> None:
        session = self.session
        assert session is not None
        if session.upstreamBytesReceived is not None:
            session.upstreamBytesReceived += len(data)
        if not protocol.adopted:
            # Before the pool hands the connection over (it may still be checking
            # it): hold, and stop reading beyond one buffer.
            if protocol.held is None:
                protocol.held = []
            protocol.held.append(data)
            protocol.heldSize += len(data)
            if (
                protocol.heldSize > self.relayFactory.proxy.bufferSize
                and not protocol.paused
            ):
                protocol.paused = True
                cast(_Transport, protocol.transport).pauseProducing()
            return
        if protocol is not self._upstream or self._closing:
            return
        self._lastActivity = self.relayFactory.clock.seconds()
        self._toClient(data)

    def _upstreamReadClosed(self, protocol: _UpstreamProtocol) -> None:
        protocol.readClosed = True
        if protocol.adopted and protocol is self._upstream:
            assert self._upstreamLeg is not None
            self._readClosed(self._upstreamLeg)

    def _upstreamLost(self, protocol: _UpstreamProtocol, reason: Failure) -> None:
        if not protocol.adopted:
            protocol.lostReason = reason
            return
        upstream, client = self._upstreamLeg, self._client
        if protocol is not self._upstream or upstream is None or upstream.lost:
            return
        assert client is not None
        upstream.lost = True
        upstream.producing = False
        self._releaseSlot()
        clean = isinstance(reason.value, ConnectionDone)
        session = self.session
        assert session is not None
        # Failed: the upstream broke the connection on its own, before sending
        # anything (not because the relay aborted it).
        broke = not clean and not upstream.closing
        self._release(failed=broke and not session.upstreamBytesReceived)
        if broke:
            log.info(
                "upstream {upstream} of {client} lost: {reason}",
                upstream=session.upstreamAddr,
                client=self._peer,
                reason=reason.getErrorMessage(),
            )
        self._closing = True
        client.close()
        self._armCloseTimer()
        self._maybeFinish()

    def _release(self, failed: bool) -> None:
        connection = self._connection
        if connection is None or self._released:
            return
        self._released = True
        try:
            connection.release(failed)
        except Exception:
            log.failure("releasing upstream {upstream}", upstream=connection.peer)

    # --- half close, timeouts, teardown ---------------------------------------------

    def _readClosed(self, leg: _Leg) -> None:
        """
        C{leg}'s peer sent FIN: with C{proxy_half_close}, pass it on and keep
        relaying the other way; without, end the session (as nginx).
        """
        if leg.readClosed:
            return
        leg.readClosed = True
        self._passReadClosed(leg)

    def _passReadClosed(self, leg: _Leg) -> None:
        other = self._upstreamLeg if leg is self._client else self._client
        if other is None:
            # The client half-closed before the upstream connected: passed on
            # when it does.
            return
        if not self.relayFactory.proxy.halfClose or other.readClosed:
            self._closeSession()
            return
        if levels.debug:
            log.debug(
                "{side} of {client} half-closed", side=leg.name, client=self._peer
            )
        other.shutdownWrite()

    def _startTimer(self, delay: float) -> None:
        # A full proxy_timeout (the first one, and the bound on closing) is
        # timed with every other session's in the factory's Deadlines; only
        # the rest of a timeout that activity extended needs a timer of its
        # own, moved rather than replaced.
        factory = self.relayFactory
        timer = self._timer
        if delay == factory.proxy.timeout:
            if timer is not None:
                self._timer = None
                if timer.active():
                    timer.cancel()
            factory.sessionDeadlines.add(self)
            return
        factory.sessionDeadlines.discard(self)
        if timer is not None and timer.active():
            timer.reset(delay)
        else:
            self._timer = factory.clock.callLater(delay, self._timerFired)

    def _armCloseTimer(self) -> None:
        # Bounds how long closing may take (a TLS peer that never answers
        # close_notify): at the next expiry, whatever is left is aborted.
        if not self._finished:
            self._startTimer(self.relayFactory.proxy.timeout)

    def _timerFired(self) -> None:
        self._timer = None
        if self._finished:
            return
        timeout = self.relayFactory.proxy.timeout
        if self._closing:
            log.info("closing {client} timed out", client=self._peer)
            self._abortAll()
            return
        idle = self.relayFactory.clock.seconds() - self._lastActivity
        if idle < timeout:
            self._startTimer(timeout - idle)
            return
        log.info(
            "{client} idle for {timeout}s (proxy_timeout): closing",
            client=self._peer,
            timeout=timeout,
        )
        self._closeSession()

    def _closeSession(self) -> None:
        """
        End the session: flush and close both sides.
        """
        self._closing = True
        self._cancelConnect()
        for leg in (self._client, self._upstreamLeg):
            if leg is not None:
                leg.close()
        self._armCloseTimer()

    def _abortAll(self) -> None:
        self._closing = True
        self._cancelConnect()
        for leg in (self._client, self._upstreamLeg):
            if leg is not None:
                leg.abort()

    def _maybeFinish(self) -> None:
        client, upstream = self._client, self._upstreamLeg
        if self._finished or client is None or not client.lost:
            return
        if self._connecting is not None:
            return
        if upstream is not None and not upstream.lost:
            return
        self._finish()

    def _finish(self) -> None:
        """
        Both sides are closed: log the session.
        """
        self._finished = True
        self.relayFactory.sessionDeadlines.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._releaseSlot()
        session = self.session
        assert session is not None
        session.endTime = self.relayFactory.now()
        if levels.debug:
            log.debug(
                "client {client} closed (connection {connection}): status {status}, "
                "bytes from/to client {bytesReceived}/{bytesSent}, "
                "bytes from/to upstream {upstreamBytesReceived}/{upstreamBytesSent}, "
                "{sessionTime:.3f}s",
                client=self._peer,
                connection=session.connection,
                status=session.status,
                bytesReceived=session.bytesReceived,
                bytesSent=session.bytesSent,
                upstream=session.upstreamAddr,
                upstreamBytesReceived=session.upstreamBytesReceived or 0,
                upstreamBytesSent=session.upstreamBytesSent or 0,
                sessionTime=session.duration(),
            )
        for writer, template in self.relayFactory.accessLogs:
            try:
                writer.write(template, session)
            except Exception:
                log.failure("writing access log {path}", path=writer.path)
        # The upstream side (its protocol, and through its transport the
        # factories that built it) refers back to this protocol: let go of
        # it, so that the session's objects are freed by reference counting
        # once the reactor lets go of them, not left to the cyclic garbage
        # collector (memory that is reused at once stays in the CPU's caches).
        self._upstream = self._connection = self._upstreamLeg = None


def _innermostProtocol(protocol: object) -> object:
    while isinstance(protocol, ProtocolWrapper):
        protocol = protocol.wrappedProtocol
    return protocol


@define(eq=False, slots=False)
class RelayFactory(ServerFactory[RelayProtocol]):
    """
    Builds the sessions of one stream C{server}.

    When the listener has C{ssl}, the caller wraps this factory in a
    L{tlsrelay._tlsfactory.TLSServerFactory} (which applies
    C{ssl_handshake_timeout}) and passes C{tls=True}.

    @ivar connectUpstream: connects to the C{proxy_pass} target; L{None} with
        C{returnTemplate}.
    @ivar proxy: the C{proxy_*} settings.
    @ivar tls: the listener has C{ssl}: the session starts when the handshake
        completes.
    @ivar clock: the C{proxy_timeout} timers.
    @ivar now: wall-clock time, for the session's variables.
    @ivar connections: C{worker_connections}, shared by all servers of a process.
    @ivar accessLogs: where and how each finished session is logged.
    @ivar returnTemplate: the C{return} value: sent after the handshake, then
        the connection is closed.
    @ivar hashKey: the C{hash} balancing key, rendered per session for
        C{connectUpstream}.
    @ivar sessionDeadlines: the sessions' C{proxy_timeout}s, timed together.
    """

    connectUpstream: ConnectUpstream | None
    proxy: Proxy
    tls: bool
    clock: IReactorTime
    now: Callable[[], float]
    connections: WorkerConnections
    accessLogs: Sequence[tuple[AccessLogWriter, Template]] = ()
    returnTemplate: Template | None = None
    hashKey: Template | None = None
    tlsFields: frozenset[str] = field(init=False)
    needsHost: bool = field(init=False)
    sessionDeadlines: Deadlines[RelayProtocol] = field(init=False)

    noisy = False

    def __attrs_post_init__(self) -> None:
        if (self.connectUpstream is None) == (self.returnTemplate is None):
            raise ValueError("give exactly one of connectUpstream and returnTemplate")
        names: set[str] = set()
        for _, template in self.accessLogs:
            names |= template.names
        for maybe in (self.returnTemplate, self.hashKey):
            if maybe is not None:
                names |= maybe.names
        self.tlsFields = tlsFactNames(names)
        self.needsHost = not names.isdisjoint({"server_addr", "server_port"})
        self.sessionDeadlines = Deadlines(
            self.clock, self.proxy.timeout, RelayProtocol._timerFired
        )

    def buildProtocol(self, addr: IAddress | None) -> RelayProtocol:
        protocol = RelayProtocol(self)
        protocol.factory = self
        return protocol
