"""The upstream half of a relayed TCP connection, driven straight off the event loop.

The client side is a uvloop transport (uvloop accepts it for us); the upstream side is the
transparent socket we built ourselves, watched with ``loop.add_reader``/``add_writer``
instead of being wrapped in a second transport. Measured against a ``create_connection
(sock=...)`` transport this saves a Task, the transport's bookkeeping and ~1.5 KB per
connection, and lets a connect that completes inside ``connect()`` (the usual case on
loopback) go straight to relaying.

It offers the small part of the ``asyncio.Transport`` API that the client protocol uses
(``write``, ``write_eof``, ``pause_reading``, ``close``, ...), and reports back to its
owner through ``upstream_made`` / ``upstream_eof`` / ``upstream_lost`` like a protocol.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from pymmproxy.server.tcp import ClientProtocol

READ_SIZE = 256 * 1024
HIGH_WATER = 256 * 1024  # pause the client's reading above this much unsent data
LOW_WATER = 64 * 1024


class Upstream:
    """A connected (or connecting) upstream socket relaying to and from ``client``."""

    __slots__ = (
        "client", "sock", "loop", "out", "reading", "writing", "paused_client",
        "eof", "eof_pending", "closing", "closed",
    )  # fmt: skip

    def __init__(
        self,
        client: ClientProtocol,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.client = client
        self.sock = sock
        self.loop = loop
        self.out: bytes | bytearray = b""  # a bytearray only while data is queued
        self.reading = False
        self.writing = False
        self.paused_client = False
        self.eof = False  # the target sent EOF
        self.eof_pending = False  # write_eof() asked for while data is still queued
        self.closing = False
        self.closed = False

    # -- connection ----------------------------------------------------------------------
    def start(self, *, connected: bool) -> None:
        """Begin: relay at once if ``connect()`` already completed, else wait for it."""
        if connected:
            self._established()
        else:
            self.writing = True
            self.loop.add_writer(self.sock.fileno(), self._on_connect)

    def _on_connect(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._teardown(_os_error(err))
            return
        # Start reading before we stop watching for writability: uvloop keeps one poll
        # handle per fd and frees it when nothing is watched, so this order reuses it
        # (one epoll MOD) instead of a close and a new handle (DEL + ADD).
        self.reading = True
        loop = self.loop
        loop.add_reader(self.sock.fileno(), self._on_readable)
        loop.remove_writer(self.sock.fileno())
        self.writing = False
        self.client.upstream_made(self)

    def _established(self) -> None:
        self.reading = True
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self.client.upstream_made(self)

    # -- target -> client ----------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._teardown(exc)
            return
        if data:
            client = self.client
            client.bytes_down += len(data)
            client.transport.write(data)
            return
        self.eof = True
        self.pause_reading()
        self.client.upstream_eof()

    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def resume_reading(self) -> None:
        if not self.reading and not self.eof and not self.closing and not self.closed:
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    # -- client -> target ----------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed or self.closing:
            return
        out = self.out
        if out:
            out += data  # a bytearray: in place
        else:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._teardown(exc)
                return
            if sent == len(data):
                return
            self.out = out = bytearray(memoryview(data)[sent:])
            self.writing = True
            self.loop.add_writer(self.sock.fileno(), self._on_writable)
        if not self.paused_client and len(out) > HIGH_WATER:
            self.paused_client = True
            self.client.transport.pause_reading()

    def _on_writable(self) -> None:
        out = cast("bytearray", self.out)  # only watched while data is queued
        try:
            sent = self.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._teardown(exc)
            return
        del out[:sent]
        if self.paused_client and len(out) <= LOW_WATER:
            self.paused_client = False
            if not self.client.transport.is_closing():
                self.client.transport.resume_reading()
        if out:
            return
        self.out = b""  # drop the buffer: idle connections keep none
        self.writing = False
        self.loop.remove_writer(self.sock.fileno())
        if self.closing:
            self._teardown(None)
        elif self.eof_pending:
            self.eof_pending = False
            self._shutdown_write()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.out:
            self.eof_pending = True
        elif not self.closed:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._teardown(exc)

    # -- closing -------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self.closing or self.closed

    def close(self) -> None:
        """Close after the queued bytes are sent (like ``Transport.close``)."""
        if self.closed or self.closing:
            return
        self.pause_reading()
        if self.out:
            self.closing = True
        else:
            self._teardown(None)

    def abort(self) -> None:
        """Close now, dropping anything queued."""
        if not self.closed:
            self._teardown(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ANN401
        return self.sock if name == "socket" else default

    def _teardown(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.sock.fileno())
        self.out = b""
        self.sock.close()
        self.client.upstream_lost(exc)


def _os_error(err: int) -> OSError:
    """The ``OSError`` subclass Python raises for ``err`` (ConnectionRefusedError, ...)."""
    return OSError(err, os.strerror(err))
