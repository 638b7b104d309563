"""UDP header counters without the network: a flow is counted once, by its header's kind."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest

from pymmproxy.proxyproto import SIGNATURE
from pymmproxy.server import udp
from pymmproxy.server.context import InstanceContext
from pymmproxy.settings import Endpoint, InstanceSettings, Limits, Transport

LOCAL = SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0) + b"x"
PROXY = (
    SIGNATURE + bytes([0x21, 0x12]) + struct.pack("!H", 12)
    + socket.inet_aton("198.51.100.7") + socket.inet_aton("127.0.0.1")
    + struct.pack("!HH", 5555, 9) + b"y"
)  # fmt: skip


class Listening:
    """The listening socket: answers go nowhere."""

    def sendto(self, data: bytes, addr: Any) -> int:
        return len(data)

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, addr: Any = None) -> int:
        return sum(len(b) for b in buffers)


LISTEN, TARGET = Endpoint("127.0.0.1", 9), Endpoint("127.0.0.1", 10)


def udp_context(listen: Endpoint = LISTEN, target: Endpoint = TARGET) -> InstanceContext:
    """A UDP instance's context on the running loop, every source allowed."""
    limits = Limits(allow_any_source=True)
    settings = InstanceSettings(listen, target, None, transport=Transport.UDP, limits=limits)
    return InstanceContext(settings, asyncio.get_running_loop())


def run_listener(
    monkeypatch: pytest.MonkeyPatch, datagrams: list[bytes], upstream: Any = None
) -> tuple[InstanceContext, udp.UdpListener, list[socket.socket]]:
    """Feed ``datagrams`` from one LB to a listener whose upstream sockets are socket pairs."""
    kept: list[socket.socket] = []

    def pair(*args: Any, **kwargs: Any) -> socket.socket:
        mine, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        kept.append(far)
        return mine

    monkeypatch.setattr(udp, "upstream_socket", upstream or pair)
    box: list[Any] = []

    async def main() -> None:
        ctx = udp_context()
        listener = udp.UdpListener(ctx, Listening())  # type: ignore[arg-type]
        for data in datagrams:
            listener.datagram_received(data, ("192.0.2.1", 4000))
        box.extend((ctx, listener))
        listener.close()

    asyncio.run(main())
    for sock in kept:
        sock.close()
    return box[0], box[1], kept


def test_local_and_proxy_flows_are_counted_once_each(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, _, _ = run_listener(monkeypatch, [LOCAL, LOCAL, LOCAL, PROXY, PROXY])
    assert ctx.stats.accepted == 2
    assert {k: v for k, v in ctx.stats.versions.items() if v} == {"v2-local": 1, "v2": 1}


def proxy(src: str, sport: int) -> bytes:
    return (
        SIGNATURE + bytes([0x21, 0x12]) + struct.pack("!H", 12) + socket.inet_aton(src)
        + socket.inet_aton("127.0.0.1") + struct.pack("!HH", sport, 9) + b"y"
    )  # fmt: skip


def test_bad_headers_are_counted_by_kind_as_for_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nx"
    v1_udp = b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\nx"  # no such v1 line: still v1 over UDP
    stream = bytearray(PROXY)
    stream[13] = 0x11  # INET over STREAM
    datagrams = [b"garbage" * 5, SIGNATURE, v1, v1_udp, b"PROXY ", bytes(stream)]
    ctx, _, _ = run_listener(monkeypatch, datagrams)
    assert dict(ctx.stats.header_errors) == {
        "bad_signature": 1, "truncated": 1, "v1_over_udp": 3, "not_dgram": 1,
    }  # fmt: skip
    assert ctx.stats.errors["bad_header"] == 6


def test_out_of_descriptors_evicts_the_longest_idle_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE for a new client's socket closes the flow idle the longest and tries again, as
    the ``--udp-max-clients`` cap would: a low descriptor limit cannot lock new clients out."""
    from pymmproxy.errors import UpstreamError  # noqa: PLC0415

    made: list[socket.socket] = []
    far: list[socket.socket] = []

    def limited(*args: Any, **kwargs: Any) -> socket.socket:
        if len([s for s in made if s.fileno() >= 0]) >= 2:  # two open: "Too many open files"
            raise UpstreamError("no socket for the target: Too many open files", "out_of_resources")
        mine, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        made.append(mine)
        far.append(other)
        return mine

    clients = [proxy("198.51.100.7", 5000 + i) for i in range(4)]
    ctx, listener, _ = run_listener(monkeypatch, clients, upstream=limited)
    for sock in far:
        sock.close()
    assert ctx.stats.accepted == 4  # every client got a flow
    assert ctx.stats.rejected["udp_evicted"] == 2  # the two oldest made room
    assert listener.table.evicted == 2
    assert ctx.stats.errors == {}


def test_a_lasting_shortage_evicts_one_flow_per_new_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory short, not descriptors: closing flows does not help, so each new client
    evicts one at most and the table is not emptied."""
    from pymmproxy.errors import UpstreamError  # noqa: PLC0415

    made: list[socket.socket] = []

    def short(*args: Any, **kwargs: Any) -> socket.socket:
        if len(made) >= 5:
            raise UpstreamError("no socket for the target: No buffer space", "out_of_resources")
        mine, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        made.extend((mine, other))
        return mine

    clients = [proxy("198.51.100.7", 6000 + i) for i in range(5)]
    ctx, listener, _ = run_listener(monkeypatch, clients, upstream=short)
    for sock in made:
        sock.close()
    assert ctx.stats.accepted == 3  # three flows, then every new client fails
    assert listener.table.evicted == 2  # one per failed client, not the whole table
    assert ctx.stats.errors["out_of_resources"] == 2


def test_ipv4_mapped_clients_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    mapped = (
        SIGNATURE + bytes([0x21, 0x22]) + struct.pack("!H", 36)
        + bytes(10) + b"\xff\xff" + socket.inet_aton("198.51.100.9")
        + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack("!HH", 7000, 9) + b"z"
    )  # fmt: skip
    slow: list[bytes] = []
    real = udp.UdpListener._slow_path

    def counted(self: udp.UdpListener, data: bytes, addr: Any) -> None:
        slow.append(data)
        real(self, data, addr)

    monkeypatch.setattr(udp.UdpListener, "_slow_path", counted)
    ctx, _, _ = run_listener(monkeypatch, [mapped] * 20)
    assert len(slow) == 1  # the first datagram opens the flow, the others hit it
    assert ctx.stats.accepted == 1
