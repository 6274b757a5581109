"""
Helpers for the tests of tlsrelay and of projects that use it: throwaway
certificates written to files, and TLS handshakes between two pyOpenSSL contexts in
memory (no sockets, no reactor).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trustme
from attrs import frozen
from OpenSSL import SSL

__all__ = ["CertificateFiles", "memoryHandshake", "pump", "writeCertificates"]


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
