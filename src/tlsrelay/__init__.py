"""
tlsrelay: nginx's stream and http TLS features on Twisted and pyOpenSSL.
"""

from tlsrelay._version import __version__

__all__ = ["__version__"]
