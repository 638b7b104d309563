"""Pathways: the policy routing and firewall state that brings spoofed replies back.

Public API: :func:`add`, :func:`delete` and :func:`status` for one fwmark, acting on the
network namespace of the calling process. The state itself is described by
:func:`pymmproxy.pathway.plan.plan`; rules and routes go through rtnetlink
(:mod:`.routing`), the CONNMARK entries through a firewall backend (:mod:`.firewall`).
Failures raise :class:`~pymmproxy.errors.PathwayError` with a one-line message; a bad mark
raises :class:`~pymmproxy.errors.UsageError`. ``add`` applies routes, rules, then firewall
entries, all or nothing: on a failure it undoes what it created itself (entries that were
already there stay) and the error line says so, or names what it could not undo. ``del``
goes in the reverse order and removes whatever part exists; first it checks every rule and
route it would delete, and if the kernel would take a foreign look-alike instead of one of
ours it refuses before changing anything (the error line says nothing was deleted). Where
IPv6 is off (:mod:`.ipv6`), ``add`` and ``status`` cover IPv4 only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from pymmproxy.errors import PathwayError, PymmproxyError, UsageError
from pymmproxy.pathway.firewall import (
    BackendName,
    FirewallBackend,
    open_backend,
    resolve_backend_name,
)
from pymmproxy.pathway.firewall.detect import detect_backend
from pymmproxy.pathway.ipv6 import Ipv6State
from pymmproxy.pathway.ipv6 import probe as probe_ipv6
from pymmproxy.pathway.plan import ITEMS, Family, FirewallSpec, Plan, plan
from pymmproxy.pathway.routing import Routing, read_tcp_fwmark_accept

__all__ = [
    "Ipv6State",
    "ItemStatus",
    "PathwayStatus",
    "add",
    "delete",
    "plan",
    "probe_ipv6",
    "status",
]


@dataclass(frozen=True, slots=True)
class ItemStatus:
    """One planned entry and whether it is in place."""

    item: str
    family: Family
    present: bool
    command: str


@dataclass(frozen=True, slots=True)
class PathwayStatus:
    """What :func:`status` found for one mark."""

    mark: int
    backend: BackendName
    backend_reason: str
    tcp_fwmark_accept: int | None
    items: tuple[ItemStatus, ...]
    ipv6_note: str = ""  # "IPv6 off on this host (...): IPv6 parts skipped", or ""

    @property
    def complete(self) -> bool:
        return all(i.present for i in self.items)

    @property
    def missing(self) -> tuple[ItemStatus, ...]:
        return tuple(i for i in self.items if not i.present)

    def rows(self) -> list[tuple[str, bool | None, bool | None]]:
        """``(item, v4 present, v6 present)`` in display order (None: not planned)."""
        cells = {(i.item, i.family): i.present for i in self.items}
        return [
            (name, cells.get((name, Family.V4)), cells.get((name, Family.V6))) for name in ITEMS
        ]


def _describe(exc: Exception) -> str:
    """The one-line reason of a lower-level failure."""
    if isinstance(exc, PermissionError):
        return "permission denied (need root, or CAP_NET_ADMIN; the legacy backend CAP_NET_RAW too)"
    return str(exc)


@contextmanager
def _reported(verb: str, mark: int) -> Iterator[None]:
    """Turn lower-level failures into a one-line ``pathway VERB MARK: ...`` PathwayError."""
    try:
        yield
    except UsageError:
        raise
    except (PathwayError, OSError) as exc:
        raise PathwayError(f"pathway {verb} {mark}: {_describe(exc)}") from exc


@dataclass(frozen=True, slots=True)
class _Change:
    """One change ``add`` made, and how to take it back (returns whether it removed it)."""

    text: str
    undo: Callable[[], object]


def _roll_back(changes: list[_Change]) -> str:
    """Undo ``changes`` newest first; a note on the outcome for the error line."""
    left: list[str] = []
    undone = 0
    for change in reversed(changes):
        try:
            undone += bool(change.undo())
        except (PymmproxyError, OSError):
            left.append(change.text)
    if left:
        return f"; rollback failed, still in place: {'; '.join(reversed(left))}"
    if undone:
        return f"; rolled back the {undone} change{'s' if undone > 1 else ''} made before"
    return ""


@contextmanager
def _all_or_nothing(changes: list[_Change]) -> Iterator[None]:
    """On a failure, undo ``changes`` and say how that went in the one error line."""
    try:
        yield
    except UsageError:
        raise
    except (PathwayError, OSError) as exc:
        note = _roll_back(changes)
        if not note:
            raise
        raise PathwayError(f"{_describe(exc)}{note}") from exc


def _fw_text(backend: FirewallBackend, spec: FirewallSpec, verb: str) -> str:
    if backend.name != "nft":
        return spec.command(verb)
    if verb == "add":
        return spec.nft_command()
    return f"nft: deleted from inet pymmproxy {spec.chain.lower()}: {spec.nft_rule()}"


def add(mark: int, *, backend: str = "auto", ipv6: Ipv6State | None = None) -> list[str]:
    """Create whatever of the plan is missing; returns the changes as commands.

    IPv6 parts are left out when IPv6 is off here (``ipv6``, probed when None). All or
    nothing: on a failure, the changes this call made are undone before it raises.
    """
    state = probe_ipv6() if ipv6 is None else ipv6
    p = plan(mark, state.families("add"))
    backend = resolve_backend_name(backend)  # a bad name fails before any change
    made: list[_Change] = []
    with (
        _reported("add", p.mark),
        Routing() as routing,
        open_backend(backend) as fw,
        _all_or_nothing(made),
    ):
        for route in p.routes:
            if routing.add_route(route):
                made.append(_Change(route.command("add"), partial(routing.del_route, route)))
        for rule in p.rules:
            if routing.add_rule(rule):
                made.append(_Change(rule.command("add"), partial(routing.del_rule, rule)))
        routed = [c.text for c in made]
        found = fw.present(p.firewall)
        missing = [f for f, ok in zip(p.firewall, found, strict=True) if not ok]
        # legacy adds entry by entry: a failure half-way undoes the ones it made
        made += [_Change(_fw_text(fw, f, "add"), partial(fw.delete, [f])) for f in missing]
        created = fw.add(missing)
    return routed + [_fw_text(fw, f, "add") for f in created]


def delete(mark: int, *, backend: str = "auto", ipv6: Ipv6State | None = None) -> list[str]:
    """Remove exactly the entries of the plan; returns what was removed.

    Reaches IPv6 leftovers even when IPv6 is off, unless the kernel has no IPv6 at all.
    """
    state = probe_ipv6() if ipv6 is None else ipv6
    p = plan(mark, state.families("del"))
    backend = resolve_backend_name(backend)
    changes: list[str] = []
    with _reported("del", p.mark), Routing() as routing, open_backend(backend) as fw:
        refusals = [routing.rule_refusal(r) for r in p.rules]
        refusals += [routing.route_refusal(r) for r in p.routes]
        if refused := [r for r in refusals if r]:
            raise PathwayError(f"{'; '.join(refused)}; nothing was deleted")
        changes += [_fw_text(fw, f, "del") for f in fw.delete(p.firewall)]
        changes += [r.command("del") for r in p.rules if routing.del_rule(r)]
        changes += [r.command("del") for r in p.routes if routing.del_route(r)]
    return changes


def _backend(requested: str) -> tuple[BackendName, str]:
    """The backend to use and why (detected once for ``auto``)."""
    if requested != "auto":
        return resolve_backend_name(requested), "requested"
    found = detect_backend()
    return found.backend, f"auto: {found.reason}"


def status(mark: int, *, backend: str = "auto", ipv6: Ipv6State | None = None) -> PathwayStatus:
    """Read which entries of the plan are present (changes nothing; only a legacy read
    without root, which cannot see the table list, instantiates empty mangle tables)."""
    state = probe_ipv6() if ipv6 is None else ipv6
    p: Plan = plan(mark, state.families("status"))
    name, reason = _backend(backend)
    items: list[ItemStatus] = []
    with _reported("status", p.mark), Routing() as routing:
        items += [ItemStatus(r.item, r.family, routing.has_rule(r), r.command()) for r in p.rules]
        items += [ItemStatus(r.item, r.family, routing.has_route(r), r.command()) for r in p.routes]
        with open_backend(name) as fw:
            found = fw.present(p.firewall)
            items += [
                ItemStatus(f.item, f.family, ok, _fw_text(fw, f, "add"))
                for f, ok in zip(p.firewall, found, strict=True)
            ]
    fwa = read_tcp_fwmark_accept()
    return PathwayStatus(p.mark, name, reason, fwa, tuple(items), state.note)
