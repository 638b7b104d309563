"""The pathway recipe is complete: a spoofed connection to a loopback service gets its reply.

A namespace gets a default route that leads elsewhere (via 203.0.113.254 / 2001:db8:1::254),
like a real host. A socket with IP_TRANSPARENT + SO_MARK, bound to a foreign client address,
connects to a listener on 127.0.0.1 / ::1: the listener's SYN-ACK (from loopback, unmarked)
only comes back with the pathway in place. The probe runs inside the namespace as
``python tests/integration/test_pathway_reply.py MARK``; it tries IPv4 and IPv6 in parallel
and prints e.g. ``4=ok 6=fail``.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MARK = 123
TIMEOUT = 1.0
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
CLIENT = {4: ("192.0.2.77", 40000), 6: ("2001:db8::77", 40000)}
SERVICE = {4: "127.0.0.1", 6: "::1"}


def probe(version: int, mark: int) -> bool:
    """Connect from the spoofed client address to a fresh loopback listener."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as srv, socket.socket(family) as cli:
        srv.bind((SERVICE[version], 0))
        srv.listen()
        if version == 4:
            cli.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            cli.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        cli.bind(CLIENT[version])
        cli.settimeout(TIMEOUT)
        try:
            cli.connect((SERVICE[version], srv.getsockname()[1]))
        except OSError:
            return False
        conn, peer = srv.accept()
        conn.close()
        return bool(peer[0] == CLIENT[version][0])


def probe_both(mark: int) -> str:
    """``4=ok|fail 6=ok|fail``, both probed at once to keep the failure cases short."""
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip((4, 6), pool.map(lambda v: probe(v, mark), (4, 6)), strict=True))
    return " ".join(f"{v}={'ok' if good else 'fail'}" for v, good in results.items())


if __name__ == "__main__":
    print(probe_both(int(sys.argv[1])))
    raise SystemExit(0)

import pytest  # noqa: E402 - the probe above must not need pytest

from tests.nsutil import Netns, netns, require_root_and_tools  # noqa: E402

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def host() -> Iterator[Netns]:
    """A namespace whose default routes point out of a veth (no dummy driver here)."""
    require_root_and_tools()
    with netns("pmr") as ns:
        for command in (
            "ip link add rp0 type veth peer name rp1",
            "ip link set rp0 up",
            "ip link set rp1 up",
            "ip addr add 203.0.113.1/24 dev rp0",
            "ip -6 addr add 2001:db8:1::1/64 dev rp0 nodad",
            "ip route add default via 203.0.113.254 dev rp0",
            "ip -6 route add default via 2001:db8:1::254 dev rp0",
        ):
            ns.run(command.split())
        yield ns


def connects(ns: Netns) -> str:
    return ns.run([sys.executable, __file__, str(MARK)], cwd=ROOT).stdout.strip()


def pathway(ns: Netns, verb: str) -> None:
    ns.run([sys.executable, "-m", "pymmproxy.pathway", verb, str(MARK)], cwd=ROOT)


def test_reply_needs_the_pathway(host: Netns) -> None:
    assert connects(host) == "4=fail 6=fail", "replies came back without a pathway"
    pathway(host, "add")
    try:
        assert connects(host) == "4=ok 6=ok", "no reply with the pathway in place"
    finally:
        pathway(host, "del")
    assert connects(host) == "4=fail 6=fail", "pathway del left the reply path"
