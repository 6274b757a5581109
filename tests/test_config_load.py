"""
Tests for L{tlsrelay._config._load}: directive table, contexts, arity, inheritance,
cross-checks and their messages with file and line.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.trial.unittest import SynchronousTestCase

from tlsrelay._config._errors import ConfigError
from tlsrelay._config._load import loadConfig
from tlsrelay._config._model import Address, Config

SERVER_BLOCK = """
    server {
        listen 127.0.0.1:12345;
        proxy_pass 127.0.0.1:9000;
    }
"""


class LoadMixin:
    """
    Write a configuration to a temporary directory and load it.
    """

    _dir: str

    if TYPE_CHECKING:

        def mktemp(self) -> str: ...

    def write(self, text: str, name: str = "relay.conf") -> str:
        directory = getattr(self, "_dir", None)
        if directory is None:
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            self._dir = directory
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def load(self, text: str) -> Config:
        return loadConfig(self.write(text))


class ErrorTests(LoadMixin, SynchronousTestCase):
    """
    Every configuration error names the file and the line, in nginx's words.
    """

    def assertError(self, text: str, message: str, line: int) -> ConfigError:
        error: ConfigError = self.assertRaises(ConfigError, self.load, text)
        self.assertEqual(error.message, message)
        self.assertEqual(error.line, line)
        self.assertEqual(error.file, os.path.join(self._dir, "relay.conf"))
        self.assertEqual(
            str(error), f"{message} in {os.path.join(self._dir, 'relay.conf')}:{line}"
        )
        return error

    def test_unknownDirective(self) -> None:
        self.assertError(
            "stream {\n  server {\n    ssl_foo on;\n  }\n}\n",
            'unknown directive "ssl_foo"',
            3,
        )

    def test_notAllowedHere(self) -> None:
        self.assertError(
            "stream {\n    proxy_pass 127.0.0.1:80;\n}\n",
            '"proxy_pass" directive is not allowed here',
            2,
        )

    def test_mainContextServer(self) -> None:
        self.assertError("listen 80;\n", '"listen" directive is not allowed here', 1)

    def test_wrongArity(self) -> None:
        self.assertError(
            "stream {\n  server {\n    listen 1234;\n    proxy_pass a b;\n  }\n}\n",
            'invalid number of arguments in "proxy_pass" directive',
            4,
        )

    def test_missingSemicolonIsArity(self) -> None:
        """
        A missing C{;} joins two directives into one with too many arguments, as
        seed 003 shows; nginx reports the first directive's line.
        """
        self.assertError(
            "stream {\n  server {\n    listen 1234;\n"
            "    ssl_certificate_key /etc/nginx/client.key\n"
            "    ssl_protocols TLSv1.2;\n"
            "    proxy_pass 127.0.0.1:80;\n  }\n}\n",
            'invalid number of arguments in "ssl_certificate_key" directive',
            4,
        )

    def test_missingBrace(self) -> None:
        error = self.assertRaises(
            ConfigError,
            self.load,
            "stream {\n  server {\n    listen 1234;\n    proxy_pass 127.0.0.1:80;\n}\n",
        )
        self.assertIn("unexpected end of file", error.message)

    def test_invalidValue(self) -> None:
        self.assertError(
            "stream {\n  ssl_session_timeout forever;\n" + SERVER_BLOCK + "}\n",
            'invalid value "forever" in "ssl_session_timeout" directive',
            2,
        )

    def test_invalidFlag(self) -> None:
        self.assertError(
            "stream {\n  proxy_half_close yes;\n" + SERVER_BLOCK + "}\n",
            'invalid value "yes" in "proxy_half_close" directive, it must be "on" '
            'or "off"',
            2,
        )

    def test_invalidProtocol(self) -> None:
        self.assertError(
            "stream {\n  ssl_protocols TLSv1.2 TLSv9;\n" + SERVER_BLOCK + "}\n",
            'invalid value "TLSv9" in "ssl_protocols" directive',
            2,
        )

    def test_duplicateDirective(self) -> None:
        self.assertError(
            "stream {\n  proxy_timeout 1s;\n  proxy_timeout 2s;\n"
            + SERVER_BLOCK
            + "}\n",
            '"proxy_timeout" directive is duplicate',
            3,
        )

    def test_duplicateListen(self) -> None:
        self.assertError(
            "stream {\n  server {\n    listen 127.0.0.1:1234;\n"
            "    proxy_pass 127.0.0.1:80;\n  }\n  server {\n"
            "    listen 127.0.0.1:1234;\n    proxy_pass 127.0.0.1:81;\n  }\n}\n",
            'duplicate "127.0.0.1:1234" address and port pair',
            7,
        )

    def test_unknownGroup(self) -> None:
        self.assertError(
            "stream {\n  server {\n    listen 1234;\n    proxy_pass backend;\n  }\n}\n",
            'no upstream "backend" is defined (and "backend" has no port) in '
            '"proxy_pass"',
            4,
        )

    def test_badTicketKeyRotation(self) -> None:
        self.assertError(
            "stream {\n  ssl_session_ticket_key_rotation soon;\n"
            + SERVER_BLOCK
            + "}\n",
            'invalid value "soon" in "ssl_session_ticket_key_rotation" directive',
            2,
        )

    def test_badMultiAccept(self) -> None:
        self.assertError(
            "events { multi_accept yes; }\nstream {\n" + SERVER_BLOCK + "}\n",
            'invalid value "yes" in "multi_accept" directive, it must be "on" or "off"',
            1,
        )

    def test_unsupportedDirective(self) -> None:
        self.assertError(
            "stream {\n" + SERVER_BLOCK + "  ssl_stapling on;\n}\n",
            '"ssl_stapling" directive is not supported yet',
            7,
        )

    def test_httpNotYet(self) -> None:
        self.assertError(
            "http {\n}\n",
            '"http" directive is not supported yet (planned in the HTTP issue)',
            1,
        )

    def test_sslListenWithoutCertificate(self) -> None:
        self.assertError(
            "stream {\n  server {\n    listen 1234 ssl;\n"
            "    proxy_pass 127.0.0.1:80;\n  }\n}\n",
            'no "ssl_certificate" is defined for the "listen ... ssl" directive',
            3,
        )

    def test_certificateWithoutKey(self) -> None:
        error = self.assertRaises(
            ConfigError,
            self.load,
            "stream {\n  server {\n    listen 1234 ssl;\n"
            "    ssl_certificate a.pem;\n    proxy_pass 127.0.0.1:80;\n  }\n}\n",
        )
        self.assertEqual(
            error.message,
            'no "ssl_certificate_key" is defined for certificate '
            f'"{os.path.join(self._dir, "a.pem")}"',
        )
        self.assertEqual(error.line, 4)

    def test_noHandler(self) -> None:
        self.assertError(
            "stream {\n  server {\n    listen 1234;\n  }\n}\n",
            'no handler for server: "proxy_pass" or "return" is required',
            2,
        )

    def test_returnAndProxyPass(self) -> None:
        self.assertError(
            "stream {\n  server {\n    listen 1234;\n    return x;\n"
            "    proxy_pass 127.0.0.1:80;\n  }\n}\n",
            '"proxy_pass" directive is duplicate',
            5,
        )

    def test_noListen(self) -> None:
        self.assertError(
            "stream {\n  server {\n    proxy_pass 127.0.0.1:80;\n  }\n}\n",
            'no "listen" is defined for server',
            2,
        )

    def test_emptyUpstream(self) -> None:
        self.assertError(
            "stream {\n  upstream b {\n  }\n" + SERVER_BLOCK + "}\n",
            'no servers are inside upstream "b"',
            2,
        )

    def test_badUpstreamParameter(self) -> None:
        self.assertError(
            "stream {\n  upstream b {\n    server 127.0.0.1:1 weight=0;\n  }\n"
            + SERVER_BLOCK
            + "}\n",
            'invalid value "0" in "server" directive',
            3,
        )

    def test_unknownVariable(self) -> None:
        self.assertError(
            "stream {\n  server {\n    listen 1234;\n    return $nope;\n  }\n}\n",
            'unknown "nope" variable',
            4,
        )

    def test_unknownLogFormat(self) -> None:
        self.assertError(
            "stream {\n  access_log a.log fancy;\n" + SERVER_BLOCK + "}\n",
            'unknown log format "fancy"',
            2,
        )

    def test_invalidPort(self) -> None:
        self.assertError(
            "stream {\n  server {\n    listen 99999;\n    return x;\n  }\n}\n",
            'invalid port in "99999"',
            3,
        )

    def test_errorInInclude(self) -> None:
        """
        An error in an included file names that file and its own line.
        """
        self.write("\n\nssl_bogus on;\n", "extra.conf")
        error = self.assertRaises(
            ConfigError,
            self.load,
            "stream {\n  include extra.conf;\n" + SERVER_BLOCK + "}\n",
        )
        self.assertEqual(error.file, os.path.join(self._dir, "extra.conf"))
        self.assertEqual(error.line, 3)


class ModelTests(LoadMixin, SynchronousTestCase):
    """
    What a valid configuration becomes.
    """

    def test_seed000(self) -> None:
        """
        Seed 000's complete example loads (paths made real): three servers, the
        listed protocols, a 20m shared cache, 4h timeout, 30s handshake timeout.
        """
        config = self.load(
            """
stream {
    upstream stream_backend {
         server 127.0.0.1:12346;
         server 127.0.0.1:12347;
         server localhost:12348;
    }

    server {
        listen                12345 ssl;
        proxy_pass            stream_backend;

        ssl_certificate       server.crt;
        ssl_certificate_key   /etc/ssl/certs/server.key;
        ssl_protocols         SSLv3 TLSv1 TLSv1.1 TLSv1.2;
        ssl_ciphers           HIGH:!aNULL:!MD5;
        ssl_session_cache     shared:SSL:20m;
        ssl_session_timeout   4h;
        ssl_handshake_timeout 30s;
        #...
     }
}
"""
        )
        [group] = config.upstreams
        self.assertEqual(
            [s.address for s in group.servers],
            [
                Address("tcp", "127.0.0.1", 12346),
                Address("tcp", "127.0.0.1", 12347),
                Address("tcp", "localhost", 12348),
            ],
        )
        [server] = config.servers
        self.assertEqual(server.listens[0].address, Address("tcp", "0.0.0.0", 12345))
        self.assertTrue(server.listens[0].ssl)
        tls = server.tls
        self.assertEqual(tls.protocols, ("SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2"))
        self.assertEqual(tls.sessionCache.mode, "shared")
        self.assertEqual(tls.sessionCache.sharedSize, 20 * 1024 * 1024)
        self.assertEqual(tls.sessionCache.sessionLimit(), 80000)
        self.assertEqual(tls.sessionTimeout, 4 * 3600)
        self.assertEqual(tls.handshakeTimeout, 30)
        # Relative paths resolve against the configuration's directory.
        self.assertEqual(
            tls.certificates[0].certificate, os.path.join(self._dir, "server.crt")
        )
        self.assertEqual(tls.certificates[0].key, "/etc/ssl/certs/server.key")

    def test_defaults(self) -> None:
        """
        Unset settings take nginx's defaults (protocols: our safer default).
        """
        config = self.load("stream {\n" + SERVER_BLOCK + "}\n")
        [server] = config.servers
        self.assertEqual(server.tls.protocols, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(server.tls.handshakeTimeout, 60)
        self.assertEqual(server.tls.sessionTimeout, 300)
        self.assertEqual(server.tls.sessionCache.mode, "none")
        self.assertTrue(server.tls.sessionTickets)
        self.assertEqual(server.proxy.connectTimeout, 60)
        self.assertEqual(server.proxy.timeout, 600)
        self.assertTrue(server.proxy.nextUpstream)
        self.assertEqual(config.workerConnections, 512)
        self.assertTrue(config.daemon)

    def test_inheritance(self) -> None:
        """
        C{ssl_*} and C{proxy_*} set in C{stream} apply to every server unless the
        server sets its own; array directives (certificates) are inherited whole.
        """
        config = self.load(
            """
stream {
    ssl_certificate a.pem;
    ssl_certificate_key a.key;
    ssl_protocols TLSv1.3;
    proxy_timeout 5s;
    server {
        listen 1001 ssl;
        return x;
    }
    server {
        listen 1002 ssl;
        ssl_protocols TLSv1.2;
        ssl_certificate b.pem;
        ssl_certificate_key b.key;
        ssl_certificate c.pem;
        ssl_certificate_key c.key;
        proxy_timeout 7s;
        return y;
    }
}
"""
        )
        first, second = config.servers
        self.assertEqual(first.tls.protocols, ("TLSv1.3",))
        self.assertEqual(second.tls.protocols, ("TLSv1.2",))
        self.assertEqual(first.proxy.timeout, 5)
        self.assertEqual(second.proxy.timeout, 7)
        self.assertEqual(
            [os.path.basename(p.certificate) for p in first.tls.certificates], ["a.pem"]
        )
        self.assertEqual(
            [
                (os.path.basename(p.certificate), os.path.basename(p.key))
                for p in second.tls.certificates
            ],
            [("b.pem", "b.key"), ("c.pem", "c.key")],
        )

    def test_listenParameters(self) -> None:
        config = self.load(
            "stream {\n  server {\n"
            "    listen [::1]:1234 ssl backlog=64 reuseport so_keepalive=30s:10s:3;\n"
            "    listen unix:/tmp/relay.sock;\n"
            "    ssl_certificate a.pem; ssl_certificate_key a.key;\n"
            "    return x;\n  }\n}\n"
        )
        first, second = config.servers[0].listens
        self.assertEqual(first.address, Address("tcp", "::1", 1234))
        self.assertTrue(first.ssl)
        self.assertEqual(first.backlog, 64)
        self.assertTrue(first.reuseport)
        assert first.keepalive is not None
        self.assertEqual(
            (first.keepalive.idle, first.keepalive.interval, first.keepalive.count),
            (30, 10, 3),
        )
        self.assertEqual(second.address, Address("unix", path="/tmp/relay.sock"))

    def test_upstreamParameters(self) -> None:
        config = self.load(
            "stream {\n  upstream b {\n    hash $remote_addr consistent;\n"
            "    server 127.0.0.1:1 weight=5 max_fails=3 fail_timeout=30s;\n"
            "    server [::1]:2 max_conns=10 down;\n    server unix:/tmp/u.sock;\n"
            "  }\n  server {\n    listen 1;\n    proxy_pass b;\n  }\n}\n"
        )
        [group] = config.upstreams
        self.assertEqual(group.balancer.method, "hash")
        self.assertEqual(group.balancer.key, "$remote_addr")
        self.assertTrue(group.balancer.consistent)
        first, second, third = group.servers
        self.assertEqual(
            (first.weight, first.maxFails, first.failTimeout), (5, 3, 30.0)
        )
        self.assertEqual((second.maxConns, second.down), (10, True))
        self.assertEqual(second.address, Address("tcp", "::1", 2))
        self.assertEqual(third.address, Address("unix", path="/tmp/u.sock"))

    def test_mainContext(self) -> None:
        config = self.load(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
            "daemon off;\npid relay.pid;\nworker_processes 2;\n"
            "error_log logs/error.log info;\n"
            "events {\n  worker_connections 100;\n  multi_accept on;\n}\n"
            "stream {\n" + SERVER_BLOCK + "}\n"
        )
        self.assertFalse(config.daemon)
        self.assertTrue(config.multiAccept)
        self.assertEqual(config.pidFile, os.path.join(self._dir, "relay.pid"))
        self.assertEqual(config.workerProcesses, 2)
        self.assertEqual(config.workerConnections, 100)
        self.assertEqual(
            config.errorLogs[0].path, os.path.join(self._dir, "logs/error.log")
        )
        self.assertEqual(config.errorLogs[0].level, "info")

    def test_multiAcceptDefault(self) -> None:
        """
        C{multi_accept} is off unless set (nginx's default).
        """
        config = self.load("stream {\n" + SERVER_BLOCK + "}\n")
        self.assertFalse(config.multiAccept)

    def test_sessionCacheForms(self) -> None:
        for text, mode, limit in [
            ("off", "off", 0),
            ("none", "none", 0),
            ("builtin", "builtin", 20480),
            ("builtin:1000", "builtin", 1000),
            ("builtin:1000 shared:SSL:1m", "shared", 4000),
        ]:
            config = self.load(
                f"stream {{\n  ssl_session_cache {text};\n" + SERVER_BLOCK + "}\n"
            )
            cache = config.servers[0].tls.sessionCache
            self.assertEqual((cache.mode, cache.sessionLimit()), (mode, limit), text)

    def test_ticketKeys(self) -> None:
        """
        C{ssl_session_ticket_key} is repeatable and inherited as a whole, like
        nginx's array directives; relative paths resolve.
        """
        config = self.load(
            "stream {\n  ssl_session_ticket_key current.key;\n"
            "  ssl_session_ticket_key /keys/previous.key;\n" + SERVER_BLOCK + "}\n"
        )
        tls = config.servers[0].tls
        self.assertEqual(
            tls.ticketKeyFiles,
            (os.path.join(self._dir, "current.key"), "/keys/previous.key"),
        )
        generated = self.load(
            "stream {\n  ssl_session_ticket_key_rotation 1h;\n" + SERVER_BLOCK + "}\n"
        )
        self.assertEqual(generated.servers[0].tls.ticketKeyRotation, 3600)

    def test_accessLog(self) -> None:
        config = self.load(
            "stream {\n  log_format mine '$remote_addr '\n"
            "                    '$ssl_protocol';\n"
            "  access_log logs/a.log mine;\n" + SERVER_BLOCK + "}\n"
        )
        [log] = config.servers[0].accessLogs
        self.assertEqual(log.path, os.path.join(self._dir, "logs/a.log"))
        self.assertEqual(log.format, "$remote_addr $ssl_protocol")


class CrossCheckTests(LoadMixin, SynchronousTestCase):
    def test_wildcardAndSpecific(self) -> None:
        error = self.assertRaises(
            ConfigError,
            self.load,
            "stream {\n  server { listen 443; return a; }\n"
            "  server {\n    listen 127.0.0.1:443;\n    return b;\n  }\n}\n",
        )
        self.assertEqual(error.line, 4)
        self.assertIn('"127.0.0.1:443" and the wildcard "0.0.0.0:443"', error.message)

    def test_rotationWithFiles(self) -> None:
        error = self.assertRaises(
            ConfigError,
            self.load,
            "stream {\n  server {\n    listen 1;\n    ssl_session_ticket_key a.key;\n"
            "    ssl_session_ticket_key_rotation 1h;\n    return a;\n  }\n}\n",
        )
        self.assertEqual(error.line, 2)
        self.assertIn("rotate by replacing the files", error.message)
