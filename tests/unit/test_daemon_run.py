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

    def fake_run_app(factory: Any, n: int, _log: Any, **_kw: Any) -> int:
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
    """Lines may arrive in pieces; the wake-up pipe's news reaches ``on_wake``, which says
    when to stop (every worker reaped)."""
    pipe_r, pipe_w = os.pipe()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    lines: list[str] = []
    wakes: list[int] = []
    os.write(pipe_w, b"ready 0\nstatus 0 1 act")

    def on_wake() -> bool:
        wakes.append(len(lines))
        if len(wakes) == 2:  # after the first poll: the rest of the line, then a signal
            os.write(pipe_w, "ive\nstatus 1 \u00e9\n".encode())
            os.write(wake_w, b"\x11")
        return "status 1 \u00e9" not in lines

    try:
        daemon._read_lines(pipe_r, wake_r, lines.append, on_wake)
        with pytest.raises(BlockingIOError):  # the signal's byte was read, not left behind
            os.read(wake_r, 1)
    finally:
        for fd in (pipe_r, pipe_w, wake_r, wake_w):
            os.close(fd)
    assert lines == ["ready 0", "status 0 1 active", "status 1 \u00e9"]
    assert wakes[0] == 0  # called before the first poll (a worker may be gone already)


_SUPERVISED = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pymmproxy import daemon, logsetup
    from pymmproxy.errors import PymmproxyError
    from pymmproxy.logsetup import get_logger

    logsetup.configure(0, "json")
    MODE = os.environ["MODE"]
    daemon.RESPAWN_LIMIT = 2

    def say(line):
        os.write(1, (line + "\\n").encode())

    def touch(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))

    class App(daemon.Lifecycle):
        def __init__(self, on_ready, index):
            super().__init__(get_logger(), None, on_ready)
            self.index = index
        async def start(self):
            if MODE == "slow" and self.index == 1:
                await asyncio.sleep(1.5)  # a slow worker: SIGHUP comes before it is up
            if MODE == "single-slow":
                say("starting")
                await asyncio.sleep(1.0)  # the stop comes now
            if MODE == "bad-start" and self.index == 1:
                for _ in range(1000):  # until worker 0 is up: it drains then, not _exits
                    if os.path.exists(os.environ["UP_FILE"]):
                        break
                    await asyncio.sleep(0.01)
                raise PymmproxyError("cannot listen on 192.0.2.1:1: test")
            say(f"started {self.index} {os.getpid()} catch_up={self.catch_up}")
            # runs once run() waits for the stop, its signal handlers in place
            asyncio.get_running_loop().call_soon(say, f"up {self.index}")
            if MODE == "bad-start":
                asyncio.get_running_loop().call_soon(touch, os.environ["UP_FILE"])
            if MODE == "crash" and self.index == 1:
                asyncio.get_running_loop().call_later(0.2, os._exit, 3)
        def close(self): say(f"close {self.index}")
        async def drain(self):
            await asyncio.sleep(float(os.environ.get("DRAIN", "0.5")))
            say(f"drained {self.index}")
        def abort(self): say(f"abort {self.index}")
        def reload(self): say(f"reload {self.index}")
        def dump(self): pass
        def status(self): return "ok"

    class StopWhileRestarting:  # the parent's log: a stop lands just as it forks again
        def __init__(self, log):
            self.log = log
        def __getattr__(self, name):
            return getattr(self.log, name)
        def error(self, event, **kw):
            self.log.error(event, **kw)
            if kw.get("action") == "restart":
                os.kill(os.getpid(), signal.SIGTERM)

    log = get_logger()
    if MODE == "stop-in-respawn":
        log = StopWhileRestarting(log)
    workers = 1 if MODE == "single-slow" else 2
    sys.exit(daemon.run_app(lambda on_ready, i: App(on_ready, i), workers, log))
    """
)


class _Supervised:
    """The program above under ``MODE``, its stdout lines and its log (stderr)."""

    def __init__(self, mode: str, drain: float = 0.5, up_file: Path | None = None) -> None:
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISED], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=root, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(root), "MODE": mode,
                 "DRAIN": str(drain), "UP_FILE": str(up_file)},
        )  # fmt: skip
        self.lines: list[str] = []

    def until(self, prefix: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """Read lines until ``count`` of them start with ``prefix``; those lines."""
        assert self.proc.stdout is not None
        give_up = threading.Timer(timeout, self.proc.kill)
        give_up.start()
        try:
            while sum(x.startswith(prefix) for x in self.lines) < count:
                line = self.proc.stdout.readline()
                assert line, f"ended before {count} x {prefix!r}: {self.lines}"
                self.lines.append(line.strip())
        finally:
            give_up.cancel()
        return [x for x in self.lines if x.startswith(prefix)]

    def parent_handles_signals(self, timeout: float = 10.0) -> None:
        """Wait until the parent has its handlers (it sets them once every worker is forked:
        before, a SIGHUP is ignored and a SIGTERM kills it). The workers' ``up`` lines do
        not say so: under load they can come first. ``timeout`` is a hang guard."""
        wanted = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGTERM - 1))
        deadline = time.monotonic() + timeout
        while True:
            status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
            caught = next(int(x.split()[1], 16) for x in status if x.startswith("SigCgt:"))
            if caught & wanted == wanted:
                return
            assert time.monotonic() < deadline, "the parent never set its signal handlers"
            time.sleep(0.01)

    def finish(self) -> tuple[int, list[str], str]:
        """Exit status, all stdout lines and stderr, once it ends (killed after 15 s)."""
        try:
            out, err = self.proc.communicate(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        self.lines += out.splitlines()
        return self.proc.returncode, self.lines, err


def test_a_worker_that_dies_is_forked_again_and_catches_up_on_reloads() -> None:
    sup = _Supervised("normal")
    try:
        started = sup.until("started", 2)
        sup.until("up", 2)
        sup.parent_handles_signals()
        sup.proc.send_signal(signal.SIGHUP)
        sup.until("reload", 2)
        victim = int(next(x for x in started if x.startswith("started 1")).split()[2])
        os.kill(victim, signal.SIGKILL)
        again = sup.until("started 1", 2)[-1]
        assert again.endswith("catch_up=True")  # and reloads, like the others did
        sup.until("reload 1", 2)
        sup.until("up 1", 2)
        sup.proc.send_signal(signal.SIGTERM)
    finally:
        code, _lines, err = sup.finish()
    assert code == 0  # the restarted worker's predecessor does not count
    assert '"daemon.worker_exited"' in err
    assert '"status": 137' in err
    assert '"action": "restart"' in err


def test_a_worker_that_fails_to_start_stops_the_daemon_with_its_status(tmp_path: Path) -> None:
    sup = _Supervised("bad-start", up_file=tmp_path / "up0")
    code, lines, err = sup.finish()
    assert code == 1, err  # PymmproxyError's exit status
    assert "cannot listen on 192.0.2.1:1: test" in err
    assert '"why": "before it was ready"' in err
    assert "drained 0" in " ".join(lines)  # the healthy worker drained, it was not killed


def test_a_crash_loop_gives_up_after_the_respawn_limit() -> None:
    sup = _Supervised("crash")
    code, lines, err = sup.finish()
    assert code == 3
    assert sum(x.startswith("started 1") for x in lines if "catch_up" in x) == 3  # 1 + 2 again
    assert err.count('"action": "restart"') == 2
    assert '"action": "stop"' in err


def test_one_stop_sent_to_the_whole_group_drains_instead_of_aborting() -> None:
    """systemd (KillMode=control-group) or a terminal's Ctrl-C signal every process; the
    parent forwards the same stop: a worker must not take that as a second request."""
    sup = _Supervised("normal")
    try:
        sup.until("up", 2)
        sup.parent_handles_signals()
        os.killpg(sup.proc.pid, signal.SIGTERM)
    finally:
        code, lines, _err = sup.finish()
    assert code == 0
    assert sorted(x for x in lines if x.startswith(("drained", "abort"))) == [
        "drained 0", "drained 1"
    ]  # fmt: skip


def test_a_second_stop_after_the_repeat_window_aborts() -> None:
    sup = _Supervised("normal", drain=3.0)
    try:
        started = sup.until("started", 2)
        sup.until("up", 2)
        sup.parent_handles_signals()
        sup.proc.send_signal(signal.SIGTERM)
        sup.until("close", 2)
        time.sleep(daemon.REPEAT_WINDOW + 0.2)
        for line in started:  # an impatient operator's second kill, straight to the workers
            os.kill(int(line.split()[2]), signal.SIGTERM)
    finally:
        code, lines, _err = sup.finish()
    assert code == 0
    assert sorted(x for x in lines if x.startswith("abort")) == ["abort 0", "abort 1"]


def test_a_stop_that_lands_while_a_worker_is_forked_again_reaches_it() -> None:
    """The stop comes between the parent's decision to fork again and the fork: the new
    worker must hear of it (else the parent waits for it until systemd's SIGKILL)."""
    sup = _Supervised("stop-in-respawn")
    try:
        started = sup.until("started", 2)
        sup.until("up", 2)
        sup.parent_handles_signals()
        os.kill(int(next(x for x in started if x.startswith("started 1")).split()[2]), 9)
    finally:
        code, lines, err = sup.finish()
    assert code == 0, err
    assert '"action": "restart"' in err
    assert "drained 0" in lines


def test_a_sighup_before_every_worker_is_up_reaches_all_of_them() -> None:
    """A worker ignores SIGHUP until its loop takes it over: the parent holds it till then."""
    sup = _Supervised("slow")
    try:
        assert sup.until("started", 1) == [sup.lines[0]]
        assert sup.lines[0].startswith("started 0")
        sup.parent_handles_signals()  # worker 1 is still starting (for 1.5 s)
        sup.proc.send_signal(signal.SIGHUP)
        sup.until("reload", 2)
        sup.proc.send_signal(signal.SIGTERM)
    finally:
        code, lines, err = sup.finish()
    assert code == 0, err
    assert sorted(x for x in lines if x.startswith("reload")) == ["reload 0", "reload 1"]
    assert lines.index(next(x for x in lines if x.startswith("started 1"))) < max(
        lines.index("reload 0"), lines.index("reload 1")
    )  # worker 1 reloaded once it was up


def test_a_stop_while_starting_stops_cleanly_once_started() -> None:
    """The listener accepts into its backlog before start() returns: a SIGTERM then must
    not meet the default action (killed, status -15), but a clean stop."""
    sup = _Supervised("single-slow")
    try:
        sup.until("starting")
        sup.proc.send_signal(signal.SIGTERM)
    finally:
        code, lines, err = sup.finish()
    assert code == 0, err
    assert "close 0" in lines
    assert "drained 0" in lines
