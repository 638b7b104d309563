"""Pathways: the policy routing and firewall state that brings spoofed replies back.

Public API: :func:`add`, :func:`delete` and :func:`status` for one fwmark, acting on the
network namespace of the calling process. The state itself is described by
:func:`pymmproxy.pathway.plan.plan`; rules and routes go through rtnetlink
(:mod:`.routing`), the CONNMARK entries through a firewall backend (:mod:`.firewall`).
Failures raise :class:`~pymmproxy.errors.PathwayError` with a one-line message; a bad mark
raises :class:`~pymmproxy.errors.UsageError`. ``add`` applies routes, rules, then firewall
entries and stops at the first failure (no rollback): re-running ``add`` completes it and
``del`` removes whatever part exists. ``del`` goes in the reverse order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pymmproxy.errors import PathwayError, UsageError
from pymmproxy.pathway.firewall import (
    BackendName,
    FirewallBackend,
    open_backend,
    resolve_backend_name,
)
from pymmproxy.pathway.firewall.detect import detect_backend
from pymmproxy.pathway.plan import ITEMS, Family, FirewallSpec, Plan, plan
from pymmproxy.pathway.routing import Routing, read_tcp_fwmark_accept

__all__ = ["ItemStatus", "PathwayStatus", "add", "delete", "plan", "status"]


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


@contextmanager
def _reported(verb: str, mark: int) -> Iterator[None]:
    """Turn lower-level failures into a one-line ``pathway VERB MARK: ...`` PathwayError."""
    try:
        yield
    except UsageError:
        raise
    except PermissionError:
        raise PathwayError(
            f"pathway {verb} {mark}: permission denied (need root or CAP_NET_ADMIN)"
        ) from None
    except PathwayError as exc:
        raise PathwayError(f"pathway {verb} {mark}: {exc}") from exc
    except OSError as exc:
        raise PathwayError(f"pathway {verb} {mark}: {exc}") from exc


def _fw_text(backend: FirewallBackend, spec: FirewallSpec, verb: str) -> str:
    if backend.name != "nft":
        return spec.command(verb)
    if verb == "add":
        return spec.nft_command()
    return f"nft: deleted from inet pymmproxy {spec.chain.lower()}: {spec.nft_rule()}"


def add(mark: int, *, backend: str = "auto") -> list[str]:
    """Create whatever of ``plan(mark)`` is missing; returns the changes as commands."""
    p = plan(mark)
    backend = resolve_backend_name(backend)  # a bad name fails before any change
    changes: list[str] = []
    with _reported("add", p.mark), Routing() as routing:
        changes += [r.command("add") for r in p.routes if routing.add_route(r)]
        changes += [r.command("add") for r in p.rules if routing.add_rule(r)]
        with open_backend(backend) as fw:
            changes += [_fw_text(fw, f, "add") for f in fw.add(p.firewall)]
    return changes


def delete(mark: int, *, backend: str = "auto") -> list[str]:
    """Remove exactly the entries of ``plan(mark)``; returns what was removed."""
    p = plan(mark)
    backend = resolve_backend_name(backend)
    changes: list[str] = []
    with _reported("del", p.mark), Routing() as routing:
        with open_backend(backend) as fw:
            changes += [_fw_text(fw, f, "del") for f in fw.delete(p.firewall)]
        changes += [r.command("del") for r in p.rules if routing.del_rule(r)]
        changes += [r.command("del") for r in p.routes if routing.del_route(r)]
    return changes


def _backend_reason(backend: str) -> str:
    if backend != "auto":
        return "requested"
    return f"auto: {detect_backend().reason}"


def status(mark: int, *, backend: str = "auto") -> PathwayStatus:
    """Read which entries of ``plan(mark)`` are present (changes no rule; note that a read
    with the legacy backend instantiates the namespace's empty legacy mangle tables)."""
    p: Plan = plan(mark)
    reason = _backend_reason(backend)
    backend = resolve_backend_name(backend)
    items: list[ItemStatus] = []
    with _reported("status", p.mark), Routing() as routing:
        items += [ItemStatus(r.item, r.family, routing.has_rule(r), r.command()) for r in p.rules]
        items += [ItemStatus(r.item, r.family, routing.has_route(r), r.command()) for r in p.routes]
        with open_backend(backend) as fw:
            found = fw.present(p.firewall)
            items += [
                ItemStatus(f.item, f.family, ok, _fw_text(fw, f, "add"))
                for f, ok in zip(p.firewall, found, strict=True)
            ]
            name = fw.name
    return PathwayStatus(p.mark, name, reason, read_tcp_fwmark_accept(), tuple(items))
