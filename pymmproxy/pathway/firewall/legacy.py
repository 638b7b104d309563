"""The ``legacy`` backend: the mangle-table CONNMARK recipe through python-iptables.

python-iptables drives libiptc, i.e. the legacy xtables tables (``iptables-legacy-save``
shows them). Entries are exactly::

    iptables  -t mangle -A PREROUTING -m mark --mark M -j CONNMARK --save-mark
    iptables  -t mangle -A OUTPUT -m connmark --mark M -j CONNMARK --restore-mark

and the ``ip6tables`` twins. xtables has no "rule exists" error, so add reads the chain
first (check-then-act); delete removes every exact copy of the entry and nothing else;
a rule of any other shape (negated, masked, extra matches) is not ours and stays. Reads
leave a namespace without a legacy ``mangle`` table as it is (root can tell from
``/proc/net/ip*_tables_names``); the first add instantiates the table, and the kernel keeps
it after the last rule is gone. On an nf_tables host that makes the host's ``iptables`` warn
"iptables-legacy tables present", which is why ``auto`` picks ``nft`` there.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, ParamSpec, TypeVar

from pymmproxy.errors import PathwayError
from pymmproxy.pathway.firewall.base import (
    BackendName,
    FirewallBackend,
    has_net_admin,
    require_net_admin,
)
from pymmproxy.pathway.firewall.detect import LEGACY_TABLE_FILES
from pymmproxy.pathway.plan import Family, FirewallSpec, FwAction

TABLE = "mangle"
P = ParamSpec("P")
T = TypeVar("T")
FULL_MASK = 0xFFFFFFFF
_MAX_DUPLICATES = 64


def _is_denied(exc: Exception) -> bool:
    text = str(exc).lower()
    return "permission denied" in text or "not permitted" in text


class _Iptc:
    """The few python-iptables calls we need, behind a typed surface.

    python-iptables decides whether a target name is a user chain by opening *every* legacy
    table (filter, nat, raw, security, mangle), which instantiates them all in the network
    namespace. Our rules live in mangle only, so the rule class is narrowed to mangle.
    """

    def __init__(self) -> None:
        try:
            import iptc  # noqa: PLC0415 - loads libiptc/libxtables: only for this backend
            import iptc.easy  # noqa: PLC0415
        except Exception as exc:  # ImportError, OSError, or iptc's XTablesError (no xtables)
            raise PathwayError(f"python-iptables unusable: {exc}") from exc
        self._iptc: Any = iptc
        self._tables: dict[Family, Any] = {}
        self._rule_classes: dict[Family, Any] = {}

    @staticmethod
    def _call(what: str, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # iptc raises IPTCError / XTablesError / ValueError
            if _is_denied(exc):
                raise PermissionError(errno.EPERM, what) from exc
            raise PathwayError(f"{what}: {exc}") from exc

    def _table(self, family: Family) -> Any:  # noqa: ANN401 - an iptc.Table(6)
        if family not in self._tables:
            iptc = self._iptc
            table_cls = iptc.Table6 if family is Family.V6 else iptc.Table
            base = iptc.Rule6 if family is Family.V6 else iptc.Rule
            table = table_cls(TABLE)
            rule_cls = type("MangleRule", (base,), {"tables": property(lambda _self: [table])})
            table.autocommit = False
            table.create_rule = lambda entry=None, chain=None: rule_cls(entry, chain)
            self._tables[family] = table
            self._rule_classes[family] = rule_cls
        return self._tables[family]

    def _decode(self, rule: object, family: Family) -> object:
        """``iptc.easy``'s dict form of a rule; None for one it cannot decode (not ours)."""
        try:
            return self._iptc.easy.decode_iptc_rule(rule, family is Family.V6)
        except Exception:  # noqa: BLE001 - any foreign shape python-iptables chokes on
            return None

    def _rules(self, spec: FirewallSpec) -> list[tuple[Any, object]]:
        table = self._table(spec.family)
        table.refresh()
        chain = self._iptc.Chain(table, spec.chain)
        return [(rule, self._decode(rule, spec.family)) for rule in chain.rules]

    def find(self, spec: FirewallSpec) -> list[Any]:
        """The rule objects in ``spec``'s chain that are exactly ``spec``.

        A namespace without a legacy mangle table of that family has none, and is left
        without one (opening the table would instantiate it).
        """
        if not table_exists(spec.family):
            return []
        what = f"{spec.family.iptables_cmd} -t {TABLE} -S {spec.chain}"
        found = self._call(what, self._rules, spec)
        return [rule for rule, decoded in found if matches(decoded, spec)]

    def _append(self, spec: FirewallSpec) -> None:
        table = self._table(spec.family)
        rule = self._rule_classes[spec.family]()
        rule.create_match(spec.match).set_parameter("mark", f"{spec.mark:#x}")
        rule.create_target("CONNMARK").set_parameter(spec.action.value)
        self._iptc.Chain(table, spec.chain).append_rule(rule)
        table.commit()

    def append(self, spec: FirewallSpec) -> None:
        self._call(spec.command("add"), self._append, spec)

    def _delete(self, spec: FirewallSpec, rule: object) -> None:
        table = self._table(spec.family)
        self._iptc.Chain(table, spec.chain).delete_rule(rule)
        table.commit()

    def delete(self, spec: FirewallSpec, rule: object) -> None:
        self._call(spec.command("del"), self._delete, spec, rule)


def rule_dict(spec: FirewallSpec) -> dict[str, Any]:
    """The python-iptables (``iptc.easy``) form of ``spec``."""
    return {
        spec.match: {"mark": f"{spec.mark:#x}"},
        "target": {"CONNMARK": {spec.action.value: ""}},
    }


def table_exists(
    family: Family,
    files: Sequence[tuple[Path, str]] = LEGACY_TABLE_FILES,
    *,
    unreadable: bool = True,
) -> bool:
    """Whether the namespace has a legacy ``mangle`` table of ``family``; ``unreadable`` when
    the root-only list cannot be read (True: let python-iptables look)."""
    path = files[0 if family is Family.V4 else 1][0]
    try:
        return TABLE in path.read_text(encoding="ascii").split()
    except FileNotFoundError:  # ip(6)_tables not loaded: no legacy table at all
        return False
    except OSError:
        return unreadable


def _hex(value: object) -> int | None:
    """A plain hex number such as ``0x7b``; None for anything else (``['!', '0x7b']``, ...)."""
    if not isinstance(value, str) or not value.lower().startswith("0x"):
        return None
    try:
        return int(value, 16)
    except ValueError:
        return None


def _mask_ok(value: object) -> bool:
    return value is None or _hex(value) == FULL_MASK


def matches(rule: object, spec: FirewallSpec) -> bool:
    """Whether a decoded rule is exactly the entry for ``spec`` (counters ignored).

    Any other shape (negations, masks, extra matches, values python-iptables could not
    decode) is somebody else's rule: False, never an exception.
    """
    if not isinstance(rule, dict) or set(rule) - {"counters"} != {spec.match, "target"}:
        return False
    mark = rule[spec.match]
    if not isinstance(mark, dict) or set(mark) != {"mark"} or _hex(mark["mark"]) != spec.mark:
        return False
    target = rule["target"]
    if not isinstance(target, dict) or set(target) != {"CONNMARK"}:
        return False
    options = target["CONNMARK"]
    if not isinstance(options, dict) or set(options) - {"nfmask", "ctmask"} != {spec.action.value}:
        return False
    return _mask_ok(options.get("nfmask")) and _mask_ok(options.get("ctmask"))


def our_mark(rule: object, family: Family, chain: str) -> int | None:
    """The mark of a decoded rule of ``chain`` if it is the CONNMARK entry of some mark."""
    for action in FwAction:
        spec = FirewallSpec("", family, 0, action)
        if spec.chain != chain or not isinstance(rule, dict):
            continue
        mark = rule.get(spec.match)
        value = _hex(mark.get("mark")) if isinstance(mark, dict) else None
        if value is not None and matches(rule, FirewallSpec("", family, value, action)):
            return value
    return None


def our_marks() -> tuple[int, ...] | None:
    """The marks whose CONNMARK entries sit in an existing legacy mangle table, sorted; None
    if they could not be read. Tables that are not listed are not opened."""
    families = [f for f in (Family.V4, Family.V6) if table_exists(f, unreadable=False)]
    if not families:
        return ()
    if not has_net_admin():
        return None
    found: set[int] = set()
    try:
        iptc = _Iptc()
        for family in families:
            for action in FwAction:
                spec = FirewallSpec("", family, 0, action)
                what = f"{family.iptables_cmd} -t {TABLE} -S {spec.chain}"
                for _rule, decoded in iptc._call(what, iptc._rules, spec):
                    mark = our_mark(decoded, family, spec.chain)
                    if mark is not None:
                        found.add(mark)
    except (PathwayError, OSError):
        return None
    return tuple(sorted(found))


class LegacyBackend(FirewallBackend):
    """Legacy xtables ``mangle`` (v4 and v6) through python-iptables."""

    name: ClassVar[BackendName] = "legacy"

    def __init__(self) -> None:
        require_net_admin("iptables")
        self._iptc = _Iptc()

    def close(self) -> None:
        """Nothing to release: python-iptables keeps its table handles per process."""

    def present(self, specs: Sequence[FirewallSpec]) -> list[bool]:
        return [bool(self._iptc.find(spec)) for spec in specs]

    def add(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        created: list[FirewallSpec] = []
        for spec in specs:
            if not self._iptc.find(spec):
                self._iptc.append(spec)
                created.append(spec)
        return created

    def delete(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        removed: list[FirewallSpec] = []
        for spec in specs:
            for _ in range(_MAX_DUPLICATES):
                found = self._iptc.find(spec)
                if not found:
                    break
                self._iptc.delete(spec, found[0])
                if spec not in removed:
                    removed.append(spec)
        return removed
