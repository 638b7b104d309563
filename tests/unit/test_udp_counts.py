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


def test_local_and_proxy_flows_are_counted_once_each(monkeypatch: pytest.MonkeyPatch) -> None:
    kept: list[socket.socket] = []

    def upstream_socket(*args: Any, **kwargs: Any) -> socket.socket:
        mine, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        kept.append(far)
        return mine

    monkeypatch.setattr(udp, "upstream_socket", upstream_socket)

    async def main() -> dict[str, int]:
        settings = InstanceSettings(
            Endpoint("127.0.0.1", 9), Endpoint("127.0.0.1", 10), None,
            transport=Transport.UDP, limits=Limits(allow_any_source=True),
        )  # fmt: skip
        ctx = InstanceContext(settings, asyncio.get_running_loop())
        listener = udp.UdpListener(ctx, Listening())  # type: ignore[arg-type]
        lb = ("192.0.2.1", 4000)
        for data in (LOCAL, LOCAL, LOCAL, PROXY, PROXY):
            listener.datagram_received(data, lb)
        listener.close()
        assert ctx.stats.accepted == 2
        return dict(ctx.stats.versions)

    versions = asyncio.run(main())
    for sock in kept:
        sock.close()
    assert {k: v for k, v in versions.items() if v} == {"v2-local": 1, "v2": 1}
