"""TPROXY rules on a legacy-iptables host: python-iptables failures become one line."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pymmproxy.errors import PathwayError
from pymmproxy.pathway import tproxy
from pymmproxy.pathway.firewall.legacy import _Iptc
from pymmproxy.pathway.plan import Family


class IPTCError(Exception):
    """What python-iptables raises (a plain Exception subclass)."""


class Table:
    def refresh(self) -> None:
        pass

    def commit(self) -> None:
        pass


class Chain:
    """PREROUTING holding one rule of instance ``web``; deleting it fails."""

    def __init__(self, table: Table, name: str) -> None:
        comment = SimpleNamespace(name="comment", comment=f"{tproxy.key('web')} 1")
        self.rules = [SimpleNamespace(matches=[comment])]

    def delete_rule(self, rule: Any) -> None:
        raise IPTCError("Bad rule (does a matching rule exist in that chain?)")


def fake_iptc(*, listing_fails: bool) -> Any:
    def table(family: Family) -> Table:
        if listing_fails:
            raise IPTCError("can't initialize iptables table `mangle': Table does not exist")
        return Table()

    return SimpleNamespace(_call=_Iptc._call, _table=table, _iptc=SimpleNamespace(Chain=Chain))


@pytest.fixture(autouse=True)
def _privileged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tproxy, "require_net_admin", lambda what: None)


def test_listing_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tproxy, "_Iptc", lambda: fake_iptc(listing_fails=True))
    with pytest.raises(PathwayError) as info:
        tproxy.apply({}, ["web"], backend="legacy")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("tproxy rules: iptables -t mangle -S PREROUTING: can't initialize")


def test_delete_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tproxy, "_Iptc", lambda: fake_iptc(listing_fails=False))
    with pytest.raises(PathwayError) as info:
        tproxy.apply({}, ["web"], backend="legacy")
    assert str(info.value) == (
        f"tproxy rules: iptables: delete rule '{tproxy.key('web')} 1': "
        "Bad rule (does a matching rule exist in that chain?)"
    )


def test_present_reports_a_listing_failure_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tproxy, "_Iptc", lambda: fake_iptc(listing_fails=True))
    with pytest.raises(PathwayError, match=r"^tproxy rules: iptables -t mangle -S PREROUTING"):
        tproxy.present("web", backend="legacy")


def test_python_iptables_failing_at_import_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """python-iptables raises its XTablesError (a plain Exception) at import when the host
    has no xtables extensions (no iptables package)."""
    import builtins  # noqa: PLC0415
    import sys  # noqa: PLC0415

    real = builtins.__import__

    def no_xtables(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "iptc" or name.startswith("iptc."):
            raise IPTCError("can't find directory with extensions; please set XTABLES_LIBDIR")
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "iptc", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_xtables)
    with pytest.raises(PathwayError, match=r"^python-iptables unusable: can.t find directory"):
        _Iptc()
