"""Whether this network namespace can hold the IPv6 parts of a pathway.

IPv6 is *off* when the kernel has none (``ipv6.disable=1`` on the kernel command line, or a
kernel built without it: ``AF_INET6`` sockets fail with EAFNOSUPPORT and so does every
IPv6 rule, route and ip6tables call) or when ``net.ipv6.conf.lo.disable_ipv6`` is 1 (also
set by ``net.ipv6.conf.all.disable_ipv6=1``): the kernel then refuses ``local ::/0 dev lo``
with EACCES and has already flushed the IPv6 routes of ``lo``, while IPv6 rules and
firewall entries can still be read and removed.

``add`` and ``status`` plan only IPv4 when IPv6 is off; ``del`` still removes IPv6 parts
left over from before, unless the kernel has no IPv6 at all.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from pathlib import Path

from pymmproxy.pathway.plan import BOTH, Family

LO_DISABLE_IPV6 = Path("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
NO_KERNEL_IPV6 = "the kernel has no IPv6: ipv6.disable=1 or built without it"
LO_DISABLED = "net.ipv6.conf.lo.disable_ipv6=1"


@dataclass(frozen=True, slots=True)
class Ipv6State:
    """``off`` is why IPv6 is off here ("" when on); ``kernel``: the kernel has IPv6."""

    kernel: bool = True
    off: str = ""

    @property
    def note(self) -> str:
        """The one-line notice for output ("" when IPv6 is on)."""
        return f"IPv6 off on this host ({self.off}): IPv6 parts skipped" if self.off else ""

    def families(self, verb: str) -> tuple[Family, ...]:
        """The families ``verb`` (add, del, status) works on: del reaches leftovers too."""
        if not self.off or (verb == "del" and self.kernel):
            return BOTH
        return (Family.V4,)


def decide(socket_errno: int | None, lo_disable_ipv6: str | None) -> Ipv6State:
    """The state from an ``AF_INET6`` socket attempt and lo's ``disable_ipv6`` text.

    ``socket_errno``: None if the socket opened; ``lo_disable_ipv6``: None if unreadable.
    """
    if socket_errno == errno.EAFNOSUPPORT:
        return Ipv6State(kernel=False, off=NO_KERNEL_IPV6)
    if lo_disable_ipv6 is not None and lo_disable_ipv6.strip() == "1":
        return Ipv6State(off=LO_DISABLED)
    return Ipv6State()


def _socket_errno() -> int | None:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError as exc:
        return exc.errno
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii")
    except OSError:
        return None


def probe(lo_disable_ipv6: Path = LO_DISABLE_IPV6) -> Ipv6State:
    """The IPv6 state of the calling thread's network namespace."""
    return decide(_socket_errno(), _read(lo_disable_ipv6))
