"""Metrics without a network: histograms, the collector's families, the handler."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pymmproxy import metrics
from pymmproxy.server.context import Histogram, InstanceContext, Stats
from pymmproxy.settings import Endpoint, InstanceSettings, Transport


def settings(transport: Transport = Transport.TCP, name: str = "") -> InstanceSettings:
    return InstanceSettings(
        Endpoint("0.0.0.0", 8443), Endpoint("127.0.0.1", 443), None, transport=transport, name=name
    )


def render(*ctxs: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.StatsCollector(list(ctxs)))
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def fake_ctx(stats: Stats, transport: Transport = Transport.TCP, name: str = "") -> Any:
    return SimpleNamespace(stats=stats, settings=settings(transport, name), conns=set())


def test_a_restarted_instance_is_reported_once() -> None:
    """serve restarts a changed instance: its old context drains beside the new one."""
    registry = CollectorRegistry(auto_describe=False)
    contexts = [fake_ctx(Stats(accepted=9), name="web"), fake_ctx(Stats(accepted=2), name="web")]
    registry.register(metrics.StatsCollector(contexts))
    text = generate_latest(registry).decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("pymmproxy_connections_accepted")]
    assert lines == ['pymmproxy_connections_accepted_total{proxy="web"} 2.0']


def test_histogram_uses_le_buckets() -> None:
    hist = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        hist.observe(v)
    assert hist.counts == [2, 2, 1]
    assert hist.total == pytest.approx(8.65)
    assert metrics._buckets(hist) == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]


def test_collector_reads_plain_counters() -> None:
    stats = Stats(accepted=10, active=2, pending_headers=1, relayed=7, bytes_up=100, bytes_down=50)
    stats.rejected["over_limit"] = 3
    stats.errors["connect_timeout"] = 1
    stats.header_errors["bad_signature"] = 2
    stats.sources_refused["loopback"] = 4
    stats.versions.update({"v2": 5, "v1": 1, "v2-local": 1, "v1-unknown": 1})
    stats.header_wait = Histogram(metrics.HEADER_WAIT_BUCKETS)
    stats.header_wait.observe(0.002)
    ctx = fake_ctx(stats, name="web")
    ctx.conns = [SimpleNamespace(bytes_up=5, bytes_down=6)]  # still open: counted too
    m = render(ctx)
    web = ("proxy", "web")

    def get(name: str, *labels: tuple[str, str]) -> float:
        return m[(name, frozenset({web, *labels}))]

    assert get("pymmproxy_connections_accepted_total") == 10
    assert get("pymmproxy_connections_active") == 2
    assert get("pymmproxy_connections_pending_headers") == 1
    assert get("pymmproxy_connections_relayed_total") == 7
    assert get("pymmproxy_connections_rejected_total", ("reason", "over_limit")) == 3
    assert get("pymmproxy_connections_failed_total", ("reason", "connect_timeout")) == 1
    assert get("pymmproxy_header_errors_total", ("kind", "bad_signature")) == 2
    assert get("pymmproxy_sources_refused_total", ("kind", "loopback")) == 4
    assert get("pymmproxy_headers_total", ("version", "2"), ("command", "proxy")) == 5
    assert get("pymmproxy_headers_total", ("version", "1"), ("command", "unknown")) == 1
    assert get("pymmproxy_headers_total", ("version", "2"), ("command", "local")) == 1
    assert get("pymmproxy_relayed_bytes_total", ("direction", "client_to_target")) == 105
    assert get("pymmproxy_relayed_bytes_total", ("direction", "target_to_client")) == 56
    assert get("pymmproxy_header_wait_seconds_count") == 1
    assert get("pymmproxy_header_wait_seconds_bucket", ("le", "0.0025")) == 1
    assert get("pymmproxy_header_wait_seconds_bucket", ("le", "0.001")) == 0
    assert not any(n.startswith("pymmproxy_target_connect") for n, _ in m)  # not observed
    assert not any(n.startswith("pymmproxy_udp") for n, _ in m)


def test_udp_instances_report_sessions_and_instances_are_labelled() -> None:
    udp = fake_ctx(Stats(accepted=4, active=3), Transport.UDP, name="dns")
    tcp = fake_ctx(Stats(accepted=1))
    m = render(udp, tcp)
    assert m[("pymmproxy_udp_sessions_total", frozenset({("proxy", "dns")}))] == 4
    assert m[("pymmproxy_udp_sessions_active", frozenset({("proxy", "dns")}))] == 3
    assert m[("pymmproxy_connections_accepted_total", frozenset({("proxy", "0.0.0.0:8443")}))] == 1
    assert ("pymmproxy_connections_accepted_total", frozenset({("proxy", "dns")})) not in m


def test_metrics_off_means_nothing_observed() -> None:
    async def build() -> InstanceContext:
        return InstanceContext(settings(), asyncio.get_running_loop())

    ctx = asyncio.run(build())
    assert ctx.stats.header_wait is None
    assert ctx.stats.connect_time is None
    assert ctx.metrics is None


class FakeWriter:
    """Collects what the handler writes."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET /metrics HTTP/1.1", b"200"),
        (b"GET / HTTP/1.1", b"200"),
        (b"HEAD /metrics HTTP/1.1", b"200"),
        (b"GET /nope HTTP/1.1", b"404"),
        (b"POST /metrics HTTP/1.1", b"405"),
    ],
)
def test_http_handler(request_line: bytes, status: bytes) -> None:
    server = object.__new__(metrics.MetricsServer)
    server.registry = CollectorRegistry(auto_describe=False)
    server.registry.register(metrics.StatsCollector([fake_ctx(Stats(accepted=3))]))

    async def serve() -> FakeWriter:
        reader = asyncio.StreamReader()
        reader.feed_data(request_line + b"\r\nHost: x\r\n\r\n")
        writer = FakeWriter()
        await server._handle(reader, writer)  # type: ignore[arg-type]
        return writer

    writer = asyncio.run(serve())
    assert writer.closed
    assert writer.data.split(b" ")[1] == status
    sample = b'pymmproxy_connections_accepted_total{proxy="0.0.0.0:8443"} 3.0'
    assert (sample in writer.data) == (request_line.startswith(b"GET /") and status == b"200")


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"a" * 9000],
    ids=["long-header", "no-crlf"],
)
def test_an_oversized_request_is_hung_up_on_without_a_traceback(request_bytes: bytes) -> None:
    """Past ``MAX_REQUEST`` bytes without the blank line: close, nothing logged or raised
    (it leaked a multi-line traceback per request into the one-JSON-line log)."""
    server = object.__new__(metrics.MetricsServer)
    errors: list[dict[str, Any]] = []

    async def serve() -> FakeWriter:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        reader = asyncio.StreamReader(limit=metrics.MAX_REQUEST)
        reader.feed_data(request_bytes)
        reader.feed_eof()
        writer = FakeWriter()
        await server._handle(reader, writer)  # type: ignore[arg-type]
        return writer

    writer = asyncio.run(serve())
    assert writer.closed
    assert writer.data == b""
    assert errors == []
