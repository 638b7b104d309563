"""Header / SSLInfo value semantics independent of parsing."""

from __future__ import annotations

import dataclasses

import pytest

from pymmproxy.errors import ProtocolError
from pymmproxy.proxyproto import (
    TLV,
    BadTLVError,
    Command,
    Family,
    Header,
    SSLInfo,
    TLVType,
    Transport,
    UnixUnsupportedError,
)


def header(command: Command, family: Family, src: str | None = "10.0.0.1") -> Header:
    port = None if src is None else 4000
    return Header(2, command, family, Transport.STREAM, src, port, src, port)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (header(Command.PROXY, Family.INET), ("10.0.0.1", 4000)),
        (header(Command.PROXY, Family.INET6, "fe80::1"), ("fe80::1", 4000)),
        (header(Command.PROXY, Family.INET6, "::ffff:192.0.2.9"), ("192.0.2.9", 4000)),
        (header(Command.PROXY, Family.INET, None), None),
        (header(Command.PROXY, Family.UNSPEC, None), None),
        (header(Command.LOCAL, Family.INET), None),
        (header(Command.LOCAL, Family.UNIX, None), None),
    ],
)
def test_relayable_source(value: Header, expected: tuple[str, int] | None) -> None:
    assert value.relayable_source == expected


def test_relayable_source_unix() -> None:
    with pytest.raises(UnixUnsupportedError) as err:
        _ = header(Command.PROXY, Family.UNIX, None).relayable_source
    assert isinstance(err.value, ProtocolError)
    assert err.value.kind == "unix_unsupported"


def test_frozen_and_slotted() -> None:
    value = header(Command.PROXY, Family.INET)
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.src_port = 1  # type: ignore[misc]
    assert not hasattr(value, "__dict__")
    assert not hasattr(TLV(1, b""), "__dict__")
    assert not hasattr(SSLInfo(0, 0, ()), "__dict__")


def test_hand_built_tlv_properties_never_raise_on_text() -> None:
    tlvs = (TLV(TLVType.AUTHORITY, b"\xff"), TLV(TLVType.NETNS, b"\xfe"), TLV(TLVType.CRC32C, b"x"))
    value = dataclasses.replace(header(Command.PROXY, Family.INET), tlvs=tlvs)
    assert value.authority == "\ufffd"
    assert value.netns == "\ufffd"
    assert value.crc32c is None  # not 4 bytes: not a checksum
    broken = dataclasses.replace(value, tlvs=(TLV(TLVType.SSL, b"\x01"),))
    with pytest.raises(BadTLVError):
        _ = broken.ssl


def test_enum_values() -> None:
    assert [int(c) for c in Command] == [0, 1]
    assert [int(f) for f in Family] == [0, 1, 2, 3]
    assert [int(t) for t in Transport] == [0, 1, 2]
    assert {t.name: int(t) for t in TLVType} == {
        "ALPN": 0x01,
        "AUTHORITY": 0x02,
        "CRC32C": 0x03,
        "NOOP": 0x04,
        "UNIQUE_ID": 0x05,
        "SSL": 0x20,
        "SSL_VERSION": 0x21,
        "SSL_CN": 0x22,
        "SSL_CIPHER": 0x23,
        "SSL_SIG_ALG": 0x24,
        "SSL_KEY_ALG": 0x25,
        "NETNS": 0x30,
    }


def test_error_kinds_are_protocol_errors() -> None:
    import pymmproxy.proxyproto as pp  # noqa: PLC0415

    kinds = {}
    for name in pp.__all__:
        obj = getattr(pp, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ProtocolError)
            assert obj("x").kind == obj.kind
            kinds[obj.kind] = name
    assert set(kinds) == {
        "bad_signature",
        "bad_version",
        "bad_command",
        "bad_family",
        "bad_transport",
        "bad_length",
        "too_long",
        "bad_crlf",
        "bad_format",
        "bad_address",
        "bad_port",
        "crc_mismatch",
        "bad_tlv",
        "unix_unsupported",
        "unencodable",
    }
