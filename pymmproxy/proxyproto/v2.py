"""Decoding of the binary (version 2) header.

:func:`parse_v2` returns ``(header, consumed)`` or, when the input is a valid but incomplete
prefix, the total byte count it needs before anything more can be decided. Every field is
checked as soon as its byte is present, in wire order.
"""

from __future__ import annotations

import struct
from socket import AF_INET, AF_INET6, inet_ntop

from pymmproxy.proxyproto.crc32c import crc32c
from pymmproxy.proxyproto.errors import (
    BadCommandError,
    BadFamilyError,
    BadLengthError,
    BadSignatureError,
    BadTransportError,
    BadVersionError,
    CRCMismatchError,
    HeaderTooLongError,
)
from pymmproxy.proxyproto.model import Command, Family, Header, Transport, make_header
from pymmproxy.proxyproto.tlv import TLV, parse_tlvs

__all__ = ["ADDRESS_LENGTHS", "MAX_V2_LENGTH", "SIGNATURE", "parse_v2"]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V2_LENGTH = 16 + 0xFFFF
ADDRESS_LENGTHS = (0, 12, 36, 216)  # indexed by Family
_COMMANDS = (Command.LOCAL, Command.PROXY)
_FAMILIES = tuple(Family)
_TRANSPORTS = tuple(Transport)

_INET = struct.Struct("!12sBBH4s4sHH")
_INET6 = struct.Struct("!12sBBH16s16sHH")
_ZERO_CRC = b"\x00\x00\x00\x00"
# family/transport byte of PROXY over INET or INET6 (STREAM or DGRAM) -> how to read it:
# (layout, family, socket family, length of the address block)
_FAST_INET = (_INET, Family.INET, AF_INET, ADDRESS_LENGTHS[Family.INET])
_FAST_INET6 = (_INET6, Family.INET6, AF_INET6, ADDRESS_LENGTHS[Family.INET6])
_FAST = {0x11: _FAST_INET, 0x12: _FAST_INET, 0x21: _FAST_INET6, 0x22: _FAST_INET6}


def parse_v2(data: bytes, max_length: int) -> tuple[Header, int] | int:
    """Parse a v2 header at the start of ``data`` (``data[0]`` is CR); see the module doc."""
    # Fast path: a complete PROXY over INET/INET6, one unpack and two inet_ntop.
    n = len(data)
    if n >= 28 and data[12] == 0x21 and (fast := _FAST.get(data[13])) is not None:
        layout, family, af, addr_len = fast
        if n >= 16 + addr_len:
            sig, _, _, length, src, dst, sport, dport = layout.unpack_from(data)
            total = 16 + length
            if sig == SIGNATURE and length >= addr_len and total <= n and total <= max_length:
                return make_header(
                    2,
                    Command.PROXY,
                    family,
                    _TRANSPORTS[data[13] & 0x0F],
                    inet_ntop(af, src),
                    sport,
                    inet_ntop(af, dst),
                    dport,
                    _tlvs(data, 16 + addr_len, total) if length > addr_len else (),
                ), total
    return _parse_slow(data, max_length)


def _parse_slow(data: bytes, max_length: int) -> tuple[Header, int] | int:
    """Field-by-field parse with early rejection of partial input."""
    n = len(data)
    got = data[:12]
    if got != SIGNATURE[: len(got)]:
        at = next(i for i, (a, b) in enumerate(zip(got, SIGNATURE, strict=False)) if a != b)
        raise BadSignatureError(
            f"byte {at} is 0x{got[at]:02x}, not the v2 signature's 0x{SIGNATURE[at]:02x}"
        )
    if n < 13:
        return n + 1  # each signature byte is checked as it arrives
    vc = data[12]
    if vc >> 4 != 2:
        raise BadVersionError(f"v2 version nibble is {vc >> 4}, must be 2")
    if vc & 0x0F > 1:
        raise BadCommandError(f"v2 command {vc & 0x0F} is neither LOCAL (0) nor PROXY (1)")
    if n < 14:
        return 14
    local = vc & 0x0F == 0
    ft = data[13]
    known = ft >> 4 <= 3 and ft & 0x0F <= 2
    # LOCAL (a health check): the spec has the receiver ignore the family and discard the
    # block. One that does not describe a family's address (an unknown nibble, or a block
    # too short for it) is accepted as such; one that does is still checked (TLVs, CRC).
    if not known and not local:
        if ft >> 4 > 3:
            raise BadFamilyError(f"v2 address family {ft >> 4} is not UNSPEC/INET/INET6/UNIX")
        raise BadTransportError(f"v2 transport {ft & 0x0F} is not UNSPEC/STREAM/DGRAM")
    if n < 16:
        return 16
    length = (data[14] << 8) | data[15]
    total = 16 + length
    if total > max_length:
        raise HeaderTooLongError(f"v2 header of {total} bytes exceeds the limit of {max_length}")
    addr_len = ADDRESS_LENGTHS[ft >> 4] if known else 0
    if length < addr_len and not local:
        name = _FAMILIES[ft >> 4].name
        raise BadLengthError(f"v2 length {length} is below the {addr_len} bytes of {name}")
    if n < total:
        return total
    if local and (not known or length < addr_len):
        return make_header(
            2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, None, None, None, None, ()
        ), total

    family = _FAMILIES[ft >> 4]
    command = _COMMANDS[vc & 0x0F]
    src = dst = None
    sport = dport = None
    if command == Command.PROXY and family == Family.INET:
        _, _, _, _, s, d, sport, dport = _INET.unpack_from(data)
        src, dst = inet_ntop(AF_INET, s), inet_ntop(AF_INET, d)
    elif command == Command.PROXY and family == Family.INET6:
        _, _, _, _, s, d, sport, dport = _INET6.unpack_from(data)
        src, dst = inet_ntop(AF_INET6, s), inet_ntop(AF_INET6, d)
    tlvs = _tlvs(data, 16 + addr_len, total) if total > 16 + addr_len else ()
    header = make_header(2, command, family, _TRANSPORTS[ft & 0x0F], src, sport, dst, dport, tlvs)
    return header, total


def _tlvs(data: bytes, start: int, total: int) -> tuple[TLV, ...]:
    """TLVs of ``data[start:total]``, with the CRC32C (if any) verified over the header."""
    tlvs, crc_at = parse_tlvs(data, start, total)
    if crc_at >= 0:
        expected = int.from_bytes(data[crc_at : crc_at + 4], "big")
        actual = crc32c(data[crc_at + 4 : total], crc32c(_ZERO_CRC, crc32c(data[:crc_at])))
        if actual != expected:
            raise CRCMismatchError(
                f"CRC32C TLV says 0x{expected:08x}, header sums to 0x{actual:08x}"
            )
    return tlvs
