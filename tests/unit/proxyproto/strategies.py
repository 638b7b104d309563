"""Hypothesis strategies for valid PROXY protocol headers."""

from __future__ import annotations

from socket import AF_INET, AF_INET6, inet_ntop

from hypothesis import strategies as st

from pymmproxy.proxyproto import TLV, Command, Family, Header, TLVType, Transport

ipv4 = st.binary(min_size=4, max_size=4).map(lambda b: inet_ntop(AF_INET, b))
ipv6 = st.binary(min_size=16, max_size=16).map(lambda b: inet_ntop(AF_INET6, b))
ports = st.integers(0, 0xFFFF)
ascii_text = st.text(st.characters(max_codepoint=0x7F), max_size=40).map(str.encode)
utf8_text = st.text(max_size=40).map(str.encode)

_SSL_SUB = st.one_of(
    st.builds(TLV, st.sampled_from([0x21, 0x23, 0x24, 0x25]), ascii_text),
    st.builds(TLV, st.just(0x22), utf8_text),
    st.builds(
        TLV, st.integers(0, 0xFF).filter(lambda t: not 0x21 <= t <= 0x25), st.binary(max_size=20)
    ),
)


@st.composite
def ssl_value(draw: st.DrawFn) -> bytes:
    subs = draw(st.lists(_SSL_SUB, max_size=4))
    out = bytes([draw(st.integers(0, 0xFF))]) + draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    for sub in subs:
        out += bytes([sub.type]) + len(sub.value).to_bytes(2, "big") + sub.value
    return out


_CHECKED = {0x02, 0x03, 0x05, 0x20, 0x30}
tlvs = st.lists(
    st.one_of(
        st.builds(TLV, st.just(TLVType.ALPN), st.binary(max_size=20)),
        st.builds(TLV, st.just(TLVType.AUTHORITY), utf8_text),
        st.builds(TLV, st.just(TLVType.NOOP), st.binary(max_size=20)),
        st.builds(TLV, st.just(TLVType.UNIQUE_ID), st.binary(max_size=128)),
        st.builds(TLV, st.just(TLVType.NETNS), ascii_text),
        st.builds(TLV, st.just(TLVType.SSL), ssl_value()),
        st.builds(
            TLV,
            st.integers(0, 0xFF).filter(lambda t: t not in _CHECKED),
            st.binary(max_size=40),
        ),
    ),
    max_size=5,
).map(tuple)


@st.composite
def v2_headers(draw: st.DrawFn) -> Header:
    command = draw(st.sampled_from(Command))
    family = draw(st.sampled_from(Family))
    transport = draw(st.sampled_from(Transport))
    src = dst = sport = dport = None
    if command == Command.PROXY and family in (Family.INET, Family.INET6):
        addr = ipv4 if family == Family.INET else ipv6
        src, dst, sport, dport = draw(addr), draw(addr), draw(ports), draw(ports)
    return Header(2, command, family, transport, src, sport, dst, dport, draw(tlvs))


@st.composite
def v1_headers(draw: st.DrawFn) -> Header:
    family = draw(st.sampled_from([Family.INET, Family.INET6, Family.UNSPEC]))
    if family == Family.UNSPEC:
        return Header(1, Command.PROXY, family, Transport.UNSPEC, None, None, None, None)
    addr = ipv4 if family == Family.INET else ipv6
    src, dst, sport, dport = draw(addr), draw(addr), draw(ports), draw(ports)
    return Header(1, Command.PROXY, family, Transport.STREAM, src, sport, dst, dport)
