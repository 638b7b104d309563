"""Firewall backends for the CONNMARK half of a pathway.

Two implementations of :class:`FirewallBackend`:

* ``legacy`` (:mod:`.legacy`): python-iptables, i.e. legacy xtables ``mangle`` tables (v4 and
  v6), exactly the ``iptables -t mangle ... CONNMARK`` recipe of :mod:`..plan`.
* ``nft`` (:mod:`.nft`): libnftables' JSON API (ctypes), rules in a dedicated
  ``table inet pymmproxy``. Chosen for hosts whose ``iptables`` is ``xtables-nft-multi``
  (Debian >= 11 default), where legacy tables would sit beside the host's own and make its
  ``iptables`` warn "iptables-legacy tables present".

``auto`` picks by where the host's ``iptables`` resolves (:mod:`.detect`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from types import TracebackType
from typing import ClassVar, Literal

from pymmproxy.errors import UsageError
from pymmproxy.pathway.plan import FirewallSpec

BackendName = Literal["legacy", "nft"]
BACKEND_CHOICES = ("auto", "legacy", "nft")


class FirewallBackend(abc.ABC):
    """Adds, removes and reads mangle entries; every method works on a batch of specs."""

    name: ClassVar[BackendName]

    def close(self) -> None:
        """Release library handles (idempotent)."""

    def __enter__(self) -> FirewallBackend:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @abc.abstractmethod
    def present(self, specs: Sequence[FirewallSpec]) -> list[bool]:
        """For each spec, whether exactly that entry exists."""

    @abc.abstractmethod
    def add(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        """Create the missing entries; returns those it created."""

    @abc.abstractmethod
    def delete(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        """Remove the entries (and nothing else); returns those it removed."""


def resolve_backend_name(name: str) -> BackendName:
    """``auto`` -> the detected backend; ``legacy`` / ``nft`` as given."""
    if name == "auto":
        from pymmproxy.pathway.firewall.detect import detect_backend

        return detect_backend().backend
    if name == "legacy":
        return "legacy"
    if name == "nft":
        return "nft"
    raise UsageError(f"bad backend {name!r}: choose one of {', '.join(BACKEND_CHOICES)}")


def open_backend(name: str) -> FirewallBackend:
    """An instance of the named (or detected) backend."""
    resolved = resolve_backend_name(name)
    if resolved == "legacy":
        from pymmproxy.pathway.firewall.legacy import LegacyBackend

        return LegacyBackend()
    from pymmproxy.pathway.firewall.nft import NftBackend

    return NftBackend()
