"""Encoding of headers to v1 and v2, checked against hand-built bytes."""

from __future__ import annotations

import pytest

from pymmproxy.proxyproto import (
    TLV,
    Command,
    Family,
    Header,
    Transport,
    UnencodableHeaderError,
    encode_v1,
    encode_v2,
    parse_header,
)

from .helpers import crc32c_bitwise, tlv, v2, v2_with_crc

P, L = Command.PROXY, Command.LOCAL
INET, INET6, UNIX, UNSPEC = Family.INET, Family.INET6, Family.UNIX, Family.UNSPEC
STREAM, DGRAM = Transport.STREAM, Transport.DGRAM
INET_BLOCK = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + (56324).to_bytes(2, "big") + b"\x01\xbb"


def h(
    command: int,
    family: int,
    transport: int,
    src: str | None,
    sport: int | None,
    dst: str | None,
    dport: int | None,
    tlvs: tuple[TLV, ...] = (),
) -> Header:
    """A v2 Header; plain ints allowed so invalid enum values can be tried."""
    return Header(2, command, family, transport, src, sport, dst, dport, tlvs)  # type: ignore[arg-type]


def test_v1_tcp4() -> None:
    header = h(P, INET, STREAM, "192.168.0.1", 56324, "192.168.0.11", 443)
    assert encode_v1(header) == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_tcp6_canonical() -> None:
    header = h(P, INET6, STREAM, "2001:DB8:0::1", 1, "::FFFF:10.0.0.1", 65535)
    assert encode_v1(header) == b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 1 65535\r\n"


@pytest.mark.parametrize(
    "header",
    [
        h(L, INET, STREAM, None, None, None, None),
        h(P, UNSPEC, Transport.UNSPEC, None, None, None, None),
        h(P, UNIX, STREAM, None, None, None, None),
        h(P, INET, DGRAM, "1.2.3.4", 1, "5.6.7.8", 2),
        h(P, INET6, Transport.UNSPEC, "::1", 1, "::2", 2),
    ],
)
def test_v1_unknown(header: Header) -> None:
    assert encode_v1(header) == b"PROXY UNKNOWN\r\n"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (h(P, INET, STREAM, "1.2.3.4", 1, "5.6.7.8", 2, tlvs=(TLV(1, b"h2"),)), "TLVs"),
        (h(P, INET, STREAM, None, 1, "5.6.7.8", 2), "needs addresses"),
        (h(P, INET, STREAM, "1.2.3.4", None, "5.6.7.8", 2), "needs addresses"),
        (h(P, INET, STREAM, "::1", 1, "5.6.7.8", 2), "not addresses"),
        (h(P, INET, STREAM, "1.2.3.4\x00", 1, "5.6.7.8", 2), "not addresses"),
        (h(P, INET6, STREAM, "1.2.3.4", 1, "::1", 2), "not addresses"),
        (h(P, INET, STREAM, "1.2.3.4", 65536, "5.6.7.8", 2), "ports"),
        (h(P, INET, STREAM, "1.2.3.4", 1, "5.6.7.8", -1), "ports"),
    ],
)
def test_v1_unencodable(header: Header, message: str) -> None:
    with pytest.raises(UnencodableHeaderError, match=message) as err:
        encode_v1(header)
    assert err.value.kind == "unencodable"


def test_v2_inet_matches_hand_built() -> None:
    header = h(P, INET, STREAM, "192.168.0.1", 56324, "192.168.0.11", 443)
    assert encode_v2(header) == v2(0x21, 0x11, INET_BLOCK)
    udp = h(P, INET, DGRAM, "192.168.0.1", 56324, "192.168.0.11", 443)
    assert encode_v2(udp) == v2(0x21, 0x12, INET_BLOCK)


def test_v2_inet6_matches_hand_built() -> None:
    header = h(P, INET6, STREAM, "2001:db8::1", 80, "::ffff:1.2.3.4", 8080)
    block = (
        bytes.fromhex("20010db8000000000000000000000001")
        + bytes.fromhex("00000000000000000000ffff01020304")
        + bytes.fromhex("0050 1f90")
    )
    assert encode_v2(header) == v2(0x21, 0x21, block)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (h(L, UNSPEC, Transport.UNSPEC, None, None, None, None), v2(0x20, 0x00, b"")),
        (h(L, INET, STREAM, "1.2.3.4", 1, "5.6.7.8", 2), v2(0x20, 0x11, bytes(12))),
        (h(L, INET6, DGRAM, None, None, None, None), v2(0x20, 0x22, bytes(36))),
        (h(P, UNIX, STREAM, None, None, None, None), v2(0x21, 0x31, bytes(216))),
        (h(P, UNSPEC, Transport.UNSPEC, None, None, None, None), v2(0x21, 0x00, b"")),
    ],
)
def test_v2_without_addresses(header: Header, expected: bytes) -> None:
    assert encode_v2(header) == expected


def test_v2_tlvs_in_order() -> None:
    tlvs = (TLV(0x02, b"example.com"), TLV(0x04, b""), TLV(0xEE, bytes(300)))
    header = h(P, INET, STREAM, "192.168.0.1", 56324, "192.168.0.11", 443, tlvs=tlvs)
    body = INET_BLOCK + tlv(0x02, b"example.com") + tlv(0x04, b"") + tlv(0xEE, bytes(300))
    assert encode_v2(header) == v2(0x21, 0x11, body)


def test_v2_with_crc32c() -> None:
    header = h(P, INET, STREAM, "192.168.0.1", 56324, "192.168.0.11", 443)
    encoded = encode_v2(header, with_crc32c=True)
    assert encoded == v2_with_crc(0x21, 0x11, INET_BLOCK)
    parsed = parse_header(encoded)
    assert parsed is not None
    assert parsed[0].crc32c == crc32c_bitwise(encoded[:-4] + bytes(4))


def test_v2_existing_crc_recomputed_in_place() -> None:
    alpn = TLV(0x01, b"h2")
    stale = h(
        P, INET, STREAM, "192.168.0.1", 56324, "192.168.0.11", 443,
        tlvs=(alpn, TLV(0x03, b"\xde\xad\xbe\xef"), TLV(0x04, b"x")),
    )  # fmt: skip
    expected = v2_with_crc(0x21, 0x11, INET_BLOCK, tlv(0x01, b"h2"), tlv(0x04, b"x"))
    assert encode_v2(stale) == expected
    assert encode_v2(stale, with_crc32c=True) == expected  # not added twice


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (h(P, INET, STREAM, None, None, None, None), "needs addresses"),
        (h(P, INET6, STREAM, "1.2.3.4", 1, "::1", 2), "not addresses"),
        (h(P, INET, STREAM, "1.2.3.4", 1, "5.6.7.8", 70000), "ports"),
        (h(4, INET, STREAM, None, None, None, None), "command"),
        (h(P, 9, STREAM, None, None, None, None), "family"),
        (h(P, UNSPEC, 7, None, None, None, None), "transport"),
        (h(P, UNSPEC, STREAM, None, None, None, None, tlvs=(TLV(256, b""),)), "out of range"),
        (h(P, UNSPEC, STREAM, None, None, None, None, tlvs=(TLV(-1, b""),)), "out of range"),
        (h(P, UNSPEC, STREAM, None, None, None, None, tlvs=(TLV(1, bytes(65536)),)), "range"),
        (h(P, UNSPEC, STREAM, None, None, None, None, tlvs=(TLV(3, b"abc"),)), "CRC32C"),
        (
            h(P, UNSPEC, STREAM, None, None, None, None, tlvs=(TLV(3, bytes(4)),) * 2),
            "CRC32C",
        ),
        (
            h(P, UNSPEC, STREAM, None, None, None, None, tlvs=(TLV(4, bytes(65000)),) * 2),
            "exceeds 65535",
        ),
    ],
)
def test_v2_unencodable(header: Header, message: str) -> None:
    with pytest.raises(UnencodableHeaderError, match=message):
        encode_v2(header)


def test_v2_largest() -> None:
    header = h(P, UNSPEC, STREAM, None, None, None, None, tlvs=(TLV(4, bytes(65532)),))
    assert len(encode_v2(header)) == 16 + 65535
