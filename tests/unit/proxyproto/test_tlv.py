"""v2 TLVs: registered types, the SSL TLV, CRC32C verification, malformed TLVs."""

from __future__ import annotations

import pytest

from pymmproxy.proxyproto import TLV, Header, SSLInfo, TLVType, parse_header

from .helpers import crc32c_bitwise, parse_all_ways, reject_all_ways, tlv, v2, v2_with_crc

INET_BLOCK = bytes([10, 0, 0, 1, 10, 0, 0, 2, 0x30, 0x39, 0x00, 0x19])  # 12345 -> 25


def proxy_inet(tlvs: bytes) -> bytes:
    return v2(0x21, 0x11, INET_BLOCK + tlvs)


def ssl_value(client: int, verify: int, subs: bytes) -> bytes:
    return bytes([client]) + verify.to_bytes(4, "big") + subs


def test_registered_types() -> None:
    header = parse_all_ways(
        proxy_inet(
            tlv(0x01, b"h2")
            + tlv(0x02, "bücher.example".encode())
            + tlv(0x04, b"")
            + tlv(0x05, bytes(range(128)))
            + tlv(0x30, b"blue")
            + tlv(0xE0, b"custom \xff")
            + tlv(0xF8, b"")
            + tlv(0x01, b"http/1.1")  # a second ALPN: properties report the first
        )
    )
    assert header.alpn == b"h2"
    assert header.authority == "bücher.example"
    assert header.unique_id == bytes(range(128))
    assert header.netns == "blue"
    assert header.ssl is None
    assert header.crc32c is None
    assert header.tlvs == (
        TLV(0x01, b"h2"),
        TLV(0x02, "bücher.example".encode()),
        TLV(0x04, b""),
        TLV(0x05, bytes(range(128))),
        TLV(0x30, b"blue"),
        TLV(0xE0, b"custom \xff"),
        TLV(0xF8, b""),
        TLV(0x01, b"http/1.1"),
    )
    assert header.relayable_source == ("10.0.0.1", 12345)


def test_no_tlvs() -> None:
    header = parse_all_ways(proxy_inet(b""))
    assert (header.alpn, header.authority, header.unique_id, header.netns) == (None,) * 4
    assert (header.ssl, header.crc32c) == (None, None)


def test_ssl() -> None:
    subs = (
        tlv(0x21, b"TLSv1.3")
        + tlv(0x22, "Zoë".encode())
        + tlv(0x23, b"TLS_AES_128_GCM_SHA256")
        + tlv(0x24, b"RSA-SHA256")
        + tlv(0x25, b"RSA2048")
        + tlv(0x99, b"\xff\xfe")  # unknown sub-type: kept, not validated
    )
    header = parse_all_ways(proxy_inet(tlv(0x20, ssl_value(0x07, 0, subs))))
    ssl = header.ssl
    assert ssl is not None
    assert (ssl.client, ssl.verify) == (0x07, 0)
    assert ssl.version == "TLSv1.3"
    assert ssl.cn == "Zoë"
    assert ssl.cipher == "TLS_AES_128_GCM_SHA256"
    assert ssl.sig_alg == "RSA-SHA256"
    assert ssl.key_alg == "RSA2048"
    assert ssl.verified
    assert ssl.tlvs[-1] == TLV(0x99, b"\xff\xfe")


def test_ssl_minimal() -> None:
    header = parse_all_ways(proxy_inet(tlv(0x20, ssl_value(0x01, 0xDEADBEEF, b""))))
    assert header.ssl == SSLInfo(0x01, 0xDEADBEEF, ())
    ssl = header.ssl
    assert (ssl.version, ssl.cn, ssl.cipher, ssl.sig_alg, ssl.key_alg) == (None,) * 5
    assert not ssl.verified  # no client certificate flag
    assert not SSLInfo(0x03, 1, ()).verified  # certificate, verification failed
    assert SSLInfo(0x05, 0, ()).verified


@pytest.mark.parametrize(
    "tlvs",
    [
        tlv(0x01, b"h2")[:-1],  # value overruns the header by one
        b"\x04\x00",  # two stray bytes
        b"\x04",  # one stray byte
        tlv(0x04, b"") + b"\x01\xff\xff",  # length far past the end
        tlv(0x03, b"\x00\x00\x00"),  # CRC32C of 3 bytes
        tlv(0x03, b"\x00" * 5),  # CRC32C of 5 bytes
        tlv(0x05, bytes(129)),  # UNIQUE_ID above 128 bytes
        tlv(0x02, b"\xff\xfe"),  # AUTHORITY not UTF-8
        tlv(0x30, "blå".encode()),  # NETNS not US-ASCII
        tlv(0x20, b"\x01\x00\x00\x00"),  # SSL shorter than client + verify
        tlv(0x20, b""),
        tlv(0x20, ssl_value(1, 0, tlv(0x21, b"TLSv1.3")[:-1])),  # sub-TLV overrun
        tlv(0x20, ssl_value(1, 0, b"\x21\x00")),  # stray sub-TLV bytes
        tlv(0x20, ssl_value(1, 0, tlv(0x21, "TLSv1.3é".encode()))),  # VERSION not ASCII
        tlv(0x20, ssl_value(1, 0, tlv(0x22, b"\xc3"))),  # CN not UTF-8
        tlv(0x20, ssl_value(1, 0, tlv(0x23, b"\x80"))),
        tlv(0x20, ssl_value(1, 0, tlv(0x24, b"\x80"))),
        tlv(0x20, ssl_value(1, 0, tlv(0x25, b"\x80"))),
    ],
)
def test_bad_tlv(tlvs: bytes) -> None:
    reject_all_ways(proxy_inet(tlvs), "bad_tlv")


def test_top_level_types_are_not_ssl_subtypes() -> None:
    # 0x21..0x25 only mean something inside the SSL TLV; NETNS only at top level.
    header = parse_all_ways(
        proxy_inet(tlv(0x22, b"\xff") + tlv(0x20, ssl_value(0, 0, tlv(0x30, b"\xff"))))
    )
    assert header.tlvs[0] == TLV(0x22, b"\xff")


def test_crc32c_valid() -> None:
    data = v2_with_crc(0x21, 0x11, INET_BLOCK)
    header = parse_all_ways(data)
    assert header.crc32c == crc32c_bitwise(data[:-4] + bytes(4))
    assert header.tlvs == (TLV(TLVType.CRC32C, data[-4:]),)
    # CRC TLV between others; the checksum covers them all.
    data = v2_with_crc(0x21, 0x21, bytes(36), tlv(0x01, b"h2"), tlv(0x02, b"a.example"))
    header = parse_all_ways(data)
    assert header.alpn == b"h2"
    assert header.authority == "a.example"
    # LOCAL and UNSPEC headers are checked too.
    parse_all_ways(v2_with_crc(0x20, 0x00, b""))


def test_crc32c_every_flipped_bit_rejected() -> None:
    data = v2_with_crc(0x21, 0x11, INET_BLOCK, tlv(0xE1, b"opaque"))
    # Flip each bit of the address block, of the CRC value and of the opaque TLV value.
    checked = list(range(16, 28)) + list(range(len(data) - 4, len(data))) + list(range(31, 37))
    for pos in checked:
        for bit in range(8):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            reject_all_ways(bytes(bad), "crc_mismatch")


def test_crc32c_duplicate() -> None:
    once = v2_with_crc(0x21, 0x11, INET_BLOCK)
    twice = v2(0x21, 0x11, once[16:] + once[28:])
    reject_all_ways(twice, "bad_tlv")


def test_parsed_header_compares_and_hashes() -> None:
    data = proxy_inet(tlv(0x01, b"h2"))
    first = parse_header(data)
    second = parse_header(bytes(data))
    assert first == second
    assert first is not None
    assert second is not None
    assert hash(first[0]) == hash(second[0])
    assert first[0] == Header(*[getattr(first[0], f) for f in Header.__dataclass_fields__])


def test_at_most_256_tlvs_per_level() -> None:
    """A header of thousands of tiny TLVs only burns CPU (~1.6 µs each): 256 per level pass,
    one more is refused, at the top level and inside SSL."""
    noop = tlv(0x04, b"")
    assert len(parse_all_ways(proxy_inet(noop * 256)).tlvs) == 256
    reject_all_ways(proxy_inet(noop * 257), "bad_tlv")
    many_subs = ssl_value(1, 0, tlv(0x21, b"TLSv1.3") * 256)
    assert parse_all_ways(proxy_inet(tlv(0x20, many_subs))).ssl is not None
    reject_all_ways(proxy_inet(tlv(0x20, ssl_value(1, 0, tlv(0x21, b"x") * 257))), "bad_tlv")
