"""
Endpoint-string parsers: C{tlsrelay:} for servers, C{tlsrelay-pool:} for clients
of an upstream pool.

Twisted imports every endpoint plugin whenever any application parses an
endpoint string, so this module imports almost nothing: OpenSSL, the
configuration and the endpoints are imported inside the parse methods.

Each keyword mirrors an nginx directive (C{ssl_} dropped, the rest in
camelCase) and its value goes through the same directive table as the
configuration file, so C{sessionCache=shared\\:SSL\\:20m} means exactly what
C{ssl_session_cache shared:SSL:20m;} means.  C{tlsrelay-pool:} keywords do the
same with C{proxy_ssl_*}, C{proxy_*} and an C{upstream} block's C{server} lines
and balancing method.  See C{docs/endpoints.md}.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorCore

    from tlsrelay._config._directives import Loader, Settings
    from tlsrelay._config._model import (
        Balancer,
        Proxy,
        ServerTLS,
        UpstreamGroup,
        UpstreamServer,
    )
    from tlsrelay.endpoints import TLSRelayPoolEndpoint, TLSRelayServerEndpoint

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
    "sessionTicketKeyRotation": ("ssl_session_ticket_key_rotation", "one"),
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
SERVER_KEYWORDS_LATER: dict[str, str] = {}

_PREFIX = "tlsrelay endpoint"
_WHERE = "<tlsrelay endpoint>"
_WORDS = re.compile(r"[\s,+]+")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _fail(message: str, prefix: str = _PREFIX) -> ValueError:
    return ValueError(f"{prefix}: {message}")


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


def _arguments(
    keyword: str, value: str, split: Split, prefix: str = _PREFIX
) -> list[tuple[str, ...]]:
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
        raise _fail(f'"{keyword}={value}" has an empty value', prefix)
    if split == "words":
        return [tuple(items[0].split(" "))]
    if split == "commands":
        pairs = [tuple(item.split(None, 1)) for item in items]
        for pair, item in zip(pairs, items):
            if len(pair) != 2:
                raise _fail(
                    f'"{keyword}={value}": "{item}" is not a "Name Value" command',
                    prefix,
                )
        return pairs
    return [(item,) for item in items]


def _runDirective(
    keyword: str,
    value: str,
    name: str,
    args: tuple[str, ...],
    context: str,
    loader: Loader,
    settings: Settings,
    prefix: str = _PREFIX,
) -> None:
    """
    Run the configuration file's handler of directive C{name} with C{args} (what
    C{keyword=value} stands for) into C{settings}, as if C{name args;} were
    written in C{context}.

    @raise ValueError: naming C{keyword=value} and the directive's own message.
    """
    from tlsrelay._config._directives import lookup
    from tlsrelay._config._errors import ConfigError
    from tlsrelay._config._tree import Directive

    spec, _ = lookup(name, context)
    assert spec is not None, name
    if spec.unsupported:
        plan = (
            f" (planned in {spec.unsupported})"
            if spec.unsupported != "unplanned"
            else ""
        )
        raise _fail(f'"{keyword}" ({name}) is not supported yet{plan}', prefix)
    assert spec.handler is not None, name
    low, high = spec.arity
    if len(args) < low or (high is not None and len(args) > high):
        raise _fail(f'"{keyword}={value}": wrong number of values', prefix)
    directive = Directive(name, args, None, _WHERE, 0)
    try:
        spec.handler(directive, loader, settings)
    except ConfigError as e:
        raise _fail(f'"{keyword}={value}": {e.message}', prefix) from None


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
        certificatePairs,
    )
    from tlsrelay._config._model import ServerTLS

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
        for args in _arguments(keyword, value, split):
            _runDirective(keyword, value, name, args, SERVER, loader, settings)

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
        from tlsrelay._sessions import SessionSharing
        from tlsrelay._tls import (
            ServerContextFactory,
            buildServerContext,
            sessionIdContext,
        )
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
        sharing = SessionSharing(clock)
        try:
            context = buildServerContext(tls)
            sharing.install(context, tls, sessionIdContext(tls), None)
        except ConfigError as e:
            sharing.stopService()  # removes any directory it made
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
            sharing,
        )


POOL_KEYWORDS: dict[str, tuple[str, Split]] = {
    "tls": ("proxy_ssl", "one"),
    "certificate": ("proxy_ssl_certificate", "one"),
    "certificateKey": ("proxy_ssl_certificate_key", "one"),
    "passwordFile": ("proxy_ssl_password_file", "one"),
    "protocols": ("proxy_ssl_protocols", "words"),
    "ciphers": ("proxy_ssl_ciphers", "one"),
    "confCommand": ("proxy_ssl_conf_command", "commands"),
    "trustedCertificate": ("proxy_ssl_trusted_certificate", "one"),
    "verify": ("proxy_ssl_verify", "one"),
    "verifyDepth": ("proxy_ssl_verify_depth", "one"),
    "crl": ("proxy_ssl_crl", "one"),
    "name": ("proxy_ssl_name", "one"),
    "serverName": ("proxy_ssl_server_name", "one"),
    "sessionReuse": ("proxy_ssl_session_reuse", "one"),
    "connectTimeout": ("proxy_connect_timeout", "one"),
    "nextUpstream": ("proxy_next_upstream", "one"),
    "nextUpstreamTries": ("proxy_next_upstream_tries", "one"),
    "nextUpstreamTimeout": ("proxy_next_upstream_timeout", "one"),
}
"""
The keywords of C{tlsrelay-pool:} client strings that stand for one C{proxy_*}
directive (C{proxy_ssl_} or C{proxy_} dropped, the rest in camelCase).
"""

POOL_GROUP_KEYWORDS: dict[str, str] = {
    "servers": 'the "server" lines of an "upstream" block, separated by ","',
    "balancer": '"least_conn", "hash KEY [consistent]", "random [two [least_conn]]"'
    ' or "round_robin" (the default)',
    "upstream": "the group's name, as in upstream NAME { ... }",
}
"""
The keywords of C{tlsrelay-pool:} client strings that describe the upstream
group itself.
"""

_POOL_PREFIX = "tlsrelay-pool endpoint"
_TLS_KEYWORDS = frozenset(
    keyword
    for keyword, (name, _) in POOL_KEYWORDS.items()
    if name.startswith("proxy_ssl_")
)
_POOL_HINTS: dict[str, str] = {
    "server": (
        '; give every server in one servers=, separated by "," (Twisted keeps'
        " only the last of repeated keywords)"
    ),
    "tries": ' (did you mean "nextUpstreamTries"?)',
    "sni": ' (did you mean "serverName"?)',
    "ssl": ' (did you mean "tls"?)',
    "hash": ' (did you mean "balancer=hash KEY"?)',
}
_BALANCERS = ("round_robin", "least_conn", "hash", "random")


def _poolFail(message: str) -> ValueError:
    return _fail(message, _POOL_PREFIX)


def _unknownPoolKeyword(keyword: str) -> ValueError:
    if keyword in _POOL_HINTS:
        return _poolFail(f'unknown keyword "{keyword}"{_POOL_HINTS[keyword]}')
    known = [*POOL_GROUP_KEYWORDS, *POOL_KEYWORDS]
    close = difflib.get_close_matches(keyword, known, 1, 0.8)
    if not close:
        close = [k for k in known if k.lower() == keyword.lower()]
    if close:
        hint = f' (did you mean "{close[0]}"?)'
    elif keyword in SERVER_KEYWORDS or keyword == "endpoint":
        hint = " (a keyword of tlsrelay: server strings, not of tlsrelay-pool:)"
    else:
        hint = ""
    return _poolFail(f'unknown keyword "{keyword}"{hint}')


def _servers(value: str, loader: Loader) -> tuple[UpstreamServer, ...]:
    """
    The servers of C{servers=}: C{address [parameter ...]} items separated by
    C{","}, each checked as an C{upstream}'s C{server} line.
    """
    import attrs

    from tlsrelay._config._directives import UPSTREAM

    settings: Settings = {}
    for item in value.split(","):
        args = tuple(item.split())
        if not args:
            raise _poolFail(f'"servers={value}" has an empty server')
        _runDirective(
            "servers",
            item.strip(),
            "server",
            args,
            UPSTREAM,
            loader,
            settings,
            _POOL_PREFIX,
        )
    servers: tuple[UpstreamServer, ...] = settings["servers"]
    return tuple(attrs.evolve(server, where=None) for server in servers)


def _balancer(value: str, loader: Loader) -> tuple[Balancer, bytes]:
    """
    The balancing method of C{balancer=}, and the hash key for C{hash KEY}.
    """
    from tlsrelay._config._directives import UPSTREAM
    from tlsrelay._config._model import Balancer

    words = value.split()
    method = words[0] if words else ""
    if method not in _BALANCERS:
        raise _poolFail(
            f'"balancer={value}": unknown balancing method, use'
            f" {POOL_GROUP_KEYWORDS['balancer']}"
        )
    if method == "round_robin":
        if len(words) > 1:
            raise _poolFail(f'"balancer={value}": round_robin takes no parameters')
        return Balancer(), b""
    if method == "hash":
        if len(words) < 2 or words[1] == "consistent":
            raise _poolFail(
                f'"balancer={value}": hash needs a key: balancer=hash KEY [consistent]'
            )
        if "$" in words[1]:
            raise _poolFail(
                f'"balancer={value}": the hash key is a fixed string here (a'
                " client endpoint has no variables); TLSRelayPoolEndpoint"
                ".withHashKey() gives another key from Python"
            )
    settings: Settings = {}
    _runDirective(
        "balancer",
        value,
        method,
        tuple(words[1:]),
        UPSTREAM,
        loader,
        settings,
        _POOL_PREFIX,
    )
    params, _ = settings["balancer"]
    balancer = Balancer(**params)
    return balancer, balancer.key.encode("utf-8")


def poolFromKeywords(
    keywords: Mapping[str, object], baseDirectory: str | None = None
) -> tuple[UpstreamGroup, Proxy, bytes]:
    """
    The upstream group, the C{proxy_*} settings (with the upstream TLS) and the
    hash key that C{tlsrelay-pool:} keywords describe, validated as the
    configuration file validates the matching directives.

    @param baseDirectory: what relative file names resolve against; the current
        directory by default.

    @raise ValueError: naming the keyword and what is wrong with it.
    """
    import attrs

    from tlsrelay._config._directives import SERVER, Loader
    from tlsrelay._config._model import Balancer, Proxy, UpstreamGroup, UpstreamTLS

    for keyword in keywords:
        if keyword not in POOL_KEYWORDS and keyword not in POOL_GROUP_KEYWORDS:
            raise _unknownPoolKeyword(keyword)
    if "servers" not in keywords:
        raise _poolFail(
            '"servers=" is required: servers=host\\:port,host\\:port weight=2,...'
        )

    loader = Loader(os.getcwd() if baseDirectory is None else baseDirectory)
    servers = _servers(_text(keywords["servers"]), loader)
    balancer, hashKey = Balancer(), b""
    if "balancer" in keywords:
        balancer, hashKey = _balancer(_text(keywords["balancer"]), loader)
    if balancer.method == "hash" and any(server.backup for server in servers):
        raise _poolFail(
            'balancing method "hash" does not support the "backup" parameter'
        )

    settings: Settings = {}
    for keyword, (name, split) in POOL_KEYWORDS.items():
        if keyword not in keywords:
            continue
        value = _text(keywords[keyword])
        for args in _arguments(keyword, value, split, _POOL_PREFIX):
            _runDirective(
                keyword, value, name, args, SERVER, loader, settings, _POOL_PREFIX
            )
    tlsKeywords = sorted(_TLS_KEYWORDS.intersection(keywords))
    if tlsKeywords and not settings.get("u_enabled", False):
        raise _poolFail(
            f'"{tlsKeywords[0]}=" has no effect without TLS: add tls=on'
            " (or remove the TLS keywords)"
        )
    if "u_certificate" in settings and "u_certificateKey" not in settings:
        # The key in the certificate's own file, as Twisted's ssl: endpoint.
        settings["u_certificateKey"] = settings["u_certificate"]

    upstream = keywords.get("upstream")
    if upstream is not None:
        name = _text(upstream).strip()
        if not name:
            raise _poolFail('"upstream=" is empty')
    else:
        name = ",".join(str(server.address) for server in servers)
    tls = UpstreamTLS(**{k[2:]: v for k, v in settings.items() if k.startswith("u_")})
    if (
        tls.enabled
        and (tls.verify or tls.serverName)
        and tls.name is None
        and upstream is None
        and len(servers) > 1
    ):
        raise _poolFail(
            "with several servers, verify=on and serverName=on need the name the"
            " upstreams prove: give name= (or upstream=, its default)"
        )
    fields = {f.name for f in attrs.fields(Proxy)} - {"tls"}
    proxy = Proxy(tls=tls, **{k: v for k, v in settings.items() if k in fields})
    return UpstreamGroup(name, servers, balancer), proxy, hashKey


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class TLSRelayPoolParser:
    """
    Parses C{tlsrelay-pool:servers=...:balancer=...:tls=on:...} into a
    L{tlsrelay.endpoints.TLSRelayPoolEndpoint}: an upstream pool, with nginx's
    balancing, passive health, next-upstream retries and upstream TLS, as a
    client endpoint.

    @ivar prefix: C{"tlsrelay-pool"}.
    """

    prefix = "tlsrelay-pool"

    def parseStreamClient(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> TLSRelayPoolEndpoint:
        """
        Build the endpoint: the group, balancer, retries and upstream TLS from
        the keywords (see C{docs/endpoints.md}).  Certificates, keys and CA
        files are loaded now; host names are resolved at the first connection.

        @param reactor: the reactor the pool connects, resolves and times with.

        @raise ValueError: for a positional argument, an unknown keyword, a bad
            value, or a file that cannot be loaded.
        """
        import random

        from twisted.internet.interfaces import IReactorTime

        from tlsrelay.endpoints import TLSRelayPoolEndpoint

        args = tuple(arg for arg in args if _text(arg))
        if args:
            raise _poolFail(
                f'unexpected argument "{_text(args[0])}": {self.prefix}: takes'
                " only keywords; give the servers as servers=host\\:port,..."
            )
        group, proxy, hashKey = poolFromKeywords(kwargs)
        if not IReactorTime.providedBy(reactor):
            raise TypeError(f"{_POOL_PREFIX}: the reactor must provide IReactorTime")
        try:
            return TLSRelayPoolEndpoint.fromGroup(
                IReactorTime(reactor), group, proxy, random.SystemRandom(), hashKey
            )
        except ValueError as e:
            hint = ""
            key = proxy.tls.certificateKey
            if "key" in str(e) and key is not None and key == proxy.tls.certificate:
                hint = (
                    " (without certificateKey=, the key must be in the"
                    " certificate file)"
                )
            raise _poolFail(f"{e}{hint}") from None
