"""
TLS around any server protocol factory, with nginx's C{ssl_handshake_timeout},
and the socket transports under it.

L{TLSServerFactory} is Twisted's L{TLSMemoryBIOFactory} (server side) plus a
handshake timeout per connection on an injected clock (all of them timed by one
L{Deadlines}): a client that has not finished its handshake in time is aborted,
so idle or half-open clients cannot hold connections forever.  Bytes that are
not TLS make the TLS layer close that one connection; the factory keeps serving.

Its protocol, L{FastTLSProtocol}, is Twisted's L{TLSMemoryBIOProtocol} with the
per-connection and per-byte paths made cheaper (L{_TLSEngine}; docs/performance.md
measures each): encrypted bytes are sent on the socket at once when nothing is
queued (L{writeThrough}) instead of waiting for the reactor's next writable
event; records are written, read and flushed with pyOpenSSL's own C{lib} calls
through one scratch buffer, with no exception per empty read; no per-write timer
for Twisted's small-write aggregation (the relay writes what one read gave,
once); fresh memory BIOs once the handshake is done.  Producers and the
application's side of shutdown are Twisted's own code.

Under it, on a POSIX reactor, L{adoptStreamPort} gives listening sockets a
L{RelayPort}, whose connections (L{RelayServer}) read more per call and close
without a round trip through the poller (L{LeanSocketMixin}); the pool's
upstream connections use the same mixin.  For a L{TLSServerFactory}, the port
builds L{TLSServerConnection}s instead: the socket transport and the TLS layer
in one object (the same L{_TLSEngine}), under the application's protocol.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from errno import EWOULDBLOCK
from typing import Any, Generic, TypeVar

from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL.SSL import Connection, Context, Error, WantReadError, ZeroReturnError
from twisted.internet import main, tcp
from twisted.internet._producer_helpers import _PullToPush
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    INegotiated,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorFDSet,
    IReactorTime,
    ISSLTransport,
    ITransport,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.tcp import Connection as _SocketConnection
from twisted.protocols.tls import (
    TLSMemoryBIOFactory,
    TLSMemoryBIOProtocol,
    _ProducerMembrane,
    _representsEOF,
)
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from tlsrelay._log import Logger
from tlsrelay._reactor import callSoon, forget
from tlsrelay._tls import ServerContextFactory
from tlsrelay._variables import describePeer

log = Logger()

ServerCreator = IOpenSSLServerConnectionCreator | IOpenSSLContextFactory

_RECORD = 2**14
"""
The most plaintext one TLS record carries; Twisted's TLS layer writes in pieces
of this size, and so does L{FastTLSProtocol}.
"""

_SCRATCH = 2**18
"""
The size of the scratch buffers: up to this much decrypted data is handed to the
application in one C{dataReceived}, and encrypted data is moved to the socket in
pieces of this size.
"""

# One reactor thread uses them, and every use copies out before it returns.
_received = _ffi.new("char[]", _SCRATCH)
_outgoing = _ffi.new("char[]", _SCRATCH)
_outgoingView = memoryview(_ffi.buffer(_outgoing))  # type: ignore[arg-type]
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_WANTS_READ, _FAILED, _DONE = object(), object(), object()


def writeThrough(
    transport: Any, data: Any, queue: Callable[[Any, bytes], object] | None = None
) -> None:
    """
    Write C{data} (bytes, or any buffer when C{transport} is a socket) to
    C{transport}: at once with C{send(2)} when it is a Twisted socket transport
    with nothing queued, else (or for what the socket did not take) through its
    C{write}, which queues it for the reactor (or C{queue(transport, data)}:
    L{TLSServerConnection} queues records with the socket's own C{write}).

    The result is what C{transport.write} alone would give, in the same order,
    without the round trip through the reactor (two C{epoll_ctl} calls, one
    wake-up and a dispatch) that a queued write costs; it is how nginx writes.
    A send error queues the data, so that the transport's own write meets the
    error and closes the connection as it always does.
    """
    if (
        isinstance(transport, _SocketConnection)
        and (queue is not None or not isinstance(transport, TLSServerConnection))
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport._writeDisconnected
        and not transport.TLS
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    if queue is None:
        transport.write(data if type(data) is bytes else bytes(data))
    else:
        queue(transport, data if type(data) is bytes else bytes(data))


class _DoneFailure(Failure):
    """
    The failure L{LeanSocketMixin} closes its transports with: its C{check}
    answers with C{issubclass}, without the walk through qualified class
    names that C{Failure.check} makes (for Twisted's C{connectionLost}, twice
    per relayed connection).
    """

    def check(self, *errorTypes: type[BaseException] | str) -> Any:
        for errorType in errorTypes:
            if isinstance(errorType, type):
                if issubclass(self.type, errorType):  # type: ignore[arg-type]
                    return errorType
            elif errorType in self.parents:
                return errorType
        return None


_CONNECTION_DONE = _DoneFailure(main.CONNECTION_DONE)  # type: ignore[no-untyped-call]


class LeanSocketMixin:
    """
    Cheaper ways for a Twisted socket transport (C{tcp.Server}, C{tcp.Client})
    to read and to close, with the same outcome.

    @ivar readSize: bytes read from the socket at once, more than
        C{bufferSize}, which stays what it is to Twisted: how much may wait to
        be written before the producer is paused (C{proxy_buffer_size}, as
        nginx holds at most one buffer per direction).  Reading more per call
        costs fewer calls per byte relayed.
    """

    readSize = 2**18

    # Twisted's shutdown(2) before close(2) stays: with unread data in the
    # socket, close(2) alone sends a reset instead of the end of the stream,
    # and a client (say, one refused with 502 before its request was read)
    # may lose what was sent to it.

    _reading = False
    """
    Whether the transport is handling what it just read (in C{doRead}).
    """

    _drained = False
    """
    Whether the last read left nothing in the socket.
    """

    _afterRead: Any = None
    """
    What C{doRead} returns once the data read is handled: the reactor then
    disconnects the transport (see L{TLSServerConnection._closeWire}).
    """

    def doRead(self) -> Any:
        try:
            data = self.socket.recv(self.readSize)  # type: ignore[attr-defined]
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            # Nothing is left to read, nor can be after the peer's end of
            # stream: close(2) alone ends the connection cleanly, without
            # shutdown(2) first.
            self._shouldShutdown = False
            return main.CONNECTION_DONE
        self._reading = True
        self._drained = len(data) < self.readSize
        try:
            self._readData(data)
        finally:
            self._reading = False
        return self._afterRead

    def _readData(self, data: bytes) -> None:
        """
        Where what the socket gave goes: to the protocol (with TLS in the
        transport, to the TLS engine).
        """
        self.protocol.dataReceived(data)  # type: ignore[attr-defined]

    def loseConnection(self) -> None:
        """
        Close once what is buffered is written, as Twisted does; with nothing
        buffered and no producer, on the next reactor turn (still after this
        call returns) instead of after a round trip through the poller for a
        writable event.
        """
        this: Any = self
        if (
            this.connected
            and not this.disconnecting
            and not this._writeDisconnected
            and not this._writeDisconnecting
            and this.producer is None
            and not this._tempDataLen
            and this.offset == len(this.dataBuffer)
            and not this.TLS
        ):
            forget(this.reactor, this)
            this.disconnecting = True
            _closeSoon(this.reactor, self)
            return
        super().loseConnection()  # type: ignore[misc]

    def _stopSocket(self, reason: Failure) -> None:
        """
        What C{FileDescriptor.connectionLost} does (the producer stopped, the
        reactor no longer watching), then the socket closed as
        C{tcp.Connection.connectionLost} closes it.
        """
        this: Any = self
        this.disconnected = 1
        this.connected = 0
        producer = this.producer
        if producer is not None:
            producer.stopProducing()
            this.producer = None
        forget(this.reactor, this, True)
        this._closeSocket(not isinstance(reason.value, ConnectionAborted))

    def _connectionLost(self, reason: Failure) -> None:
        """
        C{tcp.Connection.connectionLost}, with L{_stopSocket}.
        """
        this: Any = self
        if not hasattr(this, "socket"):
            # Twisted's guard against a second call (an abort from the
            # protocol, then an exception reaching the reactor).
            return
        self._stopSocket(reason)
        protocol = this.protocol
        del this.protocol
        del this.socket
        del this.fileno
        protocol.connectionLost(reason)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        # What Twisted's does (the TLS mixin's, then FileDescriptor's) for a
        # streaming producer on a connected transport without TLS in it, in
        # one call.
        this: Any = self
        if not streaming or this.TLS or this.disconnected or this.producer is not None:
            super().registerProducer(producer, streaming)  # type: ignore[misc]
            return
        this.producer = producer
        this.streamingProducer = True

    def unregisterProducer(self) -> None:
        this: Any = self
        if this.TLS or (this.connected and this.disconnecting):
            super().unregisterProducer()  # type: ignore[misc]
            return
        this.producer = None

    def _closed(self, reason: Failure) -> None:
        this: Any = self
        if not this.disconnected:
            this.connectionLost(reason)

    _logstr: str | None = None

    @property
    def logstr(self) -> str:
        """
        Twisted's log prefix for this connection (C{logPrefix}), made when
        first asked for (for a log line of its own, which most connections
        never have) rather than when the connection is made.
        """
        text = self._logstr
        if text is None:
            protocol = getattr(self, "protocol", None)
            if protocol is None:
                # Not connected yet (a dial), or closed before it was asked.
                return "-" + self._logSuffix()
            text = self._logstr = self._getLogPrefix(protocol) + self._logSuffix()
        return text

    @logstr.setter
    def logstr(self, value: str) -> None:
        self._logstr = value

    def _logSuffix(self) -> str:
        """
        What follows the protocol's name in L{logstr}.
        """
        raise NotImplementedError()

    def _getLogPrefix(self, applicationObject: object) -> str:
        # Twisted's, worked out once per kind of protocol (and of the
        # protocol it wraps, if any) rather than once per connection.
        key = (
            type(applicationObject),
            type(getattr(applicationObject, "wrappedProtocol", None)),
        )
        prefix = _logPrefixes.get(key)
        if prefix is None:
            prefix = super()._getLogPrefix(applicationObject)  # type: ignore[misc]
            if len(_logPrefixes) < 64:
                _logPrefixes[key] = prefix
        return prefix  # type: ignore[no-any-return]

    readEndStopsReading = True
    """
    L{readConnectionLost} stops reading itself: a reactor with
    L{tlsrelay._reactor.leanRegistration} calls it without removing the
    reader first.
    """

    def readConnectionLost(self, reason: Failure) -> None:
        # What tcp.Connection.readConnectionLost does, asking the protocol
        # whether it provides IHalfCloseableProtocol rather than adapting it
        # (no adapter is registered for that interface).
        this: Any = self
        protocol = this.protocol
        if not IHalfCloseableProtocol.providedBy(protocol):
            this.connectionLost(reason)
            return
        this.stopReading()
        try:
            protocol.readConnectionLost()
        except BaseException:
            log.failure("readConnectionLost of {protocol!r}", protocol=protocol)
            this.connectionLost(Failure())


def _stillReading(transport: Any) -> bool:
    """
    Whether C{transport} is registered for reading (and so may read before
    the reactor reports it readable), as far as a reactor with
    L{tlsrelay._reactor.leanRegistration} says; on any other, L{False}.
    """
    reactor = transport.reactor
    if getattr(reactor, "forget", None) is None:
        return False
    return transport.connected and transport.fileno() in reactor._reads  # type: ignore[no-any-return]


def _readNow(transport: Any) -> None:
    """
    Read what already waits on C{transport}'s socket, as the reactor would on
    its next turn, if it is reading; its end is handled as the reactor
    handles it.
    """
    if not _stillReading(transport):
        return
    reactor = transport.reactor
    try:
        why = transport.doRead()
    except BaseException as e:
        why = e
        log.failure("reading from {transport!r}", transport=transport)
    if why:
        reactor._disconnectSelectable(transport, why, True)


# (protocol class, wrapped protocol class) -> log prefix (LeanSocketMixin).
_logPrefixes: dict[tuple[type, type], str] = {}

# reactor -> the transports it closes on its next turn (see _closeSoon).
_closing: dict[Any, list[LeanSocketMixin]] = {}


def _closeSoon(reactor: Any, transport: LeanSocketMixin) -> None:
    """
    Call C{transport._closed} on C{reactor}'s next turn, as a
    C{callLater(0, ...)} of its own would, with one call (L{callSoon}) for
    all the transports closed in the same turn.
    """
    pending = _closing.get(reactor)
    if pending is None:
        pending = _closing[reactor] = []
        callSoon(reactor, _closePending, reactor)
    pending.append(transport)


def _closePending(reactor: Any) -> None:
    for transport in _closing.pop(reactor, ()):
        try:
            transport._closed(_CONNECTION_DONE)
        except Exception:
            log.failure("closing {transport!r}", transport=transport)


class RelayServer(LeanSocketMixin, tcp.Server):
    """
    The transport of an accepted TCP connection, with L{LeanSocketMixin}.

    Its peer's address is the one its port built for the protocol factory
    (Twisted's builds a new one for each C{getPeer}).
    """

    _peer: IPv4Address | IPv6Address | None = None

    def __init__(
        self,
        sock: socket.socket,
        protocol: IProtocol,
        client: tuple[object, ...],
        server: tcp.Port,
        sessionno: int,
        reactor: IReactorFDSet,
    ) -> None:
        # What tcp.Server.__init__ (with Connection's and FileDescriptor's)
        # does, in one call.
        self.reactor = reactor
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0
        self.socket = sock
        sock.setblocking(False)
        self.fileno = sock.fileno  # type: ignore[method-assign]
        self.protocol = protocol
        if len(client) != 2:
            self._addressType = IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()  # type: ignore[no-untyped-call]
        self.connected = 1

    connectionLost = LeanSocketMixin._connectionLost

    def _logSuffix(self) -> str:
        return f",{self.sessionno},{self.hostname}"

    _repstr: str | None = None

    @property
    def repstr(self) -> str:
        """
        What C{repr} shows (Twisted's C{tcp.Server} format), made when asked
        for.
        """
        if self._repstr is not None:
            return self._repstr
        protocol = getattr(self, "protocol", None)
        name = "-" if protocol is None else type(protocol).__name__
        return f"<{name} #{self.sessionno} on {self.server._realPortNumber}>"

    @repstr.setter
    def repstr(self, value: str) -> None:
        self._repstr = value

    def getPeer(self) -> IPv4Address | IPv6Address:
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()  # type: ignore[no-untyped-call]
        return peer


class RelayPort(tcp.Port):
    """
    A TCP listening port whose connections are L{RelayServer}s, accepted by a
    leaner loop than Twisted's.
    """

    transport = RelayServer

    noDelay = False
    """
    Whether the sockets this port accepts have C{TCP_NODELAY} already (set on
    the listening socket, and inherited).
    """

    multiAccept = False
    """
    C{multi_accept}: accept every waiting connection when the socket is
    readable (up to Twisted's adaptive C{numberAccepts} per call), or only one
    (nginx's default, which saves the C{accept(2)} that finds nothing more
    waiting, and its exception, on most events).
    """

    def doRead(self) -> None:
        """
        Accept what is waiting, as C{tcp.Port.doRead} does, with the socket
        module's C accept and socket objects (not its Python wrappers, whose
        conversions of the address family and type cost more than the
        transport uses), and without buffering log events per call.  An
        accept error other than "nothing more waiting" (C{EMFILE},
        C{ENOBUFS}, ...) is left to Twisted's loop, which recovers from it.
        """
        this: Any = self
        try:
            accept = this.socket._accept
            family = self.addressFamily
            factory = this.factory
            # TLS in the transport itself, unless the factory's protocol is
            # not the one TLSServerConnection stands for.
            tls = (
                factory
                if isinstance(factory, TLSServerFactory)
                and factory.protocol is HandshakeTimeoutTLSProtocol
                else None
            )
            reactor = self.reactor
            multi = self.multiAccept
            limit = self.numberAccepts if multi else 1
            accepted = 0
            while accepted < limit:
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    self.numberAccepts = max(1, limit - accepted)
                    tcp.Port.doRead(self)
                    return
                accepted += 1
                skt = socket.SocketType(family, socket.SOCK_STREAM, 0, fd)
                if len(addr) == 4:
                    # IPv6: with the scope ID, as Twisted gives it.
                    host = socket.getnameinfo(
                        addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
                    )
                    addr = (host[0], *addr[1:])
                peer = this._buildAddr(addr)
                protocol = (
                    factory if tls is None else tls.wrappedFactory
                ).buildProtocol(peer)
                if protocol is None:
                    skt.close()
                    continue
                session = self.sessionno
                self.sessionno = session + 1
                if tls is None:
                    transport = RelayServer(skt, protocol, addr, self, session, reactor)  # type: ignore[arg-type]
                else:
                    transport = TLSServerConnection(
                        skt,  # type: ignore[arg-type]
                        protocol,
                        addr,
                        self,
                        session,
                        reactor,
                    )
                    transport.serveTLS(tls)
                transport._peer = peer
                protocol.makeConnection(transport)
                if tls is not None:
                    # The client's hello is usually there already (it follows
                    # the TCP handshake at once): read it now, as nginx does,
                    # not on the reactor's next turn.
                    _readNow(transport)
            if multi:
                # Twisted's scaling of the accepts per call.
                if accepted == limit:
                    self.numberAccepts = limit + 20
                else:
                    self.numberAccepts = max(1, accepted)
        except BaseException:
            log.failure("accepting connections on {port!r}", port=self)


def adoptStreamPort(
    reactor: Any,
    fileDescriptor: int,
    addressFamily: int,
    factory: IProtocolFactory,
    multiAccept: bool = False,
) -> Any:
    """
    C{reactor.adoptStreamPort}, with a L{RelayPort} for TCP on a POSIX
    reactor (anything else goes to the reactor's own, which accepts as
    Twisted does).

    @param multiAccept: L{RelayPort.multiAccept}.
    """
    if isinstance(reactor, PosixReactorBase) and addressFamily in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        port = RelayPort._fromListeningDescriptor(  # type: ignore[no-untyped-call]
            reactor, fileDescriptor, addressFamily, factory
        )
        port.multiAccept = multiAccept
        port.startListening()
        try:
            # Accepted sockets inherit it on Linux: no setsockopt(2) per
            # connection (elsewhere _tune still sets it on each).
            port.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        else:
            port.noDelay = sys.platform.startswith("linux")
        return port
    return reactor.adoptStreamPort(fileDescriptor, addressFamily, factory)


# providedBy(transport) -> the declaration a TLS layer over it gets (see
# FastTLSProtocol.makeConnection).
_provides: dict[tuple[type, Any], Any] = {}


def _provideLike(protocol: object, transport: object) -> None:
    """
    Make C{protocol} directly provide what C{transport} provides, as Twisted's
    TLS layer does, reusing one declaration per kind of transport.
    """
    key = (type(protocol), providedBy(transport))
    spec = _provides.get(key)
    if spec is None:
        directlyProvides(protocol, key[1])
        if len(_provides) < 64:
            _provides[key] = protocol.__provides__  # type: ignore[attr-defined]
    else:
        protocol.__provides__ = spec  # type: ignore[attr-defined]


class _TLSEngine:
    """
    TLS over memory BIOs, on pyOpenSSL's own C{lib} calls: the record paths that
    L{FastTLSProtocol} (a TLS layer over a transport) and L{TLSServerConnection}
    (a socket transport with TLS in it) share.

    What Twisted's L{TLSMemoryBIOProtocol} does, with the same attributes, made
    cheaper: encrypted bytes go to the socket at once when nothing is queued
    (L{writeThrough}); records are written, read and flushed through one scratch
    buffer, with no exception per empty read; fresh memory BIOs once the
    handshake is done.

    A class using it sets C{_tlsConnection}, C{_appSendBuffer},
    C{wrappedProtocol} (the application) and C{_wire} (the socket transport the
    records go to), and says how to close that transport (L{_closeWire}).
    """

    _tlsConnection: Any
    _appSendBuffer: list[bytes]
    wrappedProtocol: Any
    _wire: Any
    _queue: Callable[[Any, bytes], object] | None = None
    """
    How records the socket did not take at once are queued (L{writeThrough}'s
    C{queue}): by default, the wire's own C{write}.
    """

    _reason: Failure | None = None
    _handshakeDone = False
    _lostTLSConnection = False
    _producer: Any = None
    _aborted = False

    def _closeWire(self) -> None:
        """
        Close the socket transport, after what is queued on it.
        """
        raise NotImplementedError()

    def _received(self, data: bytes) -> None:
        """
        Encrypted bytes arrived: advance the handshake, deliver what they
        decrypt to.
        """
        connection = self._tlsConnection
        if connection is None:
            return
        with _ffi.from_buffer(data) as buffer:
            if _lib.BIO_write(connection._into_ssl, buffer, len(data)) <= 0:
                connection.bio_write(data)  # raises what pyOpenSSL raises
        if self._handshakeDone:
            if self._appSendBuffer:
                self._unbufferPendingWrites()
            self._flushReceiveBIO()
            return
        self._checkHandshakeStatus()
        if not self._handshakeDone:
            return
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._flushReceiveBIO()
        self._handshakeFinished()

    def _unbufferPendingWrites(self) -> None:
        raise NotImplementedError()

    def _checkHandshakeStatus(self) -> None:
        # Twisted's, with SSL_do_handshake called directly: no exception for
        # the "want more bytes" that all but the last step of a handshake end
        # with.  Anything else goes through pyOpenSSL's error handling; a
        # connection class with a do_handshake of its own keeps it.
        if self._aborted:
            return
        connection = self._tlsConnection
        if type(connection) is not Connection:
            try:
                connection.do_handshake()
            except WantReadError:
                self._flushSendBIO()
                return
            except Error:
                self._tlsShutdownFinished(Failure())
                return
        else:
            ssl = connection._ssl
            result = _lib.SSL_do_handshake(ssl)
            if result <= 0 or not _quiet(connection):
                if (
                    result <= 0
                    and _lib.SSL_get_error(ssl, result) == _WANT_READ
                    and _quiet(connection)
                ):
                    self._flushSendBIO()
                    return
                if self._sslOutcome(connection, ssl, result) is not _DONE:
                    return
        self._handshakeDone = True
        wrapped = self.wrappedProtocol
        if IHandshakeListener.providedBy(wrapped):
            wrapped.handshakeCompleted()

    def _handshakeFinished(self) -> None:
        """
        The bytes just received completed the handshake, and what it produced
        was sent: let go of the handshake's buffers.
        """
        connection = self._tlsConnection
        if connection is not None and not self._lostTLSConnection:
            _renewBIOs(connection)

    def _flushSendBIO(self) -> None:
        connection = self._tlsConnection
        if connection is None:
            return
        bio = connection._from_ssl
        wire, queue = self._wire, self._queue
        while True:
            size = _lib.BIO_read(bio, _outgoing, _SCRATCH)
            if size <= 0:
                return
            writeThrough(wire, _outgoingView[:size], queue)
            if size < _SCRATCH:
                return

    def _flushReceiveBIO(self) -> None:
        connection = self._tlsConnection
        if connection is None:
            return
        ssl = connection._ssl
        received = 0
        while not self._lostTLSConnection:
            # Each call gives at most one record: several are gathered into one
            # delivery while there is room for another.
            result = _lib.SSL_read(ssl, _received + received, _SCRATCH - received)
            if result > 0:
                received += result
                if _SCRATCH - received < _RECORD:
                    self._deliver(received)
                    received = 0
                continue
            error = _lib.SSL_get_error(ssl, result)
            quiet = _quiet(connection)
            if error == _WANT_READ and quiet:
                if received:
                    self._deliver(received)
                break
            # The peer's close_notify (the end of every connection: no
            # exception for it), an error, or a problem a callback left: what
            # pyOpenSSL raises for it, handled as Twisted does, after the data
            # before it.
            closed = error == _ZERO_RETURN and quiet
            problem = None
            if not closed:
                try:
                    connection._raise_ssl_error(ssl, result)
                except WantReadError:
                    pass
                except ZeroReturnError:
                    closed = True
                except Error:
                    problem = Failure()
            if received:
                self._deliver(received)
            if closed:
                # Answered with close_notify (sent), and the socket closed
                # now that both sides are done: the end of the TLS connection
                # (what _tlsShutdownFinished does, without its second flush
                # and close).
                done = self._shutdownTLS()
                self._lostTLSConnection = True
                if not done:
                    self._closeWire()
                return
            if problem is not None:
                # Sent (an alert, say) and closed there.
                self._tlsShutdownFinished(problem)
                return
            break
        self._flushSendBIO()

    def _shutdownTLS(self) -> bool:
        """
        Send close_notify (or answer the peer's); once both sides have, close
        the socket transport.

        @return: whether both sides have (and the socket transport is closing).
        """
        connection = self._tlsConnection
        if type(connection) is not Connection:
            try:
                done = connection.shutdown()
            except Error:
                done = False
        else:
            # SSL_shutdown called directly (pyOpenSSL's wrapper raises for the
            # error case only).
            ssl = connection._ssl
            result = _lib.SSL_shutdown(ssl)
            if result < 0:
                # Mid-handshake, or failed: not done, with OpenSSL's error
                # queue emptied as pyOpenSSL empties it.
                try:
                    connection._raise_ssl_error(ssl, result)
                except Error:
                    pass
            done = result > 0
        self._flushSendBIO()
        if done:
            # Both sides have shut down (or the handshake never started).
            self._closeWire()
        return bool(done)

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        """
        The TLS connection is over (C{reason}: why, or L{None} for the peer's
        close_notify): send what is left, such as an alert, and close the
        socket transport.
        """
        if reason is not None and _representsEOF(reason.value):  # type: ignore[arg-type]
            # An end of stream without close_notify, as Twisted names it.
            reason = Failure(main.CONNECTION_LOST)  # type: ignore[no-untyped-call]
        if self._reason is None:
            self._reason = reason
        self._lostTLSConnection = True
        self._flushSendBIO()
        self._closeWire()

    def _deliver(self, size: int) -> None:
        if not self._aborted:
            self.wrappedProtocol.dataReceived(_ffi.buffer(_received, size)[:])

    def _bufferedWrite(self, data: bytes) -> None:
        """
        Keep C{data} until the handshake (or a read OpenSSL asked for) is
        done, and pause the producer meanwhile.
        """
        self._appSendBuffer.append(data)
        if self._producer is not None:
            self._producer.pauseProducing()

    def _write(self, data: bytes) -> None:
        connection = self._tlsConnection
        if self._lostTLSConnection or connection is None:
            return
        if self._appSendBuffer or not self._handshakeDone:
            # Waiting for the handshake (or for a read OpenSSL asked for):
            # kept in order.
            self._bufferedWrite(data)
            return
        ssl = connection._ssl
        total = len(data)
        sent = 0
        result = 1
        with _ffi.from_buffer(data) as buffer:
            while sent < total:
                result = _lib.SSL_write(ssl, buffer + sent, min(total - sent, _RECORD))
                if result <= 0:
                    break
                sent += result
        if sent == total:
            self._flushSendBIO()
            return
        # What Twisted's _write does when pyOpenSSL's send raises.
        outcome = self._sslOutcome(connection, ssl, result)
        if outcome is _WANTS_READ:
            self._bufferedWrite(data[sent:])
        elif outcome is _DONE:
            self._flushSendBIO()

    def _sslOutcome(self, connection: Any, ssl: Any, result: int) -> object:
        """
        What pyOpenSSL makes of C{result}, handled as Twisted's TLS layer
        handles it: L{_WANTS_READ} (what OpenSSL wrote is sent),
        L{_FAILED} (the connection is closed with the error), or L{_DONE}.
        """
        try:
            connection._raise_ssl_error(ssl, result)
        except WantReadError:
            self._flushSendBIO()
            return _WANTS_READ
        except Error:
            self._tlsShutdownFinished(Failure())
            return _FAILED
        return _DONE


class FastTLSProtocol(_TLSEngine, TLSMemoryBIOProtocol):  # type: ignore[misc]
    """
    L{TLSMemoryBIOProtocol} with L{_TLSEngine}'s cheaper record paths, over
    any transport.

    A server-side factory (one with a true C{serverSide}) skips the handshake
    step that Twisted takes before any byte arrived: a server has nothing to
    say until the client's hello.
    """

    def makeConnection(self, transport: ITransport) -> None:
        factory = self.factory
        self._tlsConnection = factory._creatorCallable(self)
        self._appSendBuffer = []
        self._wire = transport
        _provideLike(self, transport)
        # What TLSMemoryBIOProtocol.makeConnection does, without declaring the
        # interfaces and registering twice through ProtocolWrapper.
        Protocol.makeConnection(self, transport)
        factory.registerProtocol(self)
        if self._connectWrapped:
            self.wrappedProtocol.makeConnection(self)
        if not getattr(factory, "serverSide", False):
            self._checkHandshakeStatus()

    dataReceived = _TLSEngine._received

    def _closeWire(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _unbufferPendingWrites(self) -> None:
        TLSMemoryBIOProtocol._unbufferPendingWrites(self)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        TLSMemoryBIOProtocol.connectionLost(self, reason)  # type: ignore[no-untyped-call]
        self._wire = None

    # The transport's, as ProtocolWrapper's __getattr__ would find them, without
    # the lookup through it.

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]


# The attributes of a pyOpenSSL context that hold a callback finding its
# Connection through Connection._reverse_mapping (verification, ALPN, SNI,
# OCSP, ...).
_MAPPED_CALLBACKS = (
    "_verify_helper",
    "_info_callback",
    "_keylog_callback",
    "_tlsext_servername_callback",
    "_alpn_select_helper",
    "_ocsp_helper",
    "_cookie_generate_helper",
    "_cookie_verify_helper",
)


def _newMemoryBIOs() -> tuple[Any, Any] | None:
    """
    Two new, empty memory BIOs (what goes into OpenSSL, what comes out), or
    L{None} if OpenSSL could not allocate them.
    """
    into = _lib.BIO_new(_lib.BIO_s_mem())
    out = _lib.BIO_new(_lib.BIO_s_mem())
    if into == _ffi.NULL or out == _ffi.NULL:
        _freeBIOs((into, out))
        return None
    return into, out


def _freeBIOs(bios: tuple[Any, Any] | None) -> None:
    for bio in bios or ():
        if bio != _ffi.NULL:
            _lib.BIO_free(bio)


def serverConnection(context: Context) -> Connection:
    """
    C{Connection(context, None)} in the accept state.

    pyOpenSSL registers every connection in C{Connection._reverse_mapping}, a
    weak dictionary its callbacks look their connection up in, with five
    Python calls per connection (and one more when the connection is freed).
    A context that has none of those callbacks (a server context without
    client verification or ALPN, as tlsrelay makes them) never looks: its
    connections are made as pyOpenSSL's constructor makes them, with the
    same attributes, without the registration.
    """
    mapped = False
    for name in _MAPPED_CALLBACKS:
        if getattr(context, name, None) is not None:
            mapped = True
            break
    bios = None if mapped else _newMemoryBIOs()
    ssl = _ffi.NULL if bios is None else _lib.SSL_new(context._context)
    if ssl == _ffi.NULL:
        # With such callbacks (or out of memory: as pyOpenSSL handles it),
        # pyOpenSSL's constructor.
        _freeBIOs(bios)
        connection = Connection(context, None)
        _lib.SSL_set_accept_state(connection._ssl)
        return connection
    connection = Connection.__new__(Connection)
    context._used = True
    this: Any = connection
    this._ssl = _ffi.gc(ssl, _lib.SSL_free)
    _lib.SSL_set_mode(ssl, _lib.SSL_MODE_AUTO_RETRY)
    this._context = context
    this._app_data = None
    this._alpn_select_callback_args = None
    this._verify_helper = context._verify_helper
    this._verify_callback = context._verify_callback
    this._cookie_generate_helper = context._cookie_generate_helper
    this._cookie_verify_helper = context._cookie_verify_helper
    this._socket = None
    assert bios is not None
    into, out = bios
    this._into_ssl = into
    this._from_ssl = out
    # SSL_free frees them.
    _lib.SSL_set_bio(ssl, into, out)
    _lib.SSL_set_accept_state(ssl)
    return connection


def _renewBIOs(connection: Any) -> None:
    """
    Give C{connection} new, empty memory BIOs if its own are empty.

    A memory BIO keeps the largest buffer it ever held for as long as it lives:
    after the handshake, about 2 KiB each way that an idle connection would
    keep; fresh BIOs allocate only when data passes.
    """
    into, out = connection._into_ssl, connection._from_ssl
    if _lib.BIO_get_mem_data(into, _ffi.NULL) or _lib.BIO_get_mem_data(out, _ffi.NULL):
        return
    bios = _newMemoryBIOs()
    if bios is None:
        return
    newInto, newOut = bios
    # SSL_set_bio frees the BIOs it replaces.
    _lib.SSL_set_bio(connection._ssl, newInto, newOut)
    connection._into_ssl = newInto
    connection._from_ssl = newOut


def _quiet(connection: Any) -> bool:
    """
    Whether no callback of C{connection}'s context left a problem that
    pyOpenSSL would raise with the next result.
    """
    context = connection._context
    for helper in (
        context._verify_helper,
        context._alpn_select_helper,
        context._ocsp_helper,
    ):
        if helper is not None and helper._problems:
            return False
    return True


class HandshakeTimeoutTLSProtocol(FastTLSProtocol):
    """
    A server TLS connection that is aborted unless its handshake completes
    within the factory's C{handshakeTimeout}.

    @ivar timedOut: the handshake timed out and the connection was aborted
        (this was logged here), so that the application's C{connectionLost}
        can tell a timeout from other handshake failures.
    """

    factory: TLSServerFactory
    timedOut = False

    def makeConnection(self, transport: ITransport) -> None:
        # Timed before the application sees the connection, so that a
        # connectionLost during connectionMade finds the timeout to cancel.
        deadlines = self.factory.handshakeDeadlines
        if deadlines is not None:
            deadlines.add(self)
        super().makeConnection(transport)

    def _handshakeFinished(self) -> None:
        self._cancelHandshakeTimer()
        super()._handshakeFinished()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelHandshakeTimer()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _handshakeTimedOut(self) -> None:
        assert self.transport is not None
        _abortTimedOut(self, self.transport.getPeer(), self.factory)

    def _cancelHandshakeTimer(self) -> None:
        deadlines = self.factory.handshakeDeadlines
        if deadlines is not None:
            deadlines.discard(self)


class TLSServerFactory(TLSMemoryBIOFactory):
    """
    Server-side TLS around C{wrappedFactory}, with a handshake timeout.

    @ivar handshakeTimeout: seconds a client has to complete its handshake
        (nginx's C{ssl_handshake_timeout}, 60 by default there), or L{None} for
        no limit.
    @ivar clock: the clock for the handshake timers.
    @ivar handshakeDeadlines: the connections still handshaking, timed
        together (L{None} without a timeout).
    @ivar serverContext: with tlsrelay's own L{ServerContextFactory}, its
        context, from which a L{TLSServerConnection} makes its TLS connection
        directly; L{None} with any other creator (its own method is called).
    """

    protocol = HandshakeTimeoutTLSProtocol
    serverSide = True

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
        self.serverContext: Any = (
            contextFactory.context
            if type(contextFactory) is ServerContextFactory
            else None
        )
        self.handshakeTimeout = handshakeTimeout
        self.clock = clock
        self.handshakeDeadlines: Deadlines[_Handshaking] | None = (
            None
            if handshakeTimeout is None
            else Deadlines(clock, handshakeTimeout, _timedOut)
        )

    def __repr__(self) -> str:
        return (
            f"<TLSServerFactory around {self.wrappedFactory!r}, "
            f"handshakeTimeout={self.handshakeTimeout!r}>"
        )


@implementer(ISSLTransport, INegotiated)
class TLSServerConnection(_TLSEngine, RelayServer):
    """
    An accepted TCP connection with TLS in it (server side): what a
    L{RelayServer} under a L{HandshakeTimeoutTLSProtocol} does, in one object.

    L{RelayPort} builds these for a L{TLSServerFactory}: its application
    protocol is connected to this transport directly, and each event is one
    call less deep than through the TLS layer (the socket's read is the TLS
    layer's input; records go out with C{send(2)}).  To the application it is
    the TLS transport Twisted's layer is (C{write}, C{loseConnection} with
    close_notify, C{abortConnection}, producers, C{getHandle},
    C{getPeerCertificate}, C{negotiatedProtocol}, C{handshakeCompleted} for an
    L{IHandshakeListener}), plus the TCP transport's own (C{getPeer},
    C{getHost}, C{setTcpNoDelay}, C{pauseProducing} and C{resumeProducing} of
    its reads).

    What differs from the two layers: C{disconnecting} is the socket's (the TLS
    layer's own is C{tlsClosing}); C{loseWriteConnection} sends close_notify and
    reads on (a TLS connection cannot be half-closed below TLS); a peer's TCP
    end of stream ends the connection (TLS ends with close_notify).

    @ivar tlsFactory: the factory whose handshake timeout applies.
    @ivar timedOut: the handshake timed out and the connection was aborted (this
        was logged here), as L{HandshakeTimeoutTLSProtocol.timedOut}.
    @ivar tlsClosing: C{loseConnection} or C{abortConnection} was called.
    """

    timedOut = False
    tlsClosing = False
    _queue = staticmethod(FileDescriptor.write)  # type: ignore[assignment]

    tlsFactory: TLSServerFactory

    def serveTLS(self, tlsFactory: TLSServerFactory) -> None:
        """
        Serve TLS as C{tlsFactory} says, before the application is connected.
        """
        self.tlsFactory = tlsFactory
        self.wrappedProtocol = self.protocol
        self._wire = self
        self._appSendBuffer = []
        context = tlsFactory.serverContext
        if context is None:
            self._tlsConnection = tlsFactory._creatorCallable(self)  # type: ignore[arg-type]
        else:
            # What Twisted's connection factory does for tlsrelay's own
            # creator, without the calls through it (and without the
            # application data, which only Twisted's client-side callbacks
            # read).
            self._tlsConnection = serverConnection(context)
        deadlines = tlsFactory.handshakeDeadlines
        if deadlines is not None:
            deadlines.add(self)

    # --- the socket's events --------------------------------------------------------

    _readData = _TLSEngine._received

    def readConnectionLost(self, reason: Failure) -> None:
        # The peer's TCP end of stream: the end of the TLS connection (after
        # what is left to decrypt), as under Twisted's TLS layer.
        self.connectionLost(reason)

    def connectionLost(self, reason: Failure) -> None:
        """
        The socket is closed: tell the application, with what ended TLS if it
        ended first (as L{TLSMemoryBIOProtocol.connectionLost}).
        """
        if not hasattr(self, "socket"):
            return
        deadlines = self.tlsFactory.handshakeDeadlines
        if deadlines is not None:
            deadlines.discard(self)
        self._stopSocket(reason)
        if not self._lostTLSConnection:
            # What OpenSSL still holds is decrypted and delivered; a stream
            # that ended without close_notify is a lost connection.
            self._tlsConnection.bio_shutdown()
            self._flushReceiveBIO()
            self._lostTLSConnection = True
        reason = self._reason or reason
        self._reason = None
        protocol = self.protocol
        del self.protocol
        del self.socket
        del self.fileno
        self.wrappedProtocol = self._wire = None
        try:
            protocol.connectionLost(reason)
        finally:
            self._tlsConnection = None

    def _closeWire(self) -> None:
        if not self.connected or self.disconnecting:
            return
        if (
            self._reading
            and self.producer is None
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
        ):
            # Closing because of what was just read (the peer's close_notify
            # after ours, or an error), with nothing left to send: the read
            # returns the end of the connection to the reactor, which closes
            # it now, rather than on its next turn.
            self.disconnecting = True
            self._afterRead = main.CONNECTION_DONE
            if self._drained:
                # Nothing unread: close(2) alone sends the end of the stream
                # (shutdown(2) first only matters when unread data would make
                # it a reset), as nginx closes.
                self._shouldShutdown = False
            return
        RelayServer.loseConnection(self)

    # --- the application's transport ------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.tlsClosing and self._producer is None:
            return
        self._write(data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def loseConnection(self) -> None:
        """
        Send close_notify once what was written is sent (and the producer, if
        any, is unregistered); close when the peer answers with its own.
        Before the handshake is done, abort.
        """
        if self.tlsClosing or not self.connected:
            return
        if not self._handshakeDone and not self._appSendBuffer:
            self.abortConnection()
        self.tlsClosing = True
        if not self._appSendBuffer and self._producer is None:
            self._shutdownTLS()

    def loseWriteConnection(self) -> None:
        """
        Send no more: close_notify, reading on until the peer's.
        """
        self.loseConnection()

    def abortConnection(self) -> None:
        """
        Close now, dropping what is queued (after an attempt at close_notify).
        """
        self._aborted = True
        self.tlsClosing = True
        self._shutdownTLS()
        tcp._AbortingMixin.abortConnection(self)  # type: ignore[no-untyped-call]

    def _unbufferPendingWrites(self) -> None:
        # Twisted's, with tlsClosing for the TLS layer's disconnecting.
        pending, self._appSendBuffer = self._appSendBuffer, []
        for data in pending:
            self._write(data)
        if self._appSendBuffer:
            return
        if self._producer is not None:
            self._producer.resumeProducing()
        elif self.tlsClosing:
            self._shutdownTLS()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        As on Twisted's TLS layer: paused while the socket's queue is full (or
        the handshake is not done); a pull producer is driven by a
        C{_PullToPush}.  A socket transport (whose pause and resume can be
        repeated) is registered as it is; other producers behind the membrane
        that makes repeated pauses one.
        """
        if self._lostTLSConnection:
            producer.stopProducing()
            return
        if self.producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer!r}, because producer "
                f"{self.producer!r} was never unregistered."
            )
        pull = None
        if not streaming:
            producer = pull = _PullToPush(producer, self)  # type: ignore[no-untyped-call]
        if not isinstance(producer, FileDescriptor):
            producer = _ProducerMembrane(producer)  # type: ignore[no-untyped-call]
        self._producer = self.producer = producer
        self.streamingProducer = True
        if pull is not None:
            pull.startStreaming()  # type: ignore[no-untyped-call]

    def unregisterProducer(self) -> None:
        producer = self._producer
        if producer is None:
            return
        pull = getattr(producer, "_producer", None)
        if isinstance(pull, _PullToPush):
            pull.stopStreaming()  # type: ignore[no-untyped-call]
        self._producer = self.producer = None
        if self.connected and self.disconnecting:
            self.startWriting()  # type: ignore[no-untyped-call]
        if self.tlsClosing and not self._appSendBuffer:
            self._shutdownTLS()

    def getHandle(self) -> Any:
        """
        The C{OpenSSL.SSL.Connection} (as Twisted's TLS layer answers).
        """
        return self._tlsConnection

    def getPeerCertificate(self) -> Any:
        return self._tlsConnection.get_peer_certificate()

    @property
    def negotiatedProtocol(self) -> bytes | None:
        connection = self._tlsConnection
        if connection is None:
            return None
        protocol: bytes | None = connection.get_alpn_proto_negotiated()
        return protocol or None

    # --- the handshake timeout ------------------------------------------------------

    def _handshakeFinished(self) -> None:
        deadlines = self.tlsFactory.handshakeDeadlines
        if deadlines is not None:
            deadlines.discard(self)
        if not self._lostTLSConnection:
            _renewBIOs(self._tlsConnection)

    def _handshakeTimedOut(self) -> None:
        _abortTimedOut(self, self.getPeer(), self.tlsFactory)


_Handshaking = HandshakeTimeoutTLSProtocol | TLSServerConnection


def _timedOut(connection: _Handshaking) -> None:
    connection._handshakeTimedOut()


def _abortTimedOut(
    connection: _Handshaking, peer: Any, factory: TLSServerFactory
) -> None:
    """
    C{connection}'s handshake timed out: say so, and abort it.
    """
    connection.timedOut = True
    log.info(
        "TLS handshake with {peer} timed out after {timeout}s",
        peer=describePeer(peer),
        timeout=factory.handshakeTimeout,
    )
    connection.abortConnection()


_T = TypeVar("_T")

_EARLY = 1e-6
"""
Seconds by which a deadline may be met early: a reactor's clock (seconds since
the epoch, a float) cannot always express a smaller delay than this.
"""


class Deadlines(Generic[_T]):
    """
    Many timeouts of the same length on one reactor call.

    What a C{callLater(delay, expired, item)} for each item would do
    (C{expired(item)} once C{delay} has passed since it was added, unless it
    was discarded first), without a L{DelayedCall} for each: creating,
    scheduling and cancelling one costs more than the dictionary entry kept
    here, and Twisted keeps cancelled ones in its heap for a while, which an
    idle connection would pay for in memory.

    Items expire in the order they were added, which is the order of their
    deadlines while the clock does not go back.

    On a reactor that L{tlsrelay._reactor.tuneReactor} tuned, the reactor call
    is not cancelled when the last item goes (it runs once more, at most
    C{delay} later, and finds nothing): connections come and go too often for
    a cancel and a new call each time.  Elsewhere (tests' clocks included) it
    is cancelled at once.
    """

    def __init__(
        self, clock: IReactorTime, delay: float, expired: Callable[[_T], object]
    ) -> None:
        self._clock = clock
        self.delay = delay
        self._expired = expired
        self._deadlines: dict[_T, float] = {}
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def add(self, item: _T) -> None:
        """
        Start C{item}'s timeout (again, if it was running).
        """
        self._deadlines.pop(item, None)
        self._deadlines[item] = self._clock.seconds() + self.delay
        if self._call is None:
            self._call = self._clock.callLater(self.delay, self._run)

    def discard(self, item: _T) -> None:
        """
        Stop C{item}'s timeout, if it is running.
        """
        deadlines = self._deadlines
        if deadlines.pop(item, None) is not None and not deadlines:
            if getattr(self._clock, "_callsSoon", None) is not None:
                # A reactor tuned by tuneReactor (the relay's): the call stays
                # and, if nothing was added by then, ends when it runs.  The
                # next item spares a callLater, and this one a cancel.
                return
            call, self._call = self._call, None
            if call is not None and call.active():
                call.cancel()

    def _run(self) -> None:
        self._call = None
        deadlines = self._deadlines
        now = self._clock.seconds()
        while deadlines:
            item = next(iter(deadlines))
            deadline = deadlines[item]
            if deadline > now + _EARLY:
                self._call = self._clock.callLater(deadline - now, self._run)
                return
            del deadlines[item]
            try:
                self._expired(item)
            except Exception:
                log.failure("timeout of {item!r}", item=item)
