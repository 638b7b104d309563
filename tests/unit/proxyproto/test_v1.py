"""Version 1 (text line) decoding."""

from __future__ import annotations

import pytest

from pymmproxy.proxyproto import Command, Family, Header, Transport, parse_header

from .helpers import parse_all_ways, reject_all_ways


def tcp(family: Family, src: str, sport: int, dst: str, dport: int) -> Header:
    return Header(1, Command.PROXY, family, Transport.STREAM, src, sport, dst, dport)


UNKNOWN = Header(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, None, None, None, None)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # The spec's example (section 2.1).
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            tcp(Family.INET, "192.168.0.1", 56324, "192.168.0.11", 443),
        ),
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",  # 56 bytes, spec max
            tcp(Family.INET, "255.255.255.255", 65535, "255.255.255.255", 65535),
        ),
        (b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n", tcp(Family.INET, "0.0.0.0", 0, "0.0.0.0", 0)),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n",
            tcp(Family.INET6, "2001:db8::1", 1234, "2001:db8::2", 80),
        ),
        (  # not canonical on the wire: normalised to inet_ntop form
            b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::FFFF:10.0.0.1 1 2\r\n",
            tcp(Family.INET6, "2001:db8::1", 1, "::ffff:10.0.0.1", 2),
        ),
        (  # 104 bytes: the spec's longest TCP6 line
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            tcp(
                Family.INET6,
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                65535,
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                65535,
            ),
        ),
        (b"PROXY TCP6 :: ::1 9 10\r\n", tcp(Family.INET6, "::", 9, "::1", 10)),
        (b"PROXY UNKNOWN\r\n", UNKNOWN),
        (b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", UNKNOWN),
        (b"PROXY UNKNOWN garbage \xff\x00 \r anything\r\n", UNKNOWN),  # ignored up to CRLF
        (b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", UNKNOWN),  # exactly 107 bytes
    ],
)
def test_valid_lines(line: bytes, expected: Header) -> None:
    assert len(line) <= 107
    header = parse_all_ways(line)
    assert header == expected
    assert header.tlvs == ()
    assert header.version == 1


def test_unknown_is_not_relayed() -> None:
    assert parse_all_ways(b"PROXY UNKNOWN\r\n").relayable_source is None
    header = parse_all_ways(b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 25\r\n")
    assert header.relayable_source == ("10.1.2.3", 40000)
    assert isinstance(header.command, Command)
    assert isinstance(header.family, Family)
    assert isinstance(header.transport, Transport)


V4 = b"PROXY TCP4 1.2.3.4 5.6.7.8 "  # 27 bytes


@pytest.mark.parametrize(
    ("data", "kind", "at"),
    [
        # signature
        (b"GET / HTTP/1.1\r\n", "bad_signature", 1),
        (b"PROXZ TCP4", "bad_signature", 5),
        (b"proxy TCP4", "bad_signature", 1),
        (b"PROXY\r\n", "bad_signature", 6),
        (b"PROXYTCP4", "bad_signature", 6),
        (b"P\n", "bad_crlf", 2),
        # protocol word
        (b"PROXY TCP5 1.2.3.4", "bad_family", 10),
        (b"PROXY tcp4 1.2.3.4", "bad_family", 7),
        (b"PROXY  TCP4 1.2.3.4", "bad_family", 7),
        (b"PROXY UDP4 1.2.3.4", "bad_family", 8),
        (b"PROXY TCP4\r\n", "bad_family", 11),
        (b"PROXY UNKNOWNX\r\n", "bad_family", 14),
        (b"PROXY UNKNOWN\rX\r\n", "bad_family", 15),
        (b"PROXY \r\n", "bad_family", 7),
        # line endings
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad_crlf", 31),
        (b"PROXY UNKNOWN\n", "bad_crlf", 14),
        (b"PROXY UNKNOWN foo\nbar\r\n", "bad_crlf", 18),
        (b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", "bad_crlf", 20),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "bad_crlf", 32),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", None, None),  # valid prefix, see below
        # field count / separators
        (V4 + b"1 2 3\r\n", "bad_format", 31),
        (V4 + b"1 2 \r\n", "bad_format", 31),
        (V4 + b"1\r\n", "bad_format", 30),
        (b"PROXY TCP4 1.2.3.4\r\n", "bad_format", 20),
        (b"PROXY TCP4 \r\n", "bad_format", 13),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "bad_format", 30),
        # addresses
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad_address", 33),
        (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "bad_address", 33),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad_address", 30),
        (b"PROXY TCP4 1 5.6.7.8 1 2\r\n", "bad_address", 26),
        (b"PROXY TCP4 16909060 5.6.7.8 1 2\r\n", "bad_address", 33),
        (b"PROXY TCP4 0x7f.0.0.1 5.6.7.8 1 2\r\n", "bad_address", 13),
        (b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "bad_address", 34),
        (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "bad_address", 34),
        (b"PROXY TCP4 1.2.3.4 5.6.7..8 1 2\r\n", "bad_address", 33),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad_address", 12),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "bad_address", 20),
        (b"PROXY TCP4 1.2.3.\xc4\xb0 5.6.7.8 1 2\r\n", "bad_address", 18),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8\x00 1 2\r\n", "bad_address", 27),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad_address", 28),
        (b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n", "bad_address", 28),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad_address", 19),
        (b"PROXY TCP6 ::g ::1 1 2\r\n", "bad_address", 14),
        (b"PROXY TCP6 ::: ::1 1 2\r\n", "bad_address", 24),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad_address", 38),
        (b"PROXY TCP6 12345:: ::1 1 2\r\n", "bad_address", 28),
        (b"PROXY TCP6 [::1] ::1 1 2\r\n", "bad_address", 12),
        # ports
        (V4 + b"65536 2\r\n", "bad_port", 36),
        (V4 + b"1 65536\r\n", "bad_port", 36),
        (V4 + b"01 2\r\n", "bad_port", 33),
        (V4 + b"1 00\r\n", "bad_port", 33),
        (V4 + b"123456 2\r\n", "bad_port", 37),
        (V4 + b"+1 2\r\n", "bad_port", 28),
        (V4 + b"-1 2\r\n", "bad_port", 28),
        (V4 + b"1a 2\r\n", "bad_port", 29),
        (V4 + b"1.0 2\r\n", "bad_port", 34),
        (V4 + b" 2\r\n", "bad_port", 31),
        (b"PROXY TCP6 ::1 ::2 1a 2\r\n", "bad_port", 25),
        (b"PROXY TCP6 ::1 ::2 1 :\r\n", "bad_port", 24),
        (b"PROXY TCP6 ::1 ::2 1 \xd9\xa1\r\n", "bad_port", 22),  # Arabic-Indic digit one
        # length
        (b"PROXY UNKNOWN " + b"x" * 93, "too_long", 107),
        (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "too_long", 107),
        (b"PROXY TCP6 " + b":" * 96, "too_long", 107),
    ],
)
def test_invalid_lines(data: bytes, kind: str | None, at: int | None) -> None:
    if kind is None:
        assert parse_header(data) is None
        return
    reject_all_ways(data, kind, at=at)


def test_early_rejection_needs_no_crlf() -> None:
    # Each of these is rejected before any line end arrives.
    reject_all_ways(b"X", "bad_signature", at=1)
    reject_all_ways(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", "bad_format", at=31)
    reject_all_ways(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "bad_crlf", at=32)


def test_valid_prefixes_wait() -> None:
    line = b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n"
    for end in range(len(line)):
        assert parse_header(line[:end]) is None
    assert parse_header(b"PROXY UNKNOWN " + b"x" * 92) is None  # 106 bytes, still fine
