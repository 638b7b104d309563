"""The verdicts of ``pymmproxy doctor``: pure functions from probe results to checks.

Nothing here touches the system. :mod:`.probes` collects :mod:`.facts`; :func:`evaluate`
turns it into :class:`Check` rows, each with the command that fixes a failure. ``WARN``
marks something that works but deserves a look; only ``FAIL`` makes doctor exit 1.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

from pymmproxy.doctor.facts import (
    BackendFacts,
    Facts,
    InstanceFacts,
    MarkFacts,
    Privileges,
    TargetFacts,
)
from pymmproxy.pathway import ItemStatus, PathwayStatus
from pymmproxy.pathway.firewall.base import CAP_NET_ADMIN
from pymmproxy.pathway.ipv6 import Ipv6State
from pymmproxy.pathway.plan import (
    ITEM_FWMARK_RULE,
    ITEM_LOCAL_ROUTE,
    ITEM_LOOPBACK_RULE,
    ITEM_RESTORE_MARK,
    ITEM_SAVE_MARK,
)
from pymmproxy.settings import Transport

UNIT = "pymmproxy@.service"


class Level(enum.StrEnum):
    """How a check came out."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    """One row of the report; ``key`` + ``subject`` identify it for machines."""

    key: str
    subject: str  # "" (host-wide), a mark, or an instance name
    name: str
    level: Level
    detail: str
    fix: str = ""
    commands: tuple[str, ...] = ()  # the equivalent low-level commands of a fix


# -- verdicts ----------------------------------------------------------------------------------


def check_privileges(p: Privileges) -> Check:
    """Root or CAP_NET_ADMIN: needed to read nft rules, change pathways and spoof."""
    who = "root" if p.euid == 0 else f"uid {p.euid}"
    if p.cap_eff is None:
        detail = f"{who}; cannot read CapEff from /proc/self/status"
        return Check("privileges", "", "privileges", Level.WARN, detail)
    if p.cap_eff >> CAP_NET_ADMIN & 1:
        detail = who if p.euid == 0 else f"{who} with CAP_NET_ADMIN"
        return Check("privileges", "", "privileges", Level.OK, detail)
    return Check(
        "privileges", "", "privileges", Level.FAIL,
        f"{who} without CAP_NET_ADMIN (CapEff {p.cap_eff:#x}): cannot read or change "
        "pathways, nor spoof client addresses (IP_TRANSPARENT, SO_MARK)",
        f"run as root (sudo pymmproxy doctor ...) or with CAP_NET_ADMIN, as {UNIT} grants it",
    )  # fmt: skip


def check_backend(b: BackendFacts, in_use: frozenset[int] = frozenset()) -> list[Check]:
    """Which firewall backend holds our CONNMARK rules; stray legacy tables on nft hosts."""
    if b.name == "nft":
        where = "rules in table inet pymmproxy (nft list table inet pymmproxy)"
    else:
        where = "rules in the legacy mangle tables (iptables-legacy-save -t mangle)"
    checks = [Check("backend", "", "firewall backend", Level.OK, f"{b.name} ({b.reason}); {where}")]
    checks += check_other_backend(b, in_use)
    if b.name != "nft":
        return checks
    if b.legacy_tables is None:
        detail = "cannot read /proc/net/ip_tables_names (root only)"
        checks.append(Check("legacy-tables", "", "iptables-legacy tables", Level.WARN, detail))
        return checks
    if not b.legacy_tables:
        detail = "none (no 'iptables-legacy tables present' warning)"
        checks.append(Check("legacy-tables", "", "iptables-legacy tables", Level.OK, detail))
        return checks
    checks.append(Check(
        "legacy-tables", "", "iptables-legacy tables", Level.WARN,
        f"iptables-legacy tables present: {', '.join(b.legacy_tables)}; their rules still "
        "apply but iptables-nft and 'nft list ruleset' do not show them",
        "inspect: iptables-legacy-save; ip6tables-legacy-save (stale pymmproxy rules there: "
        f"{_move_hint('legacy', 'nft', b.other_marks, in_use)})",
    ))  # fmt: skip
    return checks


def _move_hint(
    stale: str, chosen: str, marks: tuple[int, ...], in_use: frozenset[int] = frozenset()
) -> str:
    """Commands that drop our entries from backend ``stale`` and leave a working pathway:
    ``del`` also removes the rules and routes, so ``add`` puts them back (with ``chosen``),
    but only for the marks still configured (``in_use``; unknown when empty)."""
    commands = []
    for m in marks or ("MARK",):
        drop = f"pymmproxy pathway del {m} --backend {stale}"
        if in_use and m not in in_use:
            commands.append(f"{drop} (not in pathways.conf: no add)")
        else:
            commands.append(f"{drop} && pymmproxy pathway add {m} --backend {chosen}")
    return (
        f"{'; '.join(commands)} (del also removes the mark's rules and routes, add puts them back)"
    )


def check_other_backend(b: BackendFacts, in_use: frozenset[int] = frozenset()) -> list[Check]:
    """A warning when pymmproxy entries sit in the backend that was not chosen: pathway
    commands do not see them, yet the kernel still applies them."""
    if b.name == "nft" and b.legacy_entries:
        stale, found = "legacy", "pymmproxy CONNMARK rules in the legacy mangle tables"
        inspect = "iptables-legacy-save -t mangle"
    elif b.name == "legacy" and b.nft_table:
        stale, found = "nft", "table inet pymmproxy exists"
        inspect = "nft list table inet pymmproxy"
    else:
        return []
    return [Check(
        "other-backend", "", "entries in the other backend", Level.WARN,
        f"{found}, but the backend is {b.name}: pathway commands do not see them",
        f"inspect: {inspect}; remove them, keeping the pathway: "
        f"{_move_hint(stale, b.name, b.other_marks, in_use)}",
    )]  # fmt: skip


def check_ipv6(state: Ipv6State) -> list[Check]:
    """A row only when IPv6 is off here: pathways then skip their IPv6 parts (not a fault)."""
    if not state.off:
        return []
    detail = f"off on this host ({state.off}): IPv6 parts skipped"
    return [Check("ipv6", "", "IPv6", Level.OK, detail)]


def _families(items: list[ItemStatus]) -> str:
    """``IPv4, IPv6``: the families of ``items``, each once, in order."""
    return ", ".join(dict.fromkeys(f"IPv{i.family.value}" for i in items))


def _missing(items: list[ItemStatus], mark: int) -> str:
    """``rule fwmark 7 lookup 7 (IPv4, IPv6)``: each missing entry once, with its families."""
    what = {
        ITEM_FWMARK_RULE: f"rule fwmark {mark} lookup {mark}",
        ITEM_LOCAL_ROUTE: f"route local default dev lo table {mark}",
        ITEM_SAVE_MARK: "PREROUTING save-mark",
        ITEM_RESTORE_MARK: "OUTPUT restore-mark",
    }
    families: dict[str, list[str]] = {}
    for i in items:
        families.setdefault(i.item, []).append(f"IPv{i.family.value}")
    return "; ".join(f"{what.get(k, k)} ({', '.join(v)})" for k, v in families.items())


def _add_fix(st: PathwayStatus) -> str:
    extra = f" --backend {st.backend}" if st.backend_reason == "requested" else ""
    return f"pymmproxy pathway add {st.mark}{extra}"


_GROUPS = (
    ("rules", "fwmark rules", (ITEM_FWMARK_RULE,)),
    ("routes", "local routes", (ITEM_LOCAL_ROUTE,)),
    ("connmark", "CONNMARK rules", (ITEM_SAVE_MARK, ITEM_RESTORE_MARK)),
)


def check_pathway(m: MarkFacts) -> list[Check]:
    """The rules, routes, CONNMARK entries and loopback reply path of one mark."""
    subject = str(m.mark)
    st = m.status
    if st is None:
        return [Check(
            "pathway", subject, f"pathway {m.mark}", Level.FAIL, f"cannot read: {m.error}",
            f"sudo pymmproxy pathway status {m.mark}",
        )]  # fmt: skip
    checks: list[Check] = []
    for key, label, names in _GROUPS:
        items = [i for i in st.items if i.item in names]
        missing = [i for i in items if not i.present]
        name = f"pathway {m.mark}: {label}"
        if not missing:
            detail = f"present ({_families(items)})"
            checks.append(Check(key, subject, name, Level.OK, detail))
            continue
        what = _missing(missing, m.mark)
        cmds = tuple(i.command for i in missing)
        checks.append(Check(key, subject, name, Level.FAIL, f"missing: {what}", _add_fix(st), cmds))
    checks.append(check_loopback(m, st))
    return checks


def check_loopback(m: MarkFacts, st: PathwayStatus) -> Check:
    """``from 127.0.0.0/8 iif lo`` / ``from ::1/128 iif lo``, or tcp_fwmark_accept for TCP."""
    subject, name = str(m.mark), f"pathway {m.mark}: loopback reply path"
    items = [i for i in st.items if i.item == ITEM_LOOPBACK_RULE]
    missing = [i for i in items if not i.present]
    if not missing:
        nets = " and ".join(i.family.loopback_net for i in items)
        detail = f"from {nets} iif lo rule{'s' if len(items) > 1 else ''} present"
        return Check("loopback", subject, name, Level.OK, detail)
    what = " and ".join(f"'from {i.family.loopback_net} iif lo'" for i in missing)
    what += " rules" if len(missing) > 1 else " rule"
    cmds = tuple(i.command for i in missing)
    if st.tcp_fwmark_accept == 1:
        covered = "net.ipv4.tcp_fwmark_accept=1 covers TCP replies only"
        if m.udp_instances:
            detail = f"{what} missing; {covered}, and UDP instances use this mark: "
            detail += ", ".join(m.udp_instances)
            return Check("loopback", subject, name, Level.FAIL, detail, _add_fix(st), cmds)
        detail = f"{what} missing; {covered}: a UDP instance would still need the rule"
        return Check("loopback", subject, name, Level.WARN, detail, _add_fix(st), cmds)
    fwa = "unreadable" if st.tcp_fwmark_accept is None else str(st.tcp_fwmark_accept)
    detail = (
        f"{what} missing (and net.ipv4.tcp_fwmark_accept={fwa}): replies of loopback "
        "services leave by the default route"
    )
    return Check("loopback", subject, name, Level.FAIL, detail, _add_fix(st), cmds)


def check_listen(f: InstanceFacts) -> Check:
    """The listen address can be bound, or is bound by this very instance."""
    inst, ep = f.inst, f.inst.listen
    key, name = "listen", f"{inst.name}: listen {inst.transport}"
    fix_line = f"or change listen_addr in {f.where}"
    if f.bind.ok:
        if f.holder_pid is not None:
            detail = (
                f"{ep} is free, yet the instance runs (pid {f.holder_pid or '?'}): "
                "in another network namespace?"
            )
            return Check(key, inst.name, name, Level.WARN, detail)
        return Check(key, inst.name, name, Level.OK, f"{ep} can be bound")
    code = f.bind.code
    if code == errno.EADDRINUSE:
        if f.holder_pid is not None:
            detail = f"{ep} in use by this instance, running as pid {f.holder_pid or '?'}"
            return Check(key, inst.name, name, Level.OK, detail)
        flag = "-ltnp" if inst.transport is Transport.TCP else "-lunp"
        detail = f"{ep} is in use by another process (the instance is not running)"
        fix = f"find it: ss {flag} 'sport = :{ep.port}'; stop it, {fix_line}"
        return Check(key, inst.name, name, Level.FAIL, detail, fix)
    if code == errno.EADDRNOTAVAIL:
        detail = f"{ep.host} is not an address of this host"
        fix = f"ip addr add {ep.host}/PREFIX dev IFACE (or wait for that interface), {fix_line}"
        return Check(key, inst.name, name, Level.FAIL, detail, fix)
    if code == errno.EACCES:
        detail = f"port {ep.port} needs CAP_NET_BIND_SERVICE"
        fix = f"run as root or with CAP_NET_BIND_SERVICE (as {UNIT} grants it), {fix_line}"
        return Check(key, inst.name, name, Level.FAIL, detail, fix)
    detail = f"cannot bind {ep}: {f.bind.message}"
    return Check(key, inst.name, name, Level.FAIL, detail, f"check listen_addr in {f.where}")


def check_target(f: InstanceFacts, t: TargetFacts) -> Check:
    """TCP: the target accepts a connection. UDP: the target address is local."""
    inst, ep = f.inst, t.endpoint
    key = "target4" if t.column == "target_ipv4" else "target6"
    name = f"{inst.name}: {t.column}"
    fix_line = f"or fix {t.column}/target_port in {f.where}"
    if inst.transport is Transport.UDP:
        if t.outcome.ok:
            detail = f"{ep.host} is a local address (a UDP service cannot be probed)"
            return Check(key, inst.name, name, Level.OK, detail)
        detail = f"{ep.host} is not a local address: {t.outcome.message}"
        return Check(key, inst.name, name, Level.FAIL, detail, f"use a local address {fix_line}")
    if t.outcome.ok:
        return Check(key, inst.name, name, Level.OK, f"{ep} accepts TCP connections")
    if t.outcome.code == errno.ECONNREFUSED:
        detail = f"{ep}: connection refused (is the service running?)"
    elif t.outcome.code == errno.ETIMEDOUT:
        detail = f"{ep}: no answer within {f.timeout:g} s"
    else:
        detail = f"{ep}: {t.outcome.message}"
    return Check(key, inst.name, name, Level.FAIL, detail, f"start the service on {ep}, {fix_line}")


def check_allow(f: InstanceFacts) -> Check:
    """The instance's allow list loads and names at least one load balancer."""
    inst, path = f.inst, f.allow_path
    key, name = "allow", f"{inst.name}: allow list"
    if f.allow_count is None:
        fix = f"write {path}: your load balancers' IPs or CIDRs, one a line"
        return Check(key, inst.name, name, Level.FAIL, f.allow_error, fix)
    if f.allow_count == 0:
        detail = f"{path} is empty: every PROXY header would be refused"
        fix = f"add your load balancers' IPs or CIDRs to {path}, one a line"
        return Check(key, inst.name, name, Level.FAIL, detail, fix)
    plural = "" if f.allow_count == 1 else "s"
    return Check(key, inst.name, name, Level.OK, f"{f.allow_count} network{plural} in {path}")


def check_instance(f: InstanceFacts) -> list[Check]:
    """Every check of one instance."""
    return [
        check_listen(f),
        *(check_target(f, t) for t in f.targets),
        check_allow(f),
    ]


def evaluate(facts: Facts) -> list[Check]:
    """All checks, in report order."""
    checks = [
        check_privileges(facts.privileges),
        *check_backend(facts.backend, frozenset(m.mark for m in facts.marks)),
        *check_ipv6(facts.ipv6),
    ]
    for m in facts.marks:
        checks += check_pathway(m)
    for f in facts.instances:
        checks += check_instance(f)
    return checks


def exit_code(checks: list[Check]) -> int:
    """0 when nothing failed (warnings allowed), else 1."""
    return 1 if any(c.level is Level.FAIL for c in checks) else 0
