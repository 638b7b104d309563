"""SourcePolicy: string tests on canonical addresses agree with ``ipaddress``."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymmproxy.policy import SourcePolicy, own_addresses

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
     ("198.51.100.7", None), ("2001:db8:1::7", None), ("1.2.3.4", None)],
)  # fmt: skip
def test_kinds(text: str, kind: str | None) -> None:
    assert SourcePolicy(own_addresses("192.0.2.1")).refuses(text) == kind


def test_own_addresses_of_a_specific_listener_are_it_and_the_hosts() -> None:
    """Not only the listen address: the host's others (its public address) too."""
    host = own_addresses("0.0.0.0")
    assert own_addresses("2001:DB8:0:0::1") == host | {"2001:db8::1"}
    assert own_addresses("192.0.2.1") == host | {"192.0.2.1"}


def test_own_addresses_of_a_wildcard_listener_come_from_proc() -> None:
    found = own_addresses("0.0.0.0")
    assert found == own_addresses("::")
    assert "127.0.0.1" in found  # every namespace has loopback up here
    assert all("/" not in ip for ip in found)
