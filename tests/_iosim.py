"""
The one place that imports from C{twisted.test.iosim}, which is not a public API.
"""

from twisted.test.iosim import (
    FakeTransport,
    IOPump,
    connect,
    connectedServerAndClient,
)

__all__ = ["FakeTransport", "IOPump", "connect", "connectedServerAndClient"]
