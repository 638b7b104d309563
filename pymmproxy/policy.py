"""Which peers may connect: the allow list, checked once per accepted connection.

Matching is by address, not by socket family: a v4 peer seen as ``192.0.2.1`` on an IPv4
listener and as ``::ffff:192.0.2.1`` on a dual-stack one gets the same answer. Such a peer
matches IPv4 entries and the IPv6 entries that cover its mapped form (``::ffff:0:0/96``,
``::ffff:192.0.2.0/120``, and also ``::/0``).
"""

from __future__ import annotations

import ipaddress

from pymmproxy.settings import Network

DEFAULT_CACHE_SIZE = 4096
_MAPPED_PREFIX = 0xFFFF << 32  # ::ffff:0:0/96 as an integer
_DESCRIBE_MAX = 8


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
        # (network, mask) integer pairs per family: a cache miss is a few ANDs.
        self._v4: tuple[tuple[int, int], ...] = ()
        self._v6: tuple[tuple[int, int], ...] = ()
        if self._networks is not None:
            v4 = ipaddress.collapse_addresses(n for n in self._networks if n.version == 4)
            v6 = ipaddress.collapse_addresses(n for n in self._networks if n.version == 6)
            self._v4 = tuple((int(n.network_address), int(n.netmask)) for n in v4)
            self._v6 = tuple((int(n.network_address), int(n.netmask)) for n in v6)

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
        try:
            addr = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address):
            mapped = addr.ipv4_mapped
            if mapped is None:
                value = int(addr)
                return any(value & mask == net for net, mask in self._v6)
            addr = mapped
        value = int(addr)
        if any(value & mask == net for net, mask in self._v4):
            return True
        value |= _MAPPED_PREFIX
        return any(value & mask == net for net, mask in self._v6)

    def cache_clear(self) -> None:
        """Forget memoised answers (not needed for correctness: the list is immutable)."""
        self._cache.clear()
