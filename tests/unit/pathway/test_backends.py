"""Firewall backends without a kernel: detection, rule matching, nft batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pymmproxy.errors import UsageError
from pymmproxy.pathway.firewall import resolve_backend_name
from pymmproxy.pathway.firewall.base import has_net_admin
from pymmproxy.pathway.firewall.detect import classify, detect_backend
from pymmproxy.pathway.firewall.legacy import matches, rule_dict
from pymmproxy.pathway.firewall.nft import NftBackend, rule_expr
from pymmproxy.pathway.plan import plan

P = plan(123)
SAVE4, RESTORE4, SAVE6, RESTORE6 = P.firewall


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("xtables-nft-multi", "nft"),
        ("iptables-nft", "nft"),
        ("xtables-legacy-multi", "legacy"),
        ("iptables-legacy", "legacy"),
        ("iptables", None),
    ],
)
def test_classify(name: str, expected: str | None) -> None:
    assert classify(Path("/usr/sbin") / name) == expected


@pytest.mark.parametrize("real", ["xtables-nft-multi", "xtables-legacy-multi"])
def test_detect_follows_symlinks(tmp_path: Path, real: str) -> None:
    (tmp_path / real).write_text("")
    alt = tmp_path / "alternatives-iptables"
    alt.symlink_to(tmp_path / real)
    link = tmp_path / "iptables"
    link.symlink_to(alt)
    found = detect_backend([tmp_path / "missing", link])
    assert found.backend == real.split("-")[1]
    assert found.reason == f"{link} -> {real}"


def test_detect_without_iptables(tmp_path: Path) -> None:
    assert detect_backend([tmp_path / "nothing"]).backend in {"nft", "legacy"}


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


def _decoded(match: str, mark: str, action: str, **extra: Any) -> dict[str, Any]:
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
