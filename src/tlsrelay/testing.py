"""
Helpers for the trial (or pytest) suites of tlsrelay and of projects that use it.
Nothing here opens a socket or touches the global reactor.

  - L{CertificateAuthority}: a throwaway CA (trustme) that writes server and
    client certificates as PEM files, and makes TLS options that trust it;
  - L{MemoryUpstream}, L{connectPending}, L{refusePending},
    L{pendingConnections}: in-memory servers for the TCP connections a relay (or
    a L{TLSRelayPoolEndpoint <tlsrelay.endpoints.TLSRelayPoolEndpoint>}) makes on
    a L{MemoryReactorClock};
  - L{relayFromConfig} and L{RelayFixture}: a relay built from nginx-syntax text
    on a L{MemoryReactorClock}, with in-memory (TLS) clients and its access logs;
  - L{MemoryClientEndpoint}: an L{IStreamClientEndpoint} that connects, in
    memory, to any server protocol factory;
  - L{Recorder}, L{Echo}, L{CannedResponse}: protocols for either end;
  - L{writeCertificates}, L{memoryHandshake}, L{pump}: certificate files, and
    TLS handshakes between two pyOpenSSL contexts without any transport.

Connections are wired with C{twisted.test.iosim}, as treq's C{testing} module
does.  It is not a public Twisted API, so it is imported in one place only,
L{_connect}, when a connection is made: importing this module never needs it.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trustme
from attrs import define, field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.abstract import isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, NoProtocol
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    optionsForClientTLS,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsrelay._accesslog import AccessLogFiles
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._load import buildConfig
from tlsrelay._config._model import Address, Config, Listen
from tlsrelay._config._parser import parseString
from tlsrelay._relay import WorkerConnections
from tlsrelay._service import Generation, build
from tlsrelay._sessions import SessionSharing

if TYPE_CHECKING:
    from twisted.test.iosim import IOPump

__all__ = [
    "CannedResponse",
    "CertificateAuthority",
    "CertificateFiles",
    "ConfigError",
    "Echo",
    "MemoryClientEndpoint",
    "MemoryConnection",
    "MemoryUpstream",
    "Recorder",
    "RelayFixture",
    "WithClientCertificate",
    "connectPending",
    "memoryHandshake",
    "pendingConnections",
    "pump",
    "refusePending",
    "relayFromConfig",
    "writeCertificates",
]


@frozen
class CertificateFiles:
    """
    PEM files for one server (or client) certificate and the CA that signed it.

    @ivar ca: the L{trustme.CA}, to issue more certificates from the same CA.
    @ivar caFile: the CA certificate.
    @ivar certificate: the leaf certificate followed by its chain.
    @ivar key: the leaf's private key.
    """

    ca: trustme.CA
    caFile: str
    certificate: str
    key: str


def writeCertificates(
    directory: str,
    identities: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    ca: trustme.CA | None = None,
    prefix: str = "server",
    keyType: trustme.KeyType | None = None,
) -> CertificateFiles:
    """
    Issue a certificate for C{identities} (from a new CA unless C{ca} is given) and
    write C{ca.pem}, C{<prefix>.pem} and C{<prefix>.key} in C{directory}.
    """
    os.makedirs(directory, exist_ok=True)
    if ca is None:
        ca = trustme.CA()
    if keyType is None:
        issued = ca.issue_cert(*identities)
    else:
        issued = ca.issue_cert(*identities, key_type=keyType)
    caFile = os.path.join(directory, "ca.pem")
    certificate = os.path.join(directory, f"{prefix}.pem")
    key = os.path.join(directory, f"{prefix}.key")
    ca.cert_pem.write_to_path(caFile)
    with open(certificate, "wb") as f:
        for blob in issued.cert_chain_pems:
            f.write(blob.bytes())
    issued.private_key_pem.write_to_path(key)
    return CertificateFiles(ca, caFile, certificate, key)


def pump(a: SSL.Connection, b: SSL.Connection) -> None:
    """
    Move bytes between two memory-BIO connections until neither has any to send.
    """
    moved = True
    while moved:
        moved = False
        for source, sink in ((a, b), (b, a)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                continue
            if data:
                sink.bio_write(data)
                moved = True


def _step(connection: SSL.Connection) -> bool:
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        return False
    return True


def memoryHandshake(
    server: SSL.Context,
    client: SSL.Context,
    serverName: bytes | None = None,
    session: SSL.Session | None = None,
) -> tuple[SSL.Connection, SSL.Connection]:
    """
    Complete a TLS handshake between C{server} and C{client} in memory and return
    the two connections (server, client), after exchanging one byte each way so that
    TLS 1.3 session tickets arrive.

    @raise SSL.Error: when either side fails the handshake.
    """
    serverConnection = SSL.Connection(server, None)
    serverConnection.set_accept_state()
    clientConnection = SSL.Connection(client, None)
    clientConnection.set_connect_state()
    if serverName is not None:
        clientConnection.set_tlsext_host_name(serverName)
    if session is not None:
        clientConnection.set_session(session)
    done = {serverConnection: False, clientConnection: False}
    for _ in range(20):
        for connection in (clientConnection, serverConnection):
            if not done[connection]:
                done[connection] = _step(connection)
        pump(clientConnection, serverConnection)
        if all(done.values()):
            break
    else:
        raise SSL.Error("handshake did not complete")
    serverConnection.send(b"s")
    clientConnection.send(b"c")
    pump(clientConnection, serverConnection)
    serverConnection.recv(1)
    clientConnection.recv(1)
    return serverConnection, clientConnection


# --- a certificate authority ----------------------------------------------------


def _privateCertificate(files: CertificateFiles) -> PrivateCertificate:
    with open(files.certificate, "rb") as f:
        certificate = f.read()
    with open(files.key, "rb") as f:
        key = f.read()
    private: PrivateCertificate = PrivateCertificate.loadPEM(certificate + b"\n" + key)
    return private


@implementer(IOpenSSLClientConnectionCreator)
@frozen
class WithClientCertificate:
    """
    Client connections of C{options} that present a certificate, given to
    pyOpenSSL as C{cryptography} objects (Twisted's C{clientCertificate=} hands
    it pyOpenSSL's deprecated C{X509} and C{PKey}).
    """

    options: IOpenSSLClientConnectionCreator
    certificate: x509.Certificate
    key: Any

    @classmethod
    def fromFiles(
        cls, options: IOpenSSLClientConnectionCreator, files: CertificateFiles
    ) -> WithClientCertificate:
        with open(files.certificate, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        with open(files.key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        return cls(options, certificate, key)

    def clientConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        connection = self.options.clientConnectionForTLS(tlsProtocol)
        connection.use_certificate(self.certificate)
        connection.use_privatekey(self.key)
        return connection


@define
class CertificateAuthority:
    """
    A throwaway certificate authority (a L{trustme.CA}) that writes what it issues
    as PEM files in C{directory}, and makes TLS options that trust it.

    Make one per test (in C{setUp}, from C{self.mktemp()}): certificates are made
    when a test runs, never at import time.

    @ivar directory: where the files go (made absolute, as C{self.mktemp()} is
        not, so that paths written into a configuration work from anywhere);
        C{ca.pem} is written at once.
    @ivar ca: the trustme CA, to issue anything the methods here do not.
    """

    directory: str = field(converter=os.path.abspath)
    ca: trustme.CA = field(factory=lambda: trustme.CA())

    def __attrs_post_init__(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self.ca.cert_pem.write_to_path(self.caFile)

    @property
    def caFile(self) -> str:
        """
        The CA certificate (for C{ssl_client_certificate},
        C{proxy_ssl_trusted_certificate}, C{openssl -CAfile}).
        """
        return os.path.join(self.directory, "ca.pem")

    def issueServerCertificate(
        self,
        identities: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
        name: str = "server",
        keyType: trustme.KeyType | None = None,
    ) -> CertificateFiles:
        """
        Issue a server certificate for C{identities} (host names and IP addresses)
        and write C{<name>.pem} and C{<name>.key}.
        """
        return writeCertificates(self.directory, identities, self.ca, name, keyType)

    def issueClientCertificate(
        self,
        identity: str = "client.example",
        name: str = "client",
        keyType: trustme.KeyType | None = None,
    ) -> CertificateFiles:
        """
        Issue a client certificate for C{identity} (its subject's common name and
        its subjectAltName) and write C{<name>.pem} and C{<name>.key}; trustme's
        certificates allow client authentication.
        """
        if keyType is None:
            issued = self.ca.issue_cert(identity, common_name=identity)
        else:
            issued = self.ca.issue_cert(
                identity, common_name=identity, key_type=keyType
            )
        certificate = os.path.join(self.directory, f"{name}.pem")
        key = os.path.join(self.directory, f"{name}.key")
        with open(certificate, "wb") as f:
            for blob in issued.cert_chain_pems:
                f.write(blob.bytes())
        issued.private_key_pem.write_to_path(key)
        return CertificateFiles(self.ca, self.caFile, certificate, key)

    def trustRoot(self) -> Certificate:
        """
        The CA as a Twisted trust root (an C{IOpenSSLTrustRoot}).
        """
        return Certificate.loadPEM(self.ca.cert_pem.bytes())

    def clientOptions(
        self,
        serverName: str = "localhost",
        certificate: CertificateFiles | None = None,
    ) -> IOpenSSLClientConnectionCreator:
        """
        TLS client options that trust only this CA and verify C{serverName} (a
        host name, sent as SNI, or an IP address), presenting C{certificate} when
        given.
        """
        options = optionsForClientTLS(serverName, self.trustRoot())
        if certificate is None:
            return options
        return WithClientCertificate.fromFiles(options, certificate)

    def serverOptions(
        self, certificate: CertificateFiles
    ) -> IOpenSSLServerConnectionCreator:
        """
        TLS server options that present C{certificate}: for an in-memory upstream
        behind C{proxy_ssl on}.  Built by tlsrelay's own server context builder
        (nginx's defaults), so no deprecated pyOpenSSL objects are involved.
        """
        from tlsrelay._config._model import CertificatePair, ServerTLS
        from tlsrelay._tls import ServerContextFactory, buildServerContext

        pair = CertificatePair(certificate.certificate, certificate.key)
        return ServerContextFactory(buildServerContext(ServerTLS(certificates=(pair,))))


# --- protocols for either end ---------------------------------------------------


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """
    Records what happens to its connection: the bytes that arrive, whether a TLS
    handshake completed, and how the connection ended.

    @ivar made: C{connectionMade} was called.
    @ivar handshook: the TLS handshake completed (over TLS only).
    @ivar lostReason: why the connection was lost, once it is.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.made = False
        self.handshook = False
        self.lostReason: Failure | None = None

    @property
    def received(self) -> bytes:
        """
        Every byte received so far.
        """
        return b"".join(self.chunks)

    @property
    def lost(self) -> bool:
        """
        Whether the connection was lost.
        """
        return self.lostReason is not None

    def write(self, data: bytes) -> None:
        """
        Send C{data} (delivered when the connection is flushed).
        """
        assert self.transport is not None, "not connected"
        self.transport.write(data)

    def loseConnection(self) -> None:
        """
        Close the connection (over TLS: with C{close_notify}).
        """
        assert self.transport is not None, "not connected"
        self.transport.loseConnection()

    def connectionMade(self) -> None:
        self.made = True

    def handshakeCompleted(self) -> None:
        self.handshook = True

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lostReason = reason


class Echo(Recorder):
    """
    Sends back every byte it receives (and records them).
    """

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.write(data)


class CannedResponse(Recorder):
    """
    Sends C{response} as soon as it is connected, then closes unless C{close} is
    false; records what it receives.  L{forResponse} makes a factory.
    """

    def __init__(self, response: bytes, close: bool = True) -> None:
        super().__init__()
        self.response = response
        self.close = close

    @classmethod
    def forResponse(
        cls, response: bytes, close: bool = True
    ) -> Factory[CannedResponse]:
        """
        A factory of L{CannedResponse}s that send C{response}.
        """
        return Factory.forProtocol(lambda: cls(response, close))

    def connectionMade(self) -> None:
        super().connectionMade()
        self.write(self.response)
        if self.close:
            self.loseConnection()


# --- in-memory connections ------------------------------------------------------


@define(eq=False)
class MemoryConnection:
    """
    One in-memory connection and the pump that moves its bytes.

    @ivar client: the protocol of the side that connected (the relay, for an
        upstream connection; a test's client, for a connection to the relay), as
        its factory built it: with TLS, the C{TLSMemoryBIOProtocol}.
    @ivar server: the protocol of the side that accepted, likewise; with TLS the
        application's protocol is C{server.wrappedProtocol}.
    """

    client: IProtocol
    server: IProtocol
    _pump: IOPump = field(alias="pump", repr=False)

    def flush(self) -> bool:
        """
        Move bytes both ways, and report a closed side to the other, until nothing
        is left to move (also running the calls due now on the reactor); return
        whether anything moved.
        """
        return bool(self._pump.flush())

    @property
    def disconnected(self) -> bool:
        """
        Whether both sides have been told the connection is lost.
        """
        return bool(
            self._pump.clientIO.disconnected and self._pump.serverIO.disconnected
        )


_ports = itertools.count()


def _clientAddress(server: IAddress) -> IAddress:
    """
    A loopback address with a fresh port, of the family of C{server}.
    """
    port = 40000 + next(_ports) % 20000
    if isinstance(server, IPv6Address):
        return IPv6Address("TCP", "::1", port)
    if isinstance(server, UNIXAddress):
        return UNIXAddress(None)
    return IPv4Address("TCP", "127.0.0.1", port)


def _connect(
    server: IProtocol,
    serverAddress: IAddress,
    client: IProtocol,
    clientAddress: IAddress,
    clock: MemoryReactorClock,
) -> MemoryConnection:
    """
    Connect two protocols in memory, without moving any byte yet.
    """
    # The one use of twisted.test.iosim, which is not a public Twisted API:
    # imported here so that importing tlsrelay.testing never needs it.
    from twisted.test.iosim import FakeTransport, connect

    connected: IOPump = connect(
        server,
        FakeTransport(server, True, serverAddress, clientAddress),
        client,
        FakeTransport(client, False, clientAddress, serverAddress),
        greet=False,
        clock=clock,
    )
    return MemoryConnection(client, server, connected)


@frozen
class _Attempt:
    """
    A C{connectTCP} call on a L{MemoryReactorClock}: its entry in C{tcpClients}
    and its connector.
    """

    entry: tuple[Any, ...]
    host: str
    port: int
    factory: Any
    connector: Any

    @property
    def cancelled(self) -> bool:
        return bool(getattr(self.connector, "stoppedConnecting", False))

    def address(self) -> IAddress:
        if isIPv6Address(self.host):
            return IPv6Address("TCP", self.host, self.port)
        return IPv4Address("TCP", self.host, self.port)


def _attempts(reactor: MemoryReactorClock) -> list[_Attempt]:
    """
    The TCP connection attempts recorded on C{reactor}, each with its connector
    (the first unclaimed connector to the same host and port).
    """
    claimed: set[int] = set()
    attempts = []
    for entry in reactor.tcpClients:
        host, port, factory = entry[0], entry[1], entry[2]
        connector = None
        for position, candidate in enumerate(reactor.connectors):
            destination = candidate.getDestination()
            if (
                position not in claimed
                and isinstance(destination, (IPv4Address, IPv6Address))
                and (destination.host, destination.port) == (host, port)
            ):
                claimed.add(position)
                connector = candidate
                break
        attempts.append(_Attempt(entry, host, port, factory, connector))
    return attempts


def _forget(reactor: MemoryReactorClock, done: Sequence[_Attempt]) -> None:
    """
    Remove finished attempts from C{tcpClients} and C{connectors}, as Twisted's
    C{iosim.ConnectionCompleter} does.
    """
    entries = {id(attempt.entry) for attempt in done}
    connectors = {id(attempt.connector) for attempt in done}
    reactor.tcpClients[:] = [e for e in reactor.tcpClients if id(e) not in entries]
    reactor.connectors[:] = [c for c in reactor.connectors if id(c) not in connectors]


def _selected(
    reactor: MemoryReactorClock, host: str | None, port: int | None
) -> list[_Attempt]:
    return [
        attempt
        for attempt in _attempts(reactor)
        if (host is None or attempt.host == host)
        and (port is None or attempt.port == port)
    ]


def pendingConnections(reactor: MemoryReactorClock) -> list[tuple[str, int]]:
    """
    The C{(host, port)} of every TCP connection attempt on C{reactor} that is
    neither completed, refused nor cancelled, oldest first.
    """
    return [
        (attempt.host, attempt.port)
        for attempt in _attempts(reactor)
        if not attempt.cancelled
    ]


def connectPending(
    reactor: MemoryReactorClock,
    factory: IProtocolFactory,
    host: str | None = None,
    port: int | None = None,
) -> list[MemoryConnection]:
    """
    Complete the pending TCP connection attempts on C{reactor} (those to C{host}
    and C{port} when given) to protocols of C{factory}, as if it listened there.

    The attempts leave C{reactor.tcpClients} and C{reactor.connectors};
    cancelled ones are dropped.  No byte moves until a connection is flushed.

    @return: the new connections, oldest first.
    """
    done: list[_Attempt] = []
    connections = []
    try:
        for attempt in _selected(reactor, host, port):
            done.append(attempt)
            if attempt.cancelled:
                continue
            serverAddress = attempt.address()
            clientAddress = _clientAddress(serverAddress)
            server = factory.buildProtocol(clientAddress)
            if server is None:
                attempt.factory.clientConnectionFailed(
                    attempt.connector, Failure(ConnectionRefusedError())
                )
                continue
            client = attempt.factory.buildProtocol(serverAddress)
            if client is None:
                continue
            connections.append(
                _connect(server, serverAddress, client, clientAddress, reactor)
            )
    finally:
        _forget(reactor, done)
    return connections


def refusePending(
    reactor: MemoryReactorClock,
    host: str | None = None,
    port: int | None = None,
    reason: BaseException | None = None,
) -> int:
    """
    Fail the pending TCP connection attempts on C{reactor} (those to C{host} and
    C{port} when given) with C{reason}, L{ConnectionRefusedError} by default.

    @return: how many were refused.
    """
    done: list[_Attempt] = []
    refused = 0
    try:
        for attempt in _selected(reactor, host, port):
            done.append(attempt)
            if attempt.cancelled:
                continue
            refused += 1
            attempt.factory.clientConnectionFailed(
                attempt.connector,
                Failure(reason if reason is not None else ConnectionRefusedError()),
            )
    finally:
        _forget(reactor, done)
    return refused


@define(eq=False)
class MemoryUpstream:
    """
    In-memory servers for the TCP connections made on a L{MemoryReactorClock}:
    L{serve} a protocol factory at a host and port, then L{complete} connects
    every pending attempt to an address served, and L{flush} moves the bytes.
    Attempts to other addresses stay pending: L{refuse} them, or advance the
    clock past their timeout.

    @ivar reactor: where the connections are attempted.
    @ivar servers: the factory serving each C{(host, port)}.
    @ivar connections: every connection completed, oldest first.
    """

    reactor: MemoryReactorClock
    servers: dict[tuple[str, int], IProtocolFactory] = field(factory=dict)
    connections: list[MemoryConnection] = field(factory=list)

    def serve(self, host: str, port: int, factory: IProtocolFactory) -> None:
        """
        Accept the connections to C{host} and C{port} (as the connecting side
        writes them: an IP address or the name it connects to) with C{factory}.
        For a TLS upstream, C{factory} is a server C{TLSMemoryBIOFactory}.
        """
        self.servers[(host, port)] = factory

    def stopServing(self, host: str, port: int) -> None:
        """
        Accept no more connections to C{host} and C{port}.
        """
        del self.servers[(host, port)]

    def pending(self) -> list[tuple[str, int]]:
        """
        The C{(host, port)} of every attempt not yet completed, refused or
        cancelled.
        """
        return pendingConnections(self.reactor)

    def complete(self) -> list[MemoryConnection]:
        """
        Connect every pending attempt to a served address.

        @return: the new connections.
        """
        new: list[MemoryConnection] = []
        for (host, port), factory in self.servers.items():
            new.extend(connectPending(self.reactor, factory, host, port))
        self.connections.extend(new)
        return new

    def refuse(self, host: str | None = None, port: int | None = None) -> int:
        """
        Refuse the pending attempts (those to C{host} and C{port} when given).

        @return: how many were refused.
        """
        return refusePending(self.reactor, host, port)

    def flush(self) -> bool:
        """
        Complete what can be completed and move bytes on every connection until
        nothing moves; return whether anything did.
        """
        moved = False
        for _ in range(1000):
            step = bool(self.complete())
            for connection in self.connections:
                step = connection.flush() or step
            if not step:
                return moved
            moved = True
        raise RuntimeError("connections still busy after 1000 rounds")


@implementer(IStreamClientEndpoint)
@define(eq=False)
class MemoryClientEndpoint:
    """
    Connects, in memory, to protocols of C{serverFactory}, over TLS when
    C{creator} is given; the connection is made at once, and its bytes move when
    it is flushed.

    @ivar reactor: the clock of the pumps and of the client's TLS layer.
    @ivar serverFactory: the accepting side, e.g. a relay's listener factory.
    @ivar serverAddress: what the server's transport says it listens on.
    @ivar creator: TLS client options, or L{None} for plain TCP.
    @ivar connections: every connection made, oldest first.
    """

    reactor: MemoryReactorClock
    serverFactory: IProtocolFactory
    serverAddress: IAddress
    creator: IOpenSSLClientConnectionCreator | None = None
    connections: list[MemoryConnection] = field(factory=list)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect a protocol of C{protocolFactory}; fires with it at once, or fails
        with L{NoProtocol} or (when the server factory builds none)
        L{ConnectionRefusedError}.
        """
        clientAddress = _clientAddress(self.serverAddress)
        factory = protocolFactory
        if self.creator is not None:
            factory = TLSMemoryBIOFactory(
                self.creator, True, protocolFactory, self.reactor
            )
        try:
            client = factory.buildProtocol(self.serverAddress)
            if client is None:
                return fail(NoProtocol())
            server = self.serverFactory.buildProtocol(clientAddress)
            if server is None:
                return fail(ConnectionRefusedError())
        except BaseException:
            return fail()
        self.connections.append(
            _connect(server, self.serverAddress, client, clientAddress, self.reactor)
        )
        if isinstance(client, TLSMemoryBIOProtocol):
            return succeed(client.wrappedProtocol)
        return succeed(client)


# --- a relay built from a configuration -----------------------------------------


def _serverAddress(address: Address) -> IAddress:
    """
    What the relay's transport says it is bound to: a wildcard listener is
    reached on loopback.
    """
    if address.kind == "unix":
        return UNIXAddress(address.path)
    if isIPv6Address(address.host):
        host = "::1" if address.host == "::" else address.host
        return IPv6Address("TCP", host, address.port)
    host = "127.0.0.1" if address.host in ("", "0.0.0.0", "*") else address.host
    return IPv4Address("TCP", host, address.port)


class RelayFixture:
    """
    A relay built from a configuration on a L{MemoryReactorClock}, with no
    sockets: every C{listen} gets the protocol factory L{build} makes for it
    (TLS and all), clients connect to those factories in memory, and the
    relay's upstream connections reach a L{MemoryUpstream}.

    Call L{close} when done (C{self.addCleanup(relay.close)}).

    @ivar config: the configuration.
    @ivar reactor: the relay's reactor and clock.
    @ivar upstream: where the relay's upstream connections go.
    @ivar ca: the CA that L{connect} trusts (L{None}: pass C{creator}).
    @ivar generation: what L{build} made: C{factories}, C{pools}, C{checkers}.
        Active health checks are not started: C{generation.startChecks()}.
    @ivar connections: the client connections, oldest first.
    @ivar workerConnections: C{worker_connections}, with the count of open
        connections (C{active}).
    """

    def __init__(
        self,
        config: Config,
        reactor: MemoryReactorClock,
        upstream: MemoryUpstream | None = None,
        ca: CertificateAuthority | None = None,
        randomSource: random.Random | None = None,
    ) -> None:
        """
        Build the relay for C{config}: every context, pool and log, as
        C{twistd tlsrelay} does at start-up; name resolution for upstream host
        names uses C{reactor.nameResolver}.

        @param randomSource: for the C{random} balancing method.
        @raise ConfigError: when the configuration cannot be built (a certificate
            that does not load, an access log that cannot be opened, an upstream
            host name without addresses, ...).
        """
        self.config = config
        self.reactor = reactor
        self.upstream = upstream if upstream is not None else MemoryUpstream(reactor)
        self.ca = ca
        self.connections: list[MemoryConnection] = []
        self.accessLogs = AccessLogFiles()
        self.workerConnections = WorkerConnections(config.workerConnections)
        self.sharing = SessionSharing(reactor, "single")
        try:
            self.generation: Generation = build(
                config,
                reactor,
                self.accessLogs,
                self.workerConnections,
                self.sharing,
                randomSource,
            )
        except BaseException:
            self.accessLogs.close()
            self.sharing.stopService()
            raise
        self.sharing.startService()  # type: ignore[no-untyped-call]
        for _, factory in self.generation.factories:
            factory.doStart()
        self._closed = False
        self._resolve()

    def _resolve(self) -> None:
        """
        Resolve upstream host names, as the service does before it listens.
        """
        failures: list[Failure] = []
        for pool in self.generation.pools:
            pool.resolveAll().addErrback(failures.append)
        if failures:
            self.close()
            raise ConfigError(failures[0].getErrorMessage(), self.config.path)

    def _listen(self, listen: str | int) -> tuple[Listen, IProtocolFactory]:
        found = [
            (each, factory)
            for each, factory in self.generation.factories
            if str(each.address) == listen
            or (isinstance(listen, int) and each.address.port == listen)
        ]
        if len(found) != 1:
            known = ", ".join(
                str(each.address) for each, _ in self.generation.factories
            )
            raise KeyError(f"no single listener {listen!r} (listening on {known})")
        return found[0]

    def factoryFor(self, listen: str | int) -> IProtocolFactory:
        """
        The protocol factory of a listener, named by its address as nginx prints
        it (C{"127.0.0.1:8443"}, C{"0.0.0.0:8443"}, C{"[::1]:8443"},
        C{"unix:/path"}) or by its port alone.
        """
        return self._listen(listen)[1]

    def clientEndpoint(
        self,
        listen: str | int,
        serverName: str = "localhost",
        certificate: CertificateFiles | None = None,
        creator: IOpenSSLClientConnectionCreator | None = None,
    ) -> MemoryClientEndpoint:
        """
        An endpoint that connects to a listener in memory.  To an C{ssl}
        listener it speaks TLS with C{creator}, by default options that trust
        L{ca}, verify and send C{serverName}, and present C{certificate} when
        given.
        """
        entry, factory = self._listen(listen)
        if entry.ssl and creator is None:
            if self.ca is None:
                raise ValueError(
                    f"{entry.address} has ssl: give the fixture a ca, or a creator"
                )
            creator = self.ca.clientOptions(serverName, certificate)
        return MemoryClientEndpoint(
            self.reactor,
            factory,
            _serverAddress(entry.address),
            creator if entry.ssl else None,
            self.connections,
        )

    def connect(
        self,
        listen: str | int,
        serverName: str = "localhost",
        certificate: CertificateFiles | None = None,
        creator: IOpenSSLClientConnectionCreator | None = None,
    ) -> Recorder:
        """
        Connect a L{Recorder} to a listener (see L{clientEndpoint}); what it
        writes is sent, through the handshake, when the relay is flushed.
        """
        endpoint = self.clientEndpoint(listen, serverName, certificate, creator)
        client = Recorder()
        connecting = endpoint.connect(Factory.forProtocol(lambda: client))
        result: list[object] = []
        connecting.addBoth(result.append)
        [outcome] = result
        if isinstance(outcome, Failure):
            outcome.raiseException()
        return client

    def flush(self) -> None:
        """
        Move bytes on every client and upstream connection, completing the
        relay's upstream connection attempts to addresses the upstream serves,
        until nothing moves.  Time does not pass: advance C{reactor} for
        timeouts.
        """
        for _ in range(1000):
            moved = self.upstream.flush()
            for connection in self.connections:
                moved = connection.flush() or moved
            if not moved:
                return
        raise RuntimeError("connections still busy after 1000 rounds")

    def accessLog(self, path: str | None = None) -> list[str]:
        """
        The lines of an access log, in the order written (a line is written when
        its session ends).

        @param path: the log's path as the configuration names it (relative to
            the configuration's directory); L{None} when it names only one.
        """
        paths = sorted(
            {
                log.path
                for server in self.config.servers
                for log in server.accessLogs
                if log.path is not None
            }
        )
        if path is None:
            if len(paths) != 1:
                raise ValueError(f"give the path of one of the access logs: {paths}")
            path = paths[0]
        path = os.path.join(os.path.dirname(self.config.path), path)
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read().splitlines()

    def close(self) -> None:
        """
        Stop health checks and session services, and close the logs.  Open
        connections are left as they are.
        """
        if self._closed:
            return
        self._closed = True
        self.generation.stopChecks()
        for _, factory in self.generation.factories:
            factory.doStop()
        if self.sharing.running:
            self.sharing.stopService()
        self.accessLogs.close()
        self.generation.closeErrorLogs()


def relayFromConfig(
    text: str,
    directory: str,
    reactor: MemoryReactorClock,
    upstream: MemoryUpstream | None = None,
    ca: CertificateAuthority | None = None,
    randomSource: random.Random | None = None,
    name: str = "tlsrelay.conf",
) -> RelayFixture:
    """
    Write C{text} (nginx syntax) to C{directory}/C{name}, load it as
    C{twistd tlsrelay --config} would, and build a L{RelayFixture} on
    C{reactor}.  Relative paths in the text are relative to C{directory}.

    @raise ConfigError: naming the file and line of the first problem.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.abspath(os.path.join(directory, name))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    config = buildConfig(parseString(text, path, os.path.dirname(path)), path)
    return RelayFixture(config, reactor, upstream, ca, randomSource)
