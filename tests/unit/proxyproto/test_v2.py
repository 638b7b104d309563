"""Version 2 (binary) decoding: fixed part, address blocks, limits."""

from __future__ import annotations

import pytest

from pymmproxy.errors import ProtocolError
from pymmproxy.proxyproto import (
    NEED_DATA,
    TLV,
    Command,
    Family,
    Header,
    HeaderParser,
    HeaderTooLongError,
    Transport,
    UnixUnsupportedError,
    parse_header,
)

from .helpers import SIG, parse_all_ways, reject_all_ways, tlv, v2

INET_BLOCK = bytes.fromhex("ac130001 ac130003 a652 0050")  # 172.19.0.1:42578 -> 172.19.0.3:80
INET6_BLOCK = (
    bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("20010db8000000000000000000000002")
    + bytes.fromhex("d431 01bb")  # 54321 -> 443
)


def test_haproxy_capture() -> None:
    # Bytes haproxy sent in front of an HTTP request (send-proxy-v2), as captured on the wire.
    wire = bytes.fromhex(
        "0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050474554202f20485454502f312e31"
    )
    header, consumed = parse_header(wire) or pytest.fail("incomplete")
    assert consumed == 28
    assert wire[consumed:] == b"GET / HTTP/1.1"
    assert header == Header(
        2, Command.PROXY, Family.INET, Transport.STREAM, "172.19.0.1", 42578, "172.19.0.3", 80
    )
    assert header.relayable_source == ("172.19.0.1", 42578)


V4_ENDPOINTS = (("172.19.0.1", 42578), ("172.19.0.3", 80))
V6_ENDPOINTS = (("2001:db8::1", 54321), ("2001:db8::2", 443))


@pytest.mark.parametrize("fam", [0x10, 0x11, 0x12, 0x20, 0x21, 0x22])
def test_proxy_inet(fam: int) -> None:
    family, transport = Family(fam >> 4), Transport(fam & 0x0F)
    if family == Family.INET:
        block, (src, dst) = INET_BLOCK, V4_ENDPOINTS
    else:
        block, (src, dst) = INET6_BLOCK, V6_ENDPOINTS
    expected = Header(2, Command.PROXY, family, transport, src[0], src[1], dst[0], dst[1])
    assert parse_all_ways(v2(0x21, fam, block)) == expected
    # The same with TLVs after the block (leaves the fast path's "no TLV" case).
    tlvs = tlv(0x01, b"h2") + tlv(0xE0, b"")
    header = parse_all_ways(v2(0x21, fam, block + tlvs))
    assert header.tlvs == (TLV(0x01, b"h2"), TLV(0xE0, b""))
    assert (header.src_addr, header.src_port, header.dst_addr, header.dst_port) == (*src, *dst)
    assert header.relayable_source == src


def test_v4_mapped_and_zero() -> None:
    block = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]) + bytes(16) + bytes(4)
    header = parse_all_ways(v2(0x21, 0x21, block))
    assert (header.src_addr, header.dst_addr, header.src_port, header.dst_port) == (
        "::ffff:10.0.0.1",
        "::",
        0,
        0,
    )


@pytest.mark.parametrize("fam", [0x00, 0x01, 0x02])
def test_proxy_unspec(fam: int) -> None:
    header = parse_all_ways(v2(0x21, fam, b""))
    assert header == Header(2, Command.PROXY, Family.UNSPEC, Transport(fam), None, None, None, None)
    assert header.relayable_source is None  # treated like LOCAL: no spoofing
    # UNSPEC has no address block: whatever follows must be TLVs.
    header = parse_all_ways(v2(0x21, fam, tlv(0x04, b"pad")))
    assert header.tlvs == (TLV(0x04, b"pad"),)
    reject_all_ways(v2(0x21, fam, b"\x01\x02"), "bad_tlv")


@pytest.mark.parametrize("fam", [0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32])
def test_local(fam: int) -> None:
    family = Family(fam >> 4)
    block = {Family.UNSPEC: b"", Family.INET: INET_BLOCK, Family.INET6: INET6_BLOCK}.get(
        family, b"/tmp/a".ljust(108, b"\0") * 2
    )
    header = parse_all_ways(v2(0x20, fam, block))
    assert header == Header(2, Command.LOCAL, family, Transport(fam & 0xF), None, None, None, None)
    assert header.relayable_source is None
    # TLVs of a LOCAL header are still parsed (and validated).
    header = parse_all_ways(v2(0x20, fam, block + tlv(0x05, b"id-1")))
    assert header.unique_id == b"id-1"
    assert header.relayable_source is None
    reject_all_ways(v2(0x20, fam, block + tlv(0x05, b"x" * 129)), "bad_tlv")


@pytest.mark.parametrize(
    ("fam", "block"),
    [(0x11, b""), (0x21, INET_BLOCK), (0x31, b"x" * 10), (0x41, b""), (0x13, INET_BLOCK),
     (0xFF, b"\x01\x02\x03")],
)  # fmt: skip
def test_local_ignores_a_family_it_does_not_carry(fam: int, block: bytes) -> None:
    """The spec: a LOCAL receiver ignores the family and discards the block. A family
    nibble out of range, or a block too short for the family, is a health check all the
    same (go-mmproxy and HAProxy accept these too)."""
    assert parse_all_ways(v2(0x20, fam, block)) == Header(
        2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, None, None, None, None
    )
    for bad in (0x21, 0x22):  # PROXY with the same bytes is still refused
        with pytest.raises(ProtocolError):
            parse_header(v2(bad, fam, block) + b"more")


def test_local_health_check() -> None:
    # What load balancers send for health checks: LOCAL, AF_UNSPEC, no address.
    wire = SIG + b"\x20\x00\x00\x00"
    assert parse_all_ways(wire) == Header(
        2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, None, None, None, None
    )


@pytest.mark.parametrize("fam", [0x31, 0x32])
def test_unix(fam: int) -> None:
    block = b"/run/src.sock".ljust(108, b"\0") + b"/run/dst.sock".ljust(108, b"\0")
    header = parse_all_ways(v2(0x21, fam, block))
    assert header == Header(
        2, Command.PROXY, Family.UNIX, Transport(fam & 0xF), None, None, None, None
    )
    with pytest.raises(UnixUnsupportedError) as err:
        _ = header.relayable_source
    assert err.value.kind == "unix_unsupported"
    assert "cannot be spoofed" in str(err.value)


def test_length_may_exceed_block_only_with_tlvs() -> None:
    # Extra bytes after the block are TLVs; a lone byte cannot be one.
    reject_all_ways(v2(0x21, 0x11, INET_BLOCK + b"\x00"), "bad_tlv")


@pytest.mark.parametrize("pos", range(12))
def test_bad_signature_byte_rejected_at_once(pos: int) -> None:
    data = SIG[:pos] + bytes([SIG[pos] ^ 0x40]) + SIG[pos + 1 :] + b"\x21\x11\x00\x0c" + INET_BLOCK
    if pos == 0:  # 0x4D is "M": not even a v1 start
        err = reject_all_ways(data, "bad_signature", at=1)
    else:
        err = reject_all_ways(data, "bad_signature", at=pos + 1)
    assert err.kind == "bad_signature"


@pytest.mark.parametrize(
    ("ver_cmd", "fam", "kind"),
    [
        (0x11, 0x11, "bad_version"),
        (0x31, 0x11, "bad_version"),
        (0x01, 0x11, "bad_version"),
        (0xF1, 0x11, "bad_version"),
        (0x22, 0x11, "bad_command"),
        (0x2F, 0x11, "bad_command"),
        (0x21, 0x41, "bad_family"),
        (0x21, 0xF1, "bad_family"),
        (0x21, 0x13, "bad_transport"),
        (0x21, 0x1F, "bad_transport"),
    ],
)
def test_bad_fixed_fields(ver_cmd: int, fam: int, kind: str) -> None:
    data = v2(ver_cmd, fam, INET_BLOCK)
    at = 13 if kind in ("bad_version", "bad_command") else 14
    reject_all_ways(data, kind, at=at)


@pytest.mark.parametrize(
    ("ver_cmd", "fam", "length"),
    [
        (0x21, 0x11, 0),
        (0x21, 0x11, 11),
        (0x21, 0x12, 11),
        (0x21, 0x21, 35),
        (0x21, 0x22, 12),
        (0x21, 0x31, 215),
    ],
)
def test_length_below_address_block(ver_cmd: int, fam: int, length: int) -> None:
    data = v2(ver_cmd, fam, bytes(length))
    reject_all_ways(data, "bad_length", at=16)


def test_max_length() -> None:
    data = v2(0x21, 0x11, INET_BLOCK + tlv(0x04, bytes(20)))  # 51 bytes
    assert parse_header(data, max_v2_length=51) == (parse_all_ways(data), 51)
    with pytest.raises(HeaderTooLongError, match="exceeds the limit of 50"):
        parse_header(data, max_v2_length=50)
    # Rejected from the length field alone, before the body arrives.
    parser = HeaderParser(max_v2_length=50)
    parser.feed(data[:15])
    assert parser.next_event() is NEED_DATA
    parser.feed(data[15:16])
    with pytest.raises(HeaderTooLongError) as too_long:
        parser.next_event()
    assert too_long.value.kind == "too_long"
    # Default bound: the whole 16-bit range.
    big = v2(0x21, 0x00, tlv(0x04, bytes(0xFFFF - 3)))
    assert parse_header(big) == (
        Header(
            2,
            Command.PROXY,
            Family.UNSPEC,
            Transport.UNSPEC,
            None,
            None,
            None,
            None,
            (TLV(0x04, bytes(0xFFFF - 3)),),
        ),
        16 + 0xFFFF,
    )


def test_fast_path_limit_applies() -> None:
    data = v2(0x21, 0x11, INET_BLOCK)
    assert parse_header(data, max_v2_length=28) is not None
    with pytest.raises(HeaderTooLongError):
        parse_header(data, max_v2_length=27)
    data6 = v2(0x21, 0x21, INET6_BLOCK)
    with pytest.raises(HeaderTooLongError):
        parse_header(data6, max_v2_length=51)


def test_incomplete_waits() -> None:
    data = v2(0x21, 0x21, INET6_BLOCK + tlv(0x02, b"example.com"))
    for end in range(len(data)):
        assert parse_header(data[:end]) is None
    assert parse_header(b"") is None
    assert parse_header(b"\r") is None
