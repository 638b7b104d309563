"""Which peers may connect: the allow list, checked once per accepted connection.

Matching is by address, not by socket family: a v4 peer seen as ``192.0.2.1`` on an IPv4
listener and as ``::ffff:192.0.2.1`` on a dual-stack one gets the same answer. Such a peer
matches IPv4 entries and IPv4-mapped ones (``::ffff:0:0/96``, ``::ffff:192.0.2.0/120``),
never a wider IPv6 entry: ``::/0`` is every IPv6 peer and no IPv4 one, as in go-mmproxy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pymmproxy.net.localroutes import RT_TABLE_LOCAL, RTN_BROADCAST, local_routes
from pymmproxy.settings import Network

DEFAULT_CACHE_SIZE = 4096
_MAPPED_NET = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(net: ipaddress.IPv6Network) -> ipaddress.IPv4Network:
    """``::ffff:198.51.100.0/120`` -> ``198.51.100.0/24``."""
    return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))


_DESCRIBE_MAX = 8

_Table = tuple[tuple[int, frozenset[int]], ...]  # (netmask, network addresses) per prefix length


def _table(networks: Iterable[Network]) -> _Table:
    by_mask: defaultdict[int, set[int]] = defaultdict(set)
    for net in networks:
        by_mask[int(net.netmask)].add(int(net.network_address))
    return tuple((mask, frozenset(addrs)) for mask, addrs in sorted(by_mask.items()))


def _in(value: int, table: _Table) -> bool:
    return any(value & mask in addrs for mask, addrs in table)


class AllowList:
    """A set of networks a peer address must fall in.

    ``AllowList(None)`` allows every peer (an explicit opt-in); ``AllowList(())`` denies every
    peer. ``len()`` is the number of distinct networks (0 for both of those), and ``bool()``
    is True when the list restricts peers at all, i.e. False only for allow-any -- so a deny-all
    list is truthy although it is empty.

    :meth:`allows` memoises its answer per peer string in a dict of at most ``cache_size``
    entries, emptied when full, so a returning peer costs one dict lookup.
    """

    __slots__ = ("_cache", "_cache_size", "_networks", "_v4", "_v6")

    def __init__(
        self, networks: tuple[Network, ...] | None, *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self._networks = None if networks is None else tuple(dict.fromkeys(networks))
        self._cache: dict[str, bool] = {}
        self._cache_size = max(1, cache_size)
        # A cache miss costs one AND and set lookup per distinct prefix length.
        given = self._networks or ()
        v4 = [n for n in given if isinstance(n, ipaddress.IPv4Network)]
        v6 = [n for n in given if isinstance(n, ipaddress.IPv6Network)]
        # An IPv4 peer (also ::ffff:a.b.c.d on a dual-stack socket) matches IPv4 entries and
        # IPv4-mapped ones (::ffff:198.51.100.0/120), never a wider IPv6 entry such as ::/0,
        # which means "every IPv6 peer" to whoever writes it (and to go-mmproxy).
        v4 += [_unmapped(n) for n in v6 if n.prefixlen >= 96 and n.subnet_of(_MAPPED_NET)]
        self._v4 = _table(ipaddress.collapse_addresses(v4))
        self._v6 = _table(ipaddress.collapse_addresses(v6))

    @property
    def allow_any(self) -> bool:
        """True when the list was built from ``None`` (every peer allowed)."""
        return self._networks is None

    @property
    def networks(self) -> tuple[Network, ...] | None:
        """The distinct networks, in the order given (``None`` for allow-any)."""
        return self._networks

    def __len__(self) -> int:
        return 0 if self._networks is None else len(self._networks)

    def __bool__(self) -> bool:
        return self._networks is not None

    def __repr__(self) -> str:
        return f"AllowList({self.describe()})"

    @property
    def denies_all(self) -> bool:
        """An empty list (not allow-any): every load balancer is refused."""
        return self._networks is not None and not self._networks

    def describe(self) -> str:
        """A one-line summary for logs."""
        if self._networks is None:
            return "any peer (allow list disabled)"
        if not self._networks:
            return "no peer (empty allow list denies all)"
        shown = ", ".join(str(n) for n in self._networks[:_DESCRIBE_MAX])
        more = len(self._networks) - _DESCRIBE_MAX
        tail = f", ... {more} more" if more > 0 else ""
        count = len(self._networks)
        return f"{count} network{'s' if count > 1 else ''}: {shown}{tail}"

    def allows(self, ip: str) -> bool:
        """Whether the peer ``ip`` (as in ``peername[0]``, maybe ``%scope``d) may connect.

        Text that is not an IP address is denied.
        """
        cached = self._cache.get(ip)
        if cached is not None:
            return cached
        if self._networks is None:
            return True
        result = self._match(ip)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[ip] = result
        return result

    def _match(self, ip: str) -> bool:
        host = ip.partition("%")[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            value = int.from_bytes(socket.inet_pton(family, host))
        except (OSError, ValueError):  # not an address / embedded NUL
            return False
        if family == socket.AF_INET6 and value >> 32 != 0xFFFF:
            return _in(value, self._v6)
        return _in(value & 0xFFFFFFFF, self._v4)

    def cache_clear(self) -> None:
        """Forget memoised answers (not needed for correctness: the list is immutable)."""
        self._cache.clear()


# -- which header sources may be spoofed ---------------------------------------------------
_V4_FIRST_OCTET = {"0": "unspecified", "127": "loopback"} | {
    str(octet): "multicast" for octet in range(224, 240)
}
_V6_LINK_LOCAL = frozenset({"fe8", "fe9", "fea", "feb"})
_MAPPED = "::ffff:"


class SourcePolicy:
    """Header sources the proxy refuses to spoof, checked once per relayed connection.

    Refused (the answer is the kind, for logs and metrics): ``unspecified`` (``0.0.0.0/8``,
    ``::``), ``loopback`` (``127.0.0.0/8``, ``::1``), ``multicast`` (``224.0.0.0/4``,
    ``ff00::/8``), ``link_local`` (``169.254.0.0/16``, ``fe80::/10``: never a client behind a
    load balancer, and a v6 one cannot be bound without a scope), ``broadcast``
    (``255.255.255.255`` and the broadcast address of every local subnet: the kernel binds
    a socket to one as to "any address", so the service would see this host's own) and
    ``own_address`` (an address of this host, or inside a prefix of its local table (AnyIP):
    a spoofed connection would look local to the service). IPv4-mapped IPv6 sources are
    judged by their IPv4 address. Addresses are the parser's canonical ``inet_ntop`` text,
    so the checks are string tests; local prefixes (rare) are integer ranges per family.
    """

    __slots__ = ("broadcast", "own", "ranges4", "ranges6")

    def __init__(
        self,
        own: Iterable[str] = (),
        *,
        broadcast: Iterable[str] = (),
        nets: Iterable[Network] = (),
    ) -> None:
        self.own = frozenset(_canonical(ip) for ip in own)
        self.broadcast = frozenset(_canonical(ip) for ip in broadcast)
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in nets:
            first = int(net.network_address)
            ranges[net.version].append((first, first + net.num_addresses - 1))
        self.ranges4, self.ranges6 = tuple(ranges[4]), tuple(ranges[6])

    @classmethod
    def for_host(cls, listen_host: str) -> SourcePolicy:
        """The policy for this host (see :func:`host_addresses`)."""
        host = host_addresses(listen_host)
        return cls(host.own, broadcast=host.broadcast, nets=host.nets)

    def refuses(self, ip: str) -> str | None:
        """The kind of address ``ip`` is if it must not be spoofed, else ``None``."""
        if ":" in ip:
            first = ip[0]
            if first == ":" and ip.startswith(_MAPPED) and "." in ip:
                return self.refuses(ip[len(_MAPPED) :])
            # Only "::"-led (::, ::1) and "f"-led (ff00::/8, fe80::/10) texts can be refused.
            kind = _v6_kind(ip) if first in {":", "f"} else None
        else:
            kind = _V4_FIRST_OCTET.get(ip.partition(".")[0])
            if kind is None and ip.startswith("169.254."):
                kind = "link_local"
            elif kind is None and (ip == "255.255.255.255" or ip in self.broadcast):
                kind = "broadcast"
        if kind is None and (ip in self.own or self._in_ranges(ip)):
            return "own_address"
        return kind

    def _in_ranges(self, ip: str) -> bool:
        """Inside a local prefix (none on most hosts: then two attribute tests)."""
        v6 = ":" in ip
        ranges = self.ranges6 if v6 else self.ranges4
        if not ranges:
            return False
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, ip))
        return any(first <= value <= last for first, last in ranges)


def _v6_kind(ip: str) -> str | None:
    if ip == "::":
        return "unspecified"
    if ip == "::1":
        return "loopback"
    head = ip.partition(":")[0]
    if len(head) == 4 and head.startswith("ff"):
        return "multicast"
    if len(head) == 4 and head[:3] in _V6_LINK_LOCAL:
        return "link_local"
    return None


@dataclass(frozen=True, slots=True)
class HostAddresses:
    """What this host answers for (see :func:`host_addresses`)."""

    own: frozenset[str]  # its addresses (and the listen address)
    broadcast: frozenset[str]  # its subnets' broadcast addresses
    nets: tuple[Network, ...]  # prefixes of its local table (AnyIP), beyond loopback


_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")


def host_addresses(listen_host: str) -> HostAddresses:
    """This host's addresses to refuse as sources, read at start-up and on SIGHUP from the
    kernel's routes (:mod:`pymmproxy.net.localroutes`) in the calling thread's network
    namespace: every local address (a full-length ``local`` route, in any table: a VRF's
    addresses count too), every local subnet's broadcast address, every wider ``local``
    prefix of the local table (``ip route add local 198.51.100.0/24 dev lo``: every address
    in it is the host's; not a pathway's ``local 0.0.0.0/0`` in its own table, which holds
    for marked packets only), plus the listen address and the IPv6 addresses of
    ``if_inet6`` (also on interfaces that are down).

    A service trusts connections from its own host (its public address as much as loopback):
    a header must not be able to claim one, whatever address the proxy listens on.
    """
    own: set[str] = set()
    broadcast: set[str] = set()
    nets: set[Network] = set()
    if listen_host not in {"0.0.0.0", "::"}:
        own.add(listen_host)
    for family, full in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
        try:
            routes = local_routes(family)
        except OSError:  # (IPv6 off: EAFNOSUPPORT, or an empty dump)
            continue
        for route in routes:
            if route.kind == RTN_BROADCAST:
                broadcast.add(route.dst)
            elif route.length == full:
                own.add(route.dst)
            elif route.length and route.table == RT_TABLE_LOCAL:
                net = ipaddress.ip_network(f"{route.dst}/{route.length}")
                if not (net.version == 4 and net.subnet_of(_LOOPBACK_V4)):  # type: ignore[arg-type]
                    nets.add(net)
    with contextlib.suppress(OSError):
        for line in Path("/proc/thread-self/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            own.add(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw)))
    return HostAddresses(
        frozenset(_canonical(ip) for ip in own),
        frozenset(_canonical(ip) for ip in broadcast),
        tuple(sorted(nets, key=str)),
    )


def _canonical(ip: str) -> str:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, ip))
    except (OSError, ValueError):
        return ip
