"""``daemon.run`` hands each worker its part of the instance's connection limits."""

from __future__ import annotations

import os
from typing import Any

import pytest

from pymmproxy import daemon
from pymmproxy.settings import Endpoint, InstanceSettings, Limits


class _Bound:
    def close(self) -> None:
        pass


@pytest.mark.parametrize(("workers", "expected"), [(1, (5, 10, 7)), (2, (3, 5, 7))])
def test_workers_get_their_part_of_the_count_limits(
    monkeypatch: pytest.MonkeyPatch, workers: int, expected: tuple[int, int, int]
) -> None:
    started: list[Any] = []

    def fake_run_app(factory: Any, n: int, _log: Any) -> int:
        started.append((factory(lambda: None, 0), n))
        return 0

    monkeypatch.setattr(daemon, "bind", lambda *_a, **_k: _Bound())
    monkeypatch.setattr(daemon, "run_app", fake_run_app)
    limits = Limits(max_connections=5, max_pending_headers=10, udp_max_clients=7)
    settings = InstanceSettings(
        Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2), None, listeners=workers, limits=limits
    )
    assert daemon.run(settings) == 0
    ((app, n),) = started
    got = app.settings.limits
    assert n == workers
    assert (got.max_connections, got.max_pending_headers, got.udp_max_clients) == expected


class _Log:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, event: str, **fields: object) -> None:
        self.errors.append(f"{event} {fields}")


def test_an_error_in_before_reload_refuses_the_reload_and_keeps_the_parent() -> None:
    def broken() -> bool:
        raise OSError(28, "No space left on device")

    log = _Log()
    assert daemon._may_reload(broken, log) is False  # type: ignore[arg-type]
    assert "No space left on device" in log.errors[0]
    assert "the workers were not told" in log.errors[0]
    assert daemon._may_reload(lambda: True, log) is True  # type: ignore[arg-type]


def test_read_lines_splits_the_workers_pipe_and_wakes_outside_handlers() -> None:
    """Lines may arrive in pieces; the wake-up pipe's news reaches ``on_wake``."""
    pipe_r, pipe_w = os.pipe()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    lines: list[str] = []
    wakes: list[int] = []
    os.write(wake_w, b"\x01")
    os.write(pipe_w, b"ready 0\nstatus 0 1 act")
    os.write(pipe_w, "ive\nstatus 1 \u00e9\n".encode())
    os.close(pipe_w)  # every worker gone
    try:
        daemon._read_lines(pipe_r, wake_r, lines.append, lambda: wakes.append(1))
    finally:
        for fd in (pipe_r, wake_r, wake_w):
            os.close(fd)
    assert lines == ["ready 0", "status 0 1 active", "status 1 \u00e9"]
    assert wakes
