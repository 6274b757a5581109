"""
Session resumption state that outlives one configuration and is shared between
processes: ticket-key sets (C{ssl_session_ticket_key} files, or keys tlsrelay
generates and rotates) and C{shared:NAME:SIZE} session caches.

One L{SessionSharing} lives for the whole run of a process and hands each server
context the key set and cache its settings name, making them the first time and
reusing them on reload (so a reload never invalidates issued tickets).  Its role
decides how: a single process owns everything; a master owns and publishes
(ticket keys as files, caches as SQLite files) in a private instance directory;
a worker follows what its master publishes there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any, Literal

from OpenSSL import SSL
from twisted.application.service import MultiService

from tlsrelay import _openssl
from tlsrelay._config._errors import ConfigError
from tlsrelay._config._model import ServerTLS, Where
from tlsrelay._log import Logger
from tlsrelay._sessioncache import (
    CheckpointService,
    SharedSessionCache,
    cachePath,
    makeInstanceDirectory,
)
from tlsrelay._tickets import TicketKeyRotationService, ticketKeyDirectory

log = Logger()

Role = Literal["single", "master", "worker", "check"]
Keys = Callable[[], tuple[_openssl.TicketKey, Sequence[_openssl.TicketKey]]]


class SessionSharing(MultiService):
    """
    The ticket-key services and shared caches of one process, by settings.

    @ivar directory: the instance directory (made on first need, except in a
        worker, which is given its master's).
    """

    def __init__(
        self,
        reactor: Any,
        role: Role = "single",
        directory: str | None = None,
        randomBytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reactor = reactor
        self.role = role
        self.directory = directory
        self.randomBytes = randomBytes
        self.ticketServices: dict[tuple[Any, ...], TicketKeyRotationService] = {}
        self.caches: dict[tuple[str, int], SharedSessionCache] = {}
        self._selfTested = False
        self._ownsDirectory = False

    def _instanceDirectory(self) -> str:
        if self.directory is None:
            self.directory = makeInstanceDirectory()
            self._ownsDirectory = True
        return self.directory

    def _selfTest(self, where: Where | None) -> None:
        if self._selfTested:
            return
        try:
            _openssl.selfTest()
        except _openssl.OpenSSLUnavailable as e:
            raise ConfigError(
                f"ticket keys and shared session caches need OpenSSL entry points "
                f"that cannot be used here: {e}",
                where.file if where else None,
                where.line if where else None,
            ) from None
        self._selfTested = True

    def install(
        self,
        context: SSL.Context,
        tls: ServerTLS,
        sessionIdContext: bytes,
        where: Where | None,
    ) -> None:
        """
        Give C{context} its ticket keys (when tickets are on) and its shared
        cache (for C{shared:NAME:SIZE}).
        """
        if tls.sessionTickets:
            if tls.ticketKeyFiles or self.role in ("master", "worker"):
                self._selfTest(where)
            keys = self.ticketKeys(tls, where)
            if keys is not None:
                _openssl.installTicketKeys(
                    context, keys, sessionIdContext=sessionIdContext
                )
        if tls.sessionCache.mode == "shared":
            self._selfTest(where)
            store = self.sessionCache(tls, where)
            if store is not None:
                _openssl.installSessionStore(
                    context, store, sessionIdContext=sessionIdContext
                )

    def ticketKeys(self, tls: ServerTLS, where: Where | None) -> Keys | None:
        """
        The C{keys} callable of the key set C{tls} names; L{None} when OpenSSL's
        own per-process keys will do (one process, no key files).
        """
        key = (tls.ticketKeyFiles, tls.sessionTimeout, tls.ticketKeyRotation)
        service = self.ticketServices.get(key)
        if service is None:
            service = self._makeTicketService(tls, where)
            if service is None:
                return None
            self.ticketServices[key] = service
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
        return service.keys

    def _makeTicketService(
        self, tls: ServerTLS, where: Where | None
    ) -> TicketKeyRotationService | None:
        clock = self.reactor
        files = tls.ticketKeyFiles
        lifetime = tls.sessionTimeout
        interval = tls.ticketKeyRotation
        try:
            if self.role == "worker":
                directory = ticketKeyDirectory(
                    self._instanceDirectory(), files, lifetime, interval
                )
                return TicketKeyRotationService.following(directory, clock=clock)
            publishTo = (
                ticketKeyDirectory(self._instanceDirectory(), files, lifetime, interval)
                if self.role == "master"
                else None
            )
            if files:
                return TicketKeyRotationService.fromFiles(
                    files, clock=clock, publishTo=publishTo
                )
            if self.role == "check":
                return None
            return TicketKeyRotationService.generating(
                clock=clock,
                randomBytes=self.randomBytes,
                lifetime=lifetime,
                interval=interval,
                publishTo=publishTo,
            )
        except (ValueError, OSError) as e:
            raise ConfigError(
                str(e), where.file if where else None, where.line if where else None
            ) from None

    def sessionCache(
        self, tls: ServerTLS, where: Where | None
    ) -> SharedSessionCache | None:
        """
        The shared cache C{shared:NAME:SIZE} names (L{None} when only checking).
        """
        if self.role == "check":
            return None
        cache = tls.sessionCache
        capacity = cache.sessionLimit()
        key = (cache.sharedName, capacity)
        store = self.caches.get(key)
        if store is not None:
            return store
        path = cachePath(self._instanceDirectory(), cache.sharedName, capacity)
        try:
            if self.role == "worker":
                store = SharedSessionCache.open(path, now=self.reactor.seconds)
            else:
                store = SharedSessionCache.create(
                    path, capacity, now=self.reactor.seconds, name=cache.sharedName
                )
                CheckpointService(store, self.reactor).setServiceParent(self)  # type: ignore[no-untyped-call]
        except ValueError as e:
            raise ConfigError(
                str(e), where.file if where else None, where.line if where else None
            ) from None
        self.caches[key] = store
        return store

    def reload(self) -> None:
        """
        SIGHUP: read ticket key files again.
        """
        for service in self.ticketServices.values():
            service.reload()

    def stopService(self) -> Any:
        result = super().stopService()  # type: ignore[no-untyped-call]
        for store in self.caches.values():
            store.close()
        if self._ownsDirectory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        return result
