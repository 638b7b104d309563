"""The relay design ``PERFORMANCE.md`` measured, for an A/B against pymmproxy's reactor.

A minimal PROXY v2 (TCP4) relay with uvloop transports on both sides: the client side is a
``loop.create_server`` protocol, the upstream a hand-built transparent, marked socket handed
to ``loop.create_connection(sock=)`` while it connects; bytes go from one protocol's
``data_received`` to the other transport's ``write``, with pause/resume for backpressure
and half-close passed on. No allow list, no limits, no logging: only what the relay costs.

    python -m benchmarks.protocol_relay -l ADDR:PORT -4 ADDR:PORT [-mark M] [-listeners N]

``python -m benchmarks.protocol_ab [benchmarks.run flags]`` runs the benchmark with it as
two extra candidates, ``protocol-1`` and ``protocol-2`` (one process, two workers).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import sys

import uvloop

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
IP_TRANSPARENT, SO_MARK = 19, 36
V2_TCP4 = 0x11


class Upstream(asyncio.Protocol):
    """The connection to the target: what it reads goes to the client's transport."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = self.client
        client.up = transport  # type: ignore[assignment]
        if client.pending:
            client.up.write(client.pending)
        client.pending = b""
        if client.closed:
            transport.close()
        else:
            client.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        return self.client.half_closed(self.client.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class Client(asyncio.Protocol):
    """The load balancer's connection: the header, then bytes to the upstream transport."""

    target: tuple[str, int] = ("127.0.0.1", 80)
    mark = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.up: asyncio.Transport | None = None
        self.pending: bytes | None = None
        self.closed = False
        self.eofs = 0

    def data_received(self, data: bytes) -> None:
        up = self.up
        if up is not None:
            up.write(data)
        elif self.pending is not None:
            self.pending += data
        elif len(data) < 28 or data[:12] != SIGNATURE or data[13] != V2_TCP4:
            self.transport.abort()
        else:
            self._connect(data)

    def _connect(self, data: bytes) -> None:
        size = struct.unpack_from("!H", data, 14)[0]
        source = (socket.inet_ntoa(data[16:20]), struct.unpack_from("!H", data, 24)[0])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
        try:
            sock.bind(source)
        except OSError:
            sock.bind((source[0], 0))
        sock.setblocking(False)
        sock.connect_ex(self.target)
        self.pending = data[16 + size :]
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._hand_over(sock))

    async def _hand_over(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Upstream(self), sock=sock)
        except OSError:
            sock.close()
            self.transport.abort()

    def half_closed(self, other: asyncio.Transport) -> bool:
        """One side's EOF: pass it on; the second one closes both."""
        self.eofs += 1
        if self.eofs == 2 or self.up is None:
            self.transport.close()
            if self.up is not None:
                self.up.close()
            return False
        if not other.is_closing():
            other.write_eof()
        return True

    def eof_received(self) -> bool:
        if self.up is None:
            return False
        return self.half_closed(self.up)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.up is not None:
            self.up.close()

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()


def serve(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    loop = uvloop.new_event_loop()
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.run_until_complete(loop.create_server(Client, sock=sock, backlog=4096))
    loop.run_forever()


def main(argv: list[str]) -> int:
    flags = dict(zip(argv[::2], argv[1::2], strict=True))
    host, port = flags["-l"].rsplit(":", 1)
    target_host, target_port = flags["-4"].rsplit(":", 1)
    Client.target = (target_host, int(target_port))
    Client.mark = int(flags.get("-mark", "0"))
    workers = int(flags.get("-listeners", "1"))
    if workers == 1:
        serve(host, int(port))
        return 0
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            serve(host, int(port))
            os._exit(0)
        children.append(pid)

    def stop(*_: object) -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
