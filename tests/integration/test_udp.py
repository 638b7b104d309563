"""``-p udp`` in a namespace, pymmproxy and go-mmproxy side by side on the same traffic.

The test is the load balancer: it wraps datagrams in PROXY v2 DGRAM headers for spoofed
clients and sends them from the workload's own address. Targets are UDP echoes (on loopback
and on a non-loopback local address) whose replies name the source they saw. The namespace
has a foreign default route, so a reply that the pathway fails to bring back is lost, not
silently delivered. Every behavioural test runs against both implementations with the same
assertions; the client port ranges differ so the two never contend for a spoofed address.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.conftest import LB_V4, LB_V6, MARK, PY, Workload, ns_socket, wait_for
from tests.integration.udp_tools import UdpEcho, dgram, local_dgram, parse_seen

pytestmark = [pytest.mark.netns]

GO = "/usr/bin/go-mmproxy"
IMPLS = ("pymmproxy", "go-mmproxy")
ECHO_LO, ECHO_DEV = 7100, 7101
DEV_V4, DEV_V6 = "198.51.100.7", "2001:db8:2::7"  # non-loopback local target addresses
# Local through a route alone (AnyIP; IPv4 in a table of its own): datagrams to them arrive,
# but the kernel sends from them only for a transparent socket.
ANYIP_V4, ANYIP_V6 = "203.0.113.241", "2001:db8:5::9"
PORTS = {  # listen port per (implementation, target kind)
    ("pymmproxy", "lo"): 9201, ("pymmproxy", "dev"): 9202,
    ("go-mmproxy", "lo"): 9301, ("go-mmproxy", "dev"): 9302,
}  # fmt: skip
CAP_PORT, TERM_PORT, INST_PORT, CAP = 9203, 9204, 9205, 4
V4_ANY_PORT, ONE_ADDR_PORT, LATE_PORT, LATE_ECHO = 9206, 9207, 9208, 7102
_client_ports = {"pymmproxy": itertools.count(21000), "go-mmproxy": itertools.count(31000)}


@dataclass
class Env:
    wl: Workload
    echo: UdpEcho
    procs: dict[str, subprocess.Popen[bytes]]
    #: A long-lived LB socket for LOCAL datagrams: go-mmproxy keeps ONE unspoofed flow for
    #: all of them and answers the LB that opened it, so that LB must stay the same.
    lb: socket.socket

    def local_lb(self) -> socket.socket:
        while recv(self.lb, 0.01) is not None:  # leftovers of an earlier test
            pass
        return self.lb


def client_port(impl: str) -> int:
    """A source port never used before in this run by ``impl`` (no flow reuse across tests)."""
    return next(_client_ports[impl])


def proxy_argv(
    impl: str, port: int, target: str, *extra: str, listen: str | None = None
) -> list[str]:
    t4, t6 = ("127.0.0.1", "[::1]") if target == "lo" else (DEV_V4, f"[{DEV_V6}]")
    echo = ECHO_LO if target == "lo" else ECHO_DEV
    exe = [GO] if impl == "go-mmproxy" else [PY, "-m", "pymmproxy"]
    return [*exe, "-p", "udp", "-l", listen or f"[::]:{port}", "-4", f"{t4}:{echo}",
            "-6", f"{t6}:{echo}", "-mark", str(MARK), "-allowed-subnets", "ALLOW",
            "-close-after", "1", "-v", "2", *extra]  # fmt: skip


def lb_socket(wl: Workload, v6: bool = False, bind: str | None = None) -> socket.socket:
    s = ns_socket(wl.ns, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind or (LB_V6 if v6 else LB_V4), 0))
    s.settimeout(2.0)
    return s


def ask(s: socket.socket, port: int, data: bytes, timeout: float = 2.0) -> bytes | None:
    """Send one datagram to the proxy; the reply, or None when nothing came back in time."""
    v6 = s.family == socket.AF_INET6
    s.sendto(data, (LB_V6 if v6 else LB_V4, port))
    return recv(s, timeout)


def recv(s: socket.socket, timeout: float) -> bytes | None:
    s.settimeout(timeout)
    try:
        return s.recv(65535)
    except TimeoutError:
        return None


def spawn(wl: Workload, argv: list[str], log: str) -> subprocess.Popen[bytes]:
    # Written once: rewriting it under a proxy that is still starting let go-mmproxy read
    # an empty list (= allow everyone) in one CI run.
    allow = wl.tmp / "udp-allow.txt"
    if not allow.exists():
        tmp = allow.with_suffix(".tmp")
        tmp.write_text(f"{LB_V4}/32\n{LB_V6}/128\n")
        tmp.replace(allow)
    return wl.spawn([str(allow) if a == "ALLOW" else a for a in argv], log)


def wait_ready(wl: Workload, impl: str, port: int) -> None:
    with lb_socket(wl) as s:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if ask(s, port, dgram("192.0.2.200", client_port(impl), b"probe"), 0.2):
                return
    raise AssertionError(f"{impl} on :{port} never answered")


def live_flows(wl: Workload) -> set[tuple[str, int]]:
    """Local (client) endpoints of the connected UDP sockets in the namespace."""
    out = wl.ns.run(["ss", "-H", "-u", "-a", "-n"]).stdout
    found = set()
    for line in out.splitlines():
        if not line.startswith("ESTAB"):
            continue
        local = line.split()[3]
        host, _, port = local.rpartition(":")
        found.add((host.strip("[]"), int(port)))
    return found


def log_of(env: Env, name: str) -> str:
    return env.wl.log(name)


@pytest.fixture(scope="module")
def env(workload: Workload) -> Iterator[Env]:
    wl = workload
    wl.ns.run(["ip", "addr", "add", f"{DEV_V4}/24", "dev", "wl0"])
    wl.ns.run(["ip", "-6", "addr", "add", f"{DEV_V6}/64", "dev", "wl0", "nodad"])
    wl.ns.run(["ip", "route", "add", "local", "203.0.113.240/28", "dev", "lo", "table", "100"])
    wl.ns.run(["ip", "rule", "add", "to", "203.0.113.240/28", "lookup", "100"])
    wl.ns.run(["ip", "-6", "route", "add", "local", "2001:db8:5::/64", "dev", "lo"])
    socks = []
    for host, port in (("127.0.0.1", ECHO_LO), ("::1", ECHO_LO), (DEV_V4, ECHO_DEV),
                       (DEV_V6, ECHO_DEV)):  # fmt: skip
        s = ns_socket(wl.ns, socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, port))
        socks.append(s)
    echo = UdpEcho(socks).start()
    procs = {}
    for (impl, target), port in PORTS.items():
        procs[f"{impl}-{target}"] = spawn(
            wl, proxy_argv(impl, port, target), f"{impl}-{target}.log"
        )
    procs["cap"] = spawn(
        wl,
        proxy_argv(
            "pymmproxy",
            CAP_PORT,
            "lo",
            "--udp-max-clients",
            str(CAP),
            "-listeners",
            "1",
            "-close-after",
            "5",
        ),  # (flows outlive a slow test: only eviction ends them)
        "cap.log",
    )
    try:
        for (impl, _), port in PORTS.items():
            wait_ready(wl, impl, port)
        wait_ready(wl, "pymmproxy", CAP_PORT)
        with lb_socket(wl) as lb:
            yield Env(wl, echo, procs, lb)
    finally:
        echo.stop()


@pytest.mark.parametrize("target", ["lo", "dev"])
@pytest.mark.parametrize("impl", IMPLS)
def test_target_sees_exact_client_and_reply_comes_back(env: Env, impl: str, target: str) -> None:
    port = PORTS[impl, target]
    clients = ["192.0.2.10", "203.0.113.77", "2001:db8:1::10", "2001:db8:ffff::abcd"]
    with lb_socket(env.wl) as lb4, lb_socket(env.wl, v6=True) as lb6:
        for src in clients:
            sport = client_port(impl)
            lb = lb6 if ":" in src else lb4
            for n in range(2):
                payload = f"{impl}-{src}-{n}".encode()
                reply = ask(lb, port, dgram(src, sport, payload))
                # The reply is the target's datagram as is: no PROXY header in front.
                assert reply == b"SEEN %s %d|%s" % (src.encode(), sport, payload), (src, reply)
            assert (src, sport) in env.echo.sources()


@pytest.mark.parametrize("impl", IMPLS)
def test_flow_relays_target_pushes_until_idle_close(env: Env, impl: str) -> None:
    port = PORTS[impl, "lo"]
    client = ("203.0.113.50", client_port(impl))
    with lb_socket(env.wl) as lb:
        assert ask(lb, port, dgram(*client, b"hi")) is not None
        assert client in live_flows(env.wl)
        env.echo.send_to(client, b"push-1")  # unsolicited: still goes to the LB, raw
        assert recv(lb, 2.0) == b"push-1"
        pushed = time.monotonic()
        while client in live_flows(env.wl):
            assert time.monotonic() - pushed < 4.0, "flow not closed after -close-after 1"
            time.sleep(0.05)
        idle = time.monotonic() - pushed
        assert idle >= 0.9, f"closed after {idle:.2f}s of idleness, before -close-after"
        env.echo.send_to(client, b"push-2")  # no socket any more: never reaches the LB
        assert recv(lb, 0.5) is None
        reply = ask(lb, port, dgram(*client, b"again"))  # a new flow for the same client
        assert reply is not None
        assert parse_seen(reply) == (*client, b"again")


GARBAGE = [
    b"",
    b"\x00" * 64,
    os.urandom(200),
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\nv1 is tcp only",
    b"PROXY UNKNOWN\r\nv1 unknown",
    dgram("192.0.2.1", 1000, b"")[:20],  # truncated v2
    dgram("192.0.2.1", 1000, b"bad-version").replace(b"\x21\x12", b"\x31\x12", 1),
    dgram("192.0.2.1", 1000, b"stream").replace(b"\x21\x12", b"\x21\x11", 1),
    dgram("192.0.2.1", 1000, b"unspec").replace(b"\x21\x12", b"\x21\x02", 1),
    dgram("192.0.2.1", 1000, b"length").replace(b"\x00\x0c", b"\xff\xff", 1),
]


@pytest.mark.parametrize("impl", IMPLS)
def test_garbage_is_dropped_and_survived(env: Env, impl: str) -> None:
    port = PORTS[impl, "lo"]
    before = len(env.echo.seen)
    with lb_socket(env.wl) as lb:
        for junk in GARBAGE:
            assert ask(lb, port, junk, timeout=0.1) is None
        client = ("192.0.2.99", client_port(impl))
        reply = ask(lb, port, dgram(*client, b"still alive"))
    assert reply is not None
    assert parse_seen(reply) == (*client, b"still alive")
    assert [p for _, _, p in env.echo.seen[before:]] == [b"still alive"]
    assert env.procs[f"{impl}-lo"].poll() is None


@pytest.mark.parametrize("impl", IMPLS)
def test_local_datagrams_are_relayed_unspoofed(env: Env, impl: str) -> None:
    reply = ask(env.local_lb(), PORTS[impl, "lo"], local_dgram(b"health"))
    assert reply is not None
    ip, _, payload = parse_seen(reply)
    assert (ip, payload) == ("127.0.0.1", b"health")


@pytest.mark.parametrize("impl", IMPLS)
def test_allow_list_applies_to_the_load_balancer(env: Env, impl: str) -> None:
    client = ("192.0.2.123", client_port(impl))
    with lb_socket(env.wl, bind="127.0.0.1") as stranger:
        stranger.sendto(dgram(*client, b"sneaky"), ("127.0.0.1", PORTS[impl, "lo"]))
        assert recv(stranger, 0.5) is None
    assert client not in env.echo.sources()


def _transcript(env: Env, impl: str) -> list[object]:
    """One fixed traffic script; outcomes with the client ports normalised away."""
    port = PORTS[impl, "lo"]
    base = client_port(impl)
    for _ in range(10):
        client_port(impl)
    # (LB: v4/v6/local, datagram, answered): an answer may take up to 2 s on a loaded host;
    # a step that expects none waits 0.5 s (a late answer would show up in the next step)
    steps: list[tuple[bool | None, bytes, bool]] = [
        (False, dgram("203.0.113.1", base, b"a"), True),
        (False, dgram("203.0.113.2", base + 1, b"b"), True),
        (True, dgram("2001:db8:1::1", base + 2, b"c"), True),
        (False, b"PROXY TCP4 203.0.113.1 192.0.2.1 5 6\r\nv1", False),
        (False, os.urandom(40), False),
        (None, local_dgram(b"local"), True),
        (False, dgram("203.0.113.1", base, b"again"), True),
        (False, dgram("203.0.113.3", base + 3, b""), True),  # empty payload
    ]
    out: list[object] = []
    with lb_socket(env.wl) as lb4, lb_socket(env.wl, v6=True) as lb6:
        for v6, data, answered in steps:
            lb = env.local_lb() if v6 is None else lb6 if v6 else lb4
            reply = ask(lb, port, data, timeout=2.0 if answered else 0.5)
            if reply is None:
                out.append(None)
            else:
                ip, sport, payload = parse_seen(reply)
                out.append((ip, sport - base if ip not in ("127.0.0.1", "::1") else "-", payload))
    return out


def test_side_by_side_same_observable_behaviour(env: Env) -> None:
    ours, theirs = _transcript(env, "pymmproxy"), _transcript(env, "go-mmproxy")
    assert ours == theirs
    assert ours == [
        ("203.0.113.1", 0, b"a"), ("203.0.113.2", 1, b"b"), ("2001:db8:1::1", 2, b"c"),
        None, None, ("127.0.0.1", "-", b"local"),
        ("203.0.113.1", 0, b"again"), ("203.0.113.3", 3, b""),
    ]  # fmt: skip


def test_client_cap_evicts_the_longest_idle(env: Env) -> None:
    clients = [(f"203.0.113.{100 + i}", client_port("pymmproxy")) for i in range(CAP + 2)]
    with lb_socket(env.wl) as lb:
        for client in clients:
            assert ask(lb, CAP_PORT, dgram(*client, b"x")) is not None
        flows = live_flows(env.wl)
        assert not set(clients[:2]) & flows  # the two oldest were evicted
        assert set(clients[2:]) <= flows
        env.echo.send_to(clients[0], b"to-evicted")
        env.echo.send_to(clients[-1], b"to-tracked")
        assert recv(lb, 2.0) == b"to-tracked"
        assert recv(lb, 0.3) is None
        # A flood of spoofed clients stays within the cap; a real client still gets through.
        for i in range(300):
            lb.sendto(dgram(f"192.0.2.{i % 250 + 1}", 50000 + i, b"flood"), (LB_V4, CAP_PORT))
        time.sleep(0.5)
        while recv(lb, 0.05) is not None:
            pass
        assert len([f for f in live_flows(env.wl) if f[0].startswith("192.0.2.")]) <= CAP
        reply = ask(lb, CAP_PORT, dgram("198.51.100.200", 1234, b"real"))
        while reply is not None and reply.startswith(b"SEEN 192.0.2."):  # a late flood answer
            reply = recv(lb, 2.0)
    assert reply == b"SEEN 198.51.100.200 1234|real"
    assert "udp_evicted" in log_of(env, "cap.log")


def test_pymmproxy_logs_dropped_datagrams(env: Env) -> None:
    port = PORTS["pymmproxy", "lo"]
    with lb_socket(env.wl) as lb:
        assert ask(lb, port, b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nx", timeout=0.2) is None
        assert ask(env.local_lb(), port, local_dgram(b"health")) is not None
    deadline = time.monotonic() + 10  # a hang guard: the log line is written at once
    while "v1_over_udp" not in (log := log_of(env, "pymmproxy-lo.log")) or "udp.local" not in log:
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.05)
    assert '"bad_header"' in log


def test_a_client_keeps_its_flow_through_any_lb_socket(env: Env) -> None:
    """The default for UDP is one process (one flow table): datagrams of one client that come
    through other LB sockets reuse its flow, from the client's own port, and replies go to
    the LB socket of the client's latest datagram."""
    port, client = PORTS["pymmproxy", "lo"], ("192.0.2.70", client_port("pymmproxy"))
    lbs = [lb_socket(env.wl) for _ in range(6)]
    try:
        for n, lb in enumerate(lbs):
            assert ask(lb, port, dgram(*client, b"%d" % n)) == b"SEEN %s %d|%d" % (
                client[0].encode(),
                client[1],
                n,
            )
        env.echo.send_to(client, b"pushed")
        assert recv(lbs[-1], 2.0) == b"pushed"
        assert all(recv(lb, 0.2) is None for lb in lbs[:-1])
    finally:
        for lb in lbs:
            lb.close()
    # (Every reply named the client's own port: a second flow would have had another. The
    # flow table itself is not checked here: -close-after 1 may have closed it by now.)


def test_an_ipv4_mapped_client_is_relayed_as_ipv4(env: Env) -> None:
    """A dual-stack LB writes IPv4 clients as ``::ffff:a.b.c.d`` in an INET6 header: that
    client is IPv4 (the ``-4`` target, an IPv4 socket), as go-mmproxy reads it too."""
    sport = client_port("pymmproxy")
    with lb_socket(env.wl, v6=True) as lb6:
        reply = ask(lb6, PORTS["pymmproxy", "lo"], dgram("::ffff:192.0.2.91", sport, b"mapped"))
    assert reply == b"SEEN 192.0.2.91 %d|mapped" % sport


def ask_from(lb: socket.socket, dest: tuple[str, int], data: bytes) -> tuple[bytes, str]:
    """Send to ``dest``; the reply and the address it came from (fails on no reply)."""
    lb.sendto(data, dest)
    lb.settimeout(2.0)
    reply, src = lb.recvfrom(65535)
    return reply, src[0]


@pytest.mark.parametrize("v6", [False, True], ids=["lb-v4", "lb-v6"])
@pytest.mark.parametrize("impl", IMPLS)
def test_wildcard_listener_answers_from_the_address_the_lb_sent_to(
    env: Env, impl: str, v6: bool
) -> None:
    """With ``[::]`` the LB sends to other addresses of the host: a second one on the
    interface, then its own, then an AnyIP one. The kernel's own pick of a source for the
    answers is the LB's address every time: an LB that checks where answers come from would
    drop them. pymmproxy answers from the address each datagram came to (IP_PKTINFO, a
    transparent socket); go-mmproxy 2.1 leaves it to the kernel."""
    own = LB_V6 if v6 else LB_V4  # the kernel's pick for an answer to the LB
    dests = [DEV_V6, own, ANYIP_V6] if v6 else [DEV_V4, own, ANYIP_V4]
    port = PORTS[impl, "lo"]
    # (a client of the LB's family: go-mmproxy picks the target by the LB's family)
    client = ("2001:db8:1::80" if v6 else "192.0.2.80", client_port(impl))
    with lb_socket(env.wl, v6=v6) as lb:
        for n, dest in enumerate(dests):  # a new flow, then the fast path of a known one
            reply, src = ask_from(lb, (dest, port), dgram(*client, b"%d" % n))
            assert reply == b"SEEN %s %d|%d" % (client[0].encode(), client[1], n)
            assert src == (dest if impl == "pymmproxy" else own), (dest, src)
        env.echo.send_to(client, b"pushed")  # a datagram the target starts goes the same way
        pushed, (src, *_) = lb.recvfrom(65535)
        assert pushed == b"pushed"
        assert src == (dests[-1] if impl == "pymmproxy" else own)


def test_ipv4_wildcard_and_a_specific_address_answer_from_the_address_used(env: Env) -> None:
    """``0.0.0.0`` (both families, as in Go) answers from the address the LB sent to; a
    specific listen address is served by the loop's transport and answers from itself."""
    wl = env.wl
    listens = {V4_ANY_PORT: "0.0.0.0", ONE_ADDR_PORT: DEV_V4}
    procs = {
        port: spawn(wl, proxy_argv("pymmproxy", port, "lo", listen=f"{host}:{port}"),
                    f"listen-{port}.log")
        for port, host in listens.items()
    }  # fmt: skip
    try:
        for port in listens:
            client = ("203.0.113.80", client_port("pymmproxy"))
            deadline = time.monotonic() + 15
            with lb_socket(wl) as lb:
                while True:  # until it listens: every answer names the address it came from
                    try:
                        reply, src = ask_from(lb, (DEV_V4, port), dgram(*client, b"any"))
                        break
                    except TimeoutError:
                        assert time.monotonic() < deadline, wl.log(f"listen-{port}.log")
            assert (reply, src) == (b"SEEN 203.0.113.80 %d|any" % client[1], DEV_V4)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0


def test_a_flow_is_read_again_after_the_target_was_down(env: Env) -> None:
    """A datagram to a target that is not up yet comes back as an ICMP port unreachable, an
    error on the flow's socket; once the target is up, the same flow relays its replies."""
    wl = env.wl
    argv = proxy_argv("pymmproxy", LATE_PORT, "lo", "-close-after", "30")
    proc = spawn(wl, [a.replace(f":{ECHO_LO}", f":{LATE_ECHO}") for a in argv], "late.log")
    echo = None
    try:
        wait_for(lambda: "daemon.listening" in wl.log("late.log"), what="late.log listening")
        client = ("192.0.2.82", client_port("pymmproxy"))
        with lb_socket(wl) as lb:
            assert ask(lb, LATE_PORT, dgram(*client, b"early"), 0.5) is None  # nobody there
            wait_for(lambda: "target_refused" in wl.log("late.log"), what="the refusal")
            sock = ns_socket(wl.ns, socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", LATE_ECHO))
            echo = UdpEcho([sock]).start()
            reply = ask(lb, LATE_PORT, dgram(*client, b"late"))
        assert reply == b"SEEN 192.0.2.82 %d|late" % client[1]  # the same flow, same port
    finally:
        if echo is not None:
            echo.stop()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0


def test_v6_client_behind_v4_load_balancer(env: Env) -> None:
    """pymmproxy picks the target by the client's family; go-mmproxy 2.1 drops these."""
    client = ("2001:db8:1::77", client_port("pymmproxy"))
    with lb_socket(env.wl) as lb4:
        reply = ask(lb4, PORTS["pymmproxy", "lo"], dgram(*client, b"mixed"))
    assert reply == b"SEEN 2001:db8:1::77 %d|mixed" % client[1]


def test_sigterm_closes_listener_and_flows(env: Env) -> None:
    wl = env.wl
    proc = spawn(wl, proxy_argv("pymmproxy", TERM_PORT, "lo", "-close-after", "60"), "term.log")
    wait_ready(wl, "pymmproxy", TERM_PORT)
    clients = [("203.0.113.201", client_port("pymmproxy")) for _ in range(3)]
    with lb_socket(wl) as lb:
        for client in clients:
            assert ask(lb, TERM_PORT, dgram(*client, b"x")) is not None
    assert set(clients) <= live_flows(wl)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert not set(clients) & live_flows(wl)
    assert "daemon.stopped" in wl.log("term.log")


def test_instance_with_proto_udp(env: Env) -> None:
    """``--instance NAME`` runs a ``proto=udp`` line of instances.tsv as a UDP proxy."""
    wl = env.wl
    conf = wl.tmp / "udp-conf"
    conf.mkdir()
    (conf / "allow.txt").write_text(f"{LB_V4}/32\n")
    (conf / "pathways.conf").write_text(f"{MARK}\n")
    name = f"udpt{os.getpid()}"
    (conf / "instances.tsv").write_text(
        f"{name}\t{MARK}\t[::]:{INST_PORT}\t127.0.0.1\t{ECHO_LO}\t::1\tproto=udp\n"
    )
    argv = [PY, "-m", "pymmproxy", "--instance", name, "--config-dir", str(conf),
            "-close-after", "5", "--udp-max-clients", "8"]  # fmt: skip
    proc = wl.spawn(argv, "instance.log")
    try:
        wait_ready(wl, "pymmproxy", INST_PORT)
        client = ("192.0.2.33", client_port("pymmproxy"))
        with lb_socket(wl) as lb:
            assert ask(lb, INST_PORT, dgram(*client, b"inst")) == b"SEEN %s %d|inst" % (
                client[0].encode(),
                client[1],
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
