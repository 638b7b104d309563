"""Security: default deny, dual-stack allow lists, sources that are never spoofed."""

from __future__ import annotations

import signal
import subprocess

import pytest

from pymmproxy.proxyproto import Command, Family, Header, Transport, encode_v1, encode_v2
from tests.integration.conftest import (
    LB_V4,
    LB_V6,
    PY,
    Workload,
    catches,
    log_events,
    ns_connect,
    reset_by_proxy,
    wait_for,
)
from tests.integration.test_daemon import header, open_conn, whoami

pytestmark = [pytest.mark.netns]
WHOAMI = 8381
PORT = 8301


@pytest.fixture(scope="module")
def wl(workload: Workload) -> Workload:
    workload.service("whoami", WHOAMI)
    workload.daemon("-4", f"127.0.0.1:{WHOAMI}", "-6", f"[::1]:{WHOAMI}", port=PORT)
    return workload


def served(wl: Workload, lb: str, port: int, src: str, sport: int) -> bool:
    """Whether a request from ``lb`` carrying ``src:sport`` gets the service's answer."""
    try:  # a peer refused at accept may be reset before its connect() returns, or later
        with ns_connect(wl.ns, lb, port) as s:
            s.sendall(encode_v2(header(src, sport)) + b"GET / HTTP/1.0\r\n\r\n")
            reply = b"".join(iter(lambda: s.recv(4096), b""))
    except ConnectionResetError:
        return False
    return reply.decode().endswith(f"{src} {sport}\n")


def test_no_allow_list_refuses_to_start(wl: Workload) -> None:
    out = wl.ns.run([PY, "-m", "pymmproxy", "-l", f"{LB_V4}:{PORT + 9}"], check=False)
    assert out.returncode == 2
    assert "no allow list" in out.stderr
    assert out.stderr.count("\n") == 1


DUAL_STACK = [("198.51.100.0/24\n", True, False), ("2001:db8:2::/64\n", False, True),
              ("::ffff:198.51.100.0/120\n", True, False)]  # fmt: skip


@pytest.mark.parametrize(("allow", "v4_ok", "v6_ok"), DUAL_STACK)
def test_dual_stack_listener_matches_mapped_peers_by_address(
    wl: Workload, allow: str, v4_ok: bool, v6_ok: bool
) -> None:
    port = PORT + 1 + DUAL_STACK.index((allow, v4_ok, v6_ok))
    proc = wl.daemon("-4", f"127.0.0.1:{WHOAMI}", "-6", f"[::1]:{WHOAMI}", port=port, allow=allow)
    assert served(wl, LB_V4, port, "192.0.2.100", 43000) is v4_ok  # peer ::ffff:198.51.100.2
    assert served(wl, LB_V6, port, "192.0.2.100", 43001) is v6_ok  # peer 2001:db8:2::2
    proc.terminate()
    assert proc.wait(10) == 0


UNSAFE = [
    ("127.0.0.1", "loopback"), ("127.1.2.3", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("169.254.169.254", "link_local"), ("fe80::1", "link_local"),
    ("255.255.255.255", "broadcast"), (LB_V4, "own_address"), (LB_V6, "own_address"),
    ("198.51.100.255", "broadcast"),  # the LB subnet's: bound as "any address" by the kernel
]  # fmt: skip


@pytest.mark.parametrize(("src", "kind"), UNSAFE)
def test_unsafe_sources_are_not_spoofed(wl: Workload, src: str, kind: str) -> None:
    sport = 43100 + UNSAFE.index((src, kind))
    fam = Family.INET6 if ":" in src else Family.INET
    dst = "2001:db8::1" if ":" in src else "192.0.2.1"
    raw = Header(2, Command.PROXY, fam, Transport.STREAM, src, sport, dst, 443)
    for encoded in (encode_v2(raw), encode_v1(raw)):
        with open_conn(wl, PORT) as s:
            s.sendall(encoded + b"GET / HTTP/1.0\r\n\r\n")
            reset_by_proxy(s)
    assert not [e for e in log_events(wl, f"service-whoami-{WHOAMI}.log", "conn")
                if e["port"] == sport]  # fmt: skip
    log = wl.log(f"daemon-{PORT}.log")
    assert f'"kind": "{kind}"' in log
    assert '"reason": "source_refused"' in log


def test_sighup_rereads_the_hosts_addresses(wl: Workload) -> None:
    """An address added to the host after start is refused as a source after SIGHUP."""
    port, added = PORT + 6, "203.0.113.78"
    proc = wl.daemon("-4", f"127.0.0.1:{WHOAMI}", "-listeners", "2", port=port)
    assert whoami(wl, encode_v2(header(added, 43400)), port) == f"{added} 43400"
    wl.ns.run(["ip", "addr", "add", f"{added}/32", "dev", "lo"])
    try:
        wait_for(lambda: catches(proc.pid, signal.SIGHUP), what="the SIGHUP handler")
        proc.send_signal(signal.SIGHUP)
        wait_for(  # each worker reloads on its own: the next connection may reach either
            lambda: wl.log(f"daemon-{port}.log").count('"daemon.reload"') == 2,
            what="both workers' reload",
        )
        with open_conn(wl, port) as s:
            s.sendall(encode_v2(header(added, 43401)) + b"GET / HTTP/1.0\r\n\r\n")
            reset_by_proxy(s)
    finally:
        wl.ns.run(["ip", "addr", "del", f"{added}/32", "dev", "lo"])
    assert '"kind": "own_address"' in wl.log(f"daemon-{port}.log")
    proc.terminate()
    assert proc.wait(10) == 0


def test_normal_sources_still_spoofed(wl: Workload) -> None:
    assert whoami(wl, encode_v2(header("192.0.2.101", 43200)), PORT) == "192.0.2.101 43200"
    assert whoami(wl, encode_v2(header("2001:db8:1::101", 43201)), PORT) == "2001:db8:1::101 43201"
    # an IPv4 client as a dual-stack LB writes it (INET6 header): relayed as IPv4
    assert whoami(wl, encode_v2(header("::ffff:192.0.2.102", 43202)), PORT) == "192.0.2.102 43202"
    assert whoami(wl, encode_v1(header("::ffff:192.0.2.103", 43203)), PORT) == "192.0.2.103 43203"


def test_allow_any_source_lifts_the_check(wl: Workload) -> None:
    port = PORT + 5
    proc = wl.daemon("-4", f"127.0.0.1:{WHOAMI}", "--allow-any-source", port=port)
    assert whoami(wl, encode_v2(header("127.0.0.5", 43300)), port) == "127.0.0.5 43300"
    assert whoami(wl, encode_v2(header(LB_V4, 43301)), port) == f"{LB_V4} 43301"
    assert '"allow_any_source": true' in wl.log(f"daemon-{port}.log")
    proc.terminate()
    assert proc.wait(10) == 0


def test_headers_over_the_size_limit_are_refused(wl: Workload) -> None:
    """``--max-header-size``: a v2 header whose length field says more is reset at once
    (kind too_long), before its bytes arrive; one within the limit is relayed."""
    port = PORT + 7
    proc = wl.daemon("-4", f"127.0.0.1:{WHOAMI}", "--max-header-size", "1024", port=port)

    def padded(sport: int, pad: int) -> bytes:
        plain = encode_v2(header("192.0.2.104", sport))  # 16 + 12 bytes, no TLVs
        noop = bytes([0x04]) + pad.to_bytes(2, "big") + bytes(pad)
        length = (len(plain) - 16 + len(noop)).to_bytes(2, "big")
        return plain[:14] + length + plain[16:] + noop

    fits = padded(43500, 1024 - 28 - 3)  # 1024 bytes in all
    assert len(fits) == 1024
    assert whoami(wl, fits, port) == "192.0.2.104 43500"
    with open_conn(wl, port) as s:
        s.sendall(padded(43501, 1024 - 28 - 3 + 1)[:16])  # only the fixed part: too long
        reset_by_proxy(s)
    log = wl.log(f"daemon-{port}.log")
    assert '"kind": "too_long"' in log
    proc.terminate()
    assert proc.wait(10) == 0


def test_flags_documented_in_help() -> None:
    helptext = subprocess.run(
        [PY, "-m", "pymmproxy", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--allow-any-source", "--max-pending-headers", "--idle-timeout", "--metrics"):
        assert flag in helptext
