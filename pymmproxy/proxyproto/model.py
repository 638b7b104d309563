"""The decoded header: command/family/transport enums and :class:`Header`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any

from pymmproxy.proxyproto.errors import UnixUnsupportedError
from pymmproxy.proxyproto.tlv import TLV, SSLInfo, TLVType, first_value, parse_ssl, text

__all__ = ["TLV", "Command", "Family", "Header", "SSLInfo", "TLVType", "Transport"]


class Command(IntEnum):
    """v2 command nibble. v1 headers are always ``PROXY``."""

    LOCAL = 0
    PROXY = 1


class Family(IntEnum):
    """v2 address family nibble (v1 ``TCP4`` is INET, ``TCP6`` INET6, ``UNKNOWN`` UNSPEC)."""

    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class Transport(IntEnum):
    """v2 transport protocol nibble (v1 ``TCP4``/``TCP6`` are STREAM)."""

    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded PROXY protocol header (v1 or v2).

    Addresses are ``socket.inet_ntop`` text and are ``None`` for LOCAL, UNSPEC and UNIX
    headers. A v1 ``UNKNOWN`` line is ``command=PROXY, family=UNSPEC``. ``tlvs`` keeps every
    v2 TLV in wire order, unknown and NOOP ones included. Properties return the first TLV of
    their type.
    """

    version: int
    command: Command
    family: Family
    transport: Transport
    src_addr: str | None
    src_port: int | None
    dst_addr: str | None
    dst_port: int | None
    tlvs: tuple[TLV, ...] = ()

    @property
    def relayable_source(self) -> tuple[str, int] | None:
        """``(src_addr, src_port)`` to spoof, or ``None`` to connect without spoofing.

        An IPv4-mapped IPv6 source (``::ffff:192.0.2.1``) is returned as the IPv4 address:
        that client is IPv4, so it takes the ``-4`` target and an IPv4 socket.

        Raises :class:`UnixUnsupportedError` for a PROXY header of family UNIX.
        """
        if self.command != Command.PROXY:
            return None
        family = self.family
        if family in (Family.INET, Family.INET6):
            src = self.src_addr
            if src is None or self.src_port is None:
                return None
            if family is Family.INET6 and src.startswith("::ffff:") and "." in src:
                src = src[7:]  # an IPv4 client as a dual-stack LB saw it: spoofed as IPv4
            return (src, self.src_port)
        if family == Family.UNIX:
            raise UnixUnsupportedError("AF_UNIX addresses cannot be spoofed; use INET/INET6")
        return None

    @property
    def alpn(self) -> bytes | None:
        """ALPN protocol (``PP2_TYPE_ALPN``), e.g. ``b"h2"``."""
        return first_value(self.tlvs, TLVType.ALPN)

    @property
    def authority(self) -> str | None:
        """Host name the client asked for (``PP2_TYPE_AUTHORITY``, usually the TLS SNI)."""
        return text(first_value(self.tlvs, TLVType.AUTHORITY))

    @property
    def unique_id(self) -> bytes | None:
        """Opaque connection id (``PP2_TYPE_UNIQUE_ID``)."""
        return first_value(self.tlvs, TLVType.UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        """Network namespace name (``PP2_TYPE_NETNS``)."""
        return text(first_value(self.tlvs, TLVType.NETNS))

    @property
    def crc32c(self) -> int | None:
        """Checksum carried by the ``PP2_TYPE_CRC32C`` TLV (already verified when parsed)."""
        value = first_value(self.tlvs, TLVType.CRC32C)
        return None if value is None or len(value) != 4 else int.from_bytes(value, "big")

    @property
    def ssl(self) -> SSLInfo | None:
        """Decoded ``PP2_TYPE_SSL`` TLV; raises :class:`BadTLVError` if a hand-built one is bad."""
        value = first_value(self.tlvs, TLVType.SSL)
        if value is None:
            return None
        return parse_ssl(value)


def _slot_setters() -> tuple[Callable[[Header, Any], None], ...]:
    names = [field.name for field in fields(Header)]
    return tuple(getattr(Header, name).__set__ for name in names)


_SETTERS = _slot_setters()


def make_header(  # noqa: PLR0917 (mirrors Header's positional fields)
    version: int,
    command: Command,
    family: Family,
    transport: Transport,
    src_addr: str | None,
    src_port: int | None,
    dst_addr: str | None,
    dst_port: int | None,
    tlvs: tuple[TLV, ...],
) -> Header:
    """Build a :class:`Header` from trusted parser output.

    Same result as ``Header(...)``, but writes the slots directly instead of going through
    the frozen ``__setattr__`` guard, which roughly halves the cost on the per-connection path.
    """
    header: Header = object.__new__(Header)
    sv, sc, sf, st, ssa, ssp, sda, sdp, stl = _SETTERS
    sv(header, version)
    sc(header, command)
    sf(header, family)
    st(header, transport)
    ssa(header, src_addr)
    ssp(header, src_port)
    sda(header, dst_addr)
    sdp(header, dst_port)
    stl(header, tlvs)
    return header
