"""Reply from the address a datagram came to: ``IP_PKTINFO`` for wildcard UDP listeners.

A UDP socket bound to ``0.0.0.0`` or ``[::]`` sends with whatever source address the
kernel prefers for the destination. On a host with several addresses that need not be the
address the load balancer sent to, and a load balancer that checks where answers come from
(a connected UDP socket, conntrack, a NAT) drops them. With ``IP_PKTINFO`` (and
``IPV6_RECVPKTINFO``) each received datagram says which local address it was sent to; the
reply carries that address back in the same option, so it leaves from it.

:func:`enable` switches the options on for a wildcard socket, and makes it transparent: the
kernel accepts as a reply's source only addresses it finds on an interface, which leaves out
addresses that are local through a route alone (AnyIP: ``ip route add local PREFIX dev lo``,
in any table for IPv6, outside the local table for IPv4), though datagrams to them arrive.
A :class:`ReplyFrom` turns a datagram's ancillary data into what ``sendmsg`` needs to answer
from the same address, caching the result per address (a host has few). No sending or
receiving happens here.
"""

from __future__ import annotations

import errno
import socket
import struct

from pymmproxy.net.sockets import IP_TRANSPARENT, IPV6_TRANSPARENT

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
SOL_IP = socket.IPPROTO_IP
SOL_IPV6 = socket.IPPROTO_IPV6
#: Room for both options (a dual-stack socket gets both for an IPv4 datagram).
ANCILLARY_SIZE = socket.CMSG_SPACE(12) + socket.CMSG_SPACE(20)
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst (our address to use), dst address
_IN6_PKTINFO = struct.Struct("=16si")  # dst address, ifindex
_NO_ADDR = bytes(4)
_CACHE_MAX = 256
#: What ``sendmsg`` says when the kernel will not send from the address we name (it is gone,
#: or the socket could not be made transparent): answer from the kernel's pick instead.
NOT_A_SOURCE = frozenset({errno.EINVAL, errno.ENETUNREACH, errno.EADDRNOTAVAIL})

Ancillary = list[tuple[int, int, bytes]]


def is_wildcard(sock: socket.socket) -> bool:
    """Whether ``sock`` is bound to the any-address of its family."""
    return sock.getsockname()[0] in ("0.0.0.0", "::")


def enable(sock: socket.socket) -> bool:
    """Ask the kernel to report each datagram's local address (``OSError`` if it cannot);
    returns whether the socket could be made transparent (it needs ``CAP_NET_ADMIN``).

    An IPv6 socket gets both options: for an IPv4 datagram on a dual-stack socket the
    IPv4 one names the address to answer from even when the datagram was a broadcast.
    Transparency only widens the sources ``sendmsg`` accepts: without a TPROXY rule the
    kernel delivers nothing to this socket that it would not deliver anyway.
    """
    v6 = sock.family == socket.AF_INET6
    sock.setsockopt(SOL_IP, IP_PKTINFO, 1)
    if v6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVPKTINFO, 1)
    try:
        if v6:  # (the same flag as IP_TRANSPARENT: it covers IPv4-mapped replies too)
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    except PermissionError:
        return False
    return True


class ReplyFrom:
    """Ancillary data of a received datagram -> the ``sendmsg`` ancillary data of its reply.

    ``None`` means "let the kernel pick" (no usable option: an IPv6 multicast destination,
    say). The interface index is dropped, so the reply is routed as any other packet,
    except for an IPv6 link-local address, which only means something on its link.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[bytes, Ancillary | None] = {}

    def __call__(self, ancdata: Ancillary) -> Ancillary | None:
        chosen = None
        for level, kind, data in ancdata:
            if kind == IP_PKTINFO and level == SOL_IP:
                chosen = data
                break  # the better of the two (see enable)
            if kind == IPV6_PKTINFO and level == SOL_IPV6:
                chosen = data
        if chosen is None:
            return None
        # (an in_pktinfo is 12 bytes, an in6_pktinfo 20: one dict serves both)
        cache = self._cache
        try:
            return cache[chosen]
        except KeyError:
            pass
        reply = _reply(chosen)
        if len(cache) >= _CACHE_MAX:  # AnyIP prefixes can make many local addresses
            cache.clear()
        cache[chosen] = reply
        return reply

    def forget(self, reply: Ancillary) -> None:
        """Drop ``reply`` from the cache (the kernel refused it as a source)."""
        for key in [k for k, v in self._cache.items() if v is reply]:
            del self._cache[key]


def _reply(data: bytes) -> Ancillary | None:
    """Build the reply's ancillary data from a received ``in_pktinfo``/``in6_pktinfo``."""
    if len(data) == _IN_PKTINFO.size:
        _, spec_dst, _ = _IN_PKTINFO.unpack(data)
        return [(SOL_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, spec_dst, _NO_ADDR))]
    if len(data) != _IN6_PKTINFO.size:
        return None
    addr, ifindex = _IN6_PKTINFO.unpack(data)
    if addr[0] == 0xFF:  # multicast: not a source address
        return None
    link_local = addr[0] == 0xFE and addr[1] & 0xC0 == 0x80
    return [(SOL_IPV6, IPV6_PKTINFO, _IN6_PKTINFO.pack(addr, ifindex if link_local else 0))]
