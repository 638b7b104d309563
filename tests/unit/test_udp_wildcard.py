"""A wildcard UDP listener reads with recvmsg: it relays, answers from the address used,
survives a read error, and gives its socket back when closed (in a namespace of its own)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

from pymmproxy.proxyproto import SIGNATURE
from pymmproxy.server import udp
from pymmproxy.settings import Endpoint
from tests.unit.test_udp_counts import udp_context

LOCAL = SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


async def relay_and_close() -> dict[str, Any]:
    """LOCAL datagrams (relayed unspoofed: no pathway needed) through ``0.0.0.0``."""
    loop = asyncio.get_running_loop()
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.setblocking(False)
    loop.add_reader(echo.fileno(), lambda: echo.sendto(*echo.recvfrom(100)))
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind(("0.0.0.0", 0))
    listen.setblocking(False)
    port = listen.getsockname()[1]
    ctx = udp_context(Endpoint("0.0.0.0", 0), Endpoint("127.0.0.1", echo.getsockname()[1]))
    listener = await udp.serve_udp(ctx, listen)
    got: dict[str, Any] = {"transport": listener.transport}
    lb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lb.bind(("127.0.0.1", 0))
    lb.setblocking(False)
    try:
        replies = []
        for n, dest in enumerate(("127.0.0.2", "127.0.0.3", "127.0.0.2")):
            await loop.sock_sendto(lb, LOCAL + b"%d" % n, (dest, port))
            data, src = await asyncio.wait_for(loop.sock_recvfrom(lb, 100), 2)
            replies.append((data, src[0]))
        got["replies"] = replies
        # A read error is logged, not fatal, and the reader is re-armed (this checks the
        # error path only: a call by hand is not a POLLERR that made libuv stop the reader).
        failing = FailingOnce(listen)
        listener.sock = failing  # type: ignore[assignment]
        listener._readable()
        listener.sock = listen
        got["read_error"] = ctx.stats.errors["lb_unreachable"]
        await loop.sock_sendto(lb, LOCAL + b"after", ("127.0.0.2", port))
        got["after"] = await asyncio.wait_for(loop.sock_recvfrom(lb, 100), 2)
    finally:
        got["closed_flows"] = listener.close()
        got["fileno"] = listen.fileno()
        ctx.close()
        loop.remove_reader(echo.fileno())
        echo.close()
        lb.close()
    return got


class FailingOnce:
    """The listening socket whose next recvmsg fails."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recvmsg(self, *args: Any) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")

    def fileno(self) -> int:
        return self.sock.fileno()


def test_a_wildcard_listener_relays_answers_from_the_address_used_and_closes(
    own_netns: Callable[[Callable[[], Any]], Any],
) -> None:
    got = own_netns(lambda: asyncio.run(relay_and_close()))
    assert got["transport"] is None  # read by recvmsg, not the loop's datagram transport
    assert got["replies"] == [(b"0", "127.0.0.2"), (b"1", "127.0.0.3"), (b"2", "127.0.0.2")]
    assert got["read_error"] == 1
    assert got["after"] == (b"after", ("127.0.0.2", got["after"][1][1]))
    assert got["closed_flows"] == 1  # one unspoofed flow per LB socket
    assert got["fileno"] == -1  # the listener closed its socket


class Refusing:
    """A listening socket whose kernel will not send from the address named (EINVAL)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def sendto(self, data: Any, addr: Any) -> int:
        self.sent.append(("sendto", addr))
        return len(data)

    def sendmsg(self, buffers: Any, ancdata: Any, flags: int, addr: Any) -> int:
        raise OSError(22, "Invalid argument")


def test_a_source_the_kernel_refuses_falls_back_to_its_own_pick() -> None:
    """Replies still arrive (from the kernel's choice of address) when the address the LB
    used cannot be a source any more; the cache forgets it, nothing counts as an error."""
    from pymmproxy.net import pktinfo  # noqa: PLC0415
    from pymmproxy.server.udpflows import Flow  # noqa: PLC0415

    async def main() -> tuple[Any, ...]:
        ctx = udp_context(Endpoint("::", 9))
        sock = Refusing()
        listener = udp.UdpListener(ctx, sock)  # type: ignore[arg-type]
        ancdata = [(pktinfo.SOL_IP, pktinfo.IP_PKTINFO, bytes(12))]
        via = listener._reply_from(ancdata)
        mine, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        flow = Flow("k", mine, lb=("192.0.2.1", 4000), client=None, target=("x", 1), now=0.0)
        flow.via = via
        listener.table.reply_bytes = 5
        listener._deliver(memoryview(b"hello"), flow)
        result = (sock.sent, flow.via, listener._reply_from._cache, dict(ctx.stats.errors))
        listener.close()
        ctx.close()
        mine.close()
        far.close()
        return (*result, ctx.stats.bytes_down)

    sent, via, cache, errors, bytes_down = asyncio.run(main())
    assert sent == [("sendto", ("192.0.2.1", 4000))]
    assert via is None
    assert cache == {}
    assert errors == {}
    assert bytes_down == 5  # delivered, so counted


class TooLong:
    """A listening socket to which the reply is too long for the LB's family (EMSGSIZE)."""

    def sendto(self, data: Any, addr: Any) -> int:
        raise OSError(90, "Message too long")

    def sendmsg(self, buffers: Any, ancdata: Any, flags: int, addr: Any) -> int:
        raise OSError(90, "Message too long")


def test_a_reply_too_long_for_the_lb_is_counted_as_such_not_as_an_unreachable_lb() -> None:
    from pymmproxy.server.udpflows import Flow  # noqa: PLC0415

    async def main() -> tuple[dict[str, int], int]:
        ctx = udp_context(Endpoint("198.51.100.2", 9))
        listener = udp.UdpListener(ctx, TooLong())  # type: ignore[arg-type]
        mine, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        flow = Flow("k", mine, lb=("192.0.2.1", 4000), client=None, target=("x", 1), now=0.0)
        listener.table.reply_bytes = 5
        listener._deliver(memoryview(b"hello"), flow)
        listener.close()
        ctx.close()
        mine.close()
        far.close()
        return dict(ctx.stats.errors), ctx.stats.bytes_down

    errors, bytes_down = asyncio.run(main())
    assert errors == {"reply_too_large": 1}
    assert bytes_down == 0  # not delivered, not counted


def test_a_send_that_consumed_the_flow_error_re_arms_its_reader() -> None:
    """An ICMP error can be consumed by the listener's next send on the flow instead of a
    recv; libuv may still stop watching the socket for its POLLERR, so the send path
    re-arms the flow's reader too (the recv path is tested in the namespace)."""
    from pymmproxy.server.udpflows import Flow  # noqa: PLC0415

    async def main() -> list[Flow]:
        ctx = udp_context(Endpoint("::", 9))
        listener = udp.UdpListener(ctx, Refusing())  # type: ignore[arg-type]
        rearmed: list[Flow] = []
        listener.table.rearm = rearmed.append  # type: ignore[method-assign]
        mine, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        flow = Flow("k", mine, lb=("192.0.2.1", 4000), client=None, target=("x", 1), now=0.0)
        listener._send_failed(flow, ConnectionRefusedError(111, "Connection refused"))
        listener._send_failed(flow, BlockingIOError(11, "busy"))  # a full buffer: no error
        listener.close()
        ctx.close()
        mine.close()
        far.close()
        return rearmed

    rearmed = asyncio.run(main())
    assert len(rearmed) == 1
