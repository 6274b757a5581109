"""
The built-in demo (C{twistd -n tlsrelay} with no C{--config}): a throwaway CA and
certificate, a local echo upstream, and a configuration that terminates TLS in front
of it, written to a temporary directory so the operator can read and copy it.
"""

from __future__ import annotations

import os
import socket
import tempfile

import trustme
from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.wire import Echo

DEMO_PORT = 8443

CONFIG = """\
# tlsrelay demo configuration: nginx syntax, as in nginx's stream guides.
daemon off;
pid relay.pid;

stream {{
    log_format demo '$remote_addr $ssl_protocol $ssl_cipher reused=$ssl_session_reused '
                    'upstream=$upstream_addr sent=$bytes_sent received=$bytes_received '
                    'time=$session_time';

    upstream echo_backend {{
        server 127.0.0.1:{echoPort};
    }}

    server {{
        listen                127.0.0.1:{port} ssl;
        proxy_pass            echo_backend;

        ssl_certificate       server.pem;
        ssl_certificate_key   server.key;
        ssl_protocols         TLSv1.2 TLSv1.3;
        ssl_session_cache     shared:SSL:1m;
        ssl_session_timeout   4h;
        ssl_handshake_timeout 30s;
        access_log            access.log demo;
    }}

    server {{
        listen                127.0.0.1:{infoPort} ssl;
        ssl_certificate       server.pem;
        ssl_certificate_key   server.key;
        return                "$ssl_protocol $ssl_cipher reused=$ssl_session_reused\\n";
    }}
}}
"""


def _freePort(preferred: int) -> int:
    for port in (preferred, 0):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        else:
            return int(probe.getsockname()[1])
        finally:
            probe.close()
    raise OSError("no free port on 127.0.0.1")


class EchoService(Service):
    """
    The demo's upstream: echoes bytes back, on a socket bound before the config is
    written.
    """

    def __init__(self, reactor: object, sock: socket.socket) -> None:
        self.reactor = reactor
        self.socket = sock
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        factory = Factory.forProtocol(Echo)
        self.port = self.reactor.adoptStreamPort(  # type: ignore[attr-defined]
            self.socket.fileno(), socket.AF_INET, factory
        )
        self.socket.close()

    def stopService(self) -> object:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.port is not None:
            return self.port.stopListening()
        return None


def makeDemo(reactor: object) -> tuple[str, EchoService, str]:
    """
    Write the demo files; return the config path, the echo service and the text to
    print.
    """
    directory = tempfile.mkdtemp(prefix="tlsrelay-demo-")
    ca = trustme.CA(organization_name="tlsrelay demo CA")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(os.path.join(directory, "server.key"))
    cert.cert_chain_pems[0].write_to_path(os.path.join(directory, "server.pem"))
    ca.cert_pem.write_to_path(os.path.join(directory, "ca.pem"))

    echo = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    echo.bind(("127.0.0.1", 0))
    echo.listen(128)
    echo.setblocking(False)
    echoPort = echo.getsockname()[1]
    port = _freePort(DEMO_PORT)
    infoPort = _freePort(port + 1)
    path = os.path.join(directory, "relay.conf")
    with open(path, "w") as f:
        f.write(CONFIG.format(echoPort=echoPort, port=port, infoPort=infoPort))
    caPath = os.path.join(directory, "ca.pem")
    banner = f"""
tlsrelay demo
  config:    {path}
  upstream:  echo server on 127.0.0.1:{echoPort} (plain TCP)
  TLS relay: 127.0.0.1:{port} -> echo_backend; access log {directory}/access.log

Try:
  openssl s_client -connect 127.0.0.1:{port} -CAfile {caPath} -quiet     (type, see it echoed)
  openssl s_client -connect 127.0.0.1:{infoPort} -CAfile {caPath} -quiet     (prints TLS facts)
  twistd -n tlsrelay --config {path} --check

Stop with Ctrl-C.
"""
    return path, EchoService(reactor, echo), banner
