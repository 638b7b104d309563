"""``daemon.run`` hands each worker its part of the instance's connection limits."""

from __future__ import annotations

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
