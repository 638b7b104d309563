"""SourcePolicy: string tests on canonical addresses agree with ``ipaddress``."""

from __future__ import annotations

import ipaddress
import socket
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymmproxy.policy import SourcePolicy, host_addresses
from tests.nsutil import netns, require_root_and_tools, run_in

V4_RULES = [
    ("0.0.0.0/8", "unspecified"), ("127.0.0.0/8", "loopback"), ("224.0.0.0/4", "multicast"),
    ("169.254.0.0/16", "link_local"), ("255.255.255.255/32", "broadcast"),
]  # fmt: skip
V6_RULES = [
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("ff00::/8", "multicast"),
    ("fe80::/10", "link_local"),
]  # fmt: skip


def reference(text: str, own: frozenset[str]) -> str | None:
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    rules = V4_RULES if addr.version == 4 else V6_RULES
    for net, kind in rules:
        if addr in ipaddress.ip_network(net):
            return kind
    return "own_address" if str(addr) in own or text in own else None


def canonical(family: int, packed: bytes) -> str:
    return socket.inet_ntop(family, packed)


# Random addresses, biased towards the edges of every refused range.
_V4_PREFIXES = [b"", b"\x00", b"\x7f", b"\xe0", b"\xef", b"\xf0", b"\xa9\xfe", b"\xa9\xff",
                b"\xff\xff\xff", b"\xc0\x00\x02"]  # fmt: skip
_MAPPED = b"\x00" * 10 + b"\xff\xff"
_V6_PREFIXES = [b"", b"\xff", b"\xfe\x80", b"\xfe\xbf", b"\xfe\xc0", b"\x00" * 15, _MAPPED,
                _MAPPED + b"\x7f", b"\x00\xff"]  # fmt: skip
v4 = st.tuples(st.sampled_from(_V4_PREFIXES), st.binary(min_size=4, max_size=4)).map(
    lambda t: canonical(socket.AF_INET, (t[0] + t[1])[:4])
)
v6 = st.tuples(st.sampled_from(_V6_PREFIXES), st.binary(min_size=16, max_size=16)).map(
    lambda t: canonical(socket.AF_INET6, (t[0] + t[1])[:16])
)


@settings(max_examples=3000)
@given(st.one_of(v4, v6))
def test_agrees_with_ipaddress(text: str) -> None:
    own = frozenset({"192.0.2.1", "2001:db8::1"})
    assert SourcePolicy(own).refuses(text) == reference(text, own)


@pytest.mark.parametrize(
    ("text", "kind"),
    [("127.0.0.1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("::1", "loopback"),
     ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"),
     ("ff02::1", "multicast"), ("ff::1", None), ("169.254.169.254", "link_local"),
     ("fe80::1", "link_local"), ("fec0::1", None), ("255.255.255.255", "broadcast"),
     ("192.0.2.1", "own_address"), ("::ffff:192.0.2.1", "own_address"),
     ("198.51.100.7", None), ("2001:db8:1::7", None), ("1.2.3.4", None),
     ("240.0.0.1", None), ("::127.0.0.1", None), ("127.255.255.255", "loopback"),
     ("192.0.2.255", "broadcast"), ("203.0.113.77", "own_address"),
     ("2001:db8:5::1234", "own_address"), ("2001:db8:6::1", None)],
)  # fmt: skip
def test_kinds(text: str, kind: str | None) -> None:
    subnets = [ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8:5::/64")]
    policy = SourcePolicy(host_addresses("192.0.2.1").own, broadcast={"192.0.2.255"}, nets=subnets)
    assert policy.refuses(text) == kind


def test_own_addresses_of_a_specific_listener_are_it_and_the_hosts() -> None:
    """Not only the listen address: the host's others (its public address) too."""
    host = host_addresses("0.0.0.0").own
    assert host_addresses("2001:DB8:0:0::1").own == host | {"2001:db8::1"}
    assert host_addresses("192.0.2.1").own == host | {"192.0.2.1"}


def test_own_addresses_of_a_wildcard_listener_come_from_proc() -> None:
    found = host_addresses("0.0.0.0").own
    assert found == host_addresses("::").own
    assert "127.0.0.1" in found  # every namespace has loopback up here
    assert all("/" not in ip for ip in found)


def test_subnet_broadcasts_and_local_prefixes_are_the_hosts() -> None:
    """A header claiming a local subnet's broadcast address would be bound as "any address"
    (the service would see this host); every address of a local route (AnyIP) is ours."""
    require_root_and_tools()
    with netns("pmsp") as ns:
        setup = [
            ["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
            ["link", "set", "d0", "up"],
            ["link", "set", "d1", "up"],
            ["addr", "add", "203.0.113.5/24", "dev", "d0"],
            ["route", "add", "local", "198.51.100.0/24", "dev", "lo"],
            ["-6", "route", "add", "local", "2001:db8:5::/64", "dev", "lo"],
            # a pathway's table: local for marked packets only, not the host's
            ["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "123"],
            ["-6", "route", "add", "local", "::/0", "dev", "lo", "table", "123"],
            ["-6", "route", "add", "local", "2000::/3", "dev", "lo", "table", "124"],
            ["-6", "route", "add", "local", "2001:db8:7::7/128", "dev", "lo"],  # AnyIP /128
            ["route", "add", "local", "192.0.2.77/32", "dev", "lo"],
        ]
        for argv in setup:
            subprocess.run(["ip", "-n", ns.name, *argv], check=True)
        host = run_in(ns, lambda: host_addresses("0.0.0.0"))
        policy = run_in(ns, lambda: SourcePolicy.for_host("0.0.0.0"))
    assert {"203.0.113.5", "2001:db8:7::7", "192.0.2.77"} <= host.own
    assert "203.0.113.255" in host.broadcast
    assert {str(n) for n in host.nets} == {"198.51.100.0/24", "2001:db8:5::/64"}
    assert policy.refuses("203.0.113.255") == "broadcast"
    assert policy.refuses("198.51.100.77") == "own_address"
    assert policy.refuses("2001:db8:5::9") == "own_address"
    assert policy.refuses("::ffff:198.51.100.77") == "own_address"
    assert policy.refuses("203.0.114.1") is None
    assert policy.refuses("2a00:1450::1") is None  # local only in table 124, not the host's
