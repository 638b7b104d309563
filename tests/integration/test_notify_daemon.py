"""sd_notify from the real daemon, received on a real ``AF_UNIX`` datagram socket.

The daemon runs in a network namespace of this module's own, on 127.0.0.1, with no spoofing
(``--allow-any``, a target nobody connects to); the notify socket is a path, which crosses
network namespaces. What systemd
relies on: READY=1 only once the port accepts connections (and, with ``-listeners N``, once
every worker listens), STATUS= lines while running, STOPPING=1 on SIGTERM, exit 0.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pymmproxy.cpus import usable_cpus
from tests.integration.conftest import ns_connect
from tests.nsutil import Netns, netns, require_root_and_tools

pytestmark = [pytest.mark.netns]
PY = sys.executable
STATUS_WAIT = 7.0  # the daemon reports every 5 s
NS: list[Netns] = []  # the module's namespace (see the fixture below)
_PORTS = itertools.count(8701)


@pytest.fixture(scope="module", autouse=True)
def _namespace() -> Iterator[None]:
    require_root_and_tools()
    with netns("pmn") as ns:
        NS.append(ns)
        try:
            yield
        finally:
            NS.clear()


def in_ns(argv: list[str]) -> list[str]:
    """``argv`` run in the module's namespace (``ip netns exec`` execs in place: same pid)."""
    return ["ip", "netns", "exec", NS[0].name, *argv]


class Manager:
    """Plays the service manager: owns NOTIFY_SOCKET and collects what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        """The next message carrying ``key`` (all messages are kept in ``messages``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(fields)
            if key in fields:
                return fields
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def count(self, key: str) -> int:
        return sum(key in m for m in self.messages)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify.sock")
    try:
        yield m
    finally:
        m.sock.close()


def free_port() -> int:
    """A port nobody uses in the module's fresh namespace."""
    return next(_PORTS)


@contextmanager
def daemon(
    manager: Manager, port: int, *extra: str, cpus: set[int] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon with ``NOTIFY_SOCKET`` set (on ``cpus`` only, if given); killed if a test
    leaves it running."""
    env = {**os.environ, "NOTIFY_SOCKET": str(manager.path)}
    argv = [PY, "-m", "pymmproxy", "-l", f"127.0.0.1:{port}", "-4", "127.0.0.1:9",
            "-6", "none", "--allow-any", "--drain-timeout", "2", *extra]  # fmt: skip
    if cpus is not None:  # taskset execs the daemon in place: same pid
        argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
    log = manager.path.with_name("daemon.log")
    with log.open("wb") as out:
        proc = subprocess.Popen(in_ns(argv), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def connects(port: int) -> bool:
    try:
        ns_connect(NS[0], "127.0.0.1", port, timeout=1).close()
    except OSError:
        return False
    return True


def stop(proc: subprocess.Popen[bytes], manager: Manager) -> None:
    """SIGTERM: STOPPING=1 arrives, then the daemon exits 0."""
    proc.send_signal(signal.SIGTERM)
    manager.wait_for("STOPPING", 5)
    code = proc.wait(timeout=10)
    assert code == 0, manager.path.with_name("daemon.log").read_text()


def listening_inodes(port: int, pid: int) -> set[str]:
    """Socket inodes in LISTEN on 127.0.0.1:port (``/proc/PID/net/tcp``: ``pid``'s namespace)."""
    local = f"0100007F:{port:04X}"
    found = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == local and cols[3] == "0A":
            found.add(cols[9])
    return found


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_ready_after_listening_then_status_then_stopping(manager: Manager) -> None:
    port = free_port()
    with daemon(manager, port, "-listeners", "1") as proc:
        manager.wait_for("READY", 10)
        assert connects(port), "READY=1 was sent before the port accepted connections"
        status = manager.wait_for("STATUS", STATUS_WAIT)
        assert re.fullmatch(r"0 active, 1 accepted, \d+ rejected, \d+ failed", status["STATUS"])
        stop(proc, manager)
    assert manager.count("READY") == 1
    ready_at = next(i for i, m in enumerate(manager.messages) if "READY" in m)
    stopping_at = next(i for i, m in enumerate(manager.messages) if "STOPPING" in m)
    assert ready_at < stopping_at


def test_ready_once_after_every_worker_listens(manager: Manager) -> None:
    port = free_port()
    with daemon(manager, port, "-listeners", "2") as proc:
        manager.wait_for("READY", 10)
        workers = children(proc.pid)
        listeners = listening_inodes(port, proc.pid)
        assert len(workers) == 2
        assert len(listeners) == 2
        for worker in workers:
            assert socket_inodes(worker) & listeners, f"worker {worker} not listening at READY"
        assert connects(port)
        status = manager.wait_for("STATUS", STATUS_WAIT)["STATUS"]
        worker_line = r"w[01]: \d+ active, \d+ accepted, \d+ rejected, \d+ failed"
        assert re.fullmatch(f"{worker_line}(; {worker_line})?", status), status
        stop(proc, manager)
    assert manager.count("READY") == 1


@pytest.mark.parametrize("first_cpu_only", [True, False])
def test_default_is_one_worker_per_usable_cpu(manager: Manager, first_cpu_only: bool) -> None:
    """No ``-listeners``: as many listening workers as CPUs we may use (``taskset``)."""
    port = free_port()
    cpus = {min(os.sched_getaffinity(0))} if first_cpu_only else None
    with daemon(manager, port, cpus=cpus) as proc:
        manager.wait_for("READY", 10)
        expected = 1 if first_cpu_only else usable_cpus()
        assert len(listening_inodes(port, proc.pid)) == expected
        assert len(children(proc.pid)) == (0 if expected == 1 else expected)
        assert connects(port)
        stop(proc, manager)


def test_workers_leave_when_the_parent_is_killed(manager: Manager) -> None:
    """A SIGKILLed parent (no chance to forward anything) must not leave workers serving."""
    port = free_port()
    with daemon(manager, port, "-listeners", "2") as proc:
        manager.wait_for("READY", 10)
        workers = children(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10  # SIGTERM from the kernel: drain (2 s), then exit
        while time.monotonic() < deadline and any(alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), "orphaned workers still running"
        assert not connects(port)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_stops_the_daemon_even_with_its_stderr_gone(workers: str) -> None:
    """``pymmproxy ... 2>&1 | head``: once the reader is gone every log line fails (EPIPE);
    the lines are dropped, and SIGTERM still drains and exits."""
    port = free_port()
    argv = [PY, "-m", "pymmproxy", "-l", f"127.0.0.1:{port}", "-4", "127.0.0.1:9",
            "-6", "none", "--allow-any", "--drain-timeout", "2", "-v", "2",
            "--log-format", "json", "-listeners", workers]  # fmt: skip
    proc = subprocess.Popen(in_ns(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        up = b'"daemon.workers_ready"' if workers == "2" else b'"daemon.listening"'
        while (line := proc.stdout.readline()) and up not in line:
            pass
        assert up in line, "it never came up"
        proc.stdout.close()  # the reader leaves
        deadline = time.monotonic() + 10
        while not connects(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connects(port)  # and logs conn.* lines into the broken pipe
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
