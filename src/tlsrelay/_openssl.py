"""
Every OpenSSL entry point tlsrelay needs that pyOpenSSL does not bind.

nginx's session features (ticket keys, an external session cache, the cache
size, curve lists, C{ssl_conf_command}) need C functions pyOpenSSL leaves out.
This module finds them in the OpenSSL that pyOpenSSL already uses, calls them
with L{ctypes}, and owns the callbacks OpenSSL makes back into Python.

How the functions are found (DESIGN.md section 2):

    - Where C{cryptography} links a shared libssl (distribution builds), an
      ordinary dynamic lookup through its extension module finds them.
    - The wheels bundle OpenSSL with hidden symbols, but the extension
      module keeps its ELF symbol table: a function lives at
      C{addr(PyInit__rust) - symtab(PyInit__rust) + symtab(function)}.
      Before any call, the first bytes of every function found that way are
      compared with the file on disk, so a module replaced after it was loaded
      is refused instead of crashing the process.

Either way the answer is computed once, lazily, and cached; mixing the two ways
is never done (two OpenSSL copies in one call would corrupt memory).

Measured here (x86_64, 2 cores, cryptography 50.0.2 wheel with OpenSSL 4.0.3,
a C{.symtab} of 36,394 symbols and a 2 MB string table):

    - Symbol lookup, once per process: importing pyelftools 20-30 ms; the
      whole resolution 30-50 ms more, of which the scan for our 34 names is
      about 24 ms (one regular-expression pass over the string table, one
      pass over the symbol table's name column) and the code comparison
      0.06 ms. Decoding every symbol through pyelftools instead costs about
      870 ms; 34 C{bytes.find} passes over the tables about 50 ms.
    - Ticket-key callback: about 5 µs of Python per call (C-to-Python
      transition 0.8 µs, building C{OSSL_PARAM}s 2 µs, C{keys()} and a few
      ctypes calls); end to end, an in-memory resumed TLS 1.2 handshake
      takes 274 µs against 251 µs with OpenSSL's own ticket keys, a resumed
      TLS 1.3 one (which also issues a renewed ticket) 620 µs against 583 µs.
    - Session-cache callbacks: no difference measurable above the noise of
      an in-memory handshake (0.3 to 0.8 ms), besides the store's own cost.
    - L{selfTest}: 10-30 ms (eight in-memory handshakes and a P-256 key).
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from ctypes import (
    CFUNCTYPE,
    POINTER,
    c_char_p,
    c_int,
    c_long,
    c_size_t,
    c_uint,
    c_uint64,
    c_ulong,
    c_void_p,
)
from functools import cache
from typing import Any, Literal, Protocol

from attrs import field, frozen
from cffi import FFI
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from tlsrelay._log import Logger

__all__ = [
    "DEFAULT_SESSION_ID_CONTEXT",
    "OpenSSLUnavailable",
    "SessionStore",
    "TicketKey",
    "applyConfCommands",
    "getNumTickets",
    "getSecurityLevel",
    "getSessionCacheSize",
    "installSessionStore",
    "installTicketKeys",
    "selfTest",
    "sessionReused",
    "setGroups",
    "setNumTickets",
    "setSecurityLevel",
    "setSessionCacheSize",
]

_log = Logger()

_binding = Binding()
_ffi: Any = _binding.ffi
_lib: Any = _binding.lib

DEFAULT_SESSION_ID_CONTEXT = b"tlsrelay"
"""
The session-id context used when the caller names none: the same in every
process, so a session from one worker resumes on another.
"""

# Constants from OpenSSL's headers (stable since 1.1.1).
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42
_SSL_CTRL_GET_SESS_CACHE_SIZE = 43
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CONF_FLAG_FILE = 0x2
_SSL_CONF_FLAG_CLIENT = 0x4
_SSL_CONF_FLAG_SERVER = 0x8
_SSL_CONF_FLAG_SHOW_ERRORS = 0x10
_SSL_CONF_FLAG_CERTIFICATE = 0x20
_SSL_OP_NO_TICKET = 1 << 14
_TLS1_3_VERSION = 0x0304
_ERR_TXT_STRING = 0x02
_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value
_MAX_SESSION_ID_LENGTH = 32


class OpenSSLUnavailable(Exception):
    """
    An OpenSSL entry point, or the behaviour tlsrelay needs from it, is not
    available; the message says which and why.
    """


class _OSSLParam(ctypes.Structure):
    """
    C{OSSL_PARAM}, as declared in C{openssl/core.h}.
    """

    _fields_ = [
        ("key", c_char_p),
        ("data_type", c_uint),
        ("data", c_void_p),
        ("data_size", c_size_t),
        ("return_size", c_size_t),
    ]


# int (*)(SSL *, unsigned char name[16], unsigned char iv[16],
#         EVP_CIPHER_CTX *, EVP_MAC_CTX *, int enc)
_TicketCallback = CFUNCTYPE(
    c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int
)
# int (*)(SSL *, SSL_SESSION *)
_NewSessionCallback = CFUNCTYPE(c_int, c_void_p, c_void_p)
# SSL_SESSION *(*)(SSL *, const unsigned char *id, int len, int *copy)
_GetSessionCallback = CFUNCTYPE(c_void_p, c_void_p, c_void_p, c_int, POINTER(c_int))
# void (*)(SSL_CTX *, SSL_SESSION *)
_RemoveSessionCallback = CFUNCTYPE(None, c_void_p, c_void_p)

_SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "SSL_CTX_ctrl": (c_long, (c_void_p, c_int, c_long, c_void_p)),
    "SSL_CONF_CTX_new": (c_void_p, ()),
    "SSL_CONF_CTX_set_flags": (c_uint, (c_void_p, c_uint)),
    "SSL_CONF_CTX_set_ssl_ctx": (None, (c_void_p, c_void_p)),
    "SSL_CONF_cmd": (c_int, (c_void_p, c_char_p, c_char_p)),
    "SSL_CONF_CTX_finish": (c_int, (c_void_p,)),
    "SSL_CONF_CTX_free": (None, (c_void_p,)),
    "SSL_CTX_set_security_level": (None, (c_void_p, c_int)),
    "SSL_CTX_get_security_level": (c_int, (c_void_p,)),
    "SSL_CTX_set_num_tickets": (c_int, (c_void_p, c_size_t)),
    "SSL_CTX_get_num_tickets": (c_size_t, (c_void_p,)),
    "SSL_CTX_set_tlsext_ticket_key_evp_cb": (c_int, (c_void_p, c_void_p)),
    "SSL_CTX_sess_set_new_cb": (None, (c_void_p, c_void_p)),
    "SSL_CTX_sess_set_get_cb": (None, (c_void_p, c_void_p)),
    "SSL_CTX_sess_set_remove_cb": (None, (c_void_p, c_void_p)),
    "SSL_version": (c_int, (c_void_p,)),
    "SSL_get_options": (c_uint64, (c_void_p,)),
    "SSL_SESSION_get_id": (c_void_p, (c_void_p, POINTER(c_uint))),
    "SSL_SESSION_get_timeout": (c_long, (c_void_p,)),
    "SSL_SESSION_free": (None, (c_void_p,)),
    "i2d_SSL_SESSION": (c_int, (c_void_p, POINTER(c_void_p))),
    "d2i_SSL_SESSION": (c_void_p, (c_void_p, POINTER(c_void_p), c_long)),
    "RAND_bytes": (c_int, (c_void_p, c_int)),
    "EVP_aes_128_cbc": (c_void_p, ()),
    "EVP_aes_256_cbc": (c_void_p, ()),
    "EVP_EncryptInit_ex": (c_int, (c_void_p, c_void_p, c_void_p, c_char_p, c_void_p)),
    "EVP_DecryptInit_ex": (c_int, (c_void_p, c_void_p, c_void_p, c_char_p, c_void_p)),
    "EVP_MAC_CTX_set_params": (c_int, (c_void_p, c_void_p)),
    "ERR_get_error_all": (
        c_ulong,
        (c_void_p, c_void_p, c_void_p, POINTER(c_char_p), POINTER(c_int)),
    ),
    "ERR_error_string_n": (None, (c_ulong, c_char_p, c_size_t)),
    "ERR_clear_error": (None, ()),
    "ERR_set_mark": (c_int, ()),
    "ERR_pop_to_mark": (c_int, ()),
}

_ANCHOR = "PyInit__rust"

_cffi = FFI()
"""
For the callbacks OpenSSL makes per handshake and the functions they call: a
cffi instance of our own, with pointers only (no declarations).
"""
_memmove = _cffi._backend.memmove  # FFI.memmove without its Python wrapper


@frozen
class _Symbol:
    """
    One function in the ELF symbol table.

    @ivar value: its address relative to the module's load address.
    @ivar fileOffset: where its code starts in the file.
    @ivar size: its size in bytes (0 if unknown).
    """

    value: int
    fileOffset: int
    size: int


def _scanSymbolTable(path: str, names: Iterable[str]) -> dict[str, _Symbol]:
    """
    Find C{names} in the ELF symbol table (C{.symtab}) of the file at C{path}.

    Decoding all 36k symbols through pyelftools costs about 870 ms; instead,
    one regular-expression pass over the raw string table finds where the
    names are (also as the tail of a longer string, which linkers may share),
    and one pass over the raw symbol table's name column finds the entries
    pointing there: about 25 ms.

    @raise OpenSSLUnavailable: if the file is not ELF, has no symbol table,
        or defines one of the names more than once.
    @return: the functions found; names not found are left out.
    """
    try:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
    except ImportError as e:
        raise OpenSSLUnavailable(
            f"cannot read the ELF symbol table of {path}: pyelftools is not installed ({e})"
        ) from e
    wanted = sorted({name.encode("ascii") for name in names}, key=len, reverse=True)
    with open(path, "rb") as stream:
        try:
            elf = ELFFile(stream)
        except ELFError as e:
            raise OpenSSLUnavailable(f"{path} is not an ELF file: {e}") from e
        if elf.little_endian != (sys.byteorder == "little"):
            raise OpenSSLUnavailable(f"{path} is not for this machine's byte order")
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            raise OpenSSLUnavailable(
                f"{path} has no ELF symbol table (it was stripped)"
            )
        strings: bytes = elf.get_section(symtab["sh_link"]).data()
        symbols: bytes = symtab.data()
        entrySize: int = symtab["sh_entsize"]
        if elf.elfclass == 64:
            # st_name, st_info, st_other, st_shndx, st_value, st_size
            layout = struct.Struct("=IBBHQQ")
            fields = (1, 3, 4, 5)
        else:
            # st_name, st_value, st_size, st_info, st_other, st_shndx
            layout = struct.Struct("=IIIBBH")
            fields = (3, 5, 1, 2)
        if entrySize != layout.size or len(symbols) % entrySize:
            raise OpenSSLUnavailable(
                f"{path} has an ELF symbol table of unknown layout"
            )

        # Where each name is in the string table. finditer does not report
        # overlapping matches, so a name that ends another one is looked for
        # separately.
        nameAt: dict[int, bytes] = {}
        tails = [n for n in wanted if any(m != n and m.endswith(n) for m in wanted)]
        pattern = b"|".join(re.escape(n) for n in wanted if n not in tails)
        for match in re.finditer(b"(" + pattern + b")\x00", strings):
            nameAt[match.start()] = match.group(1)
        for name in tails:
            at = strings.find(name + b"\0")
            while at != -1:
                nameAt[at] = name
                at = strings.find(name + b"\0", at + 1)

        # st_name is the first 32-bit word of an entry in both ELF classes.
        nameColumn = memoryview(symbols).cast("I")[:: entrySize // 4].tolist()
        candidates: dict[bytes, set[tuple[int, int, int]]] = {}
        for index, nameOffset in enumerate(nameColumn):
            symbolName = nameAt.get(nameOffset)
            if symbolName is None:
                continue
            entry = layout.unpack_from(symbols, index * entrySize)
            info, shndx, value, size = (entry[i] for i in fields)
            # STT_FUNC, defined in a real section
            if info & 0xF == 2 and 0 < shndx < 0xFF00 and value:
                section = elf.get_section(shndx)
                offset = section["sh_offset"] + value - section["sh_addr"]
                candidates.setdefault(symbolName, set()).add((value, offset, size))
    found: dict[str, _Symbol] = {}
    for name, where in candidates.items():
        if len(where) > 1:
            raise OpenSSLUnavailable(
                f"the ELF symbol table of {path} defines {name.decode()} {len(where)} times"
            )
        found[name.decode()] = _Symbol(*where.pop())
    return found


def _sameCode(path: str, base: int, symbols: dict[str, _Symbol]) -> str | None:
    """
    Compare the first bytes of each function in memory with the file.

    @return: C{None} if all agree, else the name of one that does not.
    """
    with open(path, "rb") as stream:
        for name, symbol in symbols.items():
            length = min(max(symbol.size, 1), 16)
            stream.seek(symbol.fileOffset)
            onDisk = stream.read(length)
            if ctypes.string_at(base + symbol.value, length) != onDisk:
                return name
    return None


@frozen
class _Functions:
    """
    The resolved entry points.

    @ivar origin: where they were found, for messages.
    @ivar functions: callable ctypes function pointers by C name.
    @ivar missing: why each name that was not found is missing.
    """

    origin: str
    functions: dict[str, Any]
    missing: dict[str, str]

    def require(self, *names: str) -> list[Any]:
        """
        Return the named functions.

        @raise OpenSSLUnavailable: naming every missing one and why.
        """
        absent = [name for name in names if name not in self.functions]
        if absent:
            reasons = sorted({self.missing[name] for name in absent})
            raise OpenSSLUnavailable(
                f"OpenSSL function(s) {', '.join(absent)} not found: {'; '.join(reasons)}"
            )
        return [self.functions[name] for name in names]


def _bind(name: str, address: int) -> Any:
    restype, argtypes = _SIGNATURES[name]
    return CFUNCTYPE(restype, *argtypes)(address)


def _resolveIn(path: str, handle: ctypes.CDLL) -> _Functions:
    """
    Find every name in L{_SIGNATURES} through the extension module at C{path}.
    """
    names = list(_SIGNATURES)
    exported: dict[str, int] = {}
    for name in names:
        try:
            pointer = getattr(handle, name)
        except AttributeError:
            continue
        address = ctypes.cast(pointer, c_void_p).value
        if address:
            exported[name] = address
    if "SSL_CTX_ctrl" in exported:
        # cryptography links a shared OpenSSL: use only what it exports.
        reason = f"not exported by the OpenSSL that {path} links"
        return _Functions(
            origin=f"exported by the shared OpenSSL that {path} links",
            functions={
                name: _bind(name, address) for name, address in exported.items()
            },
            missing={name: reason for name in names if name not in exported},
        )
    try:
        anchor = ctypes.cast(getattr(handle, _ANCHOR), c_void_p).value
    except AttributeError:
        anchor = None
    if not anchor:
        reason = f"{path} neither exports them nor exports {_ANCHOR}"
        return _Functions(
            origin=path, functions={}, missing=dict.fromkeys(names, reason)
        )
    try:
        symbols = _scanSymbolTable(path, [_ANCHOR, *names])
        if _ANCHOR not in symbols:
            raise OpenSSLUnavailable(f"the ELF symbol table of {path} has no {_ANCHOR}")
        base = anchor - symbols.pop(_ANCHOR).value
        differs = _sameCode(path, base, symbols)
        if differs is not None:
            raise OpenSSLUnavailable(
                f"the code of {differs} in memory differs from {path} on disk "
                "(was cryptography upgraded after it was imported?)"
            )
    except OpenSSLUnavailable as e:
        reason = f"not exported by {path}, and {e}"
        return _Functions(
            origin=path, functions={}, missing=dict.fromkeys(names, reason)
        )
    except OSError as e:
        reason = f"not exported by {path}, and reading it failed: {e}"
        return _Functions(
            origin=path, functions={}, missing=dict.fromkeys(names, reason)
        )
    reason = f"not exported by {path} nor in its ELF symbol table"
    return _Functions(
        origin=f"the ELF symbol table of {path}",
        functions={
            name: _bind(name, base + symbol.value) for name, symbol in symbols.items()
        },
        missing={name: reason for name in names if name not in symbols},
    )


@cache
def _functions() -> _Functions:
    """
    Resolve the entry points once, on first use.
    """
    from cryptography.hazmat.bindings import _rust

    path = os.path.realpath(_rust.__file__)
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LOCAL", 0)
    try:
        handle = ctypes.CDLL(path, mode=mode)
    except OSError as e:
        reason = f"cannot look up symbols in {path}: {e}"
        return _Functions(
            origin=path, functions={}, missing=dict.fromkeys(_SIGNATURES, reason)
        )
    return _resolveIn(path, handle)


def _require(*names: str) -> list[Any]:
    return _functions().require(*names)


def _contextPointer(context: SSL.Context) -> int:
    """
    The C{SSL_CTX *} behind a pyOpenSSL context.
    """
    return int(_ffi.cast("uintptr_t", context._context))


def _errorText() -> str:
    """
    Drain OpenSSL's error queue into nginx's C{(SSL: error:...)} suffix.
    """
    (getError, errorString) = _require("ERR_get_error_all", "ERR_error_string_n")
    parts = []
    buffer = ctypes.create_string_buffer(256)
    while True:
        data = c_char_p()
        flags = c_int()
        code = getError(None, None, None, ctypes.byref(data), ctypes.byref(flags))
        if not code:
            break
        errorString(code, buffer, len(buffer))
        text = buffer.value.decode("utf-8", "replace")
        if data.value and flags.value & _ERR_TXT_STRING:
            text += ":" + data.value.decode("utf-8", "replace")
        parts.append(text)
    if not parts:
        return ""
    return " (SSL: " + " ".join(parts) + ")"


def _clearErrors() -> None:
    (clear,) = _require("ERR_clear_error")
    clear()


def setSessionCacheSize(context: SSL.Context, sessions: int) -> None:
    """
    Set how many sessions OpenSSL's internal cache holds (0: unlimited).
    """
    if sessions < 0:
        raise ValueError(f"session cache size must not be negative, not {sessions}")
    (ctrl,) = _require("SSL_CTX_ctrl")
    ctrl(_contextPointer(context), _SSL_CTRL_SET_SESS_CACHE_SIZE, sessions, None)


def getSessionCacheSize(context: SSL.Context) -> int:
    """
    How many sessions OpenSSL's internal cache holds (0: unlimited).
    """
    (ctrl,) = _require("SSL_CTX_ctrl")
    return int(ctrl(_contextPointer(context), _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None))


def setGroups(context: SSL.Context, groups: str) -> None:
    """
    Set the key-exchange groups, as nginx's C{ssl_ecdh_curve X25519:prime256v1}.

    @raise ValueError: naming the list OpenSSL refused, and why.
    """
    (ctrl,) = _require("SSL_CTX_ctrl")
    _clearErrors()
    value = ctypes.create_string_buffer(groups.encode("utf-8"))
    if ctrl(_contextPointer(context), _SSL_CTRL_SET_GROUPS_LIST, 0, value) != 1:
        raise ValueError(f'SSL_CTX_set1_groups_list("{groups}") failed{_errorText()}')


def applyConfCommands(
    context: SSL.Context, commands: Sequence[tuple[str, str]], *, server: bool
) -> None:
    """
    Apply nginx's C{ssl_conf_command name value;} (or C{proxy_ssl_conf_command}).

    For a server context the flags are exactly nginx's (C{FILE}, C{SERVER},
    C{CLIENT}, C{CERTIFICATE}, C{SHOW_ERRORS}): nginx accepts both sides'
    commands. A client context leaves out C{SERVER}, so a server-only command
    is refused rather than ignored.

    @raise ValueError: as nginx words it, C{SSL_CONF_cmd("Ciphersuites",
        "bogus") failed (SSL: ...)}.
    """
    (new, setFlags, setContext, command, finish, free) = _require(
        "SSL_CONF_CTX_new",
        "SSL_CONF_CTX_set_flags",
        "SSL_CONF_CTX_set_ssl_ctx",
        "SSL_CONF_cmd",
        "SSL_CONF_CTX_finish",
        "SSL_CONF_CTX_free",
    )
    _clearErrors()
    flags = (
        _SSL_CONF_FLAG_FILE
        | _SSL_CONF_FLAG_CLIENT
        | _SSL_CONF_FLAG_CERTIFICATE
        | _SSL_CONF_FLAG_SHOW_ERRORS
    )
    if server:
        flags |= _SSL_CONF_FLAG_SERVER
    conf = new()
    if not conf:
        raise MemoryError(f"SSL_CONF_CTX_new() failed{_errorText()}")
    try:
        setFlags(conf, flags)
        setContext(conf, _contextPointer(context))
        for name, value in commands:
            if command(conf, name.encode("utf-8"), value.encode("utf-8")) <= 0:
                raise ValueError(
                    f'SSL_CONF_cmd("{name}", "{value}") failed{_errorText()}'
                )
        if finish(conf) != 1:
            raise ValueError(f"SSL_CONF_finish() failed{_errorText()}")
    finally:
        free(conf)


def setSecurityLevel(context: SSL.Context, level: int) -> None:
    """
    Set OpenSSL's security level (0 to 5; see C{SSL_CTX_set_security_level}).
    """
    if not 0 <= level <= 5:
        raise ValueError(f"security level must be 0 to 5, not {level}")
    (setLevel,) = _require("SSL_CTX_set_security_level")
    setLevel(_contextPointer(context), level)


def getSecurityLevel(context: SSL.Context) -> int:
    """
    OpenSSL's security level for C{context}.
    """
    (getLevel,) = _require("SSL_CTX_get_security_level")
    return int(getLevel(_contextPointer(context)))


def setNumTickets(context: SSL.Context, tickets: int) -> None:
    """
    Set how many TLS 1.3 tickets a server sends after a full handshake.
    """
    if tickets < 0:
        raise ValueError(f"number of tickets must not be negative, not {tickets}")
    (setTickets,) = _require("SSL_CTX_set_num_tickets")
    if setTickets(_contextPointer(context), tickets) != 1:
        raise ValueError(f"SSL_CTX_set_num_tickets({tickets}) failed{_errorText()}")


def getNumTickets(context: SSL.Context) -> int:
    """
    How many TLS 1.3 tickets a server sends after a full handshake.
    """
    (getTickets,) = _require("SSL_CTX_get_num_tickets")
    return int(getTickets(_contextPointer(context)))


def sessionReused(connection: SSL.Connection) -> bool:
    """
    Whether C{connection}'s handshake resumed a session.
    """
    return bool(_lib.SSL_session_reused(connection._ssl))


_Cipher = Literal["aes-256-cbc", "aes-128-cbc"]
_KEY_SIZES: dict[str, int] = {"aes-256-cbc": 32, "aes-128-cbc": 16}


def _checkKeySizes(key: TicketKey) -> None:
    if len(key.name) != 16:
        raise ValueError(f"ticket key name must be 16 bytes, not {len(key.name)}")
    size = _KEY_SIZES.get(key.cipher)
    if size is None:
        raise ValueError(
            f"ticket key cipher must be aes-256-cbc or aes-128-cbc, not {key.cipher!r}"
        )
    if len(key.aesKey) != size or len(key.hmacKey) != size:
        raise ValueError(
            f"a {key.cipher} ticket key needs {size}-byte AES and HMAC keys, "
            f"not {len(key.aesKey)} and {len(key.hmacKey)}"
        )


@frozen
class TicketKey:
    """
    One session-ticket key, as in nginx's C{ssl_session_ticket_key} files.

    Tickets are encrypted with AES-CBC and authenticated with HMAC-SHA256; the
    name (sent in clear in every ticket) says which key to decrypt with.
    """

    name: bytes
    hmacKey: bytes = field(repr=False)
    aesKey: bytes = field(repr=False)
    cipher: _Cipher = "aes-256-cbc"

    def __attrs_post_init__(self) -> None:
        _checkKeySizes(self)

    @classmethod
    def fromBytes(cls, data: bytes) -> TicketKey:
        """
        Parse an nginx key file: 80 bytes are name(16) | HMAC(32) | AES-256(32);
        48 bytes are name(16) | AES-128(16) | HMAC(16).
        """
        if len(data) == 80:
            return cls(data[:16], data[16:48], data[48:80], "aes-256-cbc")
        if len(data) == 48:
            return cls(data[:16], data[32:48], data[16:32], "aes-128-cbc")
        raise ValueError(f"a ticket key must be 48 or 80 bytes, not {len(data)}")

    @classmethod
    def generate(cls, randomBytes: Callable[[int], bytes]) -> TicketKey:
        """
        Make a new 80-byte (AES-256) key from C{randomBytes}, e.g. L{os.urandom}.
        """
        return cls.fromBytes(randomBytes(80))

    def toBytes(self) -> bytes:
        """
        The nginx key-file form of this key; L{fromBytes} reads it back.
        """
        if self.cipher == "aes-128-cbc":
            return self.name + self.aesKey + self.hmacKey
        return self.name + self.hmacKey + self.aesKey


_SHA256 = ctypes.create_string_buffer(b"SHA256")


def _macParameters(hmacKey: bytes) -> tuple[Any, Any]:
    """
    C{OSSL_PARAM[]} for HMAC-SHA256 with C{hmacKey}, and the buffer it points at
    (keep both alive for the call).
    """
    key = ctypes.create_string_buffer(hmacKey, len(hmacKey))
    params = (_OSSLParam * 3)()
    params[0].key = b"digest"
    params[0].data_type = _OSSL_PARAM_UTF8_STRING
    params[0].data = ctypes.addressof(_SHA256)
    params[0].data_size = len(_SHA256.value)
    params[0].return_size = _OSSL_PARAM_UNMODIFIED
    params[1].key = b"key"
    params[1].data_type = _OSSL_PARAM_OCTET_STRING
    params[1].data = ctypes.addressof(key)
    params[1].data_size = len(hmacKey)
    params[1].return_size = _OSSL_PARAM_UNMODIFIED
    return params, key


_installed: weakref.WeakKeyDictionary[
    SSL.Context, dict[str, weakref.finalize[Any, Any]]
] = weakref.WeakKeyDictionary()


def _uninstall(address: int, setters: Sequence[Any], callbacks: object) -> None:
    """
    Detach callbacks from an C{SSL_CTX} whose pyOpenSSL context is going away,
    before the ctypes objects in C{callbacks} are freed.
    """
    del callbacks
    for setter in setters:
        setter(address, None)


def _keepAlive(
    context: SSL.Context, kind: str, setters: Sequence[Any], callbacks: object
) -> None:
    """
    Keep C{callbacks} alive exactly as long as C{context}.

    When C{context} dies, the callbacks are first detached from its
    C{SSL_CTX} (which a C{SSL} in a garbage cycle may outlive), then freed.
    An earlier installation of the same kind is released at once, since
    OpenSSL no longer points at it.
    """
    finalizer = weakref.finalize(
        context, _uninstall, _contextPointer(context), tuple(setters), callbacks
    )
    byKind = _installed.setdefault(context, {})
    previous = byKind.get(kind)
    byKind[kind] = finalizer
    if previous is not None:
        previous.detach()


def _setSessionIdContext(context: SSL.Context, sessionIdContext: bytes) -> None:
    if not 0 < len(sessionIdContext) <= _MAX_SESSION_ID_LENGTH:
        raise ValueError(
            f"a session-id context must be 1 to {_MAX_SESSION_ID_LENGTH} bytes, "
            f"not {len(sessionIdContext)}"
        )
    context.set_session_id(sessionIdContext)


def installTicketKeys(
    context: SSL.Context,
    keys: Callable[[], tuple[TicketKey, Sequence[TicketKey]]],
    *,
    sessionIdContext: bytes = DEFAULT_SESSION_ID_CONTEXT,
) -> None:
    """
    Encrypt and decrypt C{context}'s session tickets with our own keys.

    C{keys()} is called at each ticket operation and returns the key that
    encrypts and every key that decrypts; a rotation service swaps keys by
    changing what it returns, without rebuilding the context.

    A ticket under the encrypting key resumes as is (TLS 1.2) or is renewed
    (TLS 1.3, whose clients should use a ticket once, as nginx does); a ticket
    under another known key resumes and is renewed under the encrypting key;
    an unknown key means a full handshake. If C{keys()} raises, the
    handshake goes on without resumption and without a new ticket.

    @param sessionIdContext: must be the same wherever a ticket should resume.
    """
    (
        setCallback,
        randBytes,
        aes128,
        aes256,
        encryptInit,
        decryptInit,
        setMacParams,
        sslVersion,
    ) = _require(
        "SSL_CTX_set_tlsext_ticket_key_evp_cb",
        "RAND_bytes",
        "EVP_aes_128_cbc",
        "EVP_aes_256_cbc",
        "EVP_EncryptInit_ex",
        "EVP_DecryptInit_ex",
        "EVP_MAC_CTX_set_params",
        "SSL_version",
    )
    _setSessionIdContext(context, sessionIdContext)
    # The callback runs twice per full TLS 1.3 handshake (two tickets): it is
    # a cffi callback calling cffi function pointers, several times cheaper
    # than the same through ctypes.
    randBytes = _fast(randBytes, "int(*)(char *, int)")
    encryptInit = _fast(encryptInit, "int(*)(void *, void *, void *, char *, char *)")
    decryptInit = _fast(decryptInit, "int(*)(void *, void *, void *, char *, char *)")
    setMacParams = _fast(setMacParams, "int(*)(void *, void *)")
    sslVersion = _fast(sslVersion, "int(*)(void *)")
    ciphers = {"aes-128-cbc": aes128, "aes-256-cbc": aes256}
    # Per key, built at its first use rather than at every ticket: the cipher,
    # the HMAC parameters (and the buffers they point at).  Keyed by identity:
    # keys() returns the same objects until the ring changes.
    prepared: dict[int, tuple[TicketKey, Any, Any, Any]] = {}

    def prepare(key: TicketKey) -> tuple[TicketKey, Any, Any, Any]:
        entry = prepared.get(id(key))
        if entry is None or entry[0] is not key:
            if len(prepared) >= 64:
                prepared.clear()
            params, keyBuffer = _macParameters(key.hmacKey)
            entry = prepared[id(key)] = (
                key,
                _cffi.cast("void *", ciphers[key.cipher]()),
                _cffi.cast("void *", ctypes.addressof(params)),
                (params, keyBuffer),
            )
        return entry

    # The current key's entry, as the last ticket found it: the ring returns
    # the same key object until it changes.
    last: list[tuple[TicketKey, Any, Any, Any] | None] = [None]

    def decrypt(
        ssl: Any, keyName: Any, iv: Any, cipherContext: Any, macContext: Any
    ) -> int:
        current, decrypting = keys()
        name = _cffi.buffer(keyName, 16)[:]
        if name == current.name:
            key = current
        else:
            for key in decrypting:
                if key.name == name:
                    break
            else:
                return 0
        _, cipher, params, _buffers = prepare(key)
        if setMacParams(macContext, params) != 1:
            return -1
        if decryptInit(cipherContext, cipher, _cffi.NULL, key.aesKey, iv) != 1:
            return -1
        if key is not current or sslVersion(ssl) == _TLS1_3_VERSION:
            return 2
        return 1

    def callback(
        ssl: Any,
        keyName: Any,
        iv: Any,
        cipherContext: Any,
        macContext: Any,
        enc: int,
    ) -> int:
        # cffi pointers are false when NULL.
        if not (ssl and keyName and iv and cipherContext and macContext):
            return 0
        try:
            if enc != 1:
                return decrypt(ssl, keyName, iv, cipherContext, macContext)
            # Encrypting (twice per full TLS 1.3 handshake), here rather than
            # in a function of its own.
            current = keys()[0]
            entry = last[0]
            if entry is None or entry[0] is not current:
                entry = last[0] = prepare(current)
            _, cipher, params, _buffers = entry
            if randBytes(iv, 16) != 1:
                return -1
            if encryptInit(cipherContext, cipher, _cffi.NULL, current.aesKey, iv) != 1:
                return -1
            if setMacParams(macContext, params) != 1:
                return -1
            _memmove(keyName, current.name, 16)
            return 1
        except BaseException:
            _log.failure("session ticket key callback failed; no ticket used or issued")
            # 0 means: decrypting, a full handshake; encrypting, no ticket
            # (an empty one in TLS 1.2). -1 would fail the handshake.
            return 0

    thunk = _cffi.callback(
        "int(void *, char *, char *, void *, void *, int)", callback, error=0
    )
    address = _contextPointer(context)
    setCallback(address, int(_cffi.cast("uintptr_t", thunk)))
    _keepAlive(context, "tickets", [setCallback], thunk)


def _fast(function: Any, signature: str) -> Any:
    """
    C{function}, an OpenSSL function from L{_require}, as a cffi function
    pointer of C{signature}: a call costs a fraction of a ctypes call.
    """
    return _cffi.cast(signature, ctypes.cast(function, c_void_p).value)


class SessionStore(Protocol):
    """
    Where a server keeps sessions by ID, e.g. shared among worker processes.
    """

    def get(self, sessionId: bytes) -> bytes | None:
        """
        The DER-encoded session stored under C{sessionId}, if any and unexpired.
        """

    def put(self, sessionId: bytes, session: bytes, timeout: int) -> None:
        """
        Store a DER-encoded session for C{timeout} seconds.
        """

    def remove(self, sessionId: bytes) -> None:
        """
        Forget a session (OpenSSL found it bad or used up).
        """


def _sessionId(getId: Any, session: int) -> bytes:
    length = c_uint()
    pointer = getId(session, ctypes.byref(length))
    if not pointer:
        return b""
    return ctypes.string_at(pointer, length.value)


def installSessionStore(
    context: SSL.Context,
    store: SessionStore,
    *,
    sessionIdContext: bytes = DEFAULT_SESSION_ID_CONTEXT,
) -> None:
    """
    Keep C{context}'s server sessions in C{store} instead of OpenSSL's memory,
    as nginx's C{ssl_session_cache shared:...} does.

    TLS 1.3 sessions are stored only when tickets are off (then OpenSSL's
    tickets carry just the session ID); with tickets on, they resume from the
    ticket alone, as in nginx. Exceptions from C{store} are logged and mean a
    cache miss.

    @param sessionIdContext: must be the same wherever a session should resume.
    """
    (
        setNew,
        setGet,
        setRemove,
        getId,
        getTimeout,
        i2d,
        d2i,
        sslVersion,
        sslOptions,
        setMark,
        popToMark,
    ) = _require(
        "SSL_CTX_sess_set_new_cb",
        "SSL_CTX_sess_set_get_cb",
        "SSL_CTX_sess_set_remove_cb",
        "SSL_SESSION_get_id",
        "SSL_SESSION_get_timeout",
        "i2d_SSL_SESSION",
        "d2i_SSL_SESSION",
        "SSL_version",
        "SSL_get_options",
        "ERR_set_mark",
        "ERR_pop_to_mark",
    )
    _setSessionIdContext(context, sessionIdContext)

    def newSession(ssl: int | None, session: int | None) -> int:
        setMark()
        try:
            if not ssl or not session:
                return 0
            if (
                sslVersion(ssl) == _TLS1_3_VERSION
                and not sslOptions(ssl) & _SSL_OP_NO_TICKET
            ):
                return 0
            sessionId = _sessionId(getId, session)
            if not 0 < len(sessionId) <= _MAX_SESSION_ID_LENGTH:
                return 0
            length = i2d(session, None)
            if length <= 0:
                return 0
            buffer = ctypes.create_string_buffer(length)
            cursor = c_void_p(ctypes.addressof(buffer))
            if i2d(session, ctypes.byref(cursor)) != length:
                return 0
            store.put(sessionId, buffer.raw, int(getTimeout(session)))
        except BaseException:
            _log.failure("storing a TLS session failed")
        finally:
            popToMark()
        # We keep no reference to the session.
        return 0

    def getSession(
        ssl: int | None, sessionId: int | None, length: int, copy: Any
    ) -> int | None:
        setMark()
        try:
            copy[0] = 0
            if not sessionId or length <= 0:
                return None
            der = store.get(ctypes.string_at(sessionId, length))
            if der is None:
                return None
            buffer = ctypes.create_string_buffer(der, len(der))
            cursor = c_void_p(ctypes.addressof(buffer))
            session: int | None = d2i(None, ctypes.byref(cursor), len(der))
            # copy = 0: OpenSSL takes over the reference d2i gave us.
            return session
        except BaseException:
            _log.failure("looking up a TLS session failed")
            return None
        finally:
            popToMark()

    def removeSession(sslContext: int | None, session: int | None) -> None:
        setMark()
        try:
            if session:
                sessionId = _sessionId(getId, session)
                if sessionId:
                    store.remove(sessionId)
        except BaseException:
            _log.failure("removing a TLS session failed")
        finally:
            popToMark()

    thunks = (
        _NewSessionCallback(newSession),
        _GetSessionCallback(getSession),
        _RemoveSessionCallback(removeSession),
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER | SSL.SESS_CACHE_NO_INTERNAL)
    address = _contextPointer(context)
    for setter, thunk in zip((setNew, setGet, setRemove), thunks):
        setter(address, ctypes.cast(thunk, c_void_p))
    _keepAlive(context, "sessions", [setNew, setGet, setRemove], thunks)


# In-memory handshakes, for the self-test (and the tests).


def _shuttle(source: SSL.Connection, destination: SSL.Connection) -> bool:
    """
    Move every pending TLS byte from C{source} to C{destination}.
    """
    moved = False
    while True:
        try:
            data = source.bio_read(65536)
        except SSL.WantReadError:
            return moved
        if not data:
            return moved
        destination.bio_write(data)
        moved = True


def _handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """
    Complete a handshake between two memory-BIO connections, and let the client
    read what follows it (TLS 1.3 tickets).

    @raise SSL.Error: if the handshake fails.
    """
    done = {id(client): False, id(server): False}
    for _ in range(20):
        for connection in (client, server):
            try:
                if done[id(connection)]:
                    connection.recv(65536)
                else:
                    connection.do_handshake()
                    done[id(connection)] = True
            except SSL.WantReadError:
                pass
        moved = _shuttle(client, server)
        moved = _shuttle(server, client) or moved
        if all(done.values()) and not moved:
            return
    raise SSL.Error("in-memory handshake did not finish")


def _connect(
    clientContext: SSL.Context,
    serverContext: SSL.Context,
    session: SSL.Session | None = None,
) -> tuple[SSL.Connection, SSL.Connection]:
    """
    Handshake a new client and server in memory, the client offering
    C{session}.
    """
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    if session is not None:
        client.set_session(session)
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    _handshake(client, server)
    return client, server


class _MemorySessionStore:
    """
    A L{SessionStore} in a dict, for the self-test.
    """

    def __init__(self) -> None:
        self.sessions: dict[bytes, bytes] = {}

    def get(self, sessionId: bytes) -> bytes | None:
        return self.sessions.get(sessionId)

    def put(self, sessionId: bytes, session: bytes, timeout: int) -> None:
        self.sessions[sessionId] = session

    def remove(self, sessionId: bytes) -> None:
        self.sessions.pop(sessionId, None)


def _selfTestIdentity() -> tuple[Any, Any]:
    """
    A throwaway P-256 key and self-signed certificate for the self-test.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlsrelay self-test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def selfTest() -> None:
    """
    Check that the entry points exist and do what tlsrelay needs, in memory:
    a ticket from one server context resumes on another sharing its key, and
    a session stored by one resumes on another sharing the store (tickets
    off), both in TLS 1.2 and 1.3.

    @raise OpenSSLUnavailable: saying what is missing or what did not resume.
    """
    _require(*_SIGNATURES)
    key, certificate = _selfTestIdentity()
    ticketKey = TicketKey.generate(os.urandom)

    def server(version: int, setUp: Callable[[SSL.Context], None]) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate(certificate)
        context.use_privatekey(key)
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        setUp(context)
        return context

    def withTickets(context: SSL.Context) -> None:
        installTicketKeys(context, lambda: (ticketKey, [ticketKey]))

    def withStore(store: SessionStore) -> Callable[[SSL.Context], None]:
        def setUp(context: SSL.Context) -> None:
            context.set_options(SSL.OP_NO_TICKET)
            installSessionStore(context, store)

        return setUp

    for label, version in (
        ("TLS 1.2", SSL.TLS1_2_VERSION),
        ("TLS 1.3", SSL.TLS1_3_VERSION),
    ):
        store = _MemorySessionStore()
        for what, setUp in (
            ("a shared ticket key", withTickets),
            ("a shared session store", withStore(store)),
        ):
            client = SSL.Context(SSL.TLS_CLIENT_METHOD)
            try:
                first, _ = _connect(client, server(version, setUp))
                session = first.get_session()
                if session is None:
                    raise OpenSSLUnavailable(
                        f"self-test: no {label} session with {what}"
                    )
                second, secondServer = _connect(client, server(version, setUp), session)
            except SSL.Error as e:
                raise OpenSSLUnavailable(
                    f"self-test: {label} handshake with {what} failed: {e}"
                ) from e
            if not (sessionReused(second) and sessionReused(secondServer)):
                raise OpenSSLUnavailable(
                    f"self-test: a {label} session did not resume across two contexts "
                    f"with {what} (entry points from {_functions().origin})"
                )
