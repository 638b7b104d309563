"""pymmproxy.policy.AllowList: matching, v4-mapped peers, scope ids, the result cache."""

from __future__ import annotations

import ipaddress
import timeit

import pytest

from pymmproxy.policy import AllowList
from pymmproxy.settings import Network


def nets(*texts: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


TAILNET = nets("100.64.0.0/10", "fd7a:115c:a1e0::/48")


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("100.64.0.1", True),
        ("100.127.255.255", True),
        ("100.128.0.0", False),
        ("192.0.2.1", False),
        ("fd7a:115c:a1e0::1", True),
        ("fd7a:115c:a1e1::1", False),
        ("::ffff:100.101.102.103", True),  # dual-stack listener, v4 peer
        ("::ffff:192.0.2.1", False),
        ("fd7a:115c:a1e0::1%eth0", True),  # scope ids are ignored
        ("fe80::1%tailscale0", False),
        ("not an ip", False),
        ("", False),
        ("100.64.0.1%x", True),
    ],
)
def test_matching(peer: str, expected: bool) -> None:
    assert AllowList(TAILNET).allows(peer) is expected


def test_v4_mapped_v6_entries_match_v4_and_mapped_peers() -> None:
    allow = AllowList(nets("::ffff:192.0.2.0/120"))
    assert allow.allows("::ffff:192.0.2.7")
    assert allow.allows("192.0.2.7")  # same client over an IPv4 listener
    assert not allow.allows("192.0.3.7")
    assert not allow.allows("2001:db8::1")


def test_v6_any_means_ipv6_peers_only() -> None:
    """``::/0`` is "every IPv6 peer" to whoever writes it (and to go-mmproxy): an IPv4 peer,
    also one that a dual-stack socket reports as ``::ffff:a.b.c.d``, is not in it."""
    allow = AllowList(nets("::/0"))
    assert allow.allows("2001:db8::1")
    assert not allow.allows("::ffff:192.0.2.1")
    assert not allow.allows("192.0.2.1")
    assert not AllowList(nets("::/64", "::fffe:0:0/95")).allows("192.0.2.1")


def test_ipv4_mapped_entries_match_ipv4_peers_both_ways() -> None:
    allow = AllowList(nets("::ffff:198.51.100.0/120"))
    assert allow.allows("198.51.100.7")
    assert allow.allows("::ffff:198.51.100.7")
    assert not allow.allows("198.51.101.7")
    assert AllowList(nets("::ffff:0:0/96")).allows("203.0.113.1")  # every IPv4 peer, spelled so


def test_v4_entries_do_not_match_plain_v6_peers() -> None:
    allow = AllowList(nets("0.0.0.0/0"))
    assert allow.allows("198.51.100.1")
    assert allow.allows("::ffff:198.51.100.1")
    assert not allow.allows("::c633:6401")  # IPv4-compatible (deprecated), not mapped
    assert not allow.allows("2001:db8::1")


def test_host_entries() -> None:
    allow = AllowList(nets("192.0.2.1", "2001:db8::1"))
    assert allow.allows("192.0.2.1")
    assert not allow.allows("192.0.2.2")
    assert allow.allows("2001:db8::1")
    assert not allow.allows("2001:db8::2")


def test_empty_denies_all() -> None:
    allow = AllowList(())
    assert not allow.allows("127.0.0.1")
    assert not allow.allows("::1")
    assert len(allow) == 0
    assert bool(allow)  # a restriction is in force although it is empty
    assert not allow.allow_any
    assert allow.networks == ()
    assert allow.describe() == "no peer (empty allow list denies all)"


def test_none_allows_all_without_caching() -> None:
    allow = AllowList(None)
    assert allow.allows("192.0.2.1")
    assert allow.allows("garbage")
    assert len(allow) == 0
    assert not allow
    assert allow.allow_any
    assert allow.networks is None
    assert allow._cache == {}
    assert allow.describe() == "any peer (allow list disabled)"


def test_len_bool_dedupe_and_describe() -> None:
    allow = AllowList(nets("192.0.2.0/24", "192.0.2.0/24", "2001:db8::/32"))
    assert len(allow) == 2
    assert allow
    assert allow.describe() == "2 networks: 192.0.2.0/24, 2001:db8::/32"
    assert repr(allow) == "AllowList(2 networks: 192.0.2.0/24, 2001:db8::/32)"
    assert AllowList(nets("192.0.2.0/24")).describe() == "1 network: 192.0.2.0/24"


def test_describe_truncates_long_lists() -> None:
    allow = AllowList(tuple(ipaddress.ip_network(f"10.0.{i}.0/24") for i in range(10)))
    text = allow.describe()
    assert text.startswith("10 networks: 10.0.0.0/24, ")
    assert text.endswith("10.0.7.0/24, ... 2 more")


def test_overlapping_entries_are_collapsed_but_reported_as_given() -> None:
    allow = AllowList(nets("10.0.0.0/8", "10.1.0.0/16", "10.0.0.0/9", "10.128.0.0/9"))
    assert len(allow) == 4
    assert allow._v4 == ((0xFF000000, frozenset({0x0A000000})),)
    assert allow.allows("10.200.0.1")


def test_cache_memoises_both_answers() -> None:
    allow = AllowList(TAILNET)
    assert allow.allows("100.64.0.1")
    assert not allow.allows("192.0.2.1")
    assert allow._cache == {"100.64.0.1": True, "192.0.2.1": False}
    allow._cache["192.0.2.1"] = True  # proves the second call is answered from the cache
    assert allow.allows("192.0.2.1")
    allow.cache_clear()
    assert not allow.allows("192.0.2.1")


def test_cache_is_bounded_and_cleared_when_full() -> None:
    allow = AllowList(TAILNET, cache_size=3)
    for i in range(3):
        allow.allows(f"100.64.0.{i}")
    assert len(allow._cache) == 3
    allow.allows("100.64.0.9")
    assert allow._cache == {"100.64.0.9": True}
    assert AllowList(TAILNET, cache_size=0)._cache_size == 1


def test_many_networks_are_grouped_by_prefix_length() -> None:
    many = tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(0, 2000, 2))
    allow = AllowList((*many, *nets("2001:db8::/32", "2001:db8:1::/48", "192.0.2.7")))
    assert [len(addrs) for _, addrs in allow._v4] == [1000, 1]
    assert allow.allows("10.7.206.9")  # 10.7.206.0/24 is entry 1998 // 2
    assert not allow.allows("10.7.207.9")
    assert allow.allows("192.0.2.7")
    assert allow.allows("2001:db8:ffff::1")


def test_cached_lookup_is_much_cheaper_than_a_miss() -> None:
    # Relative, so it holds on loaded CI and under coverage; ~0.1 us vs ~1.6 us locally.
    allow = AllowList(TAILNET)
    allow.allows("100.101.102.103")

    def miss() -> None:
        allow.cache_clear()
        allow.allows("100.101.102.103")

    hit = min(timeit.repeat(lambda: allow.allows("100.101.102.103"), number=20_000, repeat=5))
    cold = min(timeit.repeat(miss, number=20_000, repeat=5))
    assert hit < cold / 2


def test_an_allow_list_that_refuses_every_lb_is_logged_as_a_warning() -> None:
    """An emptied allow file (a config tool that truncates, then writes) closes the port to
    every load balancer: the start or reload line says so at warning level."""
    import structlog  # noqa: PLC0415

    from pymmproxy.server.listener import log_allow  # noqa: PLC0415

    log = structlog.get_logger()
    with structlog.testing.capture_logs() as logs:
        log_allow(log, "daemon.reload", AllowList(()))
        log_allow(log, "daemon.reload", AllowList(nets("192.0.2.0/24")))
        log_allow(log, "daemon.reload", AllowList(None))
    assert [(e["log_level"], e["allow"]) for e in logs] == [
        ("warning", "no peer (empty allow list denies all)"),
        ("info", "1 network: 192.0.2.0/24"),
        ("info", "any peer (allow list disabled)"),
    ]
    assert AllowList(()).denies_all
    assert not AllowList(None).denies_all
