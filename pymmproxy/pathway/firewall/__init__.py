"""Firewall backends for the CONNMARK half of a pathway.

Two implementations of :class:`FirewallBackend`:

* ``legacy`` (:mod:`.legacy`): python-iptables, i.e. legacy xtables ``mangle`` tables (v4 and
  v6), exactly the ``iptables -t mangle ... CONNMARK`` recipe of :mod:`..plan`.
* ``nft`` (:mod:`.nft`): libnftables' JSON API through ctypes, rules in a dedicated
  ``table inet pymmproxy``. For hosts whose ``iptables`` is ``xtables-nft-multi`` (the
  Debian >= 10 default): legacy tables there are invisible to the host's ``iptables`` /
  ``nft list ruleset`` and make ``iptables`` warn "iptables-legacy tables present".

``auto`` picks by the tables the kernel holds (legacy xtables or iptables-nft ones), else by
where the installed ``iptables`` resolves (:mod:`.detect`).

Why libnftables and not pyroute2's nftables module (measured on Debian 12, pyroute2 0.9.7,
libnftables 1.0.6): a JSON batch of table + 2 chains + 2 rules and a read-back took ~2.4 ms
and is atomic, and ``nft`` prints exactly what was written; pyroute2's nftables support is
marked experimental and only has expression helpers for addresses / verdicts, so the
meta/ct mark expressions would have to be hand-assembled register by register.
"""

from __future__ import annotations

from pymmproxy.errors import UsageError
from pymmproxy.pathway.firewall.base import BackendName, FirewallBackend
from pymmproxy.pathway.firewall.detect import detect_backend
from pymmproxy.pathway.firewall.legacy import LegacyBackend
from pymmproxy.pathway.firewall.nft import NftBackend

__all__ = ["BACKEND_CHOICES", "BackendName", "FirewallBackend", "open_backend"]

BACKEND_CHOICES = ("auto", "legacy", "nft")


def resolve_backend_name(name: str) -> BackendName:
    """``auto`` -> the detected backend; ``legacy`` / ``nft`` as given."""
    if name == "auto":
        return detect_backend().backend
    if name == "legacy":
        return "legacy"
    if name == "nft":
        return "nft"
    raise UsageError(f"bad backend {name!r}: choose one of {', '.join(BACKEND_CHOICES)}")


def open_backend(name: str) -> FirewallBackend:
    """An instance of the named (or detected) backend."""
    if resolve_backend_name(name) == "legacy":
        return LegacyBackend()
    return NftBackend()
