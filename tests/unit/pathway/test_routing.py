"""Matching of dumped rtnetlink rules/routes against the plan (fake messages, no kernel)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from pymmproxy.errors import PathwayError
from pymmproxy.pathway.plan import Family, plan
from pymmproxy.pathway.routing import (
    FULL_MASK,
    RULE_PROTOCOL,
    Routing,
    _fail,
    _route_text,
    _route_view,
    _rule_view,
)

FWMARK4, LOOP4, FWMARK6, LOOP6 = plan(123).rules
V6 = Family.V6


class Msg:
    """A dumped message: header fields, and attributes (``extra`` pairs: unnamed ones)."""

    def __init__(
        self, attrs: dict[str, Any], extra: tuple[tuple[str, Any], ...] = (), **header: int
    ) -> None:
        self.attrs = attrs
        self.extra = extra
        self.header = {"action": 1, "table": 252, "flags": 0, "dst_len": 0, "src_len": 0}
        self.header.update(header)

    def __getitem__(self, key: str) -> Any:
        if key == "attrs":
            return [*self.attrs.items(), *self.extra]
        return self.header[key]

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


# what the kernel dumps for every rule
ALWAYS = {"FRA_SUPPRESS_PREFIXLEN": FULL_MASK, "FRA_PROTOCOL": RULE_PROTOCOL}


def fwmark_msg(**changes: Any) -> Msg:
    attrs = {"FRA_TABLE": 123, "FRA_PRIORITY": 100, "FRA_FWMARK": 123, "FRA_FWMASK": FULL_MASK}
    attrs.update(ALWAYS)
    attrs.update(changes)
    return Msg({k: v for k, v in attrs.items() if v is not None})


def loop_msg(src: str = "127.0.0.0", src_len: int = 8, **changes: Any) -> Msg:
    attrs = {"FRA_TABLE": 123, "FRA_PRIORITY": 101, "FRA_SRC": src, "FRA_IIFNAME": "lo"}
    attrs.update(ALWAYS)
    attrs.update(changes)
    return Msg({k: v for k, v in attrs.items() if v is not None}, src_len=src_len)


def test_fwmark_rule_matching() -> None:
    assert Routing._rule_matches(fwmark_msg(), FWMARK4)
    assert not Routing._rule_matches(fwmark_msg(), LOOP4)


@pytest.mark.parametrize(
    "changes",
    [
        {"FRA_FWMARK": 124},
        {"FRA_FWMASK": 0xFF},
        {"FRA_TABLE": 124},
        {"FRA_PRIORITY": 32765},
        {"FRA_IIFNAME": "lo"},
        {"FRA_DST": "192.0.2.0"},
        {"FRA_OIFNAME": "eth0"},
    ],
)
def test_fwmark_rule_differences(changes: dict[str, Any]) -> None:
    assert not Routing._rule_matches(fwmark_msg(**changes), FWMARK4)


def test_inverted_rule_is_not_ours() -> None:
    msg = fwmark_msg()
    msg.header["flags"] = 0x2
    assert not Routing._rule_matches(msg, FWMARK4)


def test_loopback_rule_matching() -> None:
    assert Routing._rule_matches(loop_msg(), LOOP4)
    assert Routing._rule_matches(loop_msg("::1", 128), LOOP6)
    assert not Routing._rule_matches(loop_msg(src_len=16), LOOP4)
    assert not Routing._rule_matches(loop_msg("127.0.0.1", 8), LOOP4)
    assert not Routing._rule_matches(loop_msg(FRA_IIFNAME=None), LOOP4)
    assert not Routing._rule_matches(loop_msg(FRA_FWMARK=123), LOOP4)


def test_route_view_prefers_rta_table() -> None:
    msg = Msg({"RTA_TABLE": 4_000_000_000, "RTA_OIF": 1}, type=2, table=252)
    view = _route_view(msg)
    assert (view.table, view.type, view.oif, view.dst) == (4_000_000_000, 2, 1, None)


def test_netlink_errors_become_one_line() -> None:
    denied = _fail(NetlinkError(errno.EPERM, "x"), "ip rule add")
    assert isinstance(denied, PermissionError)
    down = _fail(NetlinkError(errno.ENETDOWN), "ip -6 route add local ::/0 dev lo table 7")
    assert isinstance(down, PathwayError)
    assert str(down) == (
        "ip -6 route add local ::/0 dev lo table 7: Network is down (ENETDOWN); is lo up?"
    )


def test_eacces_is_ipv6_off_not_a_permission_problem() -> None:
    what = "ip -6 route add local ::/0 dev lo table 7"
    err = _fail(NetlinkError(errno.EACCES, "IPv6 is disabled on nexthop device"), what, V6)
    assert isinstance(err, PathwayError)
    assert str(err) == (
        f"{what}: IPv6 is disabled on nexthop device (EACCES);"
        " IPv6 is off on lo (net.ipv6.conf.lo.disable_ipv6=1?)"
    )
    bare = _fail(NetlinkError(errno.EACCES), "ip route add local 0.0.0.0/0 dev lo table 7")
    assert isinstance(bare, PathwayError)
    assert "Permission denied" not in str(bare)
    assert str(bare).endswith(": refused by the kernel (EACCES)")


def test_no_kernel_ipv6_names_the_family() -> None:
    what = "ip -6 rule add fwmark 7 lookup 7 pref 100"
    err = _fail(NetlinkError(errno.EAFNOSUPPORT), what, V6)
    assert str(err) == (
        f"{what}: Address family not supported by protocol (EAFNOSUPPORT);"
        " the kernel has no IPv6 (ipv6.disable=1?)"
    )


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOBUFS, errno.EEXIST, 9999])
def test_other_errors_are_never_permission_errors(code: int) -> None:
    err = _fail(NetlinkError(code, "kernel says no"), "ip rule add fwmark 7 lookup 7 pref 100")
    assert isinstance(err, PathwayError)
    assert str(err).startswith("ip rule add fwmark 7 lookup 7 pref 100: kernel says no (")


@pytest.mark.parametrize(
    "changes",
    [
        {"FRA_PROTOCOL": 3},  # somebody else's protocol
        {"FRA_PROTOCOL": 4},  # static: systemd-networkd's default, not ours
        {"FRA_SUPPRESS_PREFIXLEN": 0},
        {"FRA_SUPPRESS_IFGROUP": 5},
        {"FRA_UID_RANGE": (0, 10)},
        {"FRA_IIFNAME": "foo"},
        {"FRA_FLOW": 5},  # realms
        {"FRA_DSCP": 5},
        {"FRA_FLOWLABEL": 5},
        {"FRA_GOTO": 200},
        {"FRA_L3MDEV": 1},
    ],
)
def test_rule_with_other_protocol_or_selector_is_not_ours(changes: dict[str, Any]) -> None:
    assert not Routing._rule_matches(fwmark_msg(**changes), FWMARK4)


@pytest.mark.parametrize(
    "header", [{"tos": 0x10}, {"dst_len": 8}, {"flags": 0x2}, {"flags": 0x8}, {"res1": 1}]
)
def test_rule_with_a_header_field_we_never_set_is_not_ours(header: dict[str, int]) -> None:
    msg = fwmark_msg()
    msg.header.update(header)
    assert not Routing._rule_matches(msg, FWMARK4)


def test_attributes_pyroute2_cannot_name_make_a_rule_foreign() -> None:
    """pyroute2 0.9.7 dumps e.g. a DSCP mask or flow label of newer kernels as UNKNOWN."""
    unknown = fwmark_msg()
    unknown.extra = (("UNKNOWN", {"header": {"length": 5, "type": 29}}),)
    assert not Routing._rule_matches(unknown, FWMARK4)
    assert _rule_view(unknown).foreign
    assert not _rule_view(fwmark_msg()).foreign


def test_rule_protocols_and_unset_limits_that_are_ours() -> None:
    assert RULE_PROTOCOL == 112
    assert Routing._rule_matches(fwmark_msg(), FWMARK4)  # ours
    assert Routing._rule_matches(fwmark_msg(FRA_PROTOCOL=0), FWMARK4)  # earlier versions
    assert Routing._rule_matches(fwmark_msg(FRA_PROTOCOL=None), FWMARK4)
    assert Routing._rule_matches(fwmark_msg(FRA_SUPPRESS_IFGROUP=0xFFFFFFFF), FWMARK4)
    assert Routing._rule_matches(loop_msg(), LOOP4)


def test_our_rules_are_added_with_the_private_protocol() -> None:
    assert Routing._rule_args(FWMARK4)["protocol"] == 112
    assert "protocol" not in Routing._rule_args(FWMARK4, 0)  # an old rule: no protocol
    assert FWMARK4.command() == "ip rule add fwmark 123 lookup 123 pref 100 protocol 112"


def test_kernel_pick_ignores_what_the_request_leaves_out() -> None:
    foreign = _rule_view(fwmark_msg(FRA_IIFNAME="foo", FRA_PROTOCOL=0))
    assert Routing._kernel_picks(foreign, FWMARK4, 0)  # a bare request would take it
    assert not Routing._kernel_picks(foreign, FWMARK4, 112)  # pinned by our protocol
    assert Routing._kernel_picks(_rule_view(fwmark_msg(FRA_FLOW=5)), FWMARK4, 112)
    static = _rule_view(fwmark_msg(FRA_PROTOCOL=4))
    assert Routing._kernel_picks(static, FWMARK4, 0)
    assert not Routing._kernel_picks(static, FWMARK4, 112)


def route_msg(**changes: Any) -> Msg:
    attrs = {"RTA_TABLE": 123, "RTA_DST": "::", "RTA_OIF": 1, "RTA_PRIORITY": 1024}
    attrs.update(changes)
    return Msg({k: v for k, v in attrs.items() if v is not None}, type=2, proto=3, dst_len=0)


def test_route_view_reads_metric_protocol_and_foreign_attributes() -> None:
    ours = _route_view(route_msg())
    assert (ours.metric, ours.proto, ours.foreign) == (1024, 3, False)
    assert _route_view(route_msg(RTA_PRIORITY=10)).metric == 10
    assert _route_view(route_msg(RTA_GATEWAY="fe80::1")).foreign
    assert _route_view(route_msg(RTA_PREFSRC="::1")).foreign


def test_route_text_names_the_conflicting_route() -> None:
    v4 = route_msg(RTA_DST=None, RTA_PRIORITY=None, RTA_PREFSRC="127.0.0.1")
    v4.header.update(scope=254)
    assert _route_text(_route_view(v4), Family.V4, 1) == (
        "local 0.0.0.0/0 dev lo table 123 proto 3 src 127.0.0.1"
    )
    hole = Msg({"RTA_TABLE": 7}, type=6, proto=3, dst_len=0)
    assert _route_text(_route_view(hole), Family.V4, 1) == "blackhole 0.0.0.0/0 table 7 proto 3"
    assert _route_view(route_msg(RTA_FLOW=5)).foreign
    assert _route_view(route_msg(RTA_NH_ID=3)).multipath
