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


def broken_iptc() -> Any:
    def table(family: Family) -> Any:
        raise IPTCError("can't initialize iptables table `mangle': Table does not exist")

    return SimpleNamespace(_call=_Iptc._call, _table=table)


def test_listing_failure_is_a_one_line_pathway_error() -> None:
    with pytest.raises(PathwayError) as info:
        tproxy._listed(broken_iptc(), Family.V4)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("iptables -t mangle -S PREROUTING: can't initialize")


def test_delete_failure_is_a_one_line_pathway_error() -> None:
    iptc = broken_iptc()
    with pytest.raises(PathwayError, match="delete rule 'x'"):
        iptc._call("ip6tables: delete rule 'x'", tproxy._legacy_delete, iptc, Family.V6, None)


def test_apply_reports_it_as_tproxy_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tproxy, "_Iptc", broken_iptc)
    with pytest.raises(PathwayError, match=r"^tproxy rules: iptables -t mangle -S PREROUTING"):
        tproxy.apply({}, ["web"], backend="legacy")
