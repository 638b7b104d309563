from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymmproxy.proxyproto import crc32c

from .helpers import crc32c_bitwise


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        (b"a", 0xC1D04330),
        (b"123456789", 0xE3069283),  # the CRC catalogue's check value
        # RFC 3720, appendix B.4
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    assert crc32c_bitwise(data) == expected


def test_accepts_buffers() -> None:
    assert crc32c(bytearray(b"123456789")) == 0xE3069283
    assert crc32c(memoryview(b"123456789")) == 0xE3069283


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_matches_reference_and_continues(head: bytes, tail: bytes) -> None:
    assert crc32c(head + tail) == crc32c_bitwise(head + tail)
    assert crc32c(tail, crc32c(head)) == crc32c(head + tail)
