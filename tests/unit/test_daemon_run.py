"""``daemon.run`` hands each worker its part of the instance's connection limits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
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


_WORKERS = textwrap.dedent(
    """
    import asyncio, os, sys
    from pymmproxy import daemon, logsetup
    from pymmproxy.logsetup import get_logger

    logsetup.configure(0, "json")  # log lines to stderr: stdout carries only say()

    def say(line):  # one write() per line: print() writes the newline apart
        os.write(1, (line + "\\n").encode())

    class App(daemon.Lifecycle):
        def __init__(self, on_ready, index):
            super().__init__(get_logger(), None, on_ready)
            self.index = index
        async def start(self):
            if self.index == 1:
                await asyncio.sleep(1.5)  # a slow worker: SIGHUP comes before it is up
            say(f"started {self.index}")
        def close(self): pass
        async def drain(self): pass
        def abort(self): pass
        def reload(self): say(f"reload {self.index}")
        def dump(self): pass
        def status(self): return "ok"

    sys.exit(daemon.run_app(lambda on_ready, i: App(on_ready, i), 2, get_logger()))
    """
)


def test_a_sighup_before_every_worker_is_up_reaches_all_of_them() -> None:
    """A worker ignores SIGHUP until its loop takes it over: the parent holds it till then."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKERS], stdout=subprocess.PIPE, text=True, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        while (line := proc.stdout.readline()) and not line.startswith("started"):
            pass
        assert line == "started 0\n"
        time.sleep(0.3)  # the parent's handlers are in place; worker 1 is still starting
        proc.send_signal(signal.SIGHUP)
        lines: list[str] = []
        give_up = threading.Timer(5.0, proc.send_signal, (signal.SIGTERM,))  # ends the output
        give_up.start()
        while len(lines) < 3 and (line := proc.stdout.readline()):
            if line.startswith(("started", "reload")):  # not the parent's log lines
                lines.append(line)
        give_up.cancel()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert sorted(lines) == ["reload 0\n", "reload 1\n", "started 1\n"]
