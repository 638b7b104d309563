"""Decoder entry points: one-shot :func:`parse_header`, incremental :class:`HeaderParser`."""

from __future__ import annotations

from enum import Enum
from typing import Final, Literal

from pymmproxy.errors import ProtocolError
from pymmproxy.proxyproto.errors import BadSignatureError
from pymmproxy.proxyproto.model import Header
from pymmproxy.proxyproto.v1 import MAX_V1_LENGTH, parse_v1
from pymmproxy.proxyproto.v2 import MAX_V2_LENGTH, parse_v2

__all__ = ["NEED_DATA", "HeaderParser", "NeedData", "parse_header"]


class NeedData(Enum):
    """Type of the :data:`NEED_DATA` sentinel."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


def _parse(data: bytes, max_v2_length: int) -> tuple[Header, int] | int:
    """Header and bytes consumed, or the total byte count needed before trying again."""
    if not data:
        return 1
    first = data[0]
    if first == 0x0D:
        return parse_v2(data, max_v2_length)
    if first == 0x50:  # "P"
        return parse_v1(data)
    raise BadSignatureError(f"first byte 0x{first:02x} starts neither a v1 nor a v2 header")


def parse_header(
    data: bytes | bytearray | memoryview, *, max_v2_length: int = MAX_V2_LENGTH
) -> tuple[Header, int] | None:
    """Parse the PROXY header at the start of ``data``.

    Returns ``(header, bytes_consumed)`` (bytes after the header are left alone), or ``None``
    while ``data`` is a valid but incomplete prefix. Raises only :class:`ProtocolError`
    subclasses, as soon as ``data`` cannot start a valid header. ``max_v2_length`` bounds the
    whole v2 header (16 + its length field).
    """
    if type(data) is not bytes:
        # Copy no more than a header can span.
        limit = max(max_v2_length, MAX_V1_LENGTH)
        data = bytes(memoryview(data).cast("B")[:limit])
    result = _parse(data, max_v2_length)
    return None if isinstance(result, int) else result


class HeaderParser:
    """Incremental parser in the style of h11: :meth:`feed` bytes, then call :meth:`next_event`.

    ``next_event()`` returns :data:`NEED_DATA` until a header is complete, then that
    :class:`Header` on every call; :attr:`trailing` holds the bytes fed after it. A
    :class:`ProtocolError` is raised again by every later call.
    """

    __slots__ = ("_buf", "_error", "_header", "_max", "_need")

    def __init__(self, *, max_v2_length: int = MAX_V2_LENGTH) -> None:
        self._buf = bytearray()
        self._max = max_v2_length
        self._need = 1  # bytes to hold before parsing again
        self._header: Header | None = None
        self._error: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (after the header they go to :attr:`trailing`)."""
        self._buf += data

    def next_event(self) -> Header | Literal[NeedData.NEED_DATA]:
        """The header once complete, else :data:`NEED_DATA`; raises :class:`ProtocolError`."""
        if self._header is not None:
            return self._header
        if self._error is not None:
            raise self._error
        if len(self._buf) < self._need:
            return NEED_DATA
        try:
            result = _parse(bytes(self._buf), self._max)
        except ProtocolError as exc:
            self._error = exc
            raise
        if isinstance(result, int):
            self._need = result
            return NEED_DATA
        header, consumed = result
        del self._buf[:consumed]
        self._header = header
        return header

    @property
    def header(self) -> Header | None:
        """The parsed header, or ``None`` before it is complete."""
        return self._header

    @property
    def trailing(self) -> bytes:
        """Bytes fed after the header (empty before the header is complete)."""
        return bytes(self._buf) if self._header is not None else b""
