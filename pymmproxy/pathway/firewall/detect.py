"""Which firewall backend the host uses, decided without running any tool.

The host's ``iptables`` (``/usr/sbin/iptables``, else the one on ``PATH``) is followed through
its symlinks (Debian: ``/etc/alternatives``): ``xtables-nft-multi`` / ``iptables-nft`` means
nf_tables, ``xtables-legacy-multi`` / ``iptables-legacy`` means legacy xtables. Without an
``iptables`` at all, nft is used when libnftables can be loaded, legacy otherwise.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pymmproxy.pathway.firewall.base import BackendName
from pymmproxy.pathway.firewall.libnftables import libnftables_available

DEFAULT_IPTABLES = Path("/usr/sbin/iptables")


@dataclass(frozen=True, slots=True)
class Detection:
    """The chosen backend and a one-line reason for status output."""

    backend: BackendName
    reason: str


def classify(binary: Path) -> BackendName | None:
    """``nft`` / ``legacy`` from the name an iptables binary resolves to, else None."""
    name = binary.name
    if "nft" in name:
        return "nft"
    if "legacy" in name:
        return "legacy"
    return None


def _candidates() -> list[Path]:
    found = [DEFAULT_IPTABLES]
    on_path = shutil.which("iptables")
    if on_path is not None:
        found.append(Path(on_path))
    return found


def detect_backend(candidates: list[Path] | None = None) -> Detection:
    """Inspect the host's iptables (or ``candidates``) and pick a backend."""
    for binary in _candidates() if candidates is None else candidates:
        if not binary.exists():
            continue
        target = binary.resolve()
        backend = classify(target)
        if backend is not None:
            return Detection(backend, f"{binary} -> {target.name}")
    if libnftables_available():
        return Detection("nft", "no iptables found; libnftables available")
    return Detection("legacy", "no iptables found; libnftables missing")
