"""Tiny asyncio test services: ``python -m pymmproxy.lab.services KIND --listen ADDR:PORT``.

Kinds:
  whoami     minimal HTTP/1.0 responder; the body is ``"<peer_ip> <peer_port>\\n"``
  sink-hash  reads to EOF, answers ``"<sha256hex> <count>\\n"`` and closes
  source     writes ``--bytes`` of ``pattern(n, --seed)`` then half-closes; keeps reading
  echo       copies everything back; half-closes after the peer's EOF

Every connection is logged to stdout as a JSON line (``conn`` on accept, ``done`` at the
end with the byte count and sha256 of what was received; ``peer``/``port`` are the remote
address, ``lport`` the local port), so tests can tell whether, and from which address,
anything reached a service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import sys
from collections.abc import Awaitable, Callable

CHUNK = 65536
KINDS = ("whoami", "sink-hash", "source", "echo")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Stats"], Awaitable[None]]


def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` deterministic pseudo-random bytes (same on both ends of a test)."""
    return random.Random(seed).randbytes(n)  # noqa: S311 - test data, not crypto


class Stats:
    """Bytes received on one connection."""

    def __init__(self) -> None:
        self.count = 0
        self.hash = hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.count += len(data)
        self.hash.update(data)

    async def drain_reader(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(CHUNK):
            self.add(data)


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def whoami(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, st: Stats) -> None:
    peer = writer.get_extra_info("peername")
    buf = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            while b"\r\n\r\n" not in buf and len(buf) < CHUNK:
                data = await reader.read(CHUNK)
                if not data:
                    break
                buf += data
    st.add(buf)
    body = f"{peer[0]} {peer[1]}\n".encode()
    head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
    await writer.drain()


async def sink_hash(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, st: Stats) -> None:
    await st.drain_reader(reader)
    writer.write(f"{st.hash.hexdigest()} {st.count}\n".encode())
    await writer.drain()


def make_source(n: int, seed: int) -> Handler:
    data = pattern(n, seed)

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, st: Stats) -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        await st.drain_reader(reader)

    return source


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, st: Stats) -> None:
    while data := await reader.read(CHUNK):
        st.add(data)
        writer.write(data)
        await writer.drain()
    writer.write_eof()


def serve_one(
    handler: Handler,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        lport = writer.get_extra_info("sockname")[1]
        emit("conn", peer=peer[0], port=peer[1], lport=lport)
        st, error = Stats(), None
        try:
            await handler(reader, writer, st)
        except (OSError, asyncio.IncompleteReadError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        emit(
            "done",
            peer=peer[0],
            port=peer[1],
            lport=lport,
            received=st.count,
            sha256=st.hash.hexdigest(),
            error=error,
        )

    return conn


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def run(kind: str, listens: list[str], n: int, seed: int) -> None:
    handlers: dict[str, Handler] = {
        "whoami": whoami,
        "sink-hash": sink_hash,
        "echo": echo,
        "source": make_source(n, seed),
    }
    servers = []
    for listen in listens:
        host, port = split_hostport(listen)
        servers.append(await asyncio.start_server(serve_one(handlers[kind]), host, port))
    emit("ready", kind=kind, listen=listens)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pymmproxy.lab.services")
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--listen", action="append", required=True, help="ADDR:PORT or [V6]:PORT")
    ap.add_argument("--bytes", type=int, default=1 << 20, help="source: bytes to send")
    ap.add_argument("--seed", type=int, default=1, help="source: pattern seed")
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.kind, args.listen, args.bytes, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
