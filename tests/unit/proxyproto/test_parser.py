"""The incremental parser and the buffer types parse_header accepts."""

from __future__ import annotations

import pytest

from pymmproxy.errors import ProtocolError
from pymmproxy.proxyproto import (
    NEED_DATA,
    BadSignatureError,
    Command,
    Family,
    Header,
    HeaderParser,
    NeedData,
    Transport,
    parse_header,
)

from .helpers import SIG, v2

LINE = b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 2000\r\n"
HEADER = Header(1, Command.PROXY, Family.INET, Transport.STREAM, "1.2.3.4", 1000, "5.6.7.8", 2000)


def test_need_data_sentinel() -> None:
    assert NEED_DATA is NeedData.NEED_DATA
    parser = HeaderParser()
    assert parser.next_event() is NEED_DATA
    parser.feed(b"")
    assert parser.next_event() is NEED_DATA
    assert parser.header is None
    assert parser.trailing == b""


def test_header_then_trailing() -> None:
    parser = HeaderParser()
    parser.feed(LINE[:10])
    assert parser.next_event() is NEED_DATA
    parser.feed(LINE[10:] + b"EHLO")
    assert parser.next_event() == HEADER
    assert parser.header == HEADER
    assert parser.trailing == b"EHLO"
    parser.feed(bytearray(b" x"))
    parser.feed(memoryview(b"\r\n"))
    assert parser.next_event() == HEADER  # idempotent once complete
    assert parser.trailing == b"EHLO x\r\n"


def test_error_is_sticky() -> None:
    parser = HeaderParser()
    parser.feed(b"SSH-2.0")
    with pytest.raises(BadSignatureError) as first:
        parser.next_event()
    parser.feed(LINE)
    with pytest.raises(ProtocolError) as again:
        parser.next_event()
    assert again.value is first.value
    assert parser.header is None
    assert parser.trailing == b""


def test_waits_for_announced_length() -> None:
    # Once the v2 length is known, the parser does not re-parse before the body is there.
    data = v2(0x21, 0x00, bytes([0x04, 0x03, 0xE8]) + bytes(1000))
    parser = HeaderParser()
    parser.feed(data[:16])
    assert parser.next_event() is NEED_DATA
    for i in range(16, len(data) - 1):
        parser.feed(data[i : i + 1])
    assert parser.next_event() is NEED_DATA
    parser.feed(data[-1:] + b"tail")
    header = parser.next_event()
    assert isinstance(header, Header)
    assert header.tlvs[0].value == bytes(1000)
    assert parser.trailing == b"tail"


def test_max_v2_length() -> None:
    parser = HeaderParser(max_v2_length=20)
    parser.feed(v2(0x21, 0x11, bytes(12)))
    with pytest.raises(ProtocolError) as err:
        parser.next_event()
    assert err.value.kind == "too_long"


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_header_buffer_types(kind: type) -> None:
    assert parse_header(kind(LINE + b"rest")) == (HEADER, len(LINE))
    assert parse_header(kind(LINE[:-1])) is None
    with pytest.raises(BadSignatureError):
        parse_header(kind(b"\x16\x03\x01"))  # a TLS ClientHello


def test_memoryview_of_other_format_and_huge_buffer() -> None:
    import array  # noqa: PLC0415

    words = array.array("H", [0] * 40)
    raw = SIG + b"\x20\x00\x00\x00"
    memoryview(words).cast("B")[: len(raw)] = raw
    result = parse_header(memoryview(words))
    assert result is not None
    assert result[1] == 16
    big = bytearray(LINE) + bytearray(1 << 20)
    assert parse_header(big) == (HEADER, len(LINE))


def test_empty_input() -> None:
    assert parse_header(b"") is None
    assert parse_header(bytearray()) is None
