"""Encoding of :class:`Header` values to v1 lines and v2 binary headers."""

from __future__ import annotations

import struct
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton

from pymmproxy.proxyproto.crc32c import crc32c
from pymmproxy.proxyproto.errors import UnencodableHeaderError
from pymmproxy.proxyproto.model import Command, Family, Header, Transport
from pymmproxy.proxyproto.tlv import TLV, TLVType
from pymmproxy.proxyproto.v2 import ADDRESS_LENGTHS, SIGNATURE

__all__ = ["encode_v1", "encode_v2"]

_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
_PORTS = struct.Struct("!HH")
_TLV_HEAD = struct.Struct("!BH")


def _endpoints(header: Header, af: int) -> tuple[bytes, bytes, int, int]:
    """Packed source/destination addresses and the ports of an INET/INET6 header."""
    src, dst, sport, dport = header.src_addr, header.dst_addr, header.src_port, header.dst_port
    if src is None or dst is None or sport is None or dport is None:
        raise UnencodableHeaderError(
            "a PROXY header of family INET/INET6 needs addresses and ports"
        )
    try:
        packed = (inet_pton(af, src), inet_pton(af, dst))
    except (OSError, ValueError):
        raise UnencodableHeaderError(f"{src!r} / {dst!r} are not addresses of the family") from None
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise UnencodableHeaderError(f"ports {sport}/{dport} are not in 0..65535")
    return packed[0], packed[1], sport, dport


def encode_v1(header: Header) -> bytes:
    """The v1 line for ``header``.

    PROXY over INET/INET6 with STREAM transport gives ``TCP4``/``TCP6``; anything else
    (LOCAL, UNSPEC, UNIX, DGRAM) can only be ``PROXY UNKNOWN``, as the spec prescribes. v1 has
    no TLVs, so a header carrying some is refused rather than silently truncated.
    """
    if header.tlvs:
        raise UnencodableHeaderError("v1 cannot carry TLVs; drop them first")
    family = header.family
    if (
        header.command != Command.PROXY
        or header.transport != Transport.STREAM
        or family not in (Family.INET, Family.INET6)
    ):
        return _V1_UNKNOWN
    af, word = (AF_INET, "TCP4") if family == Family.INET else (AF_INET6, "TCP6")
    src, dst, sport, dport = _endpoints(header, af)
    line = f"PROXY {word} {inet_ntop(af, src)} {inet_ntop(af, dst)} {sport} {dport}\r\n"
    return line.encode("ascii")


def encode_v2(header: Header, *, with_crc32c: bool = False) -> bytes:
    """The v2 header for ``header``.

    Addresses are written for PROXY over INET/INET6; LOCAL and UNIX headers get a zeroed
    address block of their family's size (this package does not keep UNIX paths). A CRC32C
    TLV already in ``header.tlvs`` is recomputed in place; ``with_crc32c`` appends one when
    there is none.
    """
    try:
        command = Command(header.command)
        family = Family(header.family)
        transport = Transport(header.transport)
    except ValueError as exc:
        raise UnencodableHeaderError(f"not a v2 command/family/transport: {exc}") from None
    if command == Command.PROXY and family == Family.INET:
        src, dst, sport, dport = _endpoints(header, AF_INET)
        block = src + dst + _PORTS.pack(sport, dport)
    elif command == Command.PROXY and family == Family.INET6:
        src, dst, sport, dport = _endpoints(header, AF_INET6)
        block = src + dst + _PORTS.pack(sport, dport)
    else:
        block = bytes(ADDRESS_LENGTHS[family])

    tlvs = list(header.tlvs)
    if with_crc32c and not any(t.type == TLVType.CRC32C for t in tlvs):
        tlvs.append(TLV(TLVType.CRC32C, bytes(4)))
    parts = [block]
    size = 16 + len(block)
    crc_at = -1
    for tlv in tlvs:
        value = tlv.value
        if not 0 <= tlv.type <= 0xFF or len(value) > 0xFFFF:
            raise UnencodableHeaderError(f"TLV type {tlv.type} / length {len(value)} out of range")
        if tlv.type == TLVType.CRC32C:
            if crc_at >= 0 or len(value) != 4:
                raise UnencodableHeaderError("at most one CRC32C TLV, of 4 bytes")
            crc_at = size + 3
            value = bytes(4)
        parts.append(_TLV_HEAD.pack(tlv.type, len(value)))
        parts.append(value)
        size += 3 + len(value)
    body = b"".join(parts)
    if len(body) > 0xFFFF:
        raise UnencodableHeaderError(f"v2 header body of {len(body)} bytes exceeds 65535")
    head = (
        SIGNATURE
        + bytes(((0x20 | command), (family << 4) | transport))
        + len(body).to_bytes(2, "big")
    )
    out = head + body
    if crc_at < 0:
        return out
    return out[:crc_at] + crc32c(out).to_bytes(4, "big") + out[crc_at + 4 :]
