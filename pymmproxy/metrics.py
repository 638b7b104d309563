"""Prometheus metrics (``--metrics ADDR:PORT``), off by default.

Nothing here runs per connection: the proxy bumps the plain counters of
:class:`~pymmproxy.server.context.Stats` and a custom collector turns them into metric
families when scraped. The endpoint is a small asyncio server in the proxy's own loop (no
thread); ``GET /metrics`` (or ``/``) returns the text exposition format.

With ``-listeners N`` every worker process serves its own counters on its own port: the
workers take the first free port of ``PORT .. PORT+N-1`` (scrape all N, sum in PromQL;
``process_*`` metrics tell the workers apart by pid). Several instances of one process
(``pymmproxy serve``) share one endpoint, labelled ``proxy="<name or listen address>"``.

With metrics on, two histograms are also kept: header wait (accept -> header complete) and
target connect latency, the latter measured by :class:`ConnectProbe` with one private epoll
set per instance (one ``epoll_ctl`` per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from pymmproxy.errors import PymmproxyError
from pymmproxy.logsetup import get_logger
from pymmproxy.net.sockets import listen_socket
from pymmproxy.server.context import Histogram
from pymmproxy.settings import Endpoint, Transport

if TYPE_CHECKING:
    from pymmproxy.server.context import InstanceContext, Stats

HEADER_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5, 5.0, 10.0)  # fmt: skip
CONNECT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0

_servers: dict[Endpoint, MetricsServer] = {}


def attach(ctx: InstanceContext, endpoint: Endpoint) -> MetricsServer:
    """Start observing ``ctx`` and serve it on ``endpoint`` (shared within a process)."""
    server = _servers.get(endpoint)
    if server is None or server.closed:
        server = _servers[endpoint] = MetricsServer(endpoint, ctx.loop, ctx.settings.listeners)
    ctx.stats.header_wait = Histogram(HEADER_WAIT_BUCKETS)
    ctx.stats.connect_time = Histogram(CONNECT_BUCKETS)
    server.contexts.append(ctx)
    return server


class MetricsServer:
    """The HTTP endpoint of one process and the contexts it reports."""

    def __init__(self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop, span: int) -> None:
        self.contexts: list[InstanceContext] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(self.contexts))
        ProcessCollector(registry=self.registry)
        self.closed = False
        sock, self.endpoint = _bind(endpoint, span)
        self._server: asyncio.AbstractServer | None = None
        self._starting = loop.create_task(self._start(sock))
        get_logger().info("metrics.listening", addr=str(self.endpoint), pid=os.getpid())

    async def _start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._handle, sock=sock, limit=MAX_REQUEST)

    def render(self) -> bytes:
        """The text exposition of every attached instance."""
        return generate_latest(self.registry)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = request.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method not in {b"GET", b"HEAD"}:
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path in {b"/metrics", b"/"}:
                status, body, ctype = "200 OK", self.render(), CONTENT_TYPE_LATEST
            else:
                status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
            writer.write(head.encode() + (b"" if method == b"HEAD" else body))
            await writer.drain()
        except (
            TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ConnectionError,
        ):  # fmt: skip
            pass  # a bad or vanished scraper: just hang up
        finally:
            writer.close()

    def detach(self, ctx: InstanceContext) -> None:
        """Stop reporting ``ctx``; the endpoint closes with its last instance."""
        with contextlib.suppress(ValueError):
            self.contexts.remove(ctx)
        if not self.contexts:
            self.close()

    def close(self) -> None:
        self.closed = True
        self._starting.cancel()
        if self._server is not None:
            self._server.close()


def check(endpoint: Endpoint, workers: int = 1) -> None:
    """PymmproxyError now if ``endpoint`` cannot be served, or with N workers any port of
    ``PORT..PORT+N-1`` (checked before starting or forking, so a taken port fails the
    command instead of a worker, or every instance that would report on it)."""
    if endpoint.port + workers - 1 > 65535:
        raise PymmproxyError(f"--metrics {endpoint}: {workers} workers need ports up to "
                             f"{endpoint.port + workers - 1}, past 65535")  # fmt: skip
    for port in range(endpoint.port, endpoint.port + max(workers, 1)):
        try:
            _bind(endpoint.at_port(port), 1)[0].close()
        except PymmproxyError as exc:
            if workers <= 1:
                raise PymmproxyError(f"--metrics: {exc}") from None
            raise PymmproxyError(
                f"{exc} (--metrics with {workers} workers takes ports {endpoint.port}.."
                f"{endpoint.port + workers - 1}, one each; -listeners 1 needs one)"
            ) from None


def _bind(endpoint: Endpoint, span: int) -> tuple[socket.socket, Endpoint]:
    """Listen on the first free port of ``endpoint.port .. +span-1`` (one per worker)."""
    last = min(endpoint.port + max(span, 1), 65536)
    for port in range(endpoint.port, last):
        candidate = endpoint.at_port(port)
        try:
            return listen_socket(candidate, backlog=64), candidate
        except PymmproxyError:
            if port == last - 1:
                raise
    raise PymmproxyError(f"cannot serve metrics on {endpoint}")  # pragma: no cover - span >= 1


class StatsCollector:
    """Turns the plain counters of the attached instances into metric families on scrape."""

    def __init__(self, contexts: list[InstanceContext]) -> None:
        self.contexts = contexts

    def collect(self) -> Iterator[Metric]:
        # One context per proxy label: while a restarted instance (serve, SIGHUP) drains its
        # old context beside the new one, only the newest is reported (no duplicate series;
        # its counters start again, which Prometheus reads as a reset).
        newest = {ctx.settings.name or str(ctx.settings.listen): ctx for ctx in self.contexts}
        fams = _Families()
        for ctx in newest.values():
            fams.add(ctx)
        yield from fams.all()


class _Families:
    def __init__(self) -> None:
        p, lb = "pymmproxy_", ["proxy"]
        self.tcp: list[CounterMetricFamily | GaugeMetricFamily] = [
            CounterMetricFamily(p + "connections_accepted", "TCP connections accepted", labels=lb),
            GaugeMetricFamily(p + "connections_active", "TCP connections open now", labels=lb),
            GaugeMetricFamily(p + "connections_pending_headers", "Waiting for their header",
                              labels=lb),
            CounterMetricFamily(p + "connections_relayed", "Connected to the target", labels=lb),
        ]  # fmt: skip
        self.udp: list[CounterMetricFamily | GaugeMetricFamily] = [
            CounterMetricFamily(p + "udp_sessions", "UDP client sessions opened", labels=lb),
            GaugeMetricFamily(p + "udp_sessions_active", "UDP client sessions now", labels=lb),
        ]
        self.rejected = CounterMetricFamily(
            p + "connections_rejected", "Refused at accept, by reason", labels=[*lb, "reason"]
        )
        self.failed = CounterMetricFamily(
            p + "connections_failed", "Failed or closed early, by reason", labels=[*lb, "reason"]
        )
        self.header_errors = CounterMetricFamily(
            p + "header_errors", "Unparsable PROXY headers, by kind", labels=[*lb, "kind"]
        )
        self.sources = CounterMetricFamily(
            p + "sources_refused", "Header sources not spoofed, by kind", labels=[*lb, "kind"]
        )
        self.headers = CounterMetricFamily(
            p + "headers", "PROXY headers seen", labels=[*lb, "version", "command"]
        )
        self.bytes = CounterMetricFamily(
            p + "relayed_bytes", "Bytes relayed", labels=[*lb, "direction"]
        )
        self.header_wait = HistogramMetricFamily(
            p + "header_wait_seconds", "Accept to complete PROXY header", labels=lb
        )
        self.connect = HistogramMetricFamily(
            p + "target_connect_seconds", "connect() to the target until established", labels=lb
        )

    def add(self, ctx: InstanceContext) -> None:
        stats, name = ctx.stats, [ctx.settings.name or str(ctx.settings.listen)]
        if ctx.settings.transport is Transport.UDP:
            self.udp[0].add_metric(name, stats.accepted)
            self.udp[1].add_metric(name, stats.active)
        else:
            for fam, value in zip(self.tcp, _tcp_values(stats), strict=True):
                fam.add_metric(name, value)
        for fam, counter in ((self.rejected, stats.rejected), (self.failed, stats.errors),
                             (self.header_errors, stats.header_errors),
                             (self.sources, stats.sources_refused)):  # fmt: skip
            for key, value in sorted(counter.items()):
                fam.add_metric([*name, key], value)
        for key, value in sorted(stats.versions.items()):
            version, _, command = key.partition("-")
            self.headers.add_metric([*name, version.lstrip("v"), command or "proxy"], value)
        up, down = stats.bytes_up, stats.bytes_down
        for conn in list(ctx.conns):  # connections still open count what they moved so far
            up += getattr(conn, "bytes_up", 0)
            down += getattr(conn, "bytes_down", 0)
        self.bytes.add_metric([*name, "client_to_target"], up)
        self.bytes.add_metric([*name, "target_to_client"], down)
        for hfam, hist in ((self.header_wait, stats.header_wait),
                           (self.connect, stats.connect_time)):  # fmt: skip
            if hist is not None:
                hfam.add_metric(name, _buckets(hist), hist.total)

    def all(self) -> list[Metric]:
        return [*self.tcp, *self.udp, self.rejected, self.failed, self.header_errors,
                self.sources, self.headers, self.bytes, self.header_wait, self.connect]  # fmt: skip


def _tcp_values(stats: Stats) -> tuple[int, int, int, int]:
    return stats.accepted, stats.active, stats.pending_headers, stats.relayed


def _buckets(hist: Histogram) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, count in zip((*hist.bounds, float("inf")), hist.counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
    return out
