"""CRC-32C (Castagnoli), the checksum of the ``PP2_TYPE_CRC32C`` TLV (RFC 4960, appendix B).

Pure Python and table driven: headers are small, and this avoids a compiled dependency.
"""

from __future__ import annotations

__all__ = ["crc32c"]

_POLY = 0x82F63B78  # 0x1EDC6F41 bit-reversed


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """Return the CRC-32C of ``data``; pass a previous result as ``value`` to continue it.

    Like :func:`zlib.crc32`: ``crc32c(b + c) == crc32c(c, crc32c(b))``.
    """
    table = _TABLE
    crc = value ^ 0xFFFFFFFF
    for byte in memoryview(data).cast("B"):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
