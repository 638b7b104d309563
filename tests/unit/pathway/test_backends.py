"""Firewall backends without a kernel: detection, rule matching, nft batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pymmproxy.errors import UsageError
from pymmproxy.pathway.firewall import resolve_backend_name
from pymmproxy.pathway.firewall.base import has_net_admin
from pymmproxy.pathway.firewall.detect import (
    Binary,
    Detection,
    KernelTables,
    classify,
    decide,
    detect_backend,
    find_binary,
    has_our_table,
    inspect_binary,
    read_legacy_tables,
    rule_count,
    xt_nft_tables,
)
from pymmproxy.pathway.firewall.legacy import (
    matches,
    our_mark,
    rule_dict,
    table_exists,
)
from pymmproxy.pathway.firewall.nft import NftBackend, rule_expr, rule_mark
from pymmproxy.pathway.plan import Family, plan

P = plan(123)
SAVE4, RESTORE4, SAVE6, RESTORE6 = P.firewall
ELF = b"\x7fELF"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("xtables-nft-multi", "nft"),
        ("iptables-nft", "nft"),
        ("xtables-legacy-multi", "legacy"),
        ("iptables-legacy", "legacy"),
        ("xtables-multi", "legacy"),  # iptables < 1.8 (RHEL 7, Ubuntu 18.04): no nft variant
        ("iptables-multi", "legacy"),
        ("iptables", None),
        ("iptables-wrapper", None),
    ],
)
def test_classify(name: str, expected: str | None) -> None:
    assert classify(Path("/usr/sbin") / name) == expected


@pytest.mark.parametrize("real", ["xtables-nft-multi", "xtables-legacy-multi", "xtables-multi"])
def test_binary_follows_symlinks(tmp_path: Path, real: str) -> None:
    (tmp_path / real).write_text("")
    alt = tmp_path / "alternatives-iptables"
    alt.symlink_to(tmp_path / real)
    link = tmp_path / "iptables"
    link.symlink_to(alt)
    found = find_binary([tmp_path / "missing", link])
    assert found is not None
    assert found.variant == ("nft" if "nft" in real else "legacy")
    assert found.text.startswith(f"{link} -> {real}")
    assert ("iptables < 1.8" in found.text) == (real == "xtables-multi")


def test_binary_hard_link_plain_program_and_script(tmp_path: Path) -> None:
    (tmp_path / "xtables-nft-multi").write_bytes(ELF + b"nft")
    hard = tmp_path / "iptables"
    hard.hardlink_to(tmp_path / "xtables-nft-multi")
    assert inspect_binary(hard) == Binary("nft", f"{hard} (= xtables-nft-multi)")
    old = tmp_path / "old" / "iptables"
    old.parent.mkdir()
    old.write_bytes(ELF + b"iptables v1.4.21")  # a program of its own, no multi binary
    assert inspect_binary(old) == Binary("legacy", f"{old} (iptables < 1.8: legacy only)")
    script = tmp_path / "wrap" / "iptables"
    script.parent.mkdir()
    script.write_text('#!/bin/sh\nexec iptables-nft "$@"\n')
    assert inspect_binary(script).variant is None
    # a known variant wins over an unknown one found first
    assert find_binary([script, hard]) == inspect_binary(hard)
    assert find_binary([script]) == Binary(None, str(script))
    assert find_binary([tmp_path / "nothing"]) is None


NONE = KernelTables((), ())
UNREADABLE = KernelTables(None, None)
NFT_BIN = Binary("nft", "/usr/sbin/iptables -> xtables-nft-multi")
OLD_BIN = Binary("legacy", "/sbin/iptables -> xtables-multi (iptables < 1.8: legacy only)")


@pytest.mark.parametrize(
    ("kernel", "binary", "libnft", "backend", "reason"),
    [
        # the kernel decides: legacy tables in use, no iptables-nft tables (even though the
        # installed iptables, e.g. a container image's, is the nft variant)
        (KernelTables(("filter (IPv4)", "nat (IPv4)"), ()), NFT_BIN, True, "legacy",
         "kernel: legacy tables [filter (IPv4), nat (IPv4)], no iptables-nft tables"),
        (KernelTables(("filter (IPv4)",), None), NFT_BIN, True, "legacy",
         "kernel: legacy tables [filter (IPv4)], iptables-nft tables unreadable"),
        (KernelTables((), ("ip filter", "ip6 nat")), OLD_BIN, True, "nft",
         "kernel: iptables-nft tables [ip filter, ip6 nat], no legacy tables"),
        # both kinds, or neither: the installed iptables decides
        (KernelTables(("mangle (IPv4)",), ("ip filter",)), NFT_BIN, True, "nft",
         "kernel: legacy tables [mangle (IPv4)], iptables-nft tables [ip filter]; "
         "/usr/sbin/iptables -> xtables-nft-multi"),
        (NONE, NFT_BIN, True, "nft",
         "kernel: no legacy tables, no iptables-nft tables; "
         "/usr/sbin/iptables -> xtables-nft-multi"),
        (NONE, OLD_BIN, True, "legacy",
         "kernel: no legacy tables, no iptables-nft tables; "
         "/sbin/iptables -> xtables-multi (iptables < 1.8: legacy only)"),
        (UNREADABLE, OLD_BIN, True, "legacy",
         "kernel: legacy tables unreadable, iptables-nft tables unreadable; "
         "/sbin/iptables -> xtables-multi (iptables < 1.8: legacy only)"),
        # no iptables that says anything: libnftables decides
        (NONE, None, True, "nft",
         "kernel: no legacy tables, no iptables-nft tables; no iptables found; "
         "libnftables available"),
        (NONE, Binary(None, "/usr/sbin/iptables -> iptables-wrapper"), False, "legacy",
         "kernel: no legacy tables, no iptables-nft tables; "
         "/usr/sbin/iptables -> iptables-wrapper (variant unknown); libnftables missing"),
    ],
)  # fmt: skip
def test_decide(
    kernel: KernelTables, binary: Binary | None, libnft: bool, backend: str, reason: str
) -> None:
    assert decide(kernel, binary, libnft) == Detection(backend, reason)  # type: ignore[arg-type]


def test_xt_nft_tables_from_a_listing() -> None:
    listing = [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip", "name": "filter", "handle": 1}},
        {"table": {"family": "inet", "name": "filter", "handle": 2}},  # nft's own, not xt
        {"table": {"family": "inet", "name": "pymmproxy", "handle": 3}},
        {"table": {"family": "ip6", "name": "mangle", "handle": 4}},
        {"table": {"family": "bridge", "name": "filter", "handle": 5}},
        {"table": "garbage"},
    ]
    assert xt_nft_tables(listing) == ("ip filter", "ip6 mangle")
    assert xt_nft_tables([]) == ()


def test_read_legacy_tables(tmp_path: Path) -> None:
    v4, v6 = tmp_path / "ip_tables_names", tmp_path / "ip6_tables_names"
    v4.write_text("mangle\nfilter\n")
    files = ((v4, "IPv4"), (v6, "IPv6"))  # v6 absent: ip6_tables not loaded
    assert read_legacy_tables(files) == ("mangle (IPv4)", "filter (IPv4)")
    v6.write_text("")
    assert read_legacy_tables(files) == ("mangle (IPv4)", "filter (IPv4)")
    v4.write_text("")
    assert read_legacy_tables(files) == ()


def test_detect_backend_on_given_kernel_state(tmp_path: Path) -> None:
    (tmp_path / "xtables-nft-multi").write_text("")
    (tmp_path / "iptables").symlink_to(tmp_path / "xtables-nft-multi")
    legacy_host = KernelTables(("filter (IPv4)",), ())
    assert detect_backend([tmp_path / "iptables"], legacy_host).backend == "legacy"
    assert detect_backend([tmp_path / "iptables"], NONE).backend == "nft"


def test_detect_without_iptables(tmp_path: Path) -> None:
    assert detect_backend([tmp_path / "nothing"], NONE).backend in {"nft", "legacy"}


def test_resolve_backend_name() -> None:
    assert resolve_backend_name("legacy") == "legacy"
    assert resolve_backend_name("nft") == "nft"
    assert resolve_backend_name("auto") in {"legacy", "nft"}
    with pytest.raises(UsageError, match="bad backend 'pf'"):
        resolve_backend_name("pf")


def test_has_net_admin_reads_capeff(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert has_net_admin(status)
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert not has_net_admin(status)
    assert has_net_admin(tmp_path / "absent")  # unknowable: let the kernel decide


# -- legacy ------------------------------------------------------------------------------


def _decoded(match: str, mark: object, action: str, **extra: Any) -> dict[str, Any]:
    target = {action: "", "nfmask": "0xffffffff", "ctmask": "0xffffffff"}
    return {match: {"mark": mark}, "target": {"CONNMARK": target}, "counters": (0, 0), **extra}


def test_rule_dict() -> None:
    assert rule_dict(SAVE4) == {"mark": {"mark": "0x7b"}, "target": {"CONNMARK": {"save-mark": ""}}}
    assert rule_dict(RESTORE6) == {
        "connmark": {"mark": "0x7b"},
        "target": {"CONNMARK": {"restore-mark": ""}},
    }


def test_legacy_matches_only_the_exact_entry() -> None:
    assert matches(_decoded("mark", "0x7b", "save-mark"), SAVE4)
    assert matches(_decoded("connmark", "0x7b", "restore-mark"), RESTORE4)
    assert not matches(_decoded("mark", "0x7c", "save-mark"), SAVE4)
    assert not matches(_decoded("mark", "0x7b/0xff", "save-mark"), SAVE4)
    assert not matches(_decoded("mark", "0x7b", "restore-mark"), SAVE4)
    assert not matches(_decoded("connmark", "0x7b", "save-mark"), SAVE4)
    assert not matches(_decoded("mark", "0x7b", "save-mark", src="192.0.2.0/24"), SAVE4)
    masked = _decoded("mark", "0x7b", "save-mark")
    masked["target"]["CONNMARK"]["nfmask"] = "0xff"
    assert not matches(masked, SAVE4)
    assert not matches({"mark": {"mark": "0x7b"}, "target": "ACCEPT"}, SAVE4)


@pytest.mark.parametrize(
    "mark",
    [
        ["!", "0x7b"],  # -m mark ! --mark 0x7b, as python-iptables decodes it
        ["!", "0x7b/0xff"],
        "! 0x7b",
        "0x7b/0xffffffff",
        "7b",
        "0xzz",
        "",
        None,
        123,
        {"mark": "0x7b"},
    ],
)
def test_legacy_foreign_mark_shapes_are_not_ours(mark: object) -> None:
    for match, action, spec in (
        ("mark", "save-mark", SAVE4),
        ("connmark", "restore-mark", RESTORE6),
    ):
        assert not matches(_decoded(match, mark, action), spec)


@pytest.mark.parametrize(
    "rule",
    [
        None,
        "-A PREROUTING -j ACCEPT",
        [],
        {},
        {"mark": None, "target": None},
        {"mark": {"mark": "0x7b"}, "target": {"CONNMARK": None}},
        {"mark": {"mark": "0x7b"}, "target": {"CONNMARK": {"save-mark": "", "nfmask": ["!"]}}},
        {"mark": {"mark": "0x7b"}, "target": {"CONNMARK": {"save-mark": "", "ctmask": "0xff"}}},
        {"mark": {"mark": "0x7b"}, "target": {"MARK": {"set-mark": "0x7b"}}},
    ],
)
def test_legacy_undecodable_rules_are_not_ours(rule: object) -> None:
    assert not matches(rule, SAVE4)


def test_legacy_table_exists_reads_proc_without_touching_the_kernel(tmp_path: Path) -> None:
    v4, v6 = tmp_path / "ip_tables_names", tmp_path / "ip6_tables_names"
    files = ((v4, "IPv4"), (v6, "IPv6"))
    v4.write_text("filter\nmangle\n")
    v6.write_text("filter\n")
    assert table_exists(Family.V4, files)
    assert not table_exists(Family.V6, files)
    v6.unlink()  # ip6_tables not loaded: no table
    assert not table_exists(Family.V6, files)
    assert not table_exists(Family.V6, files, unreadable=True)
    unreadable = ((tmp_path, "IPv4"), (v6, "IPv6"))  # a directory: OSError, not "missing"
    assert table_exists(Family.V4, unreadable)  # let python-iptables look
    assert not table_exists(Family.V4, unreadable, unreadable=False)


# -- nft ---------------------------------------------------------------------------------


def test_rule_expr() -> None:
    assert rule_expr(SAVE6) == [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}},
        {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 123}},
        {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"meta": {"key": "mark"}}}},
    ]
    assert rule_expr(RESTORE4)[1:] == [
        {"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": 123}},
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"ct": {"key": "mark"}}}},
    ]


class FakeNft:
    """Stands in for libnftables: serves a listing, records batches."""

    def __init__(self, listing: list[dict[str, Any]]) -> None:
        self.listing = listing
        self.batches: list[list[dict[str, Any]]] = []

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if "list" in commands[0]:
            return self.listing
        self.batches.append(commands)
        return []

    def close(self) -> None:
        pass


def _backend(listing: list[dict[str, Any]]) -> tuple[NftBackend, FakeNft]:
    fake = FakeNft(listing)
    backend = object.__new__(NftBackend)
    backend._nft = fake  # type: ignore[assignment]
    return backend, fake


def _table(*rules: tuple[str, int, Any], extra: list[dict[str, Any]] | None = None) -> list[Any]:
    items: list[dict[str, Any]] = [
        {"metainfo": {}},
        {"table": {"family": "inet", "name": "pymmproxy"}},
        {"chain": {"name": "prerouting"}},
        {"chain": {"name": "output"}},
        *(extra or []),
    ]
    items += [{"rule": {"chain": c, "handle": h, "expr": e}} for c, h, e in rules]
    return items


def test_nft_add_only_missing() -> None:
    backend, fake = _backend(_table(("prerouting", 3, rule_expr(SAVE4))))
    assert backend.add(P.firewall) == [RESTORE4, SAVE6, RESTORE6]
    (batch,) = fake.batches
    assert [next(iter(cmd["add"])) for cmd in batch] == ["table", "chain", "chain"] + ["rule"] * 3
    assert backend.present(P.firewall) == [True, False, False, False]


def test_nft_delete_last_rules_drops_table() -> None:
    backend, fake = _backend(
        _table(("prerouting", 3, rule_expr(SAVE4)), ("output", 4, rule_expr(RESTORE4)))
    )
    assert backend.delete(P.firewall) == [SAVE4, RESTORE4]
    assert fake.batches == [[{"delete": {"table": {"family": "inet", "name": "pymmproxy"}}}]]


def test_nft_delete_keeps_other_marks_and_foreign_chains() -> None:
    other = plan(124).firewall[0]
    backend, fake = _backend(
        _table(("prerouting", 3, rule_expr(SAVE4)), ("prerouting", 5, rule_expr(other)))
    )
    assert backend.delete(P.firewall) == [SAVE4]
    assert [cmd["delete"]["rule"]["handle"] for cmd in fake.batches[0]] == [3]
    backend, fake = _backend(
        _table(("prerouting", 3, rule_expr(SAVE4)), extra=[{"chain": {"name": "mine"}}])
    )
    backend.delete(P.firewall)
    assert "rule" in fake.batches[0][0]["delete"]


def test_nft_delete_nothing() -> None:
    backend, fake = _backend(_table())
    assert backend.delete(P.firewall) == []
    assert fake.batches == []


# -- detection: our own entries first, empty legacy tables do not count ------------------------

DEBIAN = KernelTables(("filter (IPv4)",), (), legacy_with_rules=())


@pytest.mark.parametrize(
    ("kernel", "backend", "reason"),
    [
        # our table wins over legacy tables in use and over our legacy rules
        (KernelTables(("filter (IPv4)",), (), ("filter (IPv4)",), ours_nft=True,
                      legacy_marks=(123,)), "nft", "kernel: our table inet pymmproxy exists"),
        (KernelTables(("mangle (IPv4)",), ("ip filter",), ("mangle (IPv4)",),
                      legacy_marks=(123,)),
         "legacy", "kernel: our CONNMARK rules are in the legacy mangle table"),
        # an empty legacy table (left by 'iptables-legacy -L') is not "in use"
        (KernelTables(("filter (IPv4)",), ("ip nat",), ()), "nft",
         "kernel: iptables-nft tables [ip nat], empty legacy tables [filter (IPv4)]"),
        (KernelTables(("mangle (IPv4)", "filter (IPv4)"), (), ("filter (IPv4)",)), "legacy",
         "kernel: legacy tables with rules [filter (IPv4)], empty legacy tables [mangle (IPv4)], "
         "no iptables-nft tables"),
    ],
)  # fmt: skip
def test_decide_ours_first_then_tables_with_rules(
    kernel: KernelTables, backend: str, reason: str
) -> None:
    # the installed iptables (legacy-only here) has no say
    assert decide(kernel, OLD_BIN, True) == Detection(backend, reason)  # type: ignore[arg-type]


def test_decide_empty_legacy_table_leaves_it_to_the_binary() -> None:
    found = decide(DEBIAN, NFT_BIN, True)
    assert found.backend == "nft"
    assert found.reason == (
        "kernel: empty legacy tables [filter (IPv4)], no iptables-nft tables; "
        "/usr/sbin/iptables -> xtables-nft-multi"
    )
    old = decide(DEBIAN, OLD_BIN, True)
    assert old.backend == "legacy"  # nothing in use either way: the binary decides


def test_rule_count_and_our_table() -> None:
    assert rule_count(4, 0b1110) == 0  # empty filter: 3 policies + the error entry
    assert rule_count(5, 0b1110) == 1
    assert rule_count(6, 0b11111) == 0  # empty mangle
    assert rule_count(8, 0b1110) == 4  # a user chain counts
    assert has_our_table([{"table": {"family": "inet", "name": "pymmproxy"}}])
    assert not has_our_table([{"table": {"family": "ip", "name": "pymmproxy"}}, {"table": 1}])


def test_our_mark_of_any_mark() -> None:
    save = _decoded("mark", "0x1c8", "save-mark")
    assert our_mark(save, Family.V4, "PREROUTING") is not None
    assert our_mark(save, Family.V4, "OUTPUT") is None
    assert our_mark(_decoded("connmark", "0x7b", "restore-mark"), Family.V6, "OUTPUT") is not None
    assert our_mark(_decoded("mark", ["!", "0x7b"], "save-mark"), Family.V4, "PREROUTING") is None
    assert our_mark({"target": "ACCEPT"}, Family.V4, "PREROUTING") is None
    assert our_mark(None, Family.V4, "PREROUTING") is None


def test_marks_of_our_entries_in_either_backend() -> None:
    assert our_mark(_decoded("mark", "0x1c8", "save-mark"), Family.V4, "PREROUTING") == 456
    assert our_mark(_decoded("mark", "0x1c8", "save-mark"), Family.V4, "OUTPUT") is None
    save6, restore4 = plan(9).firewall[2], plan(7).firewall[1]
    assert rule_mark("prerouting", rule_expr(save6)) == 9
    assert rule_mark("output", rule_expr(restore4)) == 7
    assert rule_mark("output", rule_expr(save6)) is None
    assert rule_mark("prerouting", [*rule_expr(save6), {"counter": None}]) is None
    assert rule_mark("prerouting", None) is None
