"""
Endpoint-string parsers: C{tlsrelay:} for servers.

Twisted imports every endpoint plugin whenever any application parses an
endpoint string, so this module imports almost nothing: OpenSSL, the
configuration and the endpoints are imported inside the parse methods.

Each keyword mirrors an nginx directive (C{ssl_} dropped, the rest in
camelCase) and its value goes through the same directive table as the
configuration file, so C{sessionCache=shared\\:SSL\\:20m} means exactly what
C{ssl_session_cache shared:SSL:20m;} means.  See C{docs/endpoints.md}.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorCore

    from tlsrelay._config._model import ServerTLS
    from tlsrelay.endpoints import TLSRelayServerEndpoint

# How a keyword's value becomes nginx arguments:
#   one:      the whole value is the directive's one argument;
#   each:     comma-separated; the directive is repeated once per item;
#   words:    separated by commas, "+" or spaces; the directive's arguments;
#   commands: "Name Value" pairs separated by ";"; the directive once per pair.
Split = Literal["one", "each", "words", "commands"]

SERVER_KEYWORDS: dict[str, tuple[str, Split]] = {
    "certificate": ("ssl_certificate", "each"),
    "certificateKey": ("ssl_certificate_key", "each"),
    "passwordFile": ("ssl_password_file", "one"),
    "protocols": ("ssl_protocols", "words"),
    "ciphers": ("ssl_ciphers", "one"),
    "confCommand": ("ssl_conf_command", "commands"),
    "preferServerCiphers": ("ssl_prefer_server_ciphers", "one"),
    "ecdhCurve": ("ssl_ecdh_curve", "one"),
    "dhparam": ("ssl_dhparam", "one"),
    "handshakeTimeout": ("ssl_handshake_timeout", "one"),
    "sessionCache": ("ssl_session_cache", "words"),
    "sessionTimeout": ("ssl_session_timeout", "one"),
    "sessionTickets": ("ssl_session_tickets", "one"),
    "sessionTicketKey": ("ssl_session_ticket_key", "each"),
    "clientCertificate": ("ssl_client_certificate", "one"),
    "trustedCertificate": ("ssl_trusted_certificate", "one"),
    "verifyClient": ("ssl_verify_client", "one"),
    "verifyDepth": ("ssl_verify_depth", "one"),
    "crl": ("ssl_crl", "one"),
    "alpn": ("ssl_alpn", "words"),
}
"""
The keywords of C{tlsrelay:} server strings and the nginx directive each one
stands for.
"""

# Keywords with no nginx directive, reserved for features not built yet.
SERVER_KEYWORDS_LATER: dict[str, str] = {
    "ticketKeys": "the sessions issue",
    "ticketRotation": "the sessions issue",
}

_PREFIX = "tlsrelay endpoint"
_WHERE = "<tlsrelay endpoint>"
_WORDS = re.compile(r"[\s,+]+")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _fail(message: str) -> ValueError:
    return ValueError(f"{_PREFIX}: {message}")


def _unknownKeyword(keyword: str) -> ValueError:
    known = ["endpoint", *SERVER_KEYWORDS, *SERVER_KEYWORDS_LATER]
    close = difflib.get_close_matches(keyword, known, 1, 0.8)
    if not close:
        close = [k for k in known if k.lower() == keyword.lower()]
    if close:
        hint = f' (did you mean "{close[0]}"?)'
    else:
        hint = (
            "; an inner endpoint's own keywords go inside its description,"
            " escaped: tlsrelay:tcp\\:8443\\:interface\\=127.0.0.1:..."
        )
    return _fail(f'unknown keyword "{keyword}"{hint}')


def _arguments(keyword: str, value: str, split: Split) -> list[tuple[str, ...]]:
    """
    The argument lists of the directives that C{keyword=value} stands for.
    """
    if split == "one":
        items = [value]
    elif split == "words":
        items = [" ".join(w for w in _WORDS.split(value) if w)]
    else:
        items = [i.strip() for i in value.split(";" if split == "commands" else ",")]
    if not all(items):
        raise _fail(f'"{keyword}={value}" has an empty value')
    if split == "words":
        return [tuple(items[0].split(" "))]
    if split == "commands":
        pairs = [tuple(item.split(None, 1)) for item in items]
        for pair, item in zip(pairs, items):
            if len(pair) != 2:
                raise _fail(
                    f'"{keyword}={value}": "{item}" is not a "Name Value" command'
                )
        return pairs
    return [(item,) for item in items]


def serverTLSFromKeywords(
    keywords: Mapping[str, object], baseDirectory: str | None = None
) -> ServerTLS:
    """
    The TLS server settings that C{tlsrelay:} keywords describe, validated as the
    configuration file validates the matching C{ssl_*} directives.

    @param baseDirectory: what relative file names resolve against; the current
        directory by default.

    @raise ValueError: naming the keyword and what is wrong with it.
    """
    import attrs

    from tlsrelay._config._directives import (
        SERVER,
        Loader,
        Settings,
        certificatePairs,
        lookup,
    )
    from tlsrelay._config._errors import ConfigError
    from tlsrelay._config._model import ServerTLS
    from tlsrelay._config._tree import Directive

    for keyword in keywords:
        if keyword in SERVER_KEYWORDS_LATER:
            raise _fail(
                f'"{keyword}" is not supported yet (planned in '
                f"{SERVER_KEYWORDS_LATER[keyword]})"
            )
        if keyword not in SERVER_KEYWORDS:
            raise _unknownKeyword(keyword)

    loader = Loader(os.getcwd() if baseDirectory is None else baseDirectory)
    settings: Settings = {}
    for keyword, (name, split) in SERVER_KEYWORDS.items():
        if keyword not in keywords:
            continue
        value = _text(keywords[keyword])
        spec, _ = lookup(name, SERVER)
        assert spec is not None, name
        if spec.unsupported:
            plan = (
                f" (planned in {spec.unsupported})"
                if spec.unsupported != "unplanned"
                else ""
            )
            raise _fail(f'"{keyword}" ({name}) is not supported yet{plan}')
        assert spec.handler is not None, name
        low, high = spec.arity
        for args in _arguments(keyword, value, split):
            if len(args) < low or (high is not None and len(args) > high):
                raise _fail(f'"{keyword}={value}": wrong number of values')
            directive = Directive(name, args, None, _WHERE, 0)
            try:
                spec.handler(directive, loader, settings)
            except ConfigError as e:
                raise _fail(f'"{keyword}={value}": {e.message}') from None

    certificates = settings.get("_certs", ())
    if not certificates:
        raise _fail('"certificate=" is required')
    if "_keys" not in settings:
        # The key in the certificate's own file, as Twisted's ssl: endpoint.
        settings["_keys"] = certificates
    keys = settings["_keys"]
    if len(keys) != len(certificates):
        raise _fail(
            f'"certificate=" names {len(certificates)} file(s) but '
            f'"certificateKey=" names {len(keys)}: give one key per certificate,'
            " in the same order"
        )
    pairs = tuple(
        attrs.evolve(pair, where=None) for pair in certificatePairs(settings, None)
    )
    fields = {f.name for f in attrs.fields(ServerTLS)} - {"certificates"}
    values = {k: v for k, v in settings.items() if k in fields}
    values["protocolsWhere"] = None
    try:
        return ServerTLS(certificates=pairs, **values)
    except (TypeError, ValueError) as e:
        raise _fail(str(e)) from None


def innerDescription(args: Sequence[object], endpoint: object = None) -> str:
    """
    The inner endpoint's description, from the C{endpoint=} keyword or from the
    positional arguments of a C{tlsrelay:} string.

    C{endpoint=} takes a description quoted with C{quoteStringArgument}, as the
    C{endpoint=} of Twisted's C{tls:} client strings does: the form for
    generated strings.  Otherwise one positional argument is a whole
    description with its C{:} and C{=} escaped by hand
    (C{tlsrelay:tcp\\:8443\\:interface\\=::1:...}), and several are the inner
    endpoint's own positional arguments, re-quoted as Twisted's C{haproxy:}
    parser does (C{tlsrelay:tcp:8443:...}).
    """
    from twisted.internet.endpoints import quoteStringArgument

    texts = [_text(arg) for arg in args]
    if endpoint is not None:
        if texts:
            raise _fail(
                f"give the inner endpoint once: endpoint={_text(endpoint)} or "
                f"{':'.join(texts)}, not both"
            )
        texts = [_text(endpoint)]
    if not texts or not texts[0]:
        raise _fail(
            "the inner endpoint is missing: write it first, with its colons"
            " escaped, e.g. tlsrelay:tcp\\:8443:certificate=server.pem, or give"
            " it as endpoint="
        )
    if len(texts) == 1:
        return texts[0]
    # quoteStringArgument quotes values, where "=" is literal; in a positional
    # argument an unescaped "=" would start a keyword, so escape it as well.
    return ":".join(quoteStringArgument(text).replace("=", "\\=") for text in texts)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class TLSRelayServerParser:
    """
    Parses C{tlsrelay:<inner endpoint>:certificate=...:...} (or
    C{tlsrelay:endpoint=<inner endpoint>:certificate=...}) into a
    L{tlsrelay.endpoints.TLSRelayServerEndpoint}.

    @ivar prefix: C{"tlsrelay"} (C{ssl}, C{tls} and C{tcp} belong to Twisted).
    """

    prefix = "tlsrelay"

    def parseStreamServer(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> TLSRelayServerEndpoint:
        """
        Build the endpoint: the inner endpoint from the positional arguments, the
        TLS context from the keywords (see C{docs/endpoints.md}).

        @param reactor: the reactor; it is also the clock of the handshake
            timeout.

        @raise ValueError: for an unknown keyword, a bad value, a file that
            cannot be loaded or an inner endpoint that cannot be parsed.
        """
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.interfaces import IReactorTime

        from tlsrelay._config._errors import ConfigError
        from tlsrelay._tls import ServerContextFactory, buildServerContext
        from tlsrelay.endpoints import TLSRelayServerEndpoint

        endpoint = kwargs.pop("endpoint", None)
        tls = serverTLSFromKeywords(kwargs)
        description = innerDescription(args, endpoint)
        try:
            inner = serverFromString(reactor, description)
        except (ValueError, TypeError) as e:
            raise _fail(f'inner endpoint "{description}": {e}') from None
        if not IReactorTime.providedBy(reactor):
            raise TypeError(f"{_PREFIX}: the reactor must provide IReactorTime")
        clock = IReactorTime(reactor)
        try:
            context = buildServerContext(tls)
        except ConfigError as e:
            hint = ""
            if "certificate key" in e.message and any(
                pair.key == pair.certificate for pair in tls.certificates
            ):
                hint = (
                    " (without certificateKey=, the key must be in the"
                    " certificate file)"
                )
            raise _fail(e.message + hint) from None
        return TLSRelayServerEndpoint(
            inner,
            ServerContextFactory(context),
            tls.handshakeTimeout,
            clock,
        )
