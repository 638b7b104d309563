"""Errors raised by the PROXY protocol parser and encoder.

Each class pins a stable ``kind`` (see :class:`pymmproxy.errors.ProtocolError`), so callers can
count and log failures without parsing messages.
"""

from __future__ import annotations

from pymmproxy.errors import ProtocolError

__all__ = [
    "BadAddressError",
    "BadCRLFError",
    "BadCommandError",
    "BadFamilyError",
    "BadFormatError",
    "BadLengthError",
    "BadPortError",
    "BadSignatureError",
    "BadTLVError",
    "BadTransportError",
    "BadVersionError",
    "CRCMismatchError",
    "HeaderTooLongError",
    "UnencodableHeaderError",
    "UnixUnsupportedError",
]


class BadSignatureError(ProtocolError):
    """The input starts with neither ``PROXY `` nor the v2 signature."""

    kind = "bad_signature"


class BadVersionError(ProtocolError):
    """The v2 version nibble is not 2."""

    kind = "bad_version"


class BadCommandError(ProtocolError):
    """The v2 command nibble is neither LOCAL nor PROXY."""

    kind = "bad_command"


class BadFamilyError(ProtocolError):
    """Unknown v2 address family, or a v1 protocol word other than TCP4/TCP6/UNKNOWN."""

    kind = "bad_family"


class BadTransportError(ProtocolError):
    """Unknown v2 transport protocol nibble."""

    kind = "bad_transport"


class BadLengthError(ProtocolError):
    """The v2 length field is shorter than the address block of the announced family."""

    kind = "bad_length"


class HeaderTooLongError(ProtocolError):
    """A v1 line without CRLF in 107 bytes, or a v2 header above the configured bound."""

    kind = "too_long"


class BadCRLFError(ProtocolError):
    """A v1 line with a lone CR or LF."""

    kind = "bad_crlf"


class BadFormatError(ProtocolError):
    """A v1 line with the wrong number of fields or separators."""

    kind = "bad_format"


class BadAddressError(ProtocolError):
    """A v1 address that is not the canonical text form of the announced family."""

    kind = "bad_address"


class BadPortError(ProtocolError):
    """A v1 port that is not a plain decimal number in 0..65535."""

    kind = "bad_port"


class CRCMismatchError(ProtocolError):
    """The CRC32C TLV does not match the checksum of the header."""

    kind = "crc_mismatch"


class BadTLVError(ProtocolError):
    """A malformed, overrunning, duplicated or invalid TLV."""

    kind = "bad_tlv"


class UnixUnsupportedError(ProtocolError):
    """A PROXY header for AF_UNIX: such a source cannot be spoofed."""

    kind = "unix_unsupported"


class UnencodableHeaderError(ProtocolError):
    """A :class:`Header` that cannot be written in the requested version."""

    kind = "unencodable"
