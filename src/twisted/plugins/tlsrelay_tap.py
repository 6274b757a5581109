from twisted.application.service import ServiceMaker

tlsrelay = ServiceMaker(
    "tlsrelay", "tlsrelay.tap", "nginx-compatible TLS relay", "tlsrelay"
)
