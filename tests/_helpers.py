"""
Test doubles and small helpers shared by several test modules: name
resolution that completes when told, and closing TLS connections cleanly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from zope.interface import implementer


@implementer(IHostResolution)
class Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class FakeResolver:
    """
    A name resolver with fixed answers, completing when told.

    @ivar asked: C{(hostName, portNumber, addressTypes)} of each question.
    @ivar receivers: C{(receiver, hostName)} of each question not answered yet.
    """

    def __init__(self, answers: dict[str, Sequence[IAddress]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int, Any]] = []
        self.receivers: list[tuple[IResolutionReceiver, str]] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append((hostName, portNumber, addressTypes))
        self.receivers.append((resolutionReceiver, hostName))
        resolution = Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        return resolution

    def finish(self) -> None:
        """
        Answer every pending question.
        """
        receivers, self.receivers = self.receivers, []
        for receiver, name in receivers:
            for address in self.answers.get(name, []):
                receiver.addressResolved(address)
            receiver.resolutionComplete()


def closeCleanly(*connections: SSL.Connection) -> None:
    """
    Send close_notify, so OpenSSL does not mark the session bad when the
    connection is freed.
    """
    for connection in connections:
        try:
            connection.shutdown()
        except SSL.Error:
            pass
