"""Matching of dumped rtnetlink rules/routes against the plan (fake messages, no kernel)."""

from __future__ import annotations

from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from pymmproxy.errors import PathwayError
from pymmproxy.pathway.plan import plan
from pymmproxy.pathway.routing import FULL_MASK, Routing, _fail, _route_view

FWMARK4, LOOP4, FWMARK6, LOOP6 = plan(123).rules


class Msg:
    def __init__(self, attrs: dict[str, Any], **header: int) -> None:
        self.attrs = attrs
        self.header = {"action": 1, "table": 252, "flags": 0, "dst_len": 0, "src_len": 0}
        self.header.update(header)

    def __getitem__(self, key: str) -> int:
        return self.header[key]

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def fwmark_msg(**changes: Any) -> Msg:
    attrs = {"FRA_TABLE": 123, "FRA_PRIORITY": 100, "FRA_FWMARK": 123, "FRA_FWMASK": FULL_MASK}
    attrs.update(changes)
    return Msg({k: v for k, v in attrs.items() if v is not None})


def loop_msg(src: str = "127.0.0.0", src_len: int = 8, **changes: Any) -> Msg:
    attrs = {"FRA_TABLE": 123, "FRA_PRIORITY": 101, "FRA_SRC": src, "FRA_IIFNAME": "lo"}
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
    denied = _fail(NetlinkError(1, "x"), "ip rule add")
    assert isinstance(denied, PermissionError)
    down = _fail(NetlinkError(100, "x"), "ip -6 route add local ::/0 dev lo table 7")
    assert isinstance(down, PathwayError)
    assert str(down) == "ip -6 route add local ::/0 dev lo table 7: Network is down (is lo up?)"
