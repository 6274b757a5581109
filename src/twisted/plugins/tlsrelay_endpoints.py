from tlsrelay._parsers import TLSRelayPoolParser, TLSRelayServerParser

tlsrelayServerParser = TLSRelayServerParser()
tlsrelayPoolParser = TLSRelayPoolParser()
