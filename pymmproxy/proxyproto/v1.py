"""Decoding of the human-readable (version 1) header line.

:func:`parse_v1` returns ``(header, consumed)`` or, when the input is a valid but incomplete
prefix, the byte count to wait for. Partial lines are checked as far as they go, so garbage
is rejected at the first byte that cannot belong to a valid line, and the error reported for
a bad line does not depend on how it was split across reads.
"""

from __future__ import annotations

from socket import AF_INET, AF_INET6, inet_ntop, inet_pton

from pymmproxy.proxyproto.errors import (
    BadAddressError,
    BadCRLFError,
    BadFamilyError,
    BadFormatError,
    BadPortError,
    BadSignatureError,
    HeaderTooLongError,
)
from pymmproxy.proxyproto.model import Command, Family, Header, Transport, make_header

__all__ = ["MAX_V1_LENGTH", "PREFIX", "parse_v1"]

MAX_V1_LENGTH = 107  # including CRLF (spec 2.1)
PREFIX = b"PROXY "  # every v1 header begins so
_WORDS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r\n")
_TCP = {b"PROXY TCP4 ": b"TCP4", b"PROXY TCP6 ": b"TCP6"}
_CHARS = {b"TCP4": b"0123456789. ", b"TCP6": b"0123456789abcdefABCDEF:. "}
_FIELDS = ("source address", "destination address", "source port", "destination port")
_UNKNOWN = Header(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, None, None, None, None)


def parse_v1(data: bytes) -> tuple[Header, int] | int:
    """Parse a v1 line at the start of ``data`` (``data[0]`` is ``P``); see the module doc."""
    lf = data.find(b"\n", 0, MAX_V1_LENGTH)
    if lf < 0:
        _check_prefix(data[:MAX_V1_LENGTH])
        if len(data) >= MAX_V1_LENGTH:
            raise HeaderTooLongError(f"no CRLF in the first {MAX_V1_LENGTH} bytes of a v1 line")
        return len(data) + 1
    word = _check_prefix(data[:lf])
    if data[lf - 1] != 0x0D:
        raise BadCRLFError(f"bare LF at offset {lf} ends the v1 line")
    if word == b"UNKNOWN":
        return _UNKNOWN, lf + 1
    if word == b"TCP4":
        family, af = Family.INET, AF_INET
    else:
        family, af = Family.INET6, AF_INET6
    fields = data[11 : lf - 1].split(b" ")
    if len(fields) != 4:
        raise BadFormatError(
            f"v1 {word!r} line has {len(fields)} fields after the protocol, need 4"
        )
    src = _address(af, fields[0], _FIELDS[0])
    dst = _address(af, fields[1], _FIELDS[1])
    sport = _port(fields[2], _FIELDS[2])
    dport = _port(fields[3], _FIELDS[3])
    header = make_header(1, Command.PROXY, family, Transport.STREAM, src, sport, dst, dport, ())
    return header, lf + 1


def _check_prefix(line: bytes) -> bytes | None:
    """Reject ``line`` (no LF; a final CR allowed) if no valid line starts with it.

    Reports the error at the lowest offset. Returns the protocol word once it is complete.
    """
    word = _TCP.get(line[:11])
    if word is None:
        return _check_word(line)  # UNKNOWN (the rest up to CRLF is ignored) or incomplete
    body = line[11:-1] if line[-1] == 0x0D else line[11:]
    bad = body.translate(None, _CHARS[word])
    at = body.index(bad[:1]) if bad else len(body)
    field = body.count(b" ", 0, at)
    if field > 3:
        raise BadFormatError(f"v1 {word.decode()} line has more than 4 fields after it")
    if bad:
        if bad[0] == 0x0D:
            raise BadCRLFError(f"lone CR at offset {11 + at} in a v1 line")
        raise (BadAddressError if field < 2 else BadPortError)(
            f"v1 {_FIELDS[field]}: byte 0x{bad[0]:02x} not allowed in a {word.decode()} line"
        )
    return word


def _check_word(line: bytes) -> bytes | None:
    """Check ``PROXY`` and the protocol word; ``UNKNOWN`` once complete, else None."""
    head = line[:6]
    if head != PREFIX[: len(head)]:
        raise BadSignatureError("not a PROXY protocol header (v1 lines start with 'PROXY ')")
    rest = line[6:15]
    for word in _WORDS:
        if word.startswith(rest[: len(word)]):
            break
    else:
        raise BadFamilyError(f"v1 protocol {rest.split(b' ')[0]!r} is not TCP4, TCP6 or UNKNOWN")
    # A complete TCP4/TCP6 word was caught by the caller's lookup: only UNKNOWN is left.
    if word[0] == 0x55 and len(rest) >= len(word) - (2 if word[-1] == 0x0A else 0):
        return b"UNKNOWN"
    return None  # protocol word still incomplete


def _address(af: int, field: bytes, what: str) -> str:
    text = field.decode("ascii")  # the prefix check allowed ASCII only
    try:
        canonical: str | None = inet_ntop(af, inet_pton(af, text))
    except OSError:
        canonical = None
    # IPv4 must be the canonical dotted quad (no leading zeros), whatever the libc accepts.
    if canonical is None or (af == AF_INET and canonical != text):
        raise BadAddressError(f"v1 {what} {text!r} is not a valid address of its family")
    return canonical


def _port(field: bytes, what: str) -> int:
    if not 0 < len(field) <= 5 or not field.isdigit() or (field[0] == 0x30 and len(field) > 1):
        raise BadPortError(f"v1 {what} {field!r} is not a decimal number without leading zero")
    port = int(field)
    if port > 0xFFFF:
        raise BadPortError(f"v1 {what} {port} is above 65535")
    return port
