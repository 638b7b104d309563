"""Per-instance state shared by all connections of one listener: settings, policy, counters."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pymmproxy.logsetup import RateLimiter, get_logger
from pymmproxy.policy import AllowList
from pymmproxy.settings import Endpoint, InstanceSettings


@dataclass(slots=True)
class Stats:
    """Plain counters (cheap to bump); the metrics module reads them on scrape."""

    accepted: int = 0
    active: int = 0
    pending_headers: int = 0
    relayed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)


class InstanceContext:
    """What every connection of an instance needs, resolved once at start-up."""

    def __init__(self, settings: InstanceSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.allow = AllowList(settings.allowed)
        self.mark = settings.mark
        limits = settings.limits
        self.header_timeout = limits.header_timeout
        self.connect_timeout = limits.connect_timeout
        self.idle_timeout = limits.idle_timeout
        self.max_connections = limits.max_connections
        self.target4 = _addr(settings.target4)
        self.target6 = _addr(settings.target6)
        self.stats = Stats()
        self.conns: set[Any] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.log = get_logger(instance=settings.name) if settings.name else get_logger()
        self.verbosity = 0
        self._limiter = RateLimiter()

    def local_target(self, lb_is_v6: bool) -> tuple[socket.AddressFamily, tuple[str, int]] | None:
        """Target for LOCAL / UNKNOWN headers: the LB's family if it has a target."""
        order = (self.target6, self.target4) if lb_is_v6 else (self.target4, self.target6)
        for target in order:
            if target is not None:
                return (socket.AF_INET6 if ":" in target[0] else socket.AF_INET), target
        return None

    def opened(self, conn: object) -> None:
        self.conns.add(conn)
        self.stats.active += 1
        self.idle.clear()

    def closed(self, conn: object) -> None:
        self.conns.discard(conn)
        self.stats.active -= 1
        if not self.conns:
            self.idle.set()

    def reject(self, reason: str, peer: Any, **fields: Any) -> None:  # noqa: ANN401
        """Count a refused connection and log it (rate-limited below -v 1)."""
        self.stats.rejected[reason] += 1
        self._warn("conn.rejected", reason=reason, lb=_fmt(peer), **fields)

    def failed(self, reason: str, peer: Any, **fields: Any) -> None:  # noqa: ANN401
        """Count a connection that failed after acceptance and log it."""
        self.stats.errors[reason] += 1
        self._warn("conn.failed", reason=reason, lb=_fmt(peer), **fields)

    def _warn(self, event: str, **fields: Any) -> None:  # noqa: ANN401
        if self.verbosity >= 1 or self._limiter.allow():
            self.log.warning(event, **fields)

    def flush_suppressed(self) -> None:
        """Log how many error lines the rate limiter dropped (called periodically)."""
        count = self._limiter.take_suppressed()
        if count:
            self.log.warning("log.suppressed", count=count)


def _addr(endpoint: Endpoint | None) -> tuple[str, int] | None:
    return None if endpoint is None else (endpoint.host, endpoint.port)


def _fmt(peer: Any) -> str:  # noqa: ANN401
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer)
