"""The pathway plan: pure, exact, validated."""

from __future__ import annotations

import dataclasses

import pytest

from pymmproxy.errors import UsageError
from pymmproxy.pathway.plan import (
    FWMARK_RULE_PRIORITY,
    ITEMS,
    LOOPBACK_RULE_PRIORITY,
    Family,
    FwAction,
    plan,
)


def test_plan_lists_the_exact_commands() -> None:
    assert plan(123).commands() == [
        "ip route add local 0.0.0.0/0 dev lo table 123",
        "ip -6 route add local ::/0 dev lo table 123",
        "ip rule add fwmark 123 lookup 123 pref 100 protocol 112",
        "ip rule add from 127.0.0.0/8 iif lo lookup 123 pref 101 protocol 112",
        "ip -6 rule add fwmark 123 lookup 123 pref 100 protocol 112",
        "ip -6 rule add from ::1/128 iif lo lookup 123 pref 101 protocol 112",
        "iptables -t mangle -A PREROUTING -m mark --mark 123 -j CONNMARK --save-mark",
        "iptables -t mangle -A OUTPUT -m connmark --mark 123 -j CONNMARK --restore-mark",
        "ip6tables -t mangle -A PREROUTING -m mark --mark 123 -j CONNMARK --save-mark",
        "ip6tables -t mangle -A OUTPUT -m connmark --mark 123 -j CONNMARK --restore-mark",
    ]


def test_delete_commands_mirror_add() -> None:
    cmds = plan(7).commands("del")
    assert cmds[0] == "ip route del local 0.0.0.0/0 dev lo table 7"
    assert cmds[2] == "ip rule del fwmark 7 lookup 7 pref 100"
    assert (
        cmds[-1] == "ip6tables -t mangle -D OUTPUT -m connmark --mark 7 -j CONNMARK --restore-mark"
    )


def test_plan_fields() -> None:
    p = plan(4_000_000_000)
    assert p.mark == 4_000_000_000
    assert {r.table for r in p.rules} | {r.table for r in p.routes} == {p.mark}
    fwmark_rules = [r for r in p.rules if r.fwmark is not None]
    assert [(r.family, r.priority, r.src, r.iif) for r in fwmark_rules] == [
        (Family.V4, FWMARK_RULE_PRIORITY, None, None),
        (Family.V6, FWMARK_RULE_PRIORITY, None, None),
    ]
    loopback = [r for r in p.rules if r.fwmark is None]
    assert [(r.src, r.iif, r.priority) for r in loopback] == [
        ("127.0.0.0/8", "lo", LOOPBACK_RULE_PRIORITY),
        ("::1/128", "lo", LOOPBACK_RULE_PRIORITY),
    ]
    assert [(f.chain, f.match, f.action) for f in p.firewall[:2]] == [
        ("PREROUTING", "mark", FwAction.SAVE),
        ("OUTPUT", "connmark", FwAction.RESTORE),
    ]
    assert {f.mark for f in p.firewall} == {p.mark}


def test_every_item_is_planned_for_both_families() -> None:
    p = plan(5)
    entries = [*p.rules, *p.routes, *p.firewall]
    assert sorted((e.item, e.family.value) for e in entries) == sorted(
        (item, fam) for item in ITEMS for fam in (4, 6)
    )


def test_nft_spelling() -> None:
    save, restore = plan(123).firewall[2:]
    assert save.nft_command() == (
        "nft add rule inet pymmproxy prerouting meta nfproto ipv6"
        " meta mark 0x7b ct mark set meta mark"
    )
    assert restore.nft_command() == (
        "nft add rule inet pymmproxy output meta nfproto ipv6 ct mark 0x7b meta mark set ct mark"
    )


def test_plan_is_frozen_and_deterministic() -> None:
    p = plan(9)
    assert p == plan(9)
    assert hash(p) == hash(plan(9))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.mark = 10  # type: ignore[misc]


@pytest.mark.parametrize("mark", [0, -1, 253, 254, 255, 2**32])
def test_bad_marks_are_usage_errors(mark: int) -> None:
    with pytest.raises(UsageError, match=rf"^bad mark {mark}: "):
        plan(mark)


@pytest.mark.parametrize("mark", [1, 252, 256, 2**32 - 1])
def test_edge_marks_are_fine(mark: int) -> None:
    assert plan(mark).mark == mark


def test_plan_for_ipv4_only() -> None:
    p = plan(123, [Family.V4])
    assert {e.family for e in (*p.rules, *p.routes, *p.firewall)} == {Family.V4}
    assert p.commands() == [c for c in plan(123).commands() if not c.startswith(("ip -6", "ip6"))]
    assert plan(123, [Family.V6, Family.V4]) == plan(123)  # always in apply order
