"""Sans-I/O PROXY protocol (v1 and v2) decoding and encoding.

Follows haproxy's ``doc/proxy-protocol.txt``. Decoding raises only
:class:`pymmproxy.errors.ProtocolError` subclasses, each with a stable ``kind``.
"""

from __future__ import annotations

from pymmproxy.proxyproto.crc32c import crc32c
from pymmproxy.proxyproto.encoder import encode_v1, encode_v2
from pymmproxy.proxyproto.errors import (
    BadAddressError,
    BadCommandError,
    BadCRLFError,
    BadFamilyError,
    BadFormatError,
    BadLengthError,
    BadPortError,
    BadSignatureError,
    BadTLVError,
    BadTransportError,
    BadVersionError,
    CRCMismatchError,
    HeaderTooLongError,
    UnencodableHeaderError,
    UnixUnsupportedError,
)
from pymmproxy.proxyproto.model import Command, Family, Header, Transport
from pymmproxy.proxyproto.parser import NEED_DATA, HeaderParser, NeedData, parse_header
from pymmproxy.proxyproto.tlv import TLV, SSLInfo, TLVType
from pymmproxy.proxyproto.v1 import MAX_V1_LENGTH
from pymmproxy.proxyproto.v1 import PREFIX as V1_PREFIX
from pymmproxy.proxyproto.v2 import MAX_V2_LENGTH, SIGNATURE

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "NEED_DATA",
    "SIGNATURE",
    "TLV",
    "V1_PREFIX",
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
    "Command",
    "Family",
    "Header",
    "HeaderParser",
    "HeaderTooLongError",
    "NeedData",
    "SSLInfo",
    "TLVType",
    "Transport",
    "UnencodableHeaderError",
    "UnixUnsupportedError",
    "crc32c",
    "encode_v1",
    "encode_v2",
    "parse_header",
]
