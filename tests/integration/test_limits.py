"""Per-daemon limits: connections, pending headers, idle timeout, slowloris, fd exhaustion."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from typing import Any

import pytest

from pymmproxy.proxyproto import encode_v2
from tests.integration.conftest import (
    LB_V4,
    MARK,
    PY,
    Workload,
    catches,
    log_events,
    ns_socket,
    reset_by_proxy,
    wait_for,
    wait_port,
)
from tests.integration.test_daemon import header, open_conn
from tests.integration.test_faults import cpu_seconds, fds, in_ns, settle_fds
from tests.nsutil import recv_all

pytestmark = [pytest.mark.netns]
ECHO, WHOAMI = 8281, 8282
PORT = 8201


@pytest.fixture(scope="module")
def wl(workload: Workload) -> Workload:
    workload.service("echo", ECHO)
    workload.service("whoami", WHOAMI)
    return workload


def relayed(wl: Workload, port: int, src: str, sport: int) -> socket.socket:
    """A connection through the daemon that echoed ``hi`` (closed again if it did not)."""
    s = open_conn(wl, port)
    try:
        s.sendall(encode_v2(header(src, sport)) + b"hi")
        assert s.recv(2) == b"hi"
    except BaseException:
        s.close()  # else its ResourceWarning fails whichever later test the GC runs in
        raise
    return s


def echoes(s: socket.socket, data: bytes = b"still here") -> bool:
    s.sendall(data)
    got = b""
    while len(got) < len(data) and (chunk := s.recv(64)):
        got += chunk
    return got == data


def test_max_connections_refuses_new_keeps_existing(wl: Workload) -> None:
    log = f"daemon-{PORT}.log"
    wl.daemon("-4", f"127.0.0.1:{ECHO}", "--max-connections", "5", "-listeners", "1", port=PORT)
    kept = [relayed(wl, PORT, "192.0.2.90", 42000 + i) for i in range(5)]
    try:
        for _ in range(3):  # refused at accept: nothing sent (see reset_by_proxy)
            reset_by_proxy(lambda: open_conn(wl, PORT))
        assert all(echoes(s) for s in kept)  # existing connections untouched
        assert wl.log(log).count('"reason": "over_limit"') == 3
    finally:
        last = kept.pop()
        freed = f"{LB_V4}:{last.getsockname()[1]}"
        last.close()
    # conn.closed (-v 2) is logged once the daemon no longer counts it: a slot is free.
    wait_for(lambda: [e for e in log_events(wl, log, "conn.closed") if e["lb"] == freed])
    with relayed(wl, PORT, "192.0.2.90", 42011) as again:  # a slot is free again
        assert echoes(again)
    for s in kept:
        s.close()


def daemon_stats(wl: Workload, proc: subprocess.Popen[bytes], port: int) -> dict[str, Any]:
    """SIGUSR1 a one-process daemon and return the ``daemon.stats`` line it logs."""
    log = f"daemon-{port}.log"
    wait_for(lambda: catches(proc.pid, signal.SIGUSR1))  # else SIGUSR1 would end it
    before = len(log_events(wl, log, "daemon.stats"))
    proc.send_signal(signal.SIGUSR1)
    return wait_for(lambda: log_events(wl, log, "daemon.stats")[before:])[0]


def test_max_pending_headers_refuses_new_keeps_pending(wl: Workload) -> None:
    proc = wl.daemon(
        "-4", f"127.0.0.1:{ECHO}", "--max-pending-headers", "10", "-listeners", "1", port=PORT + 1
    )
    raw = [encode_v2(header("192.0.2.91", 42100 + i)) for i in range(10)]
    pending = [open_conn(wl, PORT + 1) for _ in range(10)]
    for s, h in zip(pending, raw, strict=True):
        s.sendall(h[:7])  # half a header
    wait_for(lambda: daemon_stats(wl, proc, PORT + 1)["pending_headers"] == 10)
    reset_by_proxy(lambda: open_conn(wl, PORT + 1))  # refused at accept: nothing sent
    for s, h in zip(pending, raw, strict=True):  # the pending ones finish and are relayed
        s.sendall(h[7:] + b"hi")
        assert s.recv(2) == b"hi"
        s.close()
    assert '"reason": "pending_limit"' in wl.log(f"daemon-{PORT + 1}.log")


def test_idle_timeout_closes_silent_keeps_busy(wl: Workload) -> None:
    wl.daemon("-4", f"127.0.0.1:{ECHO}", "--idle-timeout", "2", port=PORT + 2)
    silent = relayed(wl, PORT + 2, "192.0.2.92", 42200)
    busy = relayed(wl, PORT + 2, "192.0.2.92", 42201)
    start = time.monotonic()
    silent.settimeout(10)  # a hang guard
    # busy talks every 0.3 s for 3 s: a stall of this test up to 1.7 s still keeps it
    while time.monotonic() - start < 3.0:
        assert echoes(busy, b"tick")
        time.sleep(0.3)
    assert recv_all(silent) == b""  # a FIN (nothing was stuck), not a reset
    assert echoes(busy)
    busy.close()
    silent.close()
    assert '"reason": "idle_timeout"' in wl.log(f"daemon-{PORT + 2}.log")


def test_idle_timeout_aborts_a_connection_whose_peers_stopped_reading(wl: Workload) -> None:
    """Bytes stuck both ways (the LB and the echo service both stopped reading): a graceful
    close could never finish, so the idle timeout resets both sides and frees them."""
    port = PORT + 6
    proc = wl.daemon("-4", f"127.0.0.1:{ECHO}", "--idle-timeout", "1", "-listeners", "1", port=port)
    with relayed(wl, port, "192.0.2.97", 42600):  # a baseline connection...
        time.sleep(0.2)
        base = fds(proc.pid)
    settle_fds(proc.pid, base - 2)  # ...closed: its two sockets gone
    base = fds(proc.pid)
    stuck = relayed(wl, port, "192.0.2.97", 42601)
    stuck.setblocking(False)
    sent, last, reset = 0, time.monotonic(), False
    while time.monotonic() - last < 0.5:  # until every buffer on the way stays full
        try:
            sent += stuck.send(b"x" * 65536)
            last = time.monotonic()
        except BlockingIOError:
            time.sleep(0.02)
        except ConnectionResetError:  # the idle timeout came while we still pushed
            reset = True
            break
    assert sent > 1 << 20
    assert settle_fds(proc.pid, base, timeout=4.0) == base  # both sockets closed
    stuck.setblocking(True)
    stuck.settimeout(3)
    assert reset or _ends_in_reset(stuck)  # a reset, not a FIN behind megabytes
    stuck.close()
    assert '"reason": "idle_timeout"' in wl.log(f"daemon-{port}.log")


def test_idle_timeout_is_off_by_default(wl: Workload) -> None:
    wl.daemon("-4", f"127.0.0.1:{ECHO}", port=PORT + 3)
    with relayed(wl, PORT + 3, "192.0.2.93", 42300) as s:
        time.sleep(1.5)
        assert echoes(s)


def test_slowloris_does_not_block_normal_clients(wl: Workload) -> None:
    """Every normal request is answered while 500 half headers are held open (how fast is
    for the benchmarks: the 10 s per request is a hang guard)."""
    wl.daemon("-4", f"127.0.0.1:{WHOAMI}", "-v", "0", "--header-timeout", "30", port=PORT + 4)

    def attack_and_serve() -> tuple[int, int]:
        loris = []
        for _ in range(500):
            s = socket.socket()
            s.connect((LB_V4, PORT + 4))
            s.sendall(b"PROXY TCP4 192.0.2.94 ")  # and never the rest
            loris.append(s)
        served = 0
        for i in range(50):
            with socket.create_connection((LB_V4, PORT + 4), timeout=10) as s:
                s.sendall(encode_v2(header("192.0.2.95", 42400 + i)) + b"GET / HTTP/1.0\r\n\r\n")
                assert recv_all(s).endswith(f"192.0.2.95 {42400 + i}\n".encode())
            served += 1
        alive = sum(1 for s in loris if _still_open(s))
        for s in loris:
            s.close()
        return served, alive

    served, alive = in_ns(wl, attack_and_serve)
    print(f"\nslowloris: 500 half headers held ({alive} still open), {served}/50 served")
    assert (served, alive) == (50, 500)  # all served while every half header was held


def _still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def stable_fds(pid: int) -> int:
    """The daemon's descriptor count once it stays the same for 0.2 s."""
    last, seen = -1, fds(pid)
    deadline = time.monotonic() + 5
    while seen != last and time.monotonic() < deadline:
        time.sleep(0.2)
        last, seen = seen, fds(pid)
    return seen


def start_with_64_fds(
    wl: Workload, port: int, target: int, *, header_timeout: int
) -> subprocess.Popen[bytes]:
    """A daemon in one process under ``RLIMIT_NOFILE`` 64, logging to ``daemon-PORT.log``."""
    allow = wl.tmp / f"allow-{port}.txt"
    allow.write_text("198.51.100.0/24\n")
    argv = ["prlimit", "--nofile=64:64", PY, "-m", "pymmproxy", "-l", f"[::]:{port}",
            "-4", f"127.0.0.1:{target}", "-mark", str(MARK), "-allowed-subnets", str(allow),
            "--header-timeout", str(header_timeout), "-listeners", "1"]  # fmt: skip
    proc = wl.spawn(argv, f"daemon-{port}.log")
    wait_port(wl.ns, LB_V4, port)
    return proc


def test_fd_exhaustion_backs_off_and_recovers(wl: Workload) -> None:
    """RLIMIT_NOFILE 64 and a flood of 400 connections: accepting pauses instead of spinning
    on the ready listener, no crash, serves after."""
    port = PORT + 5
    log = f"daemon-{port}.log"
    proc = start_with_64_fds(wl, port, WHOAMI, header_timeout=30)
    pid = proc.pid  # ip netns exec and prlimit both exec in place

    def flood() -> tuple[float, float, int, int, int]:
        held = []
        began = time.monotonic()  # before any pause could start
        for _ in range(400):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((LB_V4, port))
            held.append(s)
        wait_for(lambda: '"daemon.accept_paused"' in wl.log(log), what="accept_paused")
        at_limit = fds(pid)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(2.0)  # held at the limit, the backlog full: a spinning acceptor would show
        busy = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        pauses = wl.log(log).count('"daemon.accept_paused"')
        span = time.monotonic() - began
        for s in held:
            s.close()
        served = 0
        deadline = time.monotonic() + 30  # a hang guard, not a speed claim
        while served < 20:
            assert time.monotonic() < deadline, f"served {served}/20"
            with contextlib.suppress(OSError), socket.create_connection((LB_V4, port), 5) as s:
                s.sendall(encode_v2(header("192.0.2.96", 42500 + served)) + b"GET /\r\n\r\n")
                if recv_all(s).endswith(b"\n"):
                    served += 1
        return busy, span, pauses, at_limit, served

    busy, span, pauses, at_limit, served = in_ns(wl, flood)
    print(f"\nEMFILE: fds at limit {at_limit}, {pauses} pauses in {span:.1f}s, "
          f"CPU {busy:.1%} of a core, served {served}/20")  # fmt: skip
    assert at_limit >= 60  # the flood did reach the limit
    # Each pause lasts 1 s (README): `span` seconds hold at most span/1 + 1 of them (a slow
    # machine only makes fewer), while an acceptor that retried at once would log one per
    # try, thousands. A lower bound on the pause: behaviour, not speed.
    assert 1 <= pauses <= span / 1.0 + 2
    assert served == 20
    assert proc.poll() is None
    proc.terminate()
    assert proc.wait(10) == 0
    assert "Traceback" not in wl.log(log)


def test_no_descriptor_for_the_target_pauses_accepting_too(wl: Workload) -> None:
    """With one descriptor left, accept() works but the target's socket cannot be made: that
    connection is reset and accepting pauses (1 s), so the next ones wait in the backlog
    instead of each being accepted only to be reset, and are served once descriptors free."""
    port = PORT + 9
    log = f"daemon-{port}.log"
    proc = start_with_64_fds(wl, port, ECHO, header_timeout=60)
    pid = proc.pid  # ip netns exec and prlimit both exec in place
    base = stable_fds(pid)  # once wait_port's probe connection has gone
    held: list[socket.socket] = []
    # made in the namespace now (a thread each): after the reset only connect() is timed
    waiting = [ns_socket(wl.ns) for _ in range(10)]
    try:
        if (64 - base) % 2 == 0:  # an odd number left: the last one goes to an accept()
            held.append(open_conn(wl, port))  # a header never sent: one descriptor
            wait_for(lambda: fds(pid) == base + 1, what="the headerless connection")
        for i in range(40):  # two descriptors each, until one finds none for its target
            s = open_conn(wl, port)
            s.sendall(encode_v2(header("192.0.2.97", 42600 + i)) + b"hi")
            try:
                ok = s.recv(2) == b"hi"
            except OSError:
                ok = False
            if not ok:
                reset_at = time.monotonic()
                s.close()
                break
            held.append(s)
        else:
            pytest.fail("never ran short of descriptors")
        wait_for(lambda: '"daemon.accept_paused"' in wl.log(log), what="accept_paused")
        assert "no socket for the target" in wl.log(log)
        for i, s in enumerate(waiting):  # handshaken by the kernel, queued in the backlog
            s.settimeout(5)
            s.connect((LB_V4, port))
            s.sendall(encode_v2(header("192.0.2.98", 42700 + i)) + b"hi")
        time.sleep(0.2)  # without a pause all ten are accepted and reset by now
        # Still inside the 1 s pause, or this check proves nothing (a very slow host).
        assert time.monotonic() - reset_at < 0.9, "too slow to see the pause"
        assert all(_still_open(s) for s in waiting)
        for s in held[:12]:
            s.close()
        for s in waiting:
            s.settimeout(10)
            assert s.recv(2) == b"hi"  # served once the pause ends
    finally:
        for s in held + waiting:
            s.close()
    assert proc.poll() is None
    proc.terminate()
    assert proc.wait(10) == 0
    assert "Traceback" not in wl.log(log)


def _ends_in_reset(s: socket.socket) -> bool:
    """Read ``s`` to its end: True if that end is a reset, False if a FIN."""
    try:
        while s.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    return False


def _timers(out: str, pairs: list[tuple[str, str]]) -> list[str]:
    """The TCP timer ``ss -tno`` shows per socket whose (local, peer) ends with a pair."""
    timers = []
    for line in out.splitlines():
        local, peer = line.split()[2:4]
        if any(local.endswith(a) and peer.endswith(b) for a, b in pairs):
            timers.append(line.split("timer:(")[1].split(",")[0] if "timer:(" in line else "none")
    return timers


def test_both_sides_get_tcp_keepalive_and_it_can_be_turned_off(wl: Workload) -> None:
    """Peers that vanish without a FIN (a rebooted LB, a dropped NAT entry) are found, as
    go-mmproxy's Go runtime does: 15 s idle, then a probe every 15 s."""
    for port, flags, expect in (
        (PORT + 7, (), "keepalive"),
        (PORT + 8, ("--keepalive", "0"), "none"),
    ):
        wl.daemon("-4", f"127.0.0.1:{ECHO}", *flags, port=port)
        with relayed(wl, port, "192.0.2.98", 42700 + port) as s:
            out = wl.ns.run(["ss", "-tnoH", "state", "established"]).stdout
            accepted = (f":{port}", f":{s.getsockname()[1]}")  # from the load balancer
            upstream = (f":{42700 + port}", f":{ECHO}")  # from the spoofed client's port
            assert _timers(out, [accepted, upstream]) == [expect, expect], out
