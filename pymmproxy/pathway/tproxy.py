"""TPROXY rules for port-range instances (``ports=FIRST-LAST`` in instances.tsv).

One rule per address family sends every new TCP connection for a port of the range to the
instance's single ``IP_TRANSPARENT`` listener, without NAT (the accepted socket keeps the
original destination). For instance ``web`` with ``listen_addr [::]:7999`` and
``ports=8000-8099`` the nft backend installs, in pymmproxy's own table::

    table inet pymmproxy {
        chain tproxy { type filter hook prerouting priority mangle; policy accept;
            meta nfproto ipv4 fib daddr type local tcp dport 8000-8099 \\
                tproxy ip to :7999 accept comment "pymmproxy tproxy web a4e5487c"
            meta nfproto ipv6 fib daddr type local tcp dport 8000-8099 \\
                tproxy ip6 to :7999 accept comment "pymmproxy tproxy web ddb86046"
        }
    }

and the legacy backend (mangle PREROUTING; the same with ``ip6tables`` for v6)::

    iptables -t mangle -A PREROUTING -p tcp -m addrtype --dst-type LOCAL --dport 8000:8099 \\
        -m comment --comment "pymmproxy tproxy web a4e5487c" -j TPROXY --on-port 7999

A specific listen host ``H`` matches ``ip daddr H`` / ``-d H`` and redirects to ``H:PORT``
(``--on-ip H``); a wildcard (``0.0.0.0`` or ``[::]``: both families, as the listener) makes
a v4 and a v6 rule; ``fib daddr type local`` leaves
forwarded traffic alone. The comment is the instance name plus a fingerprint of the rule:
:func:`apply` is idempotent (same comment: left alone, stale: replaced) and removes
exactly one instance's rules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pymmproxy.errors import PathwayError, UsageError
from pymmproxy.pathway.firewall import resolve_backend_name
from pymmproxy.pathway.firewall.base import require_net_admin
from pymmproxy.pathway.firewall.legacy import _Iptc
from pymmproxy.pathway.firewall.libnftables import Nftables, NftError
from pymmproxy.pathway.firewall.nft import FAMILY, PRIORITY_MANGLE, TABLE
from pymmproxy.pathway.plan import Family
from pymmproxy.settings import Endpoint

CHAIN = "tproxy"
PREFIX = "pymmproxy tproxy "
_WILDCARD = frozenset({"0.0.0.0", "::"})
_MAX_KEY = 90  # nft comments hold 128 bytes


@dataclass(frozen=True, slots=True)
class TproxyRule:
    """One family's rule for instance ``name``."""

    name: str
    family: Family
    listen: Endpoint
    ports: tuple[int, int]

    @property
    def host(self) -> str | None:
        """The destination address matched (None: any local address)."""
        return None if self.listen.host in _WILDCARD else self.listen.host

    @property
    def comment(self) -> str:
        return f"{key(self.name)} {_fingerprint(self)}"

    def nft_text(self) -> str:
        ip = "ip" if self.family is Family.V4 else "ip6"
        match = f"{ip} daddr {self.host}" if self.host else "fib daddr type local"
        to = f"[{self.host}]" if self.host and ":" in self.host else (self.host or "")
        first, last = self.ports
        return (
            f"meta nfproto {self.family.nfproto} {match} tcp dport {first}-{last} "
            f'tproxy {ip} to {to}:{self.listen.port} accept comment "{self.comment}"'
        )

    def iptables_text(self) -> str:
        match = f"-d {self.host}" if self.host else "-m addrtype --dst-type LOCAL"
        on_ip = f" --on-ip {self.host}" if self.host else ""
        return (
            f"{self.family.iptables_cmd} -t mangle -A PREROUTING -p tcp {match} "
            f'--dport {self.ports[0]}:{self.ports[1]} -m comment --comment "{self.comment}" '
            f"-j TPROXY --on-port {self.listen.port}{on_ip}"
        )


def key(name: str) -> str:
    """The comment prefix owned by instance ``name``."""
    short = name if len(name) <= _MAX_KEY else hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{PREFIX}{short}"


def _fingerprint(rule: TproxyRule) -> str:
    listen = Endpoint(rule.listen.host, rule.listen.port)  # (not as written: 0.0.0.0 is [::])
    text = f"{rule.family.value} {listen} {rule.ports[0]}-{rule.ports[1]}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def rules_for(name: str, listen: Endpoint, ports: tuple[int, int]) -> list[TproxyRule]:
    """The rules of one instance (v4 and/or v6 by its listen host)."""
    both = listen.host == "::"
    families = [Family.V4, Family.V6] if both else [Family.V6 if listen.is_v6 else Family.V4]
    return [TproxyRule(name, family, listen, ports) for family in families]


def apply(
    install: Mapping[str, Sequence[TproxyRule]],
    remove: Iterable[str] = (),
    *,
    backend: str = "auto",
) -> list[str]:
    """Make each ``install`` instance's rules exactly the given ones and drop every rule of
    the ``remove`` instances; returns the changes as text (empty: nothing to do)."""
    name = resolve_backend_name(backend)
    removing = list(remove)
    with _reported():
        require_net_admin("tproxy rules")
        if name == "nft":
            return _nft_apply(install, removing)
        return _legacy_apply(install, removing)


def present(name: str, *, backend: str = "auto") -> list[str]:
    """The comments of instance ``name``'s rules that are installed."""
    with _reported():
        if resolve_backend_name(backend) == "nft":
            with Nftables() as nft:
                return [c for c, _ in _nft_rules(nft)[1] if _owned(c, name)]
        iptc = _Iptc()
        return [c for fam in Family for c, _ in _listed(iptc, fam) if _owned(c, name)]


@contextmanager
def _reported() -> Iterator[None]:
    """Lower-level failures as one-line ``tproxy rules: ...`` PathwayErrors."""
    try:
        yield
    except UsageError:
        raise
    except PermissionError:
        raise PathwayError("tproxy rules: permission denied (need CAP_NET_ADMIN)") from None
    except (PathwayError, OSError) as exc:
        raise PathwayError(f"tproxy rules: {exc}") from exc


def _owned(comment: str, name: str) -> bool:
    return comment.startswith(key(name) + " ")


def _plan(
    install: Mapping[str, Sequence[TproxyRule]], remove: list[str], existing: list[str]
) -> tuple[set[str], list[TproxyRule]]:
    """Which existing comments to delete and which rules to add."""
    drop: set[str] = set()
    add: list[TproxyRule] = []
    for name, rules in install.items():
        have = {c for c in existing if _owned(c, name)}
        if have != {r.comment for r in rules} or len(have) != len(rules):
            drop |= have
            add += rules
    for name in remove:
        drop |= {c for c in existing if _owned(c, name)}
    return drop, add


# -- nft ---------------------------------------------------------------------------------
def _nft_rules(nft: Nftables) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
    """Everything in our table, and ``(comment, handle)`` of the tproxy rules."""
    try:
        items = nft.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
    except NftError as exc:
        if exc.absent:
            return [], []
        raise
    ours = [
        (str(r["rule"].get("comment", "")), int(r["rule"]["handle"]))
        for r in items
        if "rule" in r and r["rule"].get("chain") == CHAIN
    ]
    return items, [(c, h) for c, h in ours if c.startswith(PREFIX)]


def _nft_expr(rule: TproxyRule) -> list[dict[str, Any]]:
    ip = "ip" if rule.family is Family.V4 else "ip6"
    expr: list[dict[str, Any]] = [_eq({"meta": {"key": "nfproto"}}, rule.family.nfproto)]
    if rule.host:
        expr.append(_eq({"payload": {"protocol": ip, "field": "daddr"}}, rule.host))
    else:
        expr.append(_eq({"fib": {"result": "type", "flags": ["daddr"]}}, "local"))
    expr.append(_eq({"payload": {"protocol": "tcp", "field": "dport"}}, {"range": rule.ports}))
    target: dict[str, Any] = {"family": ip, "port": rule.listen.port}
    if rule.host:
        target["addr"] = rule.host
    return [*expr, {"tproxy": target}, {"accept": None}]


def _eq(left: dict[str, Any], right: object) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _nft_apply(install: Mapping[str, Sequence[TproxyRule]], remove: list[str]) -> list[str]:
    with Nftables() as nft:
        items, ours = _nft_rules(nft)
        drop, add = _plan(install, remove, [c for c, _ in ours])
        if not drop and not add:
            return []
        where = {"family": FAMILY, "table": TABLE}
        batch: list[dict[str, Any]] = []
        if add:
            chain = {**where, "name": CHAIN, "type": "filter", "hook": "prerouting"}
            batch += [
                {"add": {"table": {"family": FAMILY, "name": TABLE}}},
                {"add": {"chain": {**chain, "prio": PRIORITY_MANGLE, "policy": "accept"}}},
            ]
        batch += [
            {"delete": {"rule": {**where, "chain": CHAIN, "handle": h}}}
            for c, h in ours
            if c in drop
        ]
        batch += [
            {"add": {"rule": {**where, "chain": CHAIN, "expr": _nft_expr(r), "comment": r.comment}}}
            for r in add
        ]
        doomed = {h for c, h in ours if c in drop}
        if not add and _only_ours(items, doomed):
            batch = [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]
        elif not add and _chain_handles(items) <= doomed:
            batch.append({"delete": {"chain": {**where, "name": CHAIN}}})
        nft.run(batch)
    changes = [f"nft: deleted from inet {TABLE} {CHAIN}: rule {c!r}" for c in sorted(drop)]
    return changes + [f"nft add rule inet {TABLE} {CHAIN} {r.nft_text()}" for r in add]


def _chain_handles(items: list[dict[str, Any]]) -> set[int]:
    return {int(i["rule"]["handle"]) for i in items if i.get("rule", {}).get("chain") == CHAIN}


def _only_ours(items: list[dict[str, Any]], doomed: set[int]) -> bool:
    """Whether the table holds nothing but ``doomed`` rules and pymmproxy's own chains."""
    for item in items:
        if "rule" in item and int(item["rule"]["handle"]) not in doomed:
            return False
        if "chain" in item and item["chain"].get("name") not in {CHAIN, "prerouting", "output"}:
            return False
        if not {"rule", "chain", "table", "metainfo"} & item.keys():
            return False
    return True


# -- legacy (python-iptables) -------------------------------------------------------------
def _legacy_rules(iptc: _Iptc, family: Family) -> list[tuple[str, Any]]:
    table = iptc._table(family)  # mangle only (see legacy)
    table.refresh()
    found: list[tuple[str, Any]] = []
    for rule in iptc._iptc.Chain(table, "PREROUTING").rules:
        for match in rule.matches:
            if match.name == "comment" and str(match.comment).startswith(PREFIX):
                found.append((str(match.comment).strip('"'), rule))
    return found


def _listed(iptc: _Iptc, family: Family) -> list[tuple[str, Any]]:
    """:func:`_legacy_rules`, its failures as one line (``_Iptc._call``)."""
    return iptc._call(f"{family.iptables_cmd} -t mangle -S PREROUTING", _legacy_rules, iptc, family)


def _legacy_delete(iptc: _Iptc, family: Family, entry: Any) -> None:  # noqa: ANN401 - iptc.Rule
    table = iptc._table(family)
    iptc._iptc.Chain(table, "PREROUTING").delete_rule(entry)
    table.commit()


def _legacy_add(iptc: _Iptc, rule: TproxyRule) -> None:
    table = iptc._table(rule.family)
    entry = iptc._rule_classes[rule.family]()
    entry.protocol = "tcp"
    if rule.host:
        entry.dst = rule.host
    else:
        entry.create_match("addrtype").dst_type = "LOCAL"
    entry.create_match("tcp").dport = f"{rule.ports[0]}:{rule.ports[1]}"
    entry.create_match("comment").comment = rule.comment
    target = entry.create_target("TPROXY")
    target.on_port = str(rule.listen.port)
    if rule.host:
        target.on_ip = rule.host
    iptc._iptc.Chain(table, "PREROUTING").append_rule(entry)
    table.commit()


def _legacy_apply(install: Mapping[str, Sequence[TproxyRule]], remove: list[str]) -> list[str]:
    iptc = _Iptc()
    changes: list[str] = []
    for family in Family:
        wanted = {n: [r for r in rules if r.family is family] for n, rules in install.items()}
        existing = _listed(iptc, family)
        drop, add = _plan(wanted, remove, [c for c, _ in existing])
        for comment, entry in existing:
            if comment in drop:
                what = f"{family.iptables_cmd}: delete rule {comment!r}"
                iptc._call(what, _legacy_delete, iptc, family, entry)
                changes.append(f"{family.iptables_cmd}: deleted rule {comment!r}")
        for rule in add:
            iptc._call(rule.iptables_text(), _legacy_add, iptc, rule)
            changes.append(rule.iptables_text())
    return changes
