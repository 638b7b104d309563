"""The ``legacy`` backend: the mangle-table CONNMARK recipe through python-iptables.

python-iptables drives libiptc, i.e. the legacy xtables tables (``iptables-legacy-save``
shows them). Entries are exactly::

    iptables  -t mangle -A PREROUTING -m mark --mark M -j CONNMARK --save-mark
    iptables  -t mangle -A OUTPUT -m connmark --mark M -j CONNMARK --restore-mark

and the ``ip6tables`` twins. xtables has no "rule exists" error, so add reads the chain
first (check-then-act); delete removes every exact copy of the entry and nothing else.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any, ClassVar

from pymmproxy.errors import PathwayError
from pymmproxy.pathway.firewall import BackendName, FirewallBackend
from pymmproxy.pathway.plan import Family, FirewallSpec

TABLE = "mangle"
FULL_MASK = 0xFFFFFFFF
_MAX_DUPLICATES = 64


def _is_denied(exc: Exception) -> bool:
    text = str(exc).lower()
    return "permission denied" in text or "not permitted" in text


class _Iptc:
    """The few python-iptables calls we need, behind a typed surface."""

    def __init__(self) -> None:
        try:
            import iptc.easy  # noqa: PLC0415 - loads libxtables; only when this backend is used
        except (ImportError, OSError) as exc:  # pragma: no cover - depends on the host
            raise PathwayError(f"python-iptables unusable: {exc}") from exc
        self._easy: Any = iptc.easy

    def _call(self, what: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # iptc raises IPTCError / XTablesError / ValueError
            if _is_denied(exc):
                raise PermissionError(errno.EPERM, what) from exc
            raise PathwayError(f"{what}: {exc}") from exc

    def dump_chain(self, chain: str, family: Family) -> list[dict[str, Any]]:
        ipv6 = family is Family.V6
        what = f"{family.iptables_cmd} -t {TABLE} -S {chain}"
        rules = self._call(what, self._easy.dump_chain, TABLE, chain, ipv6=ipv6)
        return [r for r in rules if isinstance(r, dict)]

    def append(self, spec: FirewallSpec) -> None:
        rule = rule_dict(spec)
        ipv6 = spec.family is Family.V6
        self._call(spec.command("add"), self._easy.add_rule, TABLE, spec.chain, rule, ipv6=ipv6)

    def delete(self, spec: FirewallSpec, rule: dict[str, Any]) -> None:
        ipv6 = spec.family is Family.V6
        self._call(spec.command("del"), self._easy.delete_rule, TABLE, spec.chain, rule, ipv6=ipv6)


def rule_dict(spec: FirewallSpec) -> dict[str, Any]:
    """The python-iptables (``iptc.easy``) form of ``spec``."""
    return {spec.match: {"mark": f"{spec.mark:#x}"}, "target": {"CONNMARK": {spec.action.value: ""}}}


def _mask_ok(value: object) -> bool:
    return value is None or (isinstance(value, str) and int(value, 16) == FULL_MASK)


def matches(rule: dict[str, Any], spec: FirewallSpec) -> bool:
    """Whether a decoded rule is exactly the entry for ``spec`` (counters ignored)."""
    if set(rule) - {"counters"} != {spec.match, "target"}:
        return False
    mark = rule[spec.match]
    if not isinstance(mark, dict) or set(mark) != {"mark"}:
        return False
    value = str(mark["mark"])
    if "/" in value or int(value, 16) != spec.mark:
        return False
    target = rule["target"]
    if not isinstance(target, dict) or set(target) != {"CONNMARK"}:
        return False
    options = target["CONNMARK"]
    if not isinstance(options, dict) or set(options) - {"nfmask", "ctmask"} != {spec.action.value}:
        return False
    return _mask_ok(options.get("nfmask")) and _mask_ok(options.get("ctmask"))


def _without_counters(rule: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rule.items() if k != "counters"}


class LegacyBackend(FirewallBackend):
    """Legacy xtables ``mangle`` (v4 and v6) through python-iptables."""

    name: ClassVar[BackendName] = "legacy"

    def __init__(self) -> None:
        self._iptc = _Iptc()

    def _find(self, spec: FirewallSpec) -> list[dict[str, Any]]:
        return [r for r in self._iptc.dump_chain(spec.chain, spec.family) if matches(r, spec)]

    def present(self, specs: Sequence[FirewallSpec]) -> list[bool]:
        return [bool(self._find(spec)) for spec in specs]

    def add(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        created: list[FirewallSpec] = []
        for spec in specs:
            if not self._find(spec):
                self._iptc.append(spec)
                created.append(spec)
        return created

    def delete(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        removed: list[FirewallSpec] = []
        for spec in specs:
            for _ in range(_MAX_DUPLICATES):
                found = self._find(spec)
                if not found:
                    break
                self._iptc.delete(spec, _without_counters(found[0]))
                if spec not in removed:
                    removed.append(spec)
        return removed
