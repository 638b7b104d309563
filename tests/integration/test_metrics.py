"""``--metrics``: what a scrape shows after real traffic; -listeners 2 reload and drain."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pymmproxy.proxyproto import encode_v1, encode_v2
from tests.integration.conftest import (
    LB_V4,
    PY,
    Workload,
    ns_socket,
    reset_by_proxy,
    wait_for,
    wait_port,
)
from tests.integration.test_daemon import header, local_header, open_conn, whoami
from tests.nsutil import recv_all

pytestmark = [pytest.mark.netns]
WHOAMI, ECHO = 8481, 8482
PORT, METRICS = 8401, 9401
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(
    wl: Workload, port: int, path: str = "/metrics", host: str = "127.0.0.1"
) -> tuple[str, str]:
    s = ns_socket(wl.ns, socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(5)
    with s:
        s.connect((host, port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, _, body = recv_all(s).decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body


def scrape(wl: Workload, port: int) -> Samples:
    status, body = http_get(wl, port)
    assert status == "HTTP/1.1 200 OK"
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


@pytest.fixture(scope="module")
def wl(workload: Workload) -> Workload:
    workload.service("whoami", WHOAMI)
    workload.service("echo", ECHO)
    return workload


def test_scrape_after_traffic(wl: Workload) -> None:
    wl.daemon("-4", f"127.0.0.1:{WHOAMI}", "-6", f"[::1]:{WHOAMI}", "-listeners", "1",
              "--metrics", f"127.0.0.1:{METRICS}", port=PORT)  # fmt: skip
    wait_port(wl.ns, "127.0.0.1", METRICS)
    for i in range(3):
        assert whoami(wl, encode_v2(header("192.0.2.110", 44000 + i)), PORT).endswith(
            str(44000 + i)
        )
    assert whoami(wl, encode_v1(header("192.0.2.110", 44010)), PORT).endswith("44010")
    assert whoami(wl, encode_v2(local_header()), PORT).startswith("127.0.0.1")
    for raw in (b"GET / HTTP/1.1\r\n\r\n", encode_v2(header("127.0.0.1", 44020))):
        reset_by_proxy(open_conn(wl, PORT), raw)  # a bad header, a refused source: reset

    def stranger() -> socket.socket:  # a peer outside the allow list
        s = ns_socket(wl.ns)
        s.settimeout(5)
        try:
            s.bind(("127.0.0.1", 0))
            s.connect((LB_V4, PORT))
        except OSError:
            s.close()
            raise
        return s

    reset_by_proxy(stranger)  # refused at accept: nothing sent

    def settled() -> Samples | None:  # every connection closed (and so counted)
        m = scrape(wl, METRICS)
        return m if value(m, "pymmproxy_connections_active") == 0 else None

    m = wait_for(settled, what="no active connection")
    assert value(m, "pymmproxy_connections_accepted_total") == 9  # with wait_port's probe
    assert value(m, "pymmproxy_connections_failed_total", reason="eof_before_header") == 1
    assert value(m, "pymmproxy_connections_relayed_total") == 5
    assert value(m, "pymmproxy_connections_active") == 0
    assert value(m, "pymmproxy_connections_rejected_total", reason="not_allowed") == 1
    assert value(m, "pymmproxy_header_errors_total", kind="bad_signature") == 1
    assert value(m, "pymmproxy_sources_refused_total", kind="loopback") == 1
    assert value(m, "pymmproxy_headers_total", version="2", command="proxy") == 4
    assert value(m, "pymmproxy_headers_total", version="1", command="proxy") == 1
    assert value(m, "pymmproxy_headers_total", version="2", command="local") == 1
    assert value(m, "pymmproxy_relayed_bytes_total", direction="client_to_target") > 0
    assert value(m, "pymmproxy_relayed_bytes_total", direction="target_to_client") > 0
    assert value(m, "pymmproxy_header_wait_seconds_count") == 6
    assert value(m, "pymmproxy_target_connect_seconds_count") == 5
    assert value(m, "pymmproxy_target_connect_seconds_bucket", le="+Inf") == 5
    assert value(m, "process_open_fds") > 0
    assert http_get(wl, METRICS, "/nope")[0] == "HTTP/1.1 404 Not Found"


def test_two_workers_reload_and_drain_together(wl: Workload) -> None:
    port, mports = PORT + 1, (METRICS + 1, METRICS + 2)
    proc = wl.daemon("-4", f"127.0.0.1:{ECHO}", "-listeners", "2", "-v", "0",
                     "--metrics", f"127.0.0.1:{mports[0]}", port=port)  # fmt: skip
    for mport in mports:
        wait_port(wl.ns, "127.0.0.1", mport)
    # From here the parent forwards signals (before, it ignores SIGHUP).
    wait_for(lambda: '"daemon.workers_ready"' in wl.log(f"daemon-{port}.log"))

    def echo_once(i: int) -> bool:
        try:
            with open_conn(wl, port) as s:
                s.sendall(encode_v2(header("192.0.2.111", 44100 + i)) + b"x")
                s.shutdown(socket.SHUT_WR)
                return recv_all(s) == b"x"
        except OSError:  # reset by the proxy: refused
            return False

    assert all(echo_once(i) for i in range(40))
    per_worker = [value(scrape(wl, p), "pymmproxy_connections_relayed_total") for p in mports]
    assert all(n > 0 for n in per_worker), per_worker  # both workers got some
    assert sum(per_worker) == 40

    allow = wl.tmp / f"allow-{port}.txt"
    allow.write_text("203.0.113.0/24\n")
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: wl.log(f"daemon-{port}.log").count('"daemon.reload"') == 2)
    assert not any(echo_once(100 + i) for i in range(40))
    refused = [value(scrape(wl, p), "pymmproxy_connections_rejected_total") for p in mports]
    assert all(n > 0 for n in refused), refused
    assert sum(refused) == 40

    allow.write_text("198.51.100.0/24\n")
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: wl.log(f"daemon-{port}.log").count('"daemon.reload"') == 4)
    kept: list[socket.socket] = []
    while len(kept) < 40 and not all(
        value(scrape(wl, p), "pymmproxy_connections_active") > 0 for p in mports
    ):
        s = open_conn(wl, port, timeout=20)
        s.sendall(encode_v2(header("192.0.2.112", 44300 + len(kept))) + b"x")
        assert s.recv(1) == b"x"
        kept.append(s)
    assert all(value(scrape(wl, p), "pymmproxy_connections_active") > 0 for p in mports)

    proc.send_signal(signal.SIGTERM)
    # Each worker logs daemon.draining once its listener is closed.
    wait_for(lambda: wl.log(f"daemon-{port}.log").count('"daemon.draining"') == 2)
    with pytest.raises(ConnectionRefusedError):
        open_conn(wl, port).close()
    payload = os.urandom(256 * 1024)
    results: list[bool] = []

    def finish(s: socket.socket) -> None:
        got = hashlib.sha256()
        reader = threading.Thread(
            target=lambda: [got.update(c) for c in iter(lambda: s.recv(65536), b"")]
        )
        reader.start()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reader.join(20)
        results.append(got.digest() == hashlib.sha256(payload).digest())
        s.close()

    threads = [threading.Thread(target=finish, args=(s,)) for s in kept]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True] * len(kept)
    assert proc.wait(20) == 0
    assert wl.log(f"daemon-{port}.log").count('"daemon.stopped"') == 2


def test_a_taken_worker_metrics_port_fails_the_start(wl: Workload) -> None:
    """With N workers, every port of PORT..PORT+N-1 is checked before forking: a taken one
    fails the command with one line, not one worker (and READY) later."""
    port, mport = PORT + 2, METRICS + 10
    taken = ns_socket(wl.ns)
    with taken:
        taken.bind(("127.0.0.1", mport + 1))
        taken.listen()
        allow = wl.tmp / f"allow-{port}.txt"
        allow.write_text("198.51.100.0/24\n")
        argv = [PY, "-m", "pymmproxy", "-l", f"[::]:{port}", "-4", f"127.0.0.1:{ECHO}",
                "-allowed-subnets", str(allow), "-listeners", "2",
                "--metrics", f"127.0.0.1:{mport}"]  # fmt: skip
        proc = wl.spawn(argv, f"daemon-{port}.log")
        assert proc.wait(timeout=30) == 1
    lines = wl.log(f"daemon-{port}.log").strip().splitlines()
    assert len(lines) == 1, lines
    assert f"cannot listen on 127.0.0.1:{mport + 1}" in lines[0]
    assert f"takes ports {mport}..{mport + 1}" in lines[0]


def test_a_wildcard_metrics_address_serves_both_families(wl: Workload) -> None:
    """``--metrics :PORT`` means both families, as ``-l``'s wildcard does: each worker's
    port answers IPv4 and IPv6 scrapers; errors name it as the IPv4 wildcard (``0.0.0.0:P``)."""
    port, mport = PORT + 7, METRICS + 20
    wl.daemon("-4", f"127.0.0.1:{ECHO}", "-listeners", "2", "--metrics", f":{mport}", port=port)
    for host in ("127.0.0.1", "::1"):
        for each in (mport, mport + 1):
            wait_port(wl.ns, host, each)
            assert http_get(wl, each, host=host)[0] == "HTTP/1.1 200 OK"
    taken = ns_socket(wl.ns)
    with taken:
        taken.bind(("127.0.0.1", mport + 11))
        taken.listen()
        argv = [PY, "-m", "pymmproxy", "-l", f"[::]:{port + 1}", "-4", f"127.0.0.1:{ECHO}",
                "--allow-any", "-listeners", "2", "--metrics", f"0.0.0.0:{mport + 10}"]  # fmt: skip
        proc = wl.spawn(argv, f"daemon-{port + 1}.log")
        assert proc.wait(timeout=30) == 1
    lines = wl.log(f"daemon-{port + 1}.log").strip().splitlines()
    assert len(lines) == 1, lines
    assert f"cannot listen on 0.0.0.0:{mport + 11}" in lines[0]


def test_a_worker_forked_again_keeps_the_allow_list_its_siblings_run(wl: Workload) -> None:
    """Not the file as it is now: edited without a SIGHUP, it must not reach one worker."""
    port = PORT + 5
    proc = wl.daemon("-4", f"127.0.0.1:{ECHO}", "-listeners", "2", "-v", "0", port=port)
    log = f"daemon-{port}.log"
    wait_for(lambda: '"daemon.workers_ready"' in wl.log(log))
    allow = wl.tmp / f"allow-{port}.txt"
    allow.write_text("203.0.113.0/24\n")  # the load balancer is out
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: wl.log(log).count('"daemon.reload"') == 2)
    allow.write_text("198.51.100.0/24\n")  # edited back, but no SIGHUP
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2
    os.kill(int(children[0]), signal.SIGKILL)
    wait_for(lambda: wl.log(log).count('"daemon.reload"') == 3)  # the new worker caught up

    def refused(i: int) -> bool:
        try:
            with open_conn(wl, port) as s:
                s.sendall(encode_v2(header("192.0.2.113", 44400 + i)) + b"x")
                s.shutdown(socket.SHUT_WR)
                return recv_all(s) != b"x"
        except OSError:  # reset by the proxy: refused
            return True

    assert all(refused(i) for i in range(40))  # both workers, the new one too
    assert '"daemon.worker_exited"' in wl.log(log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
