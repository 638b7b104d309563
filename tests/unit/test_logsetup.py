"""Log lines: one ``write()`` each, so workers sharing stderr never merge two lines."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from pymmproxy import logsetup


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_each_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _Recorder()
    monkeypatch.setattr(sys, "stderr", stderr)
    logsetup.configure(0, "auto")
    log = logsetup.get_logger(instance="vps01-ssh")
    log.info("daemon.listening", port=2222)
    log.warning("conn.failed", reason="bad_header")
    assert len(stderr.writes) == 2
    for text in stderr.writes:
        assert text.endswith("\n")
        assert text.count("\n") == 1
        assert json.loads(text)["instance"] == "vps01-ssh"


class _Broken(_Recorder):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_line_that_cannot_be_written_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr gone (``pymmproxy ... 2>&1 | head``): logging must not raise into a signal
    handler or a connection's callback."""
    monkeypatch.setattr(sys, "stderr", _Broken())
    logsetup.configure(0, "json")
    logsetup.get_logger().info("daemon.signal", signal="SIGTERM")
    logsetup.get_logger().error("daemon.reload_failed", error="x")


def test_the_rate_limiter_allows_a_burst_then_refills(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(logsetup.time, "monotonic", lambda: now[0])
    limiter = logsetup.RateLimiter(burst=20, period=1.0)
    assert [limiter.allow() for _ in range(25)] == [True] * 20 + [False] * 5
    now[0] += 0.5  # half a period: half the burst back
    assert [limiter.allow() for _ in range(12)] == [True] * 10 + [False] * 2
    now[0] += 60  # never more than one burst in store
    assert sum(limiter.allow() for _ in range(30)) == 20
    assert limiter.take_suppressed() == 5 + 2 + 10
    assert limiter.take_suppressed() == 0


def test_refusals_past_the_burst_are_counted_and_summed_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Below ``-v 1`` a flood of refusals logs 20 lines a second and one ``log.suppressed``
    with the rest; every refusal is still counted; ``-v 1`` logs them all."""
    import asyncio  # noqa: PLC0415

    import structlog  # noqa: PLC0415

    from pymmproxy.server.context import InstanceContext  # noqa: PLC0415
    from pymmproxy.settings import Endpoint, InstanceSettings, Limits  # noqa: PLC0415

    monkeypatch.setattr(logsetup.time, "monotonic", lambda: 5.0)  # no refill meanwhile

    async def flood(verbosity: int) -> tuple[list[dict[str, Any]], int]:
        settings = InstanceSettings(
            Endpoint("127.0.0.1", 9), Endpoint("127.0.0.1", 10), None,
            limits=Limits(allow_any_source=True),
        )  # fmt: skip
        ctx = InstanceContext(settings, asyncio.get_running_loop())
        ctx.verbosity = verbosity
        with structlog.testing.capture_logs() as logs:
            for port in range(50):
                ctx.reject("not_allowed", ("192.0.2.1", port))
            ctx.flush_suppressed()
        ctx.close()
        return logs, ctx.stats.rejected["not_allowed"]

    logs, counted = asyncio.run(flood(0))
    assert counted == 50
    assert [e["event"] for e in logs] == ["conn.rejected"] * 20 + ["log.suppressed"]
    assert logs[-1]["count"] == 30
    logs, counted = asyncio.run(flood(1))
    assert counted == 50
    assert [e["event"] for e in logs] == ["conn.rejected"] * 50
