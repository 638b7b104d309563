"""The ``nft`` backend: the CONNMARK recipe as nf_tables rules, via libnftables JSON.

Everything lives in a table of its own, so pymmproxy never edits tables other software owns::

    table inet pymmproxy {
        chain prerouting { type filter hook prerouting priority mangle; policy accept;
            meta nfproto ipv4 meta mark 0x7b ct mark set meta mark comment "pymmproxy mark 123"
        }
        chain output { type route hook output priority mangle; policy accept;
            meta nfproto ipv4 ct mark 0x7b meta mark set ct mark comment "pymmproxy mark 123"
        }
    }

(and the ``ipv6`` twins). ``type route`` on output re-routes a packet whose mark changed,
like iptables' mangle OUTPUT. ``nft list ruleset`` shows it; ``iptables-save`` does not,
since these are not xtables-compat tables. ``meta nfproto`` keeps v4 and v6 separate so
status reports per family, like the legacy backend.

nf_tables has no "rule exists" error, so rules are added after a read of the table
(check-then-act); each change is one atomic libnftables batch. Deleting the last rule also
deletes the table when it holds nothing but pymmproxy's two chains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pymmproxy.pathway.firewall.base import BackendName, FirewallBackend, require_net_admin
from pymmproxy.pathway.firewall.libnftables import Nftables, NftError
from pymmproxy.pathway.plan import Family, FirewallSpec, FwAction

FAMILY = "inet"
TABLE = "pymmproxy"
PRIORITY_MANGLE = -150
CHAINS: dict[str, dict[str, Any]] = {
    "prerouting": {"type": "filter", "hook": "prerouting"},
    "output": {"type": "route", "hook": "output"},
}


@dataclass(frozen=True, slots=True)
class _Rule:
    chain: str
    handle: int
    expr: Any


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _ct(key: str) -> dict[str, Any]:
    return {"ct": {"key": key}}


def _eq(left: dict[str, Any], right: object) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def chain_of(spec: FirewallSpec) -> str:
    """The nft chain holding ``spec``."""
    return spec.chain.lower()


def rule_expr(spec: FirewallSpec) -> list[dict[str, Any]]:
    """The JSON expression list of the rule for ``spec`` (as libnftables lists it back)."""
    family = _eq(_meta("nfproto"), spec.family.nfproto)
    if spec.action is FwAction.SAVE:
        return [
            family,
            _eq(_meta("mark"), spec.mark),
            {"mangle": {"key": _ct("mark"), "value": _meta("mark")}},
        ]
    return [
        family,
        _eq(_ct("mark"), spec.mark),
        {"mangle": {"key": _meta("mark"), "value": _ct("mark")}},
    ]


def rule_mark(chain: str, expr: object) -> int | None:
    """The mark of a rule of our table if it is the CONNMARK entry of some mark (any family)."""
    if not isinstance(expr, list) or len(expr) != 3:
        return None
    match = expr[1].get("match") if isinstance(expr[1], dict) else None
    mark = match.get("right") if isinstance(match, dict) else None
    if not isinstance(mark, int) or isinstance(mark, bool):
        return None
    for family in Family:
        for action in FwAction:
            spec = FirewallSpec("", family, mark, action)
            if chain_of(spec) == chain and rule_expr(spec) == expr:
                return mark
    return None


class NftBackend(FirewallBackend):
    """Rules in ``table inet pymmproxy`` through libnftables."""

    name: ClassVar[BackendName] = "nft"

    def __init__(self) -> None:
        require_net_admin("nftables")
        self._nft = Nftables()

    def close(self) -> None:
        self._nft.close()

    def _listing(self) -> tuple[list[_Rule], bool]:
        """Our table's rules, and whether the table holds anything but our own chains."""
        try:
            items = self._nft.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
        except NftError as exc:
            if exc.absent:
                return [], False
            raise
        rules: list[_Rule] = []
        foreign = False
        for item in items:
            if "rule" in item:
                rule = item["rule"]
                rules.append(_Rule(str(rule["chain"]), int(rule["handle"]), rule.get("expr")))
            elif "chain" in item:
                foreign = foreign or item["chain"].get("name") not in CHAINS
            elif not {"metainfo", "table"} & item.keys():
                foreign = True
        return rules, foreign

    @staticmethod
    def _matching(rules: list[_Rule], spec: FirewallSpec) -> list[_Rule]:
        expr = rule_expr(spec)
        return [r for r in rules if r.chain == chain_of(spec) and r.expr == expr]

    def marks(self) -> tuple[int, ...]:
        """The marks with a CONNMARK entry in our table, sorted."""
        rules, _ = self._listing()
        found = {rule_mark(r.chain, r.expr) for r in rules}
        return tuple(sorted(m for m in found if m is not None))

    def present(self, specs: Sequence[FirewallSpec]) -> list[bool]:
        rules, _ = self._listing()
        return [bool(self._matching(rules, spec)) for spec in specs]

    def add(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        rules, _ = self._listing()
        missing = [spec for spec in specs if not self._matching(rules, spec)]
        if not missing:
            return []
        batch: list[dict[str, Any]] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
        for chain, hook in CHAINS.items():
            batch.append(
                {
                    "add": {
                        "chain": {
                            "family": FAMILY,
                            "table": TABLE,
                            "name": chain,
                            **hook,
                            "prio": PRIORITY_MANGLE,
                            "policy": "accept",
                        }
                    }
                }
            )
        for spec in missing:
            rule = {
                "family": FAMILY,
                "table": TABLE,
                "chain": chain_of(spec),
                "expr": rule_expr(spec),
                "comment": f"pymmproxy mark {spec.mark}",
            }
            batch.append({"add": {"rule": rule}})
        self._nft.run(batch)
        return missing

    def delete(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        rules, foreign = self._listing()
        removed: list[FirewallSpec] = []
        doomed: list[_Rule] = []
        for spec in specs:
            found = self._matching(rules, spec)
            if found:
                removed.append(spec)
                doomed.extend(r for r in found if r not in doomed)
        if not doomed:
            return []
        batch: list[dict[str, Any]]
        if not foreign and len(doomed) == len(rules):
            batch = [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]
        else:
            batch = [
                {
                    "delete": {
                        "rule": {
                            "family": FAMILY,
                            "table": TABLE,
                            "chain": rule.chain,
                            "handle": rule.handle,
                        }
                    }
                }
                for rule in doomed
            ]
        self._nft.run(batch)
        return removed
