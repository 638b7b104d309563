"""The upstream half of a relayed TCP connection.

Both halves are plain ``asyncio.Protocol`` objects wired to each other's transports — no
tasks, no streams, no per-chunk awaits. Backpressure: when one transport's write buffer
crosses its high-water mark, the other side's reading is paused until it drains. Half-close:
an EOF from one side becomes ``write_eof()`` on the other; the pair closes once both
directions are done, or at once (abort) when either side fails.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymmproxy.server.tcp import ClientProtocol


class UpstreamProtocol(asyncio.Protocol):
    """Target side: bytes from the service go to the client transport."""

    __slots__ = ("client", "transport", "eof")

    def __init__(self, client: ClientProtocol) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client.upstream_made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.bytes_down += len(data)
        client.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.client.upstream_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        client = self.client
        if not client.transport.is_closing():
            client.transport.resume_reading()


def endpoint(addr: tuple[str, int] | None) -> str | None:
    """``host:port`` / ``[v6]:port`` for logs (``None`` stays ``None``)."""
    if not addr:
        return None
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def os_reason(exc: Exception, *, before_data: bool) -> str:
    """The ``reason`` of a connection that ended with ``exc`` from the kernel."""
    if isinstance(exc, ConnectionRefusedError):
        return "target_refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "target_error" if before_data else "io_error"
