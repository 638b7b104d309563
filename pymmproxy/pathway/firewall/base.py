"""The interface every firewall backend implements."""

from __future__ import annotations

import abc
import errno
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal

from pymmproxy.pathway.plan import FirewallSpec

BackendName = Literal["legacy", "nft"]
CAP_NET_ADMIN = 12


def has_net_admin(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process has CAP_NET_ADMIN in its effective set (True if unknowable)."""
    try:
        for line in status.read_text(encoding="ascii").splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def require_net_admin(what: str) -> None:
    """Fail early, before a library prints its own complaint to stderr (libnftables does)."""
    if not has_net_admin():
        raise PermissionError(errno.EPERM, what)


class FirewallBackend(abc.ABC):
    """Adds, removes and reads mangle entries; every method works on a batch of specs.

    Failures raise :class:`PermissionError` (no CAP_NET_ADMIN) or ``PathwayError``.
    """

    name: ClassVar[BackendName]

    @abc.abstractmethod
    def present(self, specs: Sequence[FirewallSpec]) -> list[bool]:
        """For each spec, whether exactly that entry exists."""

    @abc.abstractmethod
    def add(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        """Create the missing entries; returns those it created."""

    @abc.abstractmethod
    def delete(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        """Remove the entries (and nothing else); returns those it removed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release library handles (idempotent)."""

    def __enter__(self) -> FirewallBackend:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
