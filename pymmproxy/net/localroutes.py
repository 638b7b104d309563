"""The host's local and broadcast routes, read with one netlink dump per address family.

pyroute2 does this too, but costs the daemon ~11 MB and ~90 ms at start; the daemon needs
only three fields of one message type, so this reads ``RTM_GETROUTE`` itself. The dump
covers every routing table (``rtm_table``, or ``RTA_TABLE`` above 255), so callers can tell
the host's local table (255) from a pathway's table, whose ``local 0.0.0.0/0`` holds only
for marked packets, and from a VRF's, whose local routes are its addresses.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import NamedTuple

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type
_RTA = struct.Struct("=HH")  # length, type
_U32 = struct.Struct("=I")
RTM_GETROUTE, NLMSG_ERROR, NLMSG_DONE = 26, 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTN_LOCAL, RTN_BROADCAST = 2, 3
RTA_DST, RTA_TABLE = 1, 15
RT_TABLE_LOCAL = 255


class Route(NamedTuple):
    """One local or broadcast route: ``kind`` is ``RTN_LOCAL`` or ``RTN_BROADCAST``."""

    kind: int
    table: int
    dst: str  # inet_ntop text ("0.0.0.0" / "::" for a default route)
    length: int  # prefix length


def local_routes(family: socket.AddressFamily) -> list[Route]:
    """Every ``local`` and ``broadcast`` route of ``family`` in this network namespace (of
    the calling thread), from every table. OSError if netlink cannot be read."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        request = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        header = _NLMSG.pack(_NLMSG.size + len(request), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP,
                             1, 0)  # fmt: skip
        sock.send(header + request)
        routes: list[Route] = []
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return routes
            pos = 0
            while pos + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, pos)
                if kind == NLMSG_DONE:
                    return routes
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, pos + _NLMSG.size)[0]
                    if not code:  # an acknowledgement: the dump is over
                        return routes
                    raise OSError(code, f"netlink route dump: {os.strerror(code)}")
                if length < _NLMSG.size:
                    raise OSError(0, "netlink route dump: a malformed message")
                route = _route(data, pos + _NLMSG.size, pos + length, family)
                if route is not None:
                    routes.append(route)
                pos += (length + 3) & ~3


def _route(data: bytes, pos: int, end: int, family: int) -> Route | None:
    """The route in one ``RTM_NEWROUTE`` message, if it is local or broadcast."""
    fam, dst_len, _, _, table, _, _, kind, _ = _RTMSG.unpack_from(data, pos)
    if fam != family or kind not in (RTN_LOCAL, RTN_BROADCAST):
        return None
    size = 4 if family == socket.AF_INET else 16
    dst = bytes(size)
    pos += _RTMSG.size
    while pos + _RTA.size <= end:
        length, attr = _RTA.unpack_from(data, pos)
        if length < _RTA.size:
            break
        value = data[pos + _RTA.size : pos + length]
        if attr == RTA_DST and len(value) == size:
            dst = value
        elif attr == RTA_TABLE and len(value) == 4:
            table = _U32.unpack(value)[0]
        pos += (length + 3) & ~3
    return Route(kind, table, socket.inet_ntop(family, dst), dst_len)
