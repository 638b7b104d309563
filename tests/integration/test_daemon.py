"""The daemon in a namespace, driven with hand-made PROXY headers (no HAProxy needed).

The "load balancer" here is the test itself, connecting from the workload's own address;
the pathway (fwmark 123) is installed with ``pymmproxy pathway add`` and the namespace has a
foreign default route, so a missing reply path would show as a hang, not a pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import threading
import time

import pytest

from pymmproxy.proxyproto import Command, Family, Header, Transport, encode_v1, encode_v2
from tests.integration.conftest import (
    LB_V4,
    LB_V6,
    PY,
    Workload,
    catches,
    closed_soon,
    log_events,
    ns_connect,
    ns_socket,
    reset_by_proxy,
    wait_for,
)
from tests.nsutil import recv_all

pytestmark = [pytest.mark.netns]

WHOAMI, ECHO, SINK, DOWN = 8080, 8081, 8082, 8089
PORT = 8001


def header(src: str, sport: int, *, dport: int = PORT) -> Header:
    v6 = ":" in src
    fam, dst = (Family.INET6, LB_V6) if v6 else (Family.INET, LB_V4)
    return Header(2, Command.PROXY, fam, Transport.STREAM, src, sport, dst, dport)


def local_header() -> Header:
    return Header(2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, None, None, None, None)


def open_conn(wl: Workload, port: int = PORT, timeout: float = 5.0) -> socket.socket:
    return ns_connect(wl.ns, LB_V4, port, timeout)


def whoami(wl: Workload, raw_header: bytes, port: int = PORT) -> str:
    with open_conn(wl, port) as s:
        s.sendall(raw_header + b"GET / HTTP/1.0\r\n\r\n")
        reply = recv_all(s).decode()
    return reply.rsplit("\r\n\r\n", 1)[-1].strip()


@pytest.fixture(scope="module")
def wl(workload: Workload) -> Workload:
    workload.service("whoami", WHOAMI)
    workload.service("echo", ECHO)
    workload.service("sink-hash", SINK)
    workload.daemon("-4", f"127.0.0.1:{WHOAMI}", "-6", f"[::1]:{WHOAMI}",
                    "--header-timeout", "1", port=PORT)  # fmt: skip
    workload.daemon("-4", f"127.0.0.1:{ECHO}", "-6", f"[::1]:{ECHO}", port=PORT + 1)
    workload.daemon("-4", f"127.0.0.1:{SINK}", "-6", "none", port=PORT + 2)
    workload.daemon("-4", f"127.0.0.1:{DOWN}", "-6", f"[::1]:{DOWN}", port=PORT + 3)
    return workload


@pytest.mark.parametrize(
    ("src", "sport"), [("192.0.2.55", 41000), ("203.0.113.9", 1), ("2001:db8:1::55", 65535)]
)
def test_v2_service_sees_client_address_and_port(wl: Workload, src: str, sport: int) -> None:
    assert whoami(wl, encode_v2(header(src, sport))) == f"{src} {sport}"


def test_v1_service_sees_client_address(wl: Workload) -> None:
    assert whoami(wl, encode_v1(header("192.0.2.56", 40001))) == "192.0.2.56 40001"
    assert whoami(wl, encode_v1(header("2001:db8:1::56", 40002))) == "2001:db8:1::56 40002"


def test_v2_with_crc32c_and_tlvs_accepted(wl: Workload) -> None:
    assert (
        whoami(wl, encode_v2(header("192.0.2.57", 40003), with_crc32c=True)) == "192.0.2.57 40003"
    )


def test_port_in_use_falls_back_to_any_port(wl: Workload) -> None:
    with open_conn(wl) as held:
        held.sendall(encode_v2(header("192.0.2.58", 40004)))
        log = f"service-whoami-{WHOAMI}.log"  # held is relayed first (the two connections
        wait_for(  # may reach different workers, and the second must find the port taken)
            lambda: any(e["port"] == 40004 for e in log_events(wl, log, "conn")),
            what="the held connection at the service",
        )
        seen = whoami(wl, encode_v2(header("192.0.2.58", 40004)))
    host, port = seen.split()
    assert host == "192.0.2.58"
    assert port != "40004"


def test_local_health_check_is_relayed_unspoofed(wl: Workload) -> None:
    seen = whoami(wl, encode_v2(local_header()))
    assert seen.split()[0] == "127.0.0.1"
    assert whoami(wl, b"PROXY UNKNOWN\r\n").split()[0] == "127.0.0.1"


def test_bytes_after_header_in_same_segment_are_forwarded(wl: Workload) -> None:
    with open_conn(wl, PORT + 1) as s:
        s.sendall(encode_v2(header("192.0.2.60", 40010)) + b"hello")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"hello"


def test_ten_megabytes_each_way_intact(wl: Workload) -> None:
    payload = os.urandom(10 * 1024 * 1024)
    with open_conn(wl, PORT + 1, timeout=30) as s:
        s.sendall(encode_v2(header("192.0.2.61", 40011)))
        received = bytearray()

        def reader() -> None:
            while chunk := s.recv(1 << 20):
                received.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # half-close: the echo still answers everything
        t.join(30)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_half_close_client_to_service(wl: Workload) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    with open_conn(wl, PORT + 2, timeout=30) as s:
        s.sendall(encode_v2(header("192.0.2.62", 40012)) + payload)
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s).decode().split()
    assert answer == [hashlib.sha256(payload).hexdigest(), str(len(payload))]


def test_bad_header_resets_only_that_connection(wl: Workload) -> None:
    with open_conn(wl) as good:
        good.sendall(encode_v2(header("192.0.2.63", 40013)))
        for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n",
                        b"\r\n\r\n\x00\r\nQUIT\n\xff" + bytes(20)):  # fmt: skip
            reset_by_proxy(open_conn(wl), garbage)  # refused with a reset, not a FIN
        good.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert recv_all(good).decode().endswith("192.0.2.63 40013\n")


@pytest.mark.parametrize("transport", [Transport.DGRAM, Transport.UNSPEC])
def test_a_proxy_header_over_tcp_must_say_stream(wl: Workload, transport: Transport) -> None:
    """A DGRAM (or UNSPEC) transport in a TCP connection's header is refused with a reset
    and counted as ``not_stream``, as go-mmproxy refuses it; nothing is spoofed."""
    bad = Header(2, Command.PROXY, Family.INET, transport, "192.0.2.64", 40014, LB_V4, PORT)
    reset_by_proxy(open_conn(wl), encode_v2(bad) + b"GET / HTTP/1.0\r\n\r\n")
    wait_for(
        lambda: (
            f'not_stream", "error": "PROXY over TCP needs transport STREAM, got '
            f"{transport.name}" in wl.log(f"daemon-{PORT}.log")
        ),
        what="the not_stream log line",
    )


def test_header_timeout_resets(wl: Workload) -> None:
    # The socket's 10 s timeout is a hang guard (10x the header timeout), not a speed claim.
    start = time.monotonic()  # before connect: the timer starts at accept, maybe before it returns
    with open_conn(wl, timeout=10) as s:
        reset_by_proxy(s, b"PROXY TCP4 ")
        assert time.monotonic() - start > 0.8  # not before the 1 s header timeout


def test_target_down_resets_client_and_daemon_recovers(wl: Workload) -> None:
    with open_conn(wl, PORT + 3) as s:  # its 5 s timeout is the hang guard
        reset_by_proxy(s, encode_v2(header("192.0.2.64", 40014)) + b"GET / HTTP/1.0\r\n\r\n")
    svc = wl.service("whoami", 8089)
    try:
        assert whoami(wl, encode_v2(header("192.0.2.64", 40015)), PORT + 3) == "192.0.2.64 40015"
    finally:
        svc.kill()
        svc.wait()


def test_no_target_for_family_resets(wl: Workload) -> None:
    reset_by_proxy(open_conn(wl, PORT + 2), encode_v2(header("2001:db8:1::65", 40016)) + b"x")
    assert "no -6 target" in wl.log(f"daemon-{PORT + 2}.log")


def test_peer_not_in_allow_list_is_refused(wl: Workload) -> None:
    proc = wl.daemon("-4", f"127.0.0.1:{WHOAMI}", port=PORT + 4, allow="203.0.113.0/24\n")
    # Refused at accept, before reading: send nothing (unread bytes would make the kernel
    # reset even a plain close, and the reset could not be told from the proxy's own).
    reset_by_proxy(lambda: open_conn(wl, PORT + 4))
    with ns_socket(wl.ns) as s:  # with a header and a request: still nothing relayed
        s.settimeout(5)
        s.bind((LB_V4, 0))
        lb = f'"lb": "{LB_V4}:{s.getsockname()[1]}"'  # (an IPv4 peer of [::], logged as IPv4)
        # Unread bytes: the kernel resets even a plain close, so here either end will do.
        with contextlib.suppress(ConnectionResetError):  # (may come before connect returns)
            s.connect((LB_V4, PORT + 4))
            s.sendall(encode_v2(header("192.0.2.66", 40017)) + b"GET / HTTP/1.0\r\n\r\n")
            assert closed_soon(s)
    # A request relayed after the refusal: once the service logged it, it would have
    # logged the refused one before (same whoami service, connections logged in order).
    assert whoami(wl, encode_v2(header("192.0.2.166", 40117))) == "192.0.2.166 40117"
    assert "192.0.2.66" not in wl.log(f"service-whoami-{WHOAMI}.log")
    rejected = [x for x in wl.log(f"daemon-{PORT + 4}.log").splitlines() if lb in x]
    assert len(rejected) == 1
    assert '"reason": "not_allowed"' in rejected[0]
    proc.terminate()
    assert proc.wait(10) == 0


def workers_ready(wl: Workload, port: int) -> None:
    """Wait until a ``-listeners 2`` daemon's parent has all its workers up: from then on it
    forwards signals (before, a SIGHUP is ignored and a SIGTERM is the default action)."""
    wait_for(lambda: '"daemon.workers_ready"' in wl.log(f"daemon-{port}.log"), what="workers")


def test_sigterm_drains_open_transfer_without_loss(wl: Workload) -> None:
    port = PORT + 5
    proc = wl.daemon(
        "-4", f"127.0.0.1:{SINK}", "--drain-timeout", "20", "-listeners", "2", port=port
    )
    workers_ready(wl, port)
    payload = os.urandom(20 * 1024 * 1024)
    with open_conn(wl, port, timeout=30) as s:
        s.sendall(encode_v2(header("192.0.2.67", 40018)) + payload[: 1 << 20])
        proc.send_signal(signal.SIGTERM)
        # Each worker logs daemon.draining once its listener is closed.
        wait_for(lambda: wl.log(f"daemon-{port}.log").count('"daemon.draining"') == 2)
        with open_conn_refused(wl, port):
            pass
        s.sendall(payload[1 << 20 :])
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s).decode().split()
    assert answer == [hashlib.sha256(payload).hexdigest(), str(len(payload))]
    assert proc.wait(20) == 0


class open_conn_refused:  # noqa: N801
    """Asserts the listener is gone (new connections refused) while draining."""

    def __init__(self, wl: Workload, port: int) -> None:
        self.wl, self.port = wl, port

    def __enter__(self) -> None:
        with pytest.raises(ConnectionRefusedError):
            open_conn(self.wl, self.port).close()

    def __exit__(self, *exc: object) -> None:
        return None


def test_sighup_reloads_allow_list_and_keeps_connections(wl: Workload) -> None:
    port = PORT + 6
    # One process: its log says when it has handled each SIGHUP (with workers, how many
    # lines a reload logs is the parent's business; test_metrics covers that).
    proc = wl.daemon("-4", f"127.0.0.1:{ECHO}", "-listeners", "1", port=port)
    wait_for(lambda: catches(proc.pid, signal.SIGHUP), what="the SIGHUP handler")
    log = f"daemon-{port}.log"
    allow_file = wl.tmp / f"allow-{port}.txt"
    with open_conn(wl, port) as kept:
        kept.sendall(encode_v2(header("192.0.2.68", 40019)) + b"one")
        assert kept.recv(3) == b"one"
        allow_file.write_text("not a network\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: '"daemon.reload_failed"' in wl.log(log))
        assert '"daemon.reload"' not in wl.log(log)
        allow_file.write_text("203.0.113.0/24\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: '"daemon.reload"' in wl.log(log))
        reset_by_proxy(lambda: open_conn(wl, port))  # refused at accept: nothing sent
        kept.sendall(b"two")
        assert kept.recv(3) == b"two"
    proc.terminate()
    assert proc.wait(10) == 0


LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"


@pytest.mark.parametrize("ending", ["half_close", "reset", "close"])
def test_no_fd_leak_after_many_connections(wl: Workload, ending: str) -> None:
    port = PORT + 7 + ["half_close", "reset", "close"].index(ending)
    proc = wl.daemon("-4", f"127.0.0.1:{ECHO}", "-listeners", "1", port=port)
    fds = f"/proc/{proc.pid}/fd"  # ip netns exec execs in place: this is the daemon
    before = len(os.listdir(fds))
    for i in range(1000):
        with open_conn(wl, port) as s:
            s.sendall(encode_v2(header("192.0.2.70", 20000 + i)) + b"ping")
            if ending == "half_close":
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s) == b"ping"
            elif ending == "reset":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    deadline = time.monotonic() + 5
    while (after := len(os.listdir(fds))) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after <= before, [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]
    proc.terminate()
    assert proc.wait(10) == 0
    assert "Traceback" not in wl.log(f"daemon-{port}.log")


def test_sigusr1_with_workers_logs_stats_and_keeps_serving(wl: Workload) -> None:
    """With ``-listeners 2`` the parent forwards SIGUSR1 (its default action would kill
    it, and with it every worker): each worker logs ``daemon.stats``, none stops."""
    port = PORT + 10
    proc = wl.daemon("-4", f"127.0.0.1:{ECHO}", "-listeners", "2", port=port)
    proc.send_signal(signal.SIGUSR1)  # at once: a worker may still be starting (ignored then)
    deadline = time.monotonic() + 5
    while '"daemon.workers_ready"' not in wl.log(f"daemon-{port}.log"):
        assert time.monotonic() < deadline, wl.log(f"daemon-{port}.log")
        time.sleep(0.05)
    assert proc.poll() is None
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while wl.log(f"daemon-{port}.log").count('"daemon.stats"') < 2:
        assert time.monotonic() < deadline, wl.log(f"daemon-{port}.log")
        time.sleep(0.1)
    assert proc.poll() is None
    with open_conn(wl, port) as s:
        s.sendall(encode_v2(header("192.0.2.71", 40021, dport=port)) + b"still")
        assert s.recv(5) == b"still"
    proc.terminate()
    assert proc.wait(10) == 0


@pytest.mark.parametrize(
    ("kind", "option", "flags"),
    [
        (socket.SOCK_DGRAM, socket.SO_REUSEADDR, ["-p", "udp"]),
        (socket.SOCK_STREAM, socket.SO_REUSEPORT, ["-listeners", "2"]),
    ],
    ids=["udp-reuseaddr", "tcp-reuseport"],
)
def test_a_port_another_program_holds_is_refused_not_shared(
    wl: Workload, kind: int, option: int, flags: list[str]
) -> None:
    """A UDP socket with SO_REUSEADDR, or a TCP listener with SO_REUSEPORT (go-mmproxy
    -listeners 4 as root, say), would otherwise silently share the port with us."""
    port = PORT + 40
    squatter = ns_socket(wl.ns, socket.AF_INET, kind)
    try:
        squatter.setsockopt(socket.SOL_SOCKET, option, 1)
        squatter.bind((LB_V4, port))
        if kind == socket.SOCK_STREAM:
            squatter.listen()
        allow = wl.tmp / f"allow-{port}.txt"
        allow.write_text("198.51.100.0/24\n")
        res = wl.ns.run(
            [PY, "-m", "pymmproxy", "-l", f"{LB_V4}:{port}", "-4", "127.0.0.1:9",
             "-allowed-subnets", str(allow), *flags],
            check=False, timeout=20,
        )  # fmt: skip
    finally:
        squatter.close()
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"pymmproxy: cannot listen on {LB_V4}:{port}: Address already in use"
    ]


def test_connections_left_at_the_drain_timeout_are_reset_on_both_sides(wl: Workload) -> None:
    """A cut-off upload must not reach the target as a complete one (EOF): reset it too."""
    port = PORT + 41
    proc = wl.daemon(
        "-4", f"127.0.0.1:{SINK}", "--drain-timeout", "0.5", "-listeners", "2", port=port
    )
    sport = 40041
    workers_ready(wl, port)
    with open_conn(wl, port, timeout=10) as s:
        s.sendall(encode_v2(header("192.0.2.68", sport)) + os.urandom(1 << 20))
        wait_for(lambda: f'"port": {sport}' in wl.log(f"service-sink-hash-{SINK}.log"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        with pytest.raises(ConnectionResetError):
            recv_all(s)
    deadline = time.monotonic() + 5
    while True:
        done = [
            line for line in wl.log(f"service-sink-hash-{SINK}.log").splitlines()
            if '"done"' in line and f'"port": {sport}' in line
        ]  # fmt: skip
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert done, "the sink never finished"
    assert "ConnectionResetError" in done[0]  # not a hash of a partial upload
    closed = [json.loads(line) for line in wl.log(f"daemon-{port}.log").splitlines()
              if '"conn.closed"' in line and f":{sport}" in line]  # fmt: skip
    assert [e["reason"] for e in closed] == ["aborted"]  # not "done": it was cut off


@pytest.mark.parametrize("lb", [LB_V4, LB_V6])
def test_the_ipv4_wildcard_serves_ipv6_load_balancers_too(wl: Workload, lb: str) -> None:
    """go-mmproxy's default ``-l 0.0.0.0:8443`` listens on both families (Go's wildcard), so
    an LB that connects over IPv6 is served; pymmproxy takes it the same way."""
    port = PORT + 42
    proc = wl.daemon("-l", f"0.0.0.0:{port}", "-4", f"127.0.0.1:{WHOAMI}",
                     "-6", f"[::1]:{WHOAMI}", "-listeners", "1", port=port)  # fmt: skip
    try:
        with ns_connect(wl.ns, lb, port) as s:
            s.sendall(
                encode_v2(header("192.0.2.42", 42042, dport=port)) + b"GET / HTTP/1.0\r\n\r\n"
            )
            reply = recv_all(s).decode()
        assert reply.rsplit("\r\n\r\n", 1)[-1].strip() == "192.0.2.42 42042"
        logged = f'"lb": "{lb}:' if lb == LB_V4 else f'"lb": "[{lb}]:'  # a v4 peer as v4
        wait_for(lambda: logged in wl.log(f"daemon-{port}.log"), what=logged)  # conn.closed
        # the listen address as written (and as go-mmproxy logs it)
        assert f'"listen": "0.0.0.0:{port}"' in wl.log(f"daemon-{port}.log")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_a_second_stop_reports_the_connections_it_reset(wl: Workload) -> None:
    """The second SIGTERM resets what the drain was waiting for; ``daemon.stopped`` says how
    many (it counted them after the reset had already closed them: 0)."""
    port = PORT + 43
    proc = wl.daemon("-4", f"127.0.0.1:{ECHO}", "-listeners", "1", port=port)
    conns = [open_conn(wl, port) for _ in range(3)]
    try:
        for i, s in enumerate(conns):
            s.sendall(encode_v2(header("192.0.2.43", 43000 + i)) + b"ping")
            assert s.recv(4) == b"ping"
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: '"daemon.draining"' in wl.log(f"daemon-{port}.log"))
        time.sleep(1.2)  # past the window in which a second signal is the same stop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        for s in conns:
            with pytest.raises(ConnectionResetError):
                recv_all(s)
    finally:
        for s in conns:
            s.close()
    stopped = [json.loads(line) for line in wl.log(f"daemon-{port}.log").splitlines()
               if '"daemon.stopped"' in line]  # fmt: skip
    assert [e["aborted"] for e in stopped] == [3]
