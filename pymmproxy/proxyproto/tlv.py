"""v2 type-length-value entries: types, the :class:`TLV` and :class:`SSLInfo` values, parsing."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from pymmproxy.proxyproto.errors import BadTLVError

__all__ = ["TLV", "SSLInfo", "TLVType", "first_value", "parse_ssl", "parse_tlvs", "text"]

UNIQUE_ID_MAX = 128  # spec 2.2.5: "up to 128 bytes"


class TLVType(IntEnum):
    """Registered v2 TLV types; ``SSL_*`` sub-types live inside the ``SSL`` TLV."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    SSL_VERSION = 0x21
    SSL_CN = 0x22
    SSL_CIPHER = 0x23
    SSL_SIG_ALG = 0x24
    SSL_KEY_ALG = 0x25
    NETNS = 0x30


@dataclass(frozen=True, slots=True)
class TLV:
    """One type-length-value entry; ``type`` may be any byte value, known or not."""

    type: int
    value: bytes


def first_value(tlvs: tuple[TLV, ...], type_: int) -> bytes | None:
    """Value of the first TLV of ``type_`` in ``tlvs``, or ``None``."""
    for tlv in tlvs:
        if tlv.type == type_:
            return tlv.value
    return None


def text(value: bytes | None) -> str | None:
    """Decode a validated TLV string (``replace`` only matters for hand-built headers)."""
    return None if value is None else value.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class SSLInfo:
    """Content of a ``PP2_TYPE_SSL`` TLV: client flags, verify result and sub-TLVs."""

    client: int
    verify: int
    tlvs: tuple[TLV, ...]

    CLIENT_SSL = 0x01
    CLIENT_CERT_CONN = 0x02
    CLIENT_CERT_SESS = 0x04

    @property
    def version(self) -> str | None:
        """TLS version string, e.g. ``TLSv1.3``."""
        return text(first_value(self.tlvs, TLVType.SSL_VERSION))

    @property
    def cn(self) -> str | None:
        """Common Name of the client certificate."""
        return text(first_value(self.tlvs, TLVType.SSL_CN))

    @property
    def cipher(self) -> str | None:
        """Cipher name, e.g. ``ECDHE-RSA-AES128-GCM-SHA256``."""
        return text(first_value(self.tlvs, TLVType.SSL_CIPHER))

    @property
    def sig_alg(self) -> str | None:
        """Signature algorithm of the frontend certificate, e.g. ``RSA-SHA256``."""
        return text(first_value(self.tlvs, TLVType.SSL_SIG_ALG))

    @property
    def key_alg(self) -> str | None:
        """Key algorithm of the frontend certificate, e.g. ``RSA2048``."""
        return text(first_value(self.tlvs, TLVType.SSL_KEY_ALG))

    @property
    def verified(self) -> bool:
        """True when the client presented a certificate and it verified."""
        cert = self.CLIENT_CERT_CONN | self.CLIENT_CERT_SESS
        return self.verify == 0 and bool(self.client & cert)


MAX_TLVS = 256  # per level (top, inside SSL); the spec sets no bound, HAProxy sends < 20

# String-valued types and the encoding the spec gives them (top level / inside SSL).
_TOP_TEXT: dict[int, str] = {TLVType.AUTHORITY: "utf-8", TLVType.NETNS: "ascii"}
_SSL_TEXT: dict[int, str] = {
    TLVType.SSL_VERSION: "ascii",
    TLVType.SSL_CN: "utf-8",
    TLVType.SSL_CIPHER: "ascii",
    TLVType.SSL_SIG_ALG: "ascii",
    TLVType.SSL_KEY_ALG: "ascii",
}


def _split(buf: bytes, pos: int, end: int, where: str) -> list[TLV]:
    """Split ``buf[pos:end]`` into TLVs; they must tile it exactly, at most ``MAX_TLVS``."""
    tlvs: list[TLV] = []
    while pos < end:
        if len(tlvs) == MAX_TLVS:  # real headers carry a handful: this is a CPU-burning flood
            raise BadTLVError(f"{where}: more than {MAX_TLVS} TLVs")
        if end - pos < 3:
            raise BadTLVError(f"{where}: {end - pos} stray byte(s) at offset {pos}, short of a TLV")
        type_ = buf[pos]
        start = pos + 3
        pos = start + ((buf[pos + 1] << 8) | buf[pos + 2])
        if pos > end:
            raise BadTLVError(
                f"{where}: TLV 0x{type_:02x} at offset {start - 3} overruns by {pos - end}"
            )
        tlvs.append(TLV(type_, buf[start:pos]))
    return tlvs


def _check_text(tlv: TLV, encoding: str, where: str) -> None:
    try:
        tlv.value.decode(encoding)
    except UnicodeDecodeError:
        raise BadTLVError(f"{where}: TLV 0x{tlv.type:02x} is not valid {encoding}") from None


def parse_ssl(value: bytes) -> SSLInfo:
    """Decode and validate the value of a ``PP2_TYPE_SSL`` TLV."""
    if len(value) < 5:
        raise BadTLVError(f"SSL TLV: {len(value)} bytes, need at least 5 (client + verify)")
    subs = _split(value, 5, len(value), "SSL TLV")
    for sub in subs:
        encoding = _SSL_TEXT.get(sub.type)
        if encoding is not None:
            _check_text(sub, encoding, "SSL TLV")
    return SSLInfo(value[0], int.from_bytes(value[1:5], "big"), tuple(subs))


def parse_tlvs(buf: bytes, pos: int, end: int) -> tuple[tuple[TLV, ...], int]:
    """Parse and validate the TLVs of ``buf[pos:end]``.

    Returns the TLVs and the offset in ``buf`` of the CRC32C value (``-1`` if absent); the
    caller verifies the checksum.
    """
    tlvs = _split(buf, pos, end, "header")
    crc_at = -1
    for tlv in tlvs:
        type_ = tlv.type
        if type_ == TLVType.CRC32C:
            if crc_at >= 0:
                raise BadTLVError("duplicate CRC32C TLV")
            if len(tlv.value) != 4:
                raise BadTLVError(f"CRC32C TLV of {len(tlv.value)} bytes, need 4")
            crc_at = pos + 3
        elif type_ == TLVType.SSL:
            parse_ssl(tlv.value)
        elif type_ == TLVType.UNIQUE_ID:
            if len(tlv.value) > UNIQUE_ID_MAX:
                raise BadTLVError(f"UNIQUE_ID TLV of {len(tlv.value)} bytes, max {UNIQUE_ID_MAX}")
        elif type_ in _TOP_TEXT:
            _check_text(tlv, _TOP_TEXT[type_], "header")
        pos += 3 + len(tlv.value)
    return tuple(tlvs), crc_at
