from tlsrelay._parsers import TLSRelayServerParser

tlsrelayServerParser = TLSRelayServerParser()
