"""pymmproxy.net.pktinfo: what a reply must carry to leave from the address a datagram came to."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from pymmproxy.net import pktinfo
from pymmproxy.net.pktinfo import IP_PKTINFO, IPV6_PKTINFO, SOL_IP, SOL_IPV6, ReplyFrom


def in_pktinfo(ifindex: int, spec_dst: str, dst: str) -> tuple[int, int, bytes]:
    data = struct.pack("=i4s4s", ifindex, socket.inet_aton(spec_dst), socket.inet_aton(dst))
    return SOL_IP, IP_PKTINFO, data


def in6_pktinfo(dst: str, ifindex: int) -> tuple[int, int, bytes]:
    return (
        SOL_IPV6,
        IPV6_PKTINFO,
        struct.pack("=16si", socket.inet_pton(socket.AF_INET6, dst), ifindex),
    )


def test_ipv4_answers_from_the_local_address_the_kernel_named_without_an_interface() -> None:
    # spec_dst is what the kernel says to answer from (for a broadcast: a unicast address)
    got = ReplyFrom()([in_pktinfo(3, "198.51.100.7", "198.51.100.255")])
    assert got == [in_pktinfo(0, "198.51.100.7", "0.0.0.0")]


def test_ipv6_answers_from_the_destination_and_keeps_the_interface_only_for_link_local() -> None:
    reply = ReplyFrom()
    assert reply([in6_pktinfo("2001:db8:2::7", 4)]) == [in6_pktinfo("2001:db8:2::7", 0)]
    assert reply([in6_pktinfo("fe80::1", 4)]) == [in6_pktinfo("fe80::1", 4)]
    assert reply([in6_pktinfo("febf::1", 4)]) == [in6_pktinfo("febf::1", 4)]  # fe80::/10
    assert reply([in6_pktinfo("fec0::1", 4)]) == [in6_pktinfo("fec0::1", 0)]


def test_an_ipv6_multicast_destination_leaves_the_source_to_the_kernel() -> None:
    assert ReplyFrom()([in6_pktinfo("ff02::1", 2)]) is None


def test_a_dual_stack_socket_prefers_the_ipv4_option_in_either_order() -> None:
    """An IPv4 datagram on ``[::]`` carries both; the IPv4 one names a unicast source even
    for a broadcast, the IPv6 one only the mapped destination."""
    v4 = in_pktinfo(3, "198.51.100.7", "198.51.100.255")
    v6 = in6_pktinfo("::ffff:198.51.100.255", 3)
    want = [in_pktinfo(0, "198.51.100.7", "0.0.0.0")]
    assert ReplyFrom()([v6, v4]) == want
    assert ReplyFrom()([v4, v6]) == want


def test_no_or_short_options_leave_the_source_to_the_kernel() -> None:
    reply = ReplyFrom()
    assert reply([]) is None
    assert reply([(socket.SOL_SOCKET, 99, b"x")]) is None
    assert reply([(SOL_IP, IP_PKTINFO, b"\0" * 11)]) is None
    assert reply([(SOL_IPV6, IPV6_PKTINFO, b"\0" * 19)]) is None


@given(st.lists(st.binary(min_size=4, max_size=4), min_size=1, max_size=600))
def test_the_cache_stays_bounded_and_right(addresses: list[bytes]) -> None:
    reply = ReplyFrom()
    for addr in addresses:
        data = struct.pack("=i4s4s", 1, addr, addr)
        got = reply([(SOL_IP, IP_PKTINFO, data)])
        assert got == [(SOL_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, addr, bytes(4)))]
        assert len(reply._cache) <= 256


def test_the_kernel_reports_the_local_address_and_the_reply_leaves_from_it(
    own_netns: Callable[[Callable[[], Any]], Any],
) -> None:
    """A real round trip on loopback, where 127.0.0.2 is a local address too: a datagram to
    127.0.0.2 on a ``0.0.0.0`` socket is answered from 127.0.0.2, not the kernel's pick."""

    def run() -> tuple[bool, bool, str, str]:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
        ):
            server.bind(("0.0.0.0", 0))
            port = server.getsockname()[1]
            wildcard = pktinfo.is_wildcard(server)
            pktinfo.enable(server)
            client.bind(("127.0.0.1", 0))
            client.settimeout(2)
            client.sendto(b"q", ("127.0.0.2", port))
            _, anc, _, addr = server.recvmsg(100, pktinfo.ANCILLARY_SIZE)
            via = ReplyFrom()(anc)
            assert via is not None
            server.sendmsg([b"a"], via, 0, addr)
            _, src_with = client.recvfrom(100)
            client.sendto(b"q", ("127.0.0.2", port))
            _, _, _, addr = server.recvmsg(100, pktinfo.ANCILLARY_SIZE)
            server.sendto(b"a", addr)
            _, src_without = client.recvfrom(100)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as specific:
                specific.bind(("127.0.0.2", 0))
                return wildcard, pktinfo.is_wildcard(specific), src_with[0], src_without[0]

    assert own_netns(run) == (True, False, "127.0.0.2", "127.0.0.1")
