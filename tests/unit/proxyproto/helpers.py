"""Independent builders and checkers for the PROXY protocol tests.

Nothing here uses the encoder under test: v2 headers are assembled by hand and the CRC32C
reference is a bit-at-a-time implementation.
"""

from __future__ import annotations

import pytest

from pymmproxy.errors import ProtocolError
from pymmproxy.proxyproto import NEED_DATA, Header, HeaderParser, parse_header

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")
PAYLOAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\r\n"


def crc32c_bitwise(data: bytes) -> int:
    """Reference CRC-32C: reflected polynomial 0x82F63B78, one bit at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def tlv(type_: int, value: bytes) -> bytes:
    return bytes([type_]) + len(value).to_bytes(2, "big") + value


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header: signature, the two nibble bytes, length (default: of body), body."""
    size = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + body


def v2_with_crc(
    ver_cmd: int, fam: int, addr: bytes, before: bytes = b"", after: bytes = b""
) -> bytes:
    """A v2 header whose CRC32C TLV (between ``before`` and ``after``) is correct."""
    zeroed = v2(ver_cmd, fam, addr + before + tlv(0x03, bytes(4)) + after)
    crc = crc32c_bitwise(zeroed).to_bytes(4, "big")
    return v2(ver_cmd, fam, addr + before + tlv(0x03, crc) + after)


def parse_all_ways(data: bytes, payload: bytes = PAYLOAD) -> Header:
    """Parse ``data`` whole, byte by byte and with a payload; all must agree. Returns the header."""
    result = parse_header(data)
    assert result is not None
    header, consumed = result
    assert consumed == len(data)
    assert parse_header(data + payload) == (header, len(data))
    assert parse_header(bytearray(data + payload)) == (header, len(data))
    assert parse_header(memoryview(data + payload)) == (header, len(data))

    parser = HeaderParser()
    for i in range(len(data)):
        assert parse_header(data[:i]) is None, f"prefix of {i} bytes"
        assert parser.next_event() is NEED_DATA
        parser.feed(data[i : i + 1])
    assert parser.next_event() == header
    assert parser.trailing == b""
    parser.feed(payload)
    assert parser.next_event() == header
    assert parser.trailing == payload

    whole = HeaderParser()
    whole.feed(data + payload)
    assert whole.next_event() == header
    assert whole.trailing == payload
    return header


def reject_all_ways(data: bytes, kind: str, *, at: int | None = None) -> ProtocolError:
    """``data`` must be rejected with ``kind`` whole and byte by byte.

    Byte by byte, the error must come once exactly ``at`` bytes were fed (default: all).
    """
    with pytest.raises(ProtocolError) as whole:
        parse_header(data)
    assert whole.value.kind == kind, whole.value
    with pytest.raises(ProtocolError) as padded:
        parse_header(data + PAYLOAD)
    assert padded.value.kind == kind

    parser = HeaderParser()
    fed = 0
    with pytest.raises(ProtocolError) as stepwise:  # noqa: PT012 (the loop is the act)
        for fed in range(1, len(data) + 1):
            parser.feed(data[fed - 1 : fed])
            parser.next_event()
    assert stepwise.value.kind == kind, stepwise.value
    assert fed == (len(data) if at is None else at)
    with pytest.raises(ProtocolError):  # sticky
        parser.next_event()
    return whole.value
