"""Property tests: round trips, arbitrary splits, and fuzzing for exception safety."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pymmproxy.errors import ProtocolError
from pymmproxy.proxyproto import (
    NEED_DATA,
    TLV,
    Header,
    HeaderParser,
    TLVType,
    encode_v1,
    encode_v2,
    parse_header,
)

from .strategies import v1_headers, v2_headers

headers = st.one_of(v1_headers(), v2_headers())


def encode(header: Header) -> bytes:
    return encode_v1(header) if header.version == 1 else encode_v2(header)


@given(v2_headers())
def test_v2_round_trip(header: Header) -> None:
    data = encode_v2(header)
    assert parse_header(data) == (header, len(data))
    # With a checksum: the same header plus a trailing CRC32C TLV, stable on re-encoding.
    data = encode_v2(header, with_crc32c=True)
    result = parse_header(data)
    assert result is not None
    parsed, consumed = result
    assert consumed == len(data)
    assert parsed.tlvs[-1].type == TLVType.CRC32C
    assert dataclasses.replace(parsed, tlvs=parsed.tlvs[:-1]) == header
    assert encode_v2(parsed) == data


@given(v1_headers())
def test_v1_round_trip(header: Header) -> None:
    data = encode_v1(header)
    assert len(data) <= 107
    assert parse_header(data) == (header, len(data))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def run_parser(chunks: list[bytes]) -> tuple[Header | None, bytes, str | None]:
    """Feed chunks; return (header, trailing, error kind) as soon as one is decided."""
    parser = HeaderParser()
    for i, chunk in enumerate(chunks):
        parser.feed(chunk)
        try:
            event = parser.next_event()
        except ProtocolError as exc:
            return None, b"", exc.kind
        if event is not NEED_DATA:
            assert isinstance(event, Header)
            for rest in chunks[i + 1 :]:
                parser.feed(rest)
            return event, parser.trailing, None
    return None, b"", None


@given(headers, st.binary(max_size=50), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_split_same_result(header: Header, payload: bytes, cuts: list[int]) -> None:
    data = encode(header)
    stream = data + payload
    assert run_parser(chunked(stream, cuts)) == (header, payload, None)
    assert run_parser([stream[i : i + 1] for i in range(len(stream))]) == (header, payload, None)


def outcome(data: bytes) -> tuple[Header | None, int, str | None]:
    """Whole-buffer result; fails the test on anything but a ProtocolError."""
    try:
        result = parse_header(data)
    except ProtocolError as exc:
        return None, 0, exc.kind
    except Exception as exc:  # noqa: BLE001 (that is the bug being hunted)
        pytest.fail(f"{type(exc).__name__}: {exc} on {data!r}")
    if result is None:
        return None, 0, None
    return result[0], result[1], None


def check_consistent(data: bytes) -> None:
    """Whole and byte-by-byte parsing agree, down to the error kind."""
    header, consumed, kind = outcome(data)
    stepwise = run_parser([data[i : i + 1] for i in range(len(data))])
    if header is not None:
        assert stepwise == (header, data[consumed:], None)
    else:
        assert stepwise == (None, b"", kind)


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]),
        st.integers(0, 400),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, value in edits:
        at = pos % (len(buf) + 1)
        if op == "insert":
            buf[at:at] = bytes([value])
        elif at < len(buf):
            if op == "flip":
                buf[at] ^= 1 << (value % 8)
            elif op == "set":
                buf[at] = value
            else:
                del buf[at]
    return bytes(buf)


@pytest.mark.fuzz
@given(headers, st.booleans(), mutations, st.binary(max_size=8))
@example(
    Header(2, 1, 1, 1, "1.2.3.4", 1, "5.6.7.8", 2, (TLV(0x20, b"\x01\x00\x00\x00\x00"),)),  # type: ignore[arg-type]
    True,
    [("set", 29, 0xFF)],
    b"",
)
def test_mutated_headers_only_raise_protocol_errors(
    header: Header, crc: bool, edits: list[tuple[str, int, int]], payload: bytes
) -> None:
    data = encode_v1(header) if header.version == 1 else encode_v2(header, with_crc32c=crc)
    check_consistent(mutate(data, edits) + payload)


@pytest.mark.fuzz
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        st.binary(max_size=60).map(lambda b: b"PROXY TCP4 " + b),
        st.binary(max_size=100).map(lambda b: b"PROXY TCP6 " + b),
        st.binary(max_size=300).map(lambda b: bytes.fromhex("0d0a0d0a000d0a515549540a") + b),
        st.text("0123456789.: \r\nabcdefPROXYTCPUNKOW", max_size=110).map(str.encode),
    )
)
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    check_consistent(data)
