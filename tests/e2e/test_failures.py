"""Rejections and failures: allow list, header timeout, target down, PROXY v2 LOCAL."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pymmproxy.lab import CLIENT_V4, CLIENT_V6, LB_FRONT_V4, LB_FRONT_V6, Frontend, Lab, Proc
from tests.e2e.helpers import (
    IMPLS,
    available,
    body,
    events,
    module_lab,
    need,
    next_sport,
    start_proxy,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

WK = "198.51.100.2"
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
V2_LOCAL = V2_SIG + b"\x20\x00\x00\x00"  # version 2, LOCAL, AF_UNSPEC, no addresses
HTTP_GET = b"GET / HTTP/1.0\r\n\r\n"
# (scenario, impl) -> lb frontend port; the proxy listens on 8000 + it, its target on 8000 + 2x
PORTS = {
    (sc, impl): base + n
    for sc, base in (("deny", 120), ("down", 140), ("check", 150))
    for n, impl in enumerate(IMPLS)
}
HEADER_TIMEOUT_PORT = 8311  # pymmproxy only: go-mmproxy has no header timeout
WHOAMI_PORTS = [2 * PORTS[sc, impl] + 8000 for sc in ("deny", "check") for impl in IMPLS]


def target(sc: str, impl: str) -> int:
    return 8000 + 2 * PORTS[sc, impl]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    frontends = [
        Frontend(p, f"{WK}:{8000 + p}", 2, check=sc == "check") for (sc, _), p in PORTS.items()
    ]
    with module_lab(frontends) as lab:
        listen = [a for p in WHOAMI_PORTS for a in (f"127.0.0.1:{p}", f"[::1]:{p}")]
        lab.start_service("whoami", *listen)
        yield lab


@pytest.fixture(scope="module")
def proxies(lab: Lab) -> set[str]:
    started = set()
    for impl in available():
        for (sc, i), port in PORTS.items():
            if i == impl:
                allowed = ("203.0.113.0/24",) if sc == "deny" else ("198.51.100.1/32",)
                start_proxy(lab, impl, f"{WK}:{8000 + port}", target(sc, impl), allowed=allowed)
        started.add(impl)
    if "py" in started:
        start_proxy(lab, "py", f"{WK}:{HEADER_TIMEOUT_PORT}", target("check", "py"),
                    extra=["--header-timeout", "1"])  # fmt: skip
    return started


def seen_by(lab: Lab, port: int) -> list[dict[str, Any]]:
    """``conn`` events of the whoami service on local port ``port``."""
    whoami: Proc = next(p for p in lab.procs if p.name == "whoami")
    return [e for e in events(whoami, "conn") if e["lport"] == port]


def via_lb(lab: Lab, src: str, port: int) -> tuple[int, dict[str, Any]]:
    sport = next_sport()
    dst = LB_FRONT_V6 if ":" in src else LB_FRONT_V4
    return sport, lab.connect_from_client(src, dst, port, sport=sport, timeout=10)


def lb_raw(lab: Lab, port: int, payload: bytes, timeout: float = 5) -> tuple[bytes, float, bool]:
    """Connect from the lb ns straight to the daemon, send ``payload``, read to the end:
    what came back, when it ended, and whether that end was a reset (else a FIN)."""
    with lab.lb.socket(socket.AF_INET) as sock:
        sock.settimeout(timeout)
        start = time.monotonic()  # (the daemon's timers start at accept, maybe before this returns)
        sock.connect((WK, port))
        sock.sendall(payload)
        chunks, reset = [], False
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            reset = True
        return b"".join(chunks), time.monotonic() - start, reset


def direct_whoami(lab: Lab, port: int) -> int:
    """One request straight to the whoami service on ``port`` (from the workload ns, not
    through any proxy); its source port, once the service has logged it."""
    sport = next_sport()
    job = {"src": "127.0.0.1", "sport": sport, "dst": "127.0.0.1", "port": port,
           "send": HTTP_GET.decode()}  # fmt: skip
    (res,) = lab.clients_in(lab.workload, [job])
    assert body(res) == f"127.0.0.1 {sport}", res
    return sport


@pytest.mark.parametrize("src", [CLIENT_V4[0], CLIENT_V6[0]])
def test_allow_list_rejects_lb(lab: Lab, proxies: set[str], impl: str, src: str) -> None:
    """The LB is not in the allow list: closed without data, nothing reaches the service."""
    need(impl, proxies)
    tport = target("deny", impl)
    before = len(seen_by(lab, tport))
    _, res = via_lb(lab, src, PORTS["deny", impl])
    assert res["received"] == 0, res
    # The daemon resets the LB's connection; HAProxy then ends the client's its own way (a
    # FIN or a reset, by version and timing): through the LB either end is right.
    assert res["end"] in {"eof", "reset"}, res
    # A request after the refusal, straight to the service: the service logs connections
    # in the order it accepts them, so a relayed refused one would show before this one.
    marker = direct_whoami(lab, tport)
    seen = seen_by(lab, tport)[before:]
    assert [(e["peer"], e["port"]) for e in seen] == [("127.0.0.1", marker)], seen


def test_header_timeout_closes_silent_connection(lab: Lab, proxies: set[str]) -> None:
    need("py", proxies)
    # Straight from the lb ns (no HAProxy in between): the daemon's own reset arrives. The
    # 10 s socket timeout is a hang guard (10x the header timeout), not a speed claim.
    data, elapsed, reset = lb_raw(lab, HEADER_TIMEOUT_PORT, b"", timeout=10)
    assert data == b""
    assert reset, "the header timeout ended the connection with a FIN, not a reset"
    assert elapsed > 0.7, elapsed  # not before the 1 s header timeout


def test_target_down_then_recovers(lab: Lab, proxies: set[str], impl: str) -> None:
    """No service: the client is closed; once the service is up, requests work."""
    need(impl, proxies)
    port, tport = PORTS["down", impl], target("down", impl)
    _, res = via_lb(lab, CLIENT_V4[1], port)
    assert res["received"] == 0, res
    # Ended, not timed out (the client's 10 s timeout is the hang guard). Through HAProxy,
    # which ends the client's connection its own way: a FIN or a reset are both right.
    assert res["end"] in {"eof", "reset"}, res
    svc = lab.start_service("whoami", f"127.0.0.1:{tport}", f"[::1]:{tport}")
    try:
        for src in (CLIENT_V4[1], CLIENT_V6[1]):
            sport, res = via_lb(lab, src, port)
            assert body(res) == f"{src} {sport}", res
    finally:
        lab.stop(svc)


def test_haproxy_local_health_check(lab: Lab, proxies: set[str], impl: str) -> None:
    """``check check-send-proxy`` sends PROXY v2 LOCAL; the daemon relays it, HAProxy sees UP."""
    need(impl, proxies)
    fe = next(f for f in lab.frontends if f.port == PORTS["check", impl])
    up = wait_for(lambda: lab.haproxy_status(fe).startswith("UP"), timeout=20)
    assert up, lab.haproxy_status(fe)
    peers = wait_for(lambda: {e["peer"] for e in seen_by(lab, target("check", impl))}, 10)
    assert peers, "health checks never reached the service"
    assert peers <= {"127.0.0.1", "::1"}, peers
    sport, res = via_lb(lab, CLIENT_V4[2], fe.port)  # real traffic still carries the client
    assert body(res) == f"{CLIENT_V4[2]} {sport}"


def test_direct_v2_local_is_relayed_from_own_address(
    lab: Lab, proxies: set[str], impl: str
) -> None:
    need(impl, proxies)
    data, _, _ = lb_raw(lab, 8000 + PORTS["check", impl], V2_LOCAL + HTTP_GET)
    peer = data.partition(b"\r\n\r\n")[2].decode().split()
    assert peer, data
    assert peer[0] in {"127.0.0.1", "::1"}, data
