"""
Tests for L{tlsrelay._openssl}: the OpenSSL entry points pyOpenSSL does not
bind, exercised with in-memory handshakes between pyOpenSSL connections.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Callable, Sequence

import trustme
from OpenSSL import SSL
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests._helpers import closeCleanly
from tlsrelay import _openssl
from tlsrelay._openssl import (
    DEFAULT_SESSION_ID_CONTEXT,
    OpenSSLUnavailable,
    SessionStore,
    TicketKey,
    applyConfCommands,
    getNumTickets,
    getSecurityLevel,
    getSessionCacheSize,
    installSessionStore,
    installTicketKeys,
    selfTest,
    sessionReused,
    setGroups,
    setNumTickets,
    setSecurityLevel,
    setSessionCacheSize,
)

VERSIONS = (("TLS 1.2", SSL.TLS1_2_VERSION), ("TLS 1.3", SSL.TLS1_3_VERSION))


def keyBytes(seed: int) -> bytes:
    """
    80 distinct, reproducible bytes: an nginx AES-256 key file.
    """
    return bytes((seed + i) % 256 for i in range(80))


class RecordingStore:
    """
    A session store in a dict that records its calls.
    """

    def __init__(self) -> None:
        self.sessions: dict[bytes, bytes] = {}
        self.calls: list[tuple[str, bytes]] = []
        self.timeouts: list[int] = []

    def get(self, sessionId: bytes) -> bytes | None:
        self.calls.append(("get", sessionId))
        return self.sessions.get(sessionId)

    def put(self, sessionId: bytes, session: bytes, timeout: int) -> None:
        self.calls.append(("put", sessionId))
        self.timeouts.append(timeout)
        self.sessions[sessionId] = session

    def remove(self, sessionId: bytes) -> None:
        self.calls.append(("remove", sessionId))
        self.sessions.pop(sessionId, None)

    def count(self, kind: str) -> int:
        return sum(1 for call, _ in self.calls if call == kind)


class BrokenStore(RecordingStore):
    """
    A session store whose every operation raises.
    """

    def get(self, sessionId: bytes) -> bytes | None:
        raise ZeroDivisionError("get")

    def put(self, sessionId: bytes, session: bytes, timeout: int) -> None:
        raise ZeroDivisionError("put")

    def remove(self, sessionId: bytes) -> None:
        raise ZeroDivisionError("remove")


class KeyRing:
    """
    A C{keys()} callable whose answer a test changes, counting calls.
    """

    def __init__(
        self, current: TicketKey, decrypting: Sequence[TicketKey] = ()
    ) -> None:
        self.current = current
        self.decrypting = list(decrypting)
        self.calls = 0

    def __call__(self) -> tuple[TicketKey, Sequence[TicketKey]]:
        self.calls += 1
        return self.current, self.decrypting


def withKeys(
    keys: Callable[[], tuple[TicketKey, Sequence[TicketKey]]],
) -> Callable[[SSL.Context], None]:
    """
    A context set-up that installs C{keys}.
    """
    return lambda context: installTicketKeys(context, keys)


def withKey(key: TicketKey) -> Callable[[SSL.Context], None]:
    """
    A context set-up that installs C{key} alone.
    """
    return withKeys(lambda: (key, [key]))


def withStore(store: SessionStore) -> Callable[[SSL.Context], None]:
    """
    A context set-up that installs C{store}.
    """
    return lambda context: installSessionStore(context, store)


class TLSTestCase(SynchronousTestCase):
    """
    Server and client contexts around a trustme CA made for each test.
    """

    def setUp(self) -> None:
        self.ca = trustme.CA()
        self.leaf = self.ca.issue_cert("relay.example")

    def serverContext(
        self,
        version: int = SSL.TLS1_3_VERSION,
        setUp: Callable[[SSL.Context], None] | None = None,
        tickets: bool = True,
    ) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.leaf.configure_cert(context)
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        if not tickets:
            context.set_options(SSL.OP_NO_TICKET)
        if setUp is not None:
            setUp(context)
        return context

    def clientContext(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.ca.configure_trust(context)
        context.set_verify(SSL.VERIFY_PEER)
        return context

    def connect(
        self,
        client: SSL.Context,
        server: SSL.Context,
        session: SSL.Session | None = None,
    ) -> tuple[SSL.Connection, SSL.Connection]:
        clientConnection, serverConnection = _openssl._connect(client, server, session)
        self.addCleanup(closeCleanly, clientConnection, serverConnection)
        return clientConnection, serverConnection

    def resumes(
        self,
        first: SSL.Context,
        second: SSL.Context,
        client: SSL.Context | None = None,
    ) -> bool:
        """
        Whether a session from a handshake with C{first} resumes on C{second}.
        """
        if client is None:
            client = self.clientContext()
        clientConnection, _ = self.connect(client, first)
        session = clientConnection.get_session()
        assert session is not None
        clientAgain, serverAgain = self.connect(client, second, session)
        reused = sessionReused(serverAgain)
        self.assertEqual(sessionReused(clientAgain), reused)
        return reused


class EntryPointTests(SynchronousTestCase):
    """
    Finding the functions, both ways.
    """

    def test_allFound(self) -> None:
        """
        Every function is found on this install, and where is said.
        """
        functions = _openssl._functions()
        self.assertEqual(functions.missing, {})
        self.assertEqual(sorted(functions.functions), sorted(_openssl._SIGNATURES))
        self.assertIn("_rust", functions.origin)

    def test_resolvedOnce(self) -> None:
        """
        The lookup is cached.
        """
        self.assertIs(_openssl._functions(), _openssl._functions())

    def test_requireNamesWhatIsMissing(self) -> None:
        """
        Asking for a missing function raises L{OpenSSLUnavailable} naming it
        and the reason.
        """
        functions = _openssl._Functions(
            origin="nowhere",
            functions={"A": object()},
            missing={"B": "because", "C": "because"},
        )
        error = self.assertRaises(OpenSSLUnavailable, functions.require, "A", "B", "C")
        self.assertEqual(str(error), "OpenSSL function(s) B, C not found: because")

    def test_nothingExported(self) -> None:
        """
        A module that exports neither the functions nor the anchor symbol
        yields every name missing, with that reason.
        """

        class Nothing:
            pass

        functions = _openssl._resolveIn("/x/_rust.so", Nothing())  # type: ignore[arg-type]
        self.assertEqual(functions.functions, {})
        self.assertEqual(
            set(functions.missing.values()),
            {"/x/_rust.so neither exports them nor exports PyInit__rust"},
        )
        error = self.assertRaises(OpenSSLUnavailable, functions.require, "SSL_CTX_ctrl")
        self.assertIn("PyInit__rust", str(error))

    def test_sharedLibrary(self) -> None:
        """
        Where the functions are exported (a shared libssl, as distribution
        builds of cryptography link), the ordinary dynamic lookup finds them.
        """
        name = ctypes.util.find_library("ssl")
        if name is None:
            raise self.skipTest("no shared libssl on this system")
        functions = _openssl._resolveIn(name, ctypes.CDLL(name))
        self.assertIn("exported by", functions.origin)
        self.assertIn("SSL_CTX_ctrl", functions.functions)
        self.assertIn("SSL_CTX_sess_set_new_cb", functions.functions)

    def test_notELF(self) -> None:
        """
        The symbol table cannot be read from a file that is not ELF.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"not an ELF file at all" * 10)
        error = self.assertRaises(
            OpenSSLUnavailable, _openssl._scanSymbolTable, path, ["SSL_CTX_ctrl"]
        )
        self.assertIn("is not an ELF file", str(error))

    def test_symbolTable(self) -> None:
        """
        The scan finds only the names asked for, as functions, and the code at
        each computed address is the code in the file.
        """
        from cryptography.hazmat.bindings import _rust

        path = os.path.realpath(_rust.__file__)
        found = _openssl._scanSymbolTable(
            path, ["PyInit__rust", "SSL_CTX_ctrl", "NoSuchFunction"]
        )
        self.assertEqual(sorted(found), ["PyInit__rust", "SSL_CTX_ctrl"])
        anchor = ctypes.cast(ctypes.CDLL(path).PyInit__rust, ctypes.c_void_p).value
        assert anchor is not None
        base = anchor - found.pop("PyInit__rust").value
        self.assertIsNone(_openssl._sameCode(path, base, found))
        self.assertEqual(_openssl._sameCode(path, base + 16, found), "SSL_CTX_ctrl")

    if not sys.platform.startswith("linux"):
        test_symbolTable.skip = "ELF only"  # type: ignore[attr-defined]


class ContextSettingTests(TLSTestCase):
    """
    Settings made through C{SSL_CTX_ctrl}, C{SSL_CONF_cmd} and friends.
    """

    def test_sessionCacheSize(self) -> None:
        """
        The cache size set is the size read back.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.assertEqual(getSessionCacheSize(context), 1024 * 20)
        setSessionCacheSize(context, 4000)
        self.assertEqual(getSessionCacheSize(context), 4000)
        setSessionCacheSize(context, 0)
        self.assertEqual(getSessionCacheSize(context), 0)
        self.assertRaises(ValueError, setSessionCacheSize, context, -1)

    def test_groups(self) -> None:
        """
        A valid group list is accepted and limits the key exchange.
        """
        for serverGroups, expected in (
            ("prime256v1", "secp256r1"),
            ("X25519", "x25519"),
        ):
            server = self.serverContext()
            setGroups(server, serverGroups)
            client = self.clientContext()
            setGroups(client, "X25519:prime256v1")
            clientConnection, serverConnection = self.connect(client, server)
            # OpenSSL's spelling of x25519 changed case between versions.
            for connection in (serverConnection, clientConnection):
                name = connection.get_group_name()
                self.assertEqual(None if name is None else name.lower(), expected)

    def test_groupsMismatch(self) -> None:
        """
        With no group in common the handshake fails: the list is applied.
        """
        server = self.serverContext()
        setGroups(server, "prime256v1")
        client = self.clientContext()
        setGroups(client, "X25519")
        self.assertRaises(SSL.Error, _openssl._connect, client, server)

    def test_badGroups(self) -> None:
        """
        A bad group list raises L{ValueError} naming the list.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        error = self.assertRaises(ValueError, setGroups, context, "X25519:bogus")
        self.assertIn('SSL_CTX_set1_groups_list("X25519:bogus") failed', str(error))

    def test_confCommandCiphersuites(self) -> None:
        """
        C{Ciphersuites} restricts the negotiated TLS 1.3 suite.
        """
        for suite in ("TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"):
            server = self.serverContext()
            applyConfCommands(server, [("Ciphersuites", suite)], server=True)
            _, connection = self.connect(self.clientContext(), server)
            self.assertEqual(connection.get_cipher_name(), suite)

    def test_confCommandFailure(self) -> None:
        """
        A refused command raises L{ValueError} worded as nginx words it, with
        OpenSSL's reasons.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        error = self.assertRaises(
            ValueError,
            applyConfCommands,
            context,
            [("Ciphersuites", "bogus")],
            server=True,
        )
        message = str(error)
        self.assertTrue(
            message.startswith('SSL_CONF_cmd("Ciphersuites", "bogus") failed (SSL: '),
            message,
        )
        self.assertIn("no cipher match", message)
        self.assertIn("cmd=Ciphersuites, value=bogus", message)

    def test_confCommandUnknown(self) -> None:
        """
        An unknown command is refused.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        error = self.assertRaises(
            ValueError,
            applyConfCommands,
            context,
            [("NoSuchCommand", "1")],
            server=True,
        )
        self.assertIn("unknown cmd name", str(error))

    def test_confCommandSides(self) -> None:
        """
        A server context takes server-only commands (as nginx); a client
        context refuses them; both take common ones.
        """
        server = SSL.Context(SSL.TLS_SERVER_METHOD)
        applyConfCommands(
            server, [("NumTickets", "5"), ("MinProtocol", "TLSv1.2")], server=True
        )
        self.assertEqual(getNumTickets(server), 5)
        client = SSL.Context(SSL.TLS_CLIENT_METHOD)
        applyConfCommands(client, [("MinProtocol", "TLSv1.2")], server=False)
        self.assertRaises(
            ValueError, applyConfCommands, client, [("NumTickets", "5")], server=False
        )

    def test_errorQueueLeftEmpty(self) -> None:
        """
        A failure leaves nothing in OpenSSL's error queue for pyOpenSSL to
        misreport later.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.assertRaises(
            ValueError,
            applyConfCommands,
            context,
            [("Ciphersuites", "bogus")],
            server=True,
        )
        self.assertRaises(ValueError, setGroups, context, "bogus")
        self.assertEqual(_openssl._lib.ERR_peek_error(), 0)

    def test_securityLevel(self) -> None:
        """
        The security level set is the level read back; out of range is refused.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        for level in (0, 1, 3, 5):
            setSecurityLevel(context, level)
            self.assertEqual(getSecurityLevel(context), level)
        self.assertRaises(ValueError, setSecurityLevel, context, 6)
        self.assertRaises(ValueError, setSecurityLevel, context, -1)

    def test_numTickets(self) -> None:
        """
        The number of TLS 1.3 tickets set is the number read back.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        setNumTickets(context, 1)
        self.assertEqual(getNumTickets(context), 1)
        setNumTickets(context, 0)
        self.assertEqual(getNumTickets(context), 0)
        self.assertRaises(ValueError, setNumTickets, context, -1)

    def test_numTicketsIssued(self) -> None:
        """
        The number of tickets is the number of times a new ticket is
        encrypted after a full TLS 1.3 handshake.
        """
        ring = KeyRing(TicketKey.fromBytes(keyBytes(1)))
        for tickets in (1, 3):
            server = self.serverContext()
            installTicketKeys(server, ring)
            setNumTickets(server, tickets)
            ring.calls = 0
            self.connect(self.clientContext(), server)
            self.assertEqual(ring.calls, tickets)

    def test_sessionReused(self) -> None:
        """
        L{sessionReused} tells a full handshake from a resumed one.
        """
        server = self.serverContext()
        client = self.clientContext()
        clientConnection, serverConnection = self.connect(client, server)
        self.assertFalse(sessionReused(serverConnection))
        self.assertFalse(sessionReused(clientConnection))
        self.assertTrue(self.resumes(server, server, client))


class TicketKeyTests(SynchronousTestCase):
    """
    L{TicketKey} and nginx's key files.
    """

    def test_80Bytes(self) -> None:
        """
        80 bytes are name(16) | HMAC(32) | AES-256(32).
        """
        data = keyBytes(0)
        key = TicketKey.fromBytes(data)
        self.assertEqual(key.name, data[:16])
        self.assertEqual(key.hmacKey, data[16:48])
        self.assertEqual(key.aesKey, data[48:80])
        self.assertEqual(key.cipher, "aes-256-cbc")
        self.assertEqual(key.toBytes(), data)

    def test_48Bytes(self) -> None:
        """
        48 bytes are name(16) | AES-128(16) | HMAC(16).
        """
        data = keyBytes(0)[:48]
        key = TicketKey.fromBytes(data)
        self.assertEqual(key.name, data[:16])
        self.assertEqual(key.aesKey, data[16:32])
        self.assertEqual(key.hmacKey, data[32:48])
        self.assertEqual(key.cipher, "aes-128-cbc")
        self.assertEqual(key.toBytes(), data)

    def test_badLength(self) -> None:
        """
        Any other length is refused, saying what it must be.
        """
        for length in (0, 16, 47, 49, 79, 81, 96):
            error = self.assertRaises(ValueError, TicketKey.fromBytes, b"k" * length)
            self.assertEqual(
                str(error), f"a ticket key must be 48 or 80 bytes, not {length}"
            )

    def test_badSizes(self) -> None:
        """
        Keys of the wrong size for their cipher are refused.
        """
        self.assertRaises(ValueError, TicketKey, b"n" * 15, b"h" * 32, b"a" * 32)
        self.assertRaises(ValueError, TicketKey, b"n" * 16, b"h" * 16, b"a" * 32)
        self.assertRaises(
            ValueError, TicketKey, b"n" * 16, b"h" * 32, b"a" * 32, "aes-128-cbc"
        )

    def test_generate(self) -> None:
        """
        L{TicketKey.generate} makes an 80-byte key from the random source.
        """
        asked: list[int] = []

        def randomBytes(n: int) -> bytes:
            asked.append(n)
            return keyBytes(7)

        key = TicketKey.generate(randomBytes)
        self.assertEqual(asked, [80])
        self.assertEqual(key, TicketKey.fromBytes(keyBytes(7)))
        self.assertNotEqual(
            TicketKey.generate(os.urandom), TicketKey.generate(os.urandom)
        )

    def test_reprHidesSecrets(self) -> None:
        """
        The repr shows the name, never the secret keys.
        """
        key = TicketKey.fromBytes(keyBytes(0))
        text = repr(key)
        self.assertIn(repr(key.name), text)
        self.assertNotIn(repr(key.hmacKey), text)
        self.assertNotIn(repr(key.aesKey), text)


class TicketCallbackTests(TLSTestCase):
    """
    L{installTicketKeys}: tickets under our keys, shared between contexts.
    """

    def test_sharedKeyResumes(self) -> None:
        """
        A ticket issued by one context resumes on another sharing its key, in
        TLS 1.2 and 1.3; both AES-256 and AES-128 keys work.
        """
        for data in (keyBytes(1), keyBytes(2)[:48]):
            key = TicketKey.fromBytes(data)
            for label, version in VERSIONS:

                def install(context: SSL.Context, key: TicketKey = key) -> None:
                    installTicketKeys(context, lambda: (key, [key]))

                first = self.serverContext(version, install)
                second = self.serverContext(version, install)
                self.assertTrue(self.resumes(first, second), (label, key.cipher))

    def test_withoutSharedKeyNoResumption(self) -> None:
        """
        Two contexts without our callback do not resume each other's tickets
        (so the test above proves the callback does it).
        """
        for label, version in VERSIONS:
            first = self.serverContext(version)
            first.set_session_id(DEFAULT_SESSION_ID_CONTEXT)
            second = self.serverContext(version)
            second.set_session_id(DEFAULT_SESSION_ID_CONTEXT)
            self.assertFalse(self.resumes(first, second), label)

    def test_currentKeyNotRenewedInTLS12(self) -> None:
        """
        In TLS 1.2 a ticket under the current key resumes without a new ticket:
        C{keys()} is called once, to decrypt.
        """
        ring = KeyRing(TicketKey.fromBytes(keyBytes(1)))
        server = self.serverContext(SSL.TLS1_2_VERSION, withKeys(ring))
        client = self.clientContext()
        clientConnection, _ = self.connect(client, server)
        session = clientConnection.get_session()
        ring.calls = 0
        _, serverConnection = self.connect(client, server, session)
        self.assertTrue(sessionReused(serverConnection))
        self.assertEqual(ring.calls, 1)

    def test_renewal(self) -> None:
        """
        A ticket under a key that still decrypts but no longer encrypts resumes
        and is renewed: the new ticket resumes where only the current key is
        known. In TLS 1.3 even a current-key ticket is renewed, as in nginx.
        """
        old = TicketKey.fromBytes(keyBytes(1))
        new = TicketKey.fromBytes(keyBytes(2))
        for label, version in VERSIONS:
            ring = KeyRing(old)
            rotated = KeyRing(new, [old])
            onlyNew = KeyRing(new)
            client = self.clientContext()
            clientConnection, _ = self.connect(
                client,
                self.serverContext(version, withKeys(ring)),
            )
            oldSession = clientConnection.get_session()
            renewing = self.serverContext(version, withKeys(rotated))
            setNumTickets(renewing, 1)
            clientConnection, serverConnection = self.connect(
                client, renewing, oldSession
            )
            self.assertTrue(sessionReused(serverConnection), label)
            # One decrypt, then one encrypt for the renewed ticket.
            self.assertEqual(rotated.calls, 2, label)
            renewedSession = clientConnection.get_session()
            _, serverConnection = self.connect(
                client,
                self.serverContext(version, withKeys(onlyNew)),
                renewedSession,
            )
            self.assertTrue(sessionReused(serverConnection), label)

    def test_currentKeyRenewedInTLS13(self) -> None:
        """
        In TLS 1.3 a ticket under the current key is renewed too (clients use a
        TLS 1.3 ticket once), as nginx does.
        """
        ring = KeyRing(TicketKey.fromBytes(keyBytes(1)))
        server = self.serverContext(SSL.TLS1_3_VERSION, withKeys(ring))
        setNumTickets(server, 1)
        client = self.clientContext()
        clientConnection, _ = self.connect(client, server)
        session = clientConnection.get_session()
        ring.calls = 0
        _, serverConnection = self.connect(client, server, session)
        self.assertTrue(sessionReused(serverConnection))
        self.assertEqual(ring.calls, 2)

    def test_unknownKey(self) -> None:
        """
        A ticket under a key the server does not know means a full handshake,
        with no error and nothing logged.
        """
        known = TicketKey.fromBytes(keyBytes(1))
        other = TicketKey.fromBytes(keyBytes(2))
        for label, version in VERSIONS:
            first = self.serverContext(version, withKey(known))
            second = self.serverContext(version, withKey(other))
            with capturedLogs() as events:
                self.assertFalse(self.resumes(first, second), label)
            self.assertEqual(events, [], label)

    def test_retiredKeyNeverMatchesByAccident(self) -> None:
        """
        A key with the same name but other secrets does not decrypt: the
        HMAC check fails and the handshake is a full one.
        """
        key = TicketKey.fromBytes(keyBytes(1))
        impostor = TicketKey(key.name, b"h" * 32, b"a" * 32)
        first = self.serverContext(SSL.TLS1_2_VERSION, withKey(key))
        second = self.serverContext(
            SSL.TLS1_2_VERSION,
            withKey(impostor),
        )
        self.assertFalse(self.resumes(first, second))

    def test_keysRaises(self) -> None:
        """
        If C{keys()} raises, the handshake still completes, without resumption
        and without a ticket from the broken context; the failure is logged.
        """
        key = TicketKey.fromBytes(keyBytes(1))

        def broken() -> tuple[TicketKey, Sequence[TicketKey]]:
            raise ZeroDivisionError("no keys")

        for label, version in VERSIONS:
            good = self.serverContext(version, withKey(key))
            bad = self.serverContext(version, withKeys(broken))
            with capturedLogs() as events:
                # Decrypting fails: a full handshake.
                self.assertFalse(self.resumes(good, bad), label)
                # Encrypting fails: the handshake completes, no usable ticket.
                self.assertFalse(self.resumes(bad, good), label)
            self.assertTrue(events, label)
            self.assertTrue(all(e["log_level"] is LogLevel.critical for e in events))
            self.assertTrue(self.flushLoggedErrors(ZeroDivisionError))

    def test_rotationWithoutRebuilding(self) -> None:
        """
        Changing what C{keys()} returns rotates keys in a live context.
        """
        old = TicketKey.fromBytes(keyBytes(1))
        new = TicketKey.fromBytes(keyBytes(2))
        ring = KeyRing(old)
        server = self.serverContext(SSL.TLS1_2_VERSION, withKeys(ring))
        onlyOld = self.serverContext(SSL.TLS1_2_VERSION, withKey(old))
        onlyNew = self.serverContext(SSL.TLS1_2_VERSION, withKey(new))
        self.assertTrue(self.resumes(server, onlyOld))
        ring.current, ring.decrypting = new, [old]
        self.assertTrue(self.resumes(server, onlyNew))
        self.assertFalse(self.resumes(server, onlyOld))

    def test_sessionIdContext(self) -> None:
        """
        Tickets resume only between contexts with the same session-id context;
        too long a context is refused.
        """
        key = TicketKey.fromBytes(keyBytes(1))

        def install(sessionIdContext: bytes) -> Callable[[SSL.Context], None]:
            return lambda c: installTicketKeys(
                c, lambda: (key, [key]), sessionIdContext=sessionIdContext
            )

        first = self.serverContext(SSL.TLS1_3_VERSION, install(b"one"))
        same = self.serverContext(SSL.TLS1_3_VERSION, install(b"one"))
        other = self.serverContext(SSL.TLS1_3_VERSION, install(b"two"))
        self.assertTrue(self.resumes(first, same))
        self.assertFalse(self.resumes(first, other))
        self.assertRaises(
            ValueError, install(b"x" * 33), SSL.Context(SSL.TLS_SERVER_METHOD)
        )

    def test_callbackKeptAlive(self) -> None:
        """
        The callback lives as long as the context, with no reference kept by
        the caller; it is released with the context.
        """
        key = TicketKey.fromBytes(keyBytes(1))
        first = self.serverContext(SSL.TLS1_3_VERSION, withKey(key))
        second = self.serverContext(SSL.TLS1_3_VERSION, withKey(key))
        finalizer = _openssl._installed[first]["tickets"]
        gc.collect()
        client = self.clientContext()
        clientConnection, serverConnection = _openssl._connect(client, first)
        session = clientConnection.get_session()
        closeCleanly(clientConnection, serverConnection)
        clientConnection, serverConnection = _openssl._connect(client, second, session)
        self.assertTrue(sessionReused(serverConnection))
        closeCleanly(clientConnection, serverConnection)
        self.assertTrue(finalizer.alive)
        del first, clientConnection, serverConnection
        gc.collect()
        self.assertFalse(finalizer.alive)

    def test_reinstall(self) -> None:
        """
        Installing again replaces the keys and releases the old callback.
        """
        one = TicketKey.fromBytes(keyBytes(1))
        two = TicketKey.fromBytes(keyBytes(2))
        server = self.serverContext(SSL.TLS1_2_VERSION)
        installTicketKeys(server, lambda: (one, [one]))
        finalizer = _openssl._installed[server]["tickets"]
        installTicketKeys(server, lambda: (two, [two]))
        self.assertFalse(finalizer.alive)
        onlyTwo = self.serverContext(SSL.TLS1_2_VERSION, withKey(two))
        self.assertTrue(self.resumes(server, onlyTwo))


class SessionStoreTests(TLSTestCase):
    """
    L{installSessionStore}: a session cache outside OpenSSL.
    """

    def test_sharedStoreResumes(self) -> None:
        """
        With tickets off, a session stored by one context resumes on another
        sharing the store, in TLS 1.2 and 1.3.
        """
        for label, version in VERSIONS:
            store = RecordingStore()
            first = self.serverContext(version, withStore(store), tickets=False)
            second = self.serverContext(version, withStore(store), tickets=False)
            self.assertTrue(self.resumes(first, second), label)
            self.assertGreaterEqual(store.count("put"), 1, label)
            self.assertGreaterEqual(store.count("get"), 1, label)
            for sessionId in store.sessions:
                self.assertTrue(0 < len(sessionId) <= 32)

    def test_withoutStoreNoResumption(self) -> None:
        """
        Without the shared store, two contexts do not resume each other's
        sessions (so the test above proves the store does it).
        """
        for label, version in VERSIONS:
            first = self.serverContext(version, tickets=False)
            first.set_session_id(DEFAULT_SESSION_ID_CONTEXT)
            second = self.serverContext(version, tickets=False)
            second.set_session_id(DEFAULT_SESSION_ID_CONTEXT)
            self.assertFalse(self.resumes(first, second), label)

    def test_noInternalCache(self) -> None:
        """
        OpenSSL keeps no sessions itself: with an empty store, even the same
        context does not resume.
        """
        store = RecordingStore()
        server = self.serverContext(SSL.TLS1_2_VERSION, withStore(store), tickets=False)
        client = self.clientContext()
        clientConnection, _ = self.connect(client, server)
        session = clientConnection.get_session()
        store.sessions.clear()
        _, serverConnection = self.connect(client, server, session)
        self.assertFalse(sessionReused(serverConnection))

    def test_timeout(self) -> None:
        """
        Sessions are stored with the context's timeout.
        """
        store = RecordingStore()
        server = self.serverContext(SSL.TLS1_2_VERSION, withStore(store), tickets=False)
        server.set_timeout(1234)
        self.connect(self.clientContext(), server)
        self.assertEqual(store.timeouts, [1234])

    def test_tls13WithTicketsNotStored(self) -> None:
        """
        With TLS 1.3 tickets on, sessions resume from the ticket and are not
        stored, as in nginx.
        """
        store = RecordingStore()
        server = self.serverContext(SSL.TLS1_3_VERSION, withStore(store))
        self.assertTrue(self.resumes(server, server))
        self.assertEqual(store.count("put"), 0)

    def test_tls13SessionReplaced(self) -> None:
        """
        A TLS 1.3 session resumed from the store gets a replacement, which is
        stored too. As in nginx, the store is not told to drop the old one:
        OpenSSL's single use applies to its internal cache only, and without
        early data a second use is no replay risk.
        """
        store = RecordingStore()
        server = self.serverContext(SSL.TLS1_3_VERSION, withStore(store), tickets=False)
        setNumTickets(server, 1)
        client = self.clientContext()
        clientConnection, _ = self.connect(client, server)
        session = clientConnection.get_session()
        (firstId,) = store.sessions
        clientConnection, serverConnection = self.connect(client, server, session)
        self.assertTrue(sessionReused(serverConnection))
        self.assertEqual(store.count("put"), 2)
        self.assertEqual(store.count("remove"), 0)
        self.assertIn(firstId, store.sessions)
        self.assertEqual(len(store.sessions), 2)

    def test_droppedConnectionRemovesSession(self) -> None:
        """
        OpenSSL forgets the session of a connection freed without sending
        close_notify: the store is told to remove it.
        """
        store = RecordingStore()
        server = self.serverContext(SSL.TLS1_2_VERSION, withStore(store), tickets=False)
        clientConnection, serverConnection = _openssl._connect(
            self.clientContext(), server
        )
        (sessionId,) = store.sessions
        del serverConnection
        gc.collect()
        self.assertIn(("remove", sessionId), store.calls)
        closeCleanly(clientConnection)

    def test_storeRaises(self) -> None:
        """
        A store that raises means full handshakes, never a crash; the failures
        are logged.
        """
        for label, version in VERSIONS:
            store = BrokenStore()
            first = self.serverContext(version, withStore(store), tickets=False)
            second = self.serverContext(version, withStore(store), tickets=False)
            with capturedLogs() as events:
                self.assertFalse(self.resumes(first, second), label)
            self.assertTrue(events, label)
            self.assertTrue(self.flushLoggedErrors(ZeroDivisionError))

    def test_corruptSession(self) -> None:
        """
        Bytes that are not a session mean a full handshake, and leave no error
        behind in OpenSSL's queue.
        """
        store = RecordingStore()
        server = self.serverContext(SSL.TLS1_2_VERSION, withStore(store), tickets=False)
        client = self.clientContext()
        clientConnection, _ = self.connect(client, server)
        session = clientConnection.get_session()
        for sessionId in store.sessions:
            store.sessions[sessionId] = b"\x30\x03garbage"
        _, serverConnection = self.connect(client, server, session)
        self.assertFalse(sessionReused(serverConnection))
        self.assertEqual(_openssl._lib.ERR_peek_error(), 0)

    def test_collectedWithLiveConnection(self) -> None:
        """
        A context collected in a garbage cycle with an unclosed connection
        detaches its callbacks first: freeing the connection does not call
        into freed memory.
        """
        store = RecordingStore()
        server = self.serverContext(SSL.TLS1_2_VERSION, withStore(store), tickets=False)
        clientConnection, serverConnection = _openssl._connect(
            self.clientContext(), server
        )
        finalizer = _openssl._installed[server]["sessions"]
        server.cycle = serverConnection  # type: ignore[attr-defined]
        del server, serverConnection
        gc.collect()
        self.assertFalse(finalizer.alive)
        # Without the detaching, OpenSSL would call remove_cb here.
        self.assertEqual(store.count("remove"), 0)
        closeCleanly(clientConnection)


class SelfTestTests(SynchronousTestCase):
    """
    L{selfTest}.
    """

    def test_passes(self) -> None:
        """
        On this install every entry point is there and sessions resume across
        contexts.
        """
        selfTest()
