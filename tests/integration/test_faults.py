"""Faults: slow, refusing and resetting targets, resetting clients, fd/RSS after churn.

Also holds the small helpers the other issue-7 suites share: run a function in a thread
that entered the workload namespace (so thousands of sockets need one ``setns``), and read
a daemon's fds, RSS and CPU time from ``/proc``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from pymmproxy.proxyproto import encode_v2
from tests.integration.conftest import (
    CLONE_NEWNET,
    LB_V4,
    Workload,
    log_events,
    ns_socket,
    reset_by_proxy,
)
from tests.integration.test_daemon import header, open_conn
from tests.nsutil import recv_all

pytestmark = [pytest.mark.netns]
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)
LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"
ECHO, SLOW, RST_TARGET, REFUSED = 8181, 8182, 8183, 8184
PORT = 8101


# -- helpers shared with test_limits / test_metrics / test_security ---------------------------
def in_ns(wl: Workload, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread inside the workload namespace; its sockets live there."""
    box: list[tuple[bool, object]] = []

    def run() -> None:
        fd = os.open(f"/run/netns/{wl.ns.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        finally:
            os.close(fd)
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box.append((False, exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle_fds(pid: int, limit: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (count := fds(pid)) > limit and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wl(workload: Workload) -> Workload:
    workload.service("echo", ECHO)
    return workload


# -- tests -----------------------------------------------------------------------------------
def test_slow_target_connect_timeout_fires(wl: Workload) -> None:
    """SYNs dropped (target's accept queue full): the connect timeout closes the client."""
    target = ns_socket(wl.ns)
    target.bind(("127.0.0.1", SLOW))
    target.listen(0)
    fillers = [ns_socket(wl.ns) for _ in range(3)]
    for f in fillers:
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", SLOW))
    time.sleep(0.2)
    wl.daemon("-4", f"127.0.0.1:{SLOW}", "--connect-timeout", "1", port=PORT)
    try:
        # The socket's 10 s timeout is only a hang guard (10x the connect timeout), not a
        # speed claim: if the timeout never fired, recv raises TimeoutError, not a reset.
        with open_conn(wl, PORT, timeout=10) as s:
            start = time.monotonic()
            s.sendall(encode_v2(header("192.0.2.80", 41080)) + b"hello")
            with pytest.raises(ConnectionResetError):  # a reset: the connection failed
                recv_all(s)
            elapsed = time.monotonic() - start
        assert elapsed > 0.9  # the connect timeout fired, and not before its time
        assert '"reason": "connect_timeout"' in wl.log(f"daemon-{PORT}.log")
    finally:
        for sock in (target, *fillers):
            sock.close()


def test_refusing_target_resets_client_with_reason(wl: Workload) -> None:
    wl.daemon("-4", f"127.0.0.1:{REFUSED}", port=PORT + 1)
    with open_conn(wl, PORT + 1) as s:  # its 5 s timeout is the hang guard
        reset_by_proxy(s, encode_v2(header("192.0.2.81", 41081)) + b"hello")
    assert '"reason": "target_refused"' in wl.log(f"daemon-{PORT + 1}.log")


def test_target_reset_mid_stream_resets_client(wl: Workload) -> None:
    target = ns_socket(wl.ns)
    target.bind(("127.0.0.1", RST_TARGET))
    target.listen(8)
    target.settimeout(5)
    wl.daemon("-4", f"127.0.0.1:{RST_TARGET}", port=PORT + 2)
    try:
        with open_conn(wl, PORT + 2) as s:
            s.sendall(encode_v2(header("192.0.2.82", 41082)) + b"hello")
            conn, _ = target.accept()
            conn.sendall(b"from target")
            assert s.recv(64) == b"from target"
            assert conn.recv(5) == b"hello"
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            conn.close()
            reset_by_proxy(s)  # the socket's 5 s timeout is the hang guard
        assert '"reason": "reset"' in wl.log(f"daemon-{PORT + 2}.log")
    finally:
        target.close()


def test_client_reset_mid_stream_closes_target(wl: Workload) -> None:
    wl.daemon("-4", f"127.0.0.1:{ECHO}", port=PORT + 3)
    s = open_conn(wl, PORT + 3)
    s.sendall(encode_v2(header("192.0.2.83", 41083)) + b"ping")
    assert s.recv(4) == b"ping"
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    s.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        done = log_events(wl, f"service-echo-{ECHO}.log", "done")
        if any(e["port"] == 41083 for e in done):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the target side was not closed after the client reset")


def _churn(port: int, count: int) -> dict[str, int]:
    """``count`` connections ending three ways: half-close, reset, plain close."""
    ends = {"half_close": 0, "reset": 0, "close": 0}
    for i in range(count):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((LB_V4, port))
            s.sendall(encode_v2(header("192.0.2.84", 10000 + i % 50000)) + b"ping")
            way = ("half_close", "reset", "close")[i % 3]
            if way == "half_close":
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s) == b"ping"
            elif way == "reset":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            else:
                assert s.recv(4) == b"ping"
            ends[way] += 1
        finally:
            s.close()
    return ends


def test_churn_10000_connections_no_fd_or_memory_leak(wl: Workload) -> None:
    proc = wl.daemon("-4", f"127.0.0.1:{ECHO}", "-v", "0", "-listeners", "1", port=PORT + 4)
    in_ns(wl, lambda: _churn(PORT + 4, 300))  # warm up allocator and caches
    time.sleep(0.3)
    fds_before, rss_before = fds(proc.pid), rss_kb(proc.pid)
    start = time.monotonic()
    ends = in_ns(wl, lambda: _churn(PORT + 4, 10_000))
    elapsed = time.monotonic() - start
    fds_after = settle_fds(proc.pid, fds_before)
    rss_after = rss_kb(proc.pid)
    print(
        f"\nchurn: 10000 connections {ends} in {elapsed:.1f}s; "
        f"fds {fds_before} -> {fds_after}; RSS {rss_before} -> {rss_after} KiB"
    )
    assert fds_after <= fds_before
    assert rss_after - rss_before < 8 * 1024, "RSS grew by more than 8 MiB"
    assert proc.poll() is None
    with contextlib.suppress(OSError):
        proc.terminate()
    assert proc.wait(10) == 0
