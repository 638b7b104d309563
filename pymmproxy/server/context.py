"""Per-instance state shared by all connections of one listener: settings, policy, counters."""

from __future__ import annotations

import asyncio
import socket
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymmproxy.errors import UpstreamError
from pymmproxy.logsetup import RateLimiter, get_logger
from pymmproxy.net.reactor import Reactor
from pymmproxy.net.relay import endpoint
from pymmproxy.policy import AllowList, SourcePolicy
from pymmproxy.settings import Endpoint, InstanceSettings, Transport

IDLE_CHECKS = 4  # the idle sweep runs every idle_timeout / IDLE_CHECKS seconds
#: ``Stats.versions`` keys: by version for spoofed headers; LOCAL/UNKNOWN ones by (version, command)
VERSION_KEYS = ("v0", "v1", "v2")
LOCAL_KEYS = {(1, 1): "v1-unknown", (2, 0): "v2-local", (2, 1): "v2-unspec"}


class Histogram:
    """Fixed buckets (Prometheus ``le`` bounds, +Inf last) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


@dataclass(slots=True)
class Stats:
    """Plain counters (cheap to bump); the metrics module reads them on scrape.

    The histograms exist only with ``--metrics``; without it nothing is observed.
    """

    accepted: int = 0
    active: int = 0
    pending_headers: int = 0
    relayed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)  # see VERSION_KEYS, LOCAL_KEYS
    header_errors: Counter[str] = field(default_factory=Counter)  # by ProtocolError.kind
    sources_refused: Counter[str] = field(default_factory=Counter)  # by SourcePolicy kind
    header_wait: Histogram | None = None  # accept -> complete header, seconds
    connect_time: Histogram | None = None  # connect() -> target connected, seconds


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
        self.keepalive = limits.keepalive
        self.max_connections = limits.max_connections
        self.max_pending_headers = limits.max_pending_headers
        self.max_header_size = limits.max_header_size
        self.target4 = _addr(settings.target4)
        self.target6 = _addr(settings.target6)
        self.stats = Stats()
        self.conns: set[Any] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.log = get_logger(instance=settings.name) if settings.name else get_logger()
        self.verbosity = 0
        self._limiter = RateLimiter()
        self.sources: SourcePolicy | None = None
        if limits.allow_any_source:
            self.log.warning("daemon.unsafe", allow_any_source=True)
        else:
            self.sources = SourcePolicy.for_host(settings.listen.host)
        self.metrics: Any = None
        # Called with the error when a connection found no descriptor for its target: the
        # TCP listener stops accepting for a moment (see Acceptor.pause).
        self.on_exhausted: Callable[[str], None] | None = None
        self._reactor: Reactor | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        if settings.metrics is not None:  # first: it may fail (a taken port), leaving nothing
            from pymmproxy.metrics import attach  # noqa: PLC0415 - prometheus_client on demand

            self.metrics = attach(self, settings.metrics)
        if self.idle_timeout > 0 and settings.transport is Transport.TCP:
            self._sweeper = loop.call_later(self.idle_timeout / IDLE_CHECKS, self._sweep)

    @property
    def reactor(self) -> Reactor:
        """The epoll set of this instance's TCP sockets (made on first use)."""
        if self._reactor is None:
            self._reactor = Reactor(self.loop)
        return self._reactor

    @property
    def timed(self) -> bool:
        """Whether connections need their accept time (``-v 2`` logs or header histogram)."""
        return self.verbosity >= 2 or self.stats.header_wait is not None

    def local_target(self, lb_is_v6: bool) -> tuple[socket.AddressFamily, tuple[str, int]] | None:
        """Target for LOCAL / UNKNOWN headers (see :func:`local_target`)."""
        return local_target(self.target4, self.target6, lb_is_v6)

    def refresh_own_addresses(self) -> None:
        """Re-read this host's addresses for the source policy (e.g. on SIGHUP)."""
        if self.sources is not None:
            self.sources = SourcePolicy.for_host(self.settings.listen.host)

    def opened(self, conn: object) -> None:
        self.conns.add(conn)
        self.stats.active += 1
        self.idle.clear()

    def closed(self, conn: Any) -> None:  # noqa: ANN401 - a tcp.ClientProtocol
        """Forget a connection, add its byte counts, log ``conn.closed`` at ``-v 2``."""
        self.conns.discard(conn)
        stats = self.stats
        stats.active -= 1
        stats.bytes_up += conn.bytes_up
        stats.bytes_down += conn.bytes_down
        if not self.conns:
            self.idle.set()
        if self.verbosity >= 2:
            self.log.info(
                "conn.closed",
                lb=endpoint(conn.peer),
                client=conn.source,
                target=endpoint(conn.target),
                mark=self.mark,
                bytes_in=conn.bytes_up,
                bytes_out=conn.bytes_down,
                duration=round(time.monotonic() - conn.started, 6),
                reason=conn.reason,
            )

    def reject(self, reason: str, peer: Any, **fields: Any) -> None:  # noqa: ANN401
        """Count a refused connection and log it (rate-limited below -v 1)."""
        self.stats.rejected[reason] += 1
        self._warn("conn.rejected", reason=reason, lb=endpoint(peer), **fields)

    def failed(self, reason: str, peer: Any, **fields: Any) -> None:  # noqa: ANN401
        """Count a connection that failed after acceptance and log it."""
        self.stats.errors[reason] += 1
        self._warn("conn.failed", reason=reason, lb=endpoint(peer), **fields)

    def _warn(self, event: str, **fields: Any) -> None:  # noqa: ANN401
        if self.verbosity >= 1 or self._limiter.allow():
            self.log.warning(event, **fields)

    def flush_suppressed(self) -> None:
        """Log how many error lines the rate limiter dropped (called periodically)."""
        count = self._limiter.take_suppressed()
        if count:
            self.log.warning("log.suppressed", count=count)

    def _sweep(self) -> None:
        """One pass of the idle timeout over the open connections (no per-chunk timers)."""
        self._sweeper = self.loop.call_later(self.idle_timeout / IDLE_CHECKS, self._sweep)
        for conn in list(self.conns):
            conn.idle_check()

    def close(self) -> None:
        """Stop the idle sweep, the reactor and the metrics endpoint (the listener is gone)."""
        if self._reactor is not None:
            self._reactor.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.metrics is not None:
            self.metrics.detach(self)
            self.metrics = None


def _addr(endpoint: Endpoint | None) -> tuple[str, int] | None:
    return None if endpoint is None else (endpoint.host, endpoint.port)


def local_target(
    target4: tuple[str, int] | None, target6: tuple[str, int] | None, lb_is_v6: bool
) -> tuple[socket.AddressFamily, tuple[str, int]] | None:
    """Target for LOCAL / UNKNOWN headers: the LB's own family first, else the other."""
    order = (target6, target4) if lb_is_v6 else (target4, target6)
    for target in order:
        if target is not None:
            return (socket.AF_INET6 if ":" in target[0] else socket.AF_INET), target
    return None


def pick_target(
    source: tuple[str, int] | None,
    target4: tuple[str, int] | None,
    target6: tuple[str, int] | None,
    *,
    lb_host: str,
) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """Upstream family and target: the header's source family picks ``-4``/``-6`` (not the
    load balancer's); LOCAL/UNKNOWN (``source`` None) try the LB's family first.

    Raises :class:`UpstreamError` when that family has no target.
    """
    if source is None:
        lb_is_v6 = ":" in lb_host and not lb_host.startswith("::ffff:")
        chosen = local_target(target4, target6, lb_is_v6)
        if chosen is None:
            raise UpstreamError("no target configured")
        return chosen
    if ":" in source[0]:
        if target6 is None:
            raise UpstreamError(f"IPv6 client {source[0]} but no -6 target configured")
        return socket.AF_INET6, target6
    if target4 is None:
        raise UpstreamError(f"IPv4 client {source[0]} but no -4 target configured")
    return socket.AF_INET, target4
