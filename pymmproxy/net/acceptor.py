"""Accept TCP connections off a listening socket in the reactor and hand them to protocols.

The listening socket sits in the instance's :class:`~pymmproxy.net.reactor.Reactor`; each
accepted socket becomes a :class:`~pymmproxy.net.channel.ClientSide` driving a fresh
protocol from ``factory``. ``connection_made`` is called at once (no ``call_soon`` round
trip), and reading starts unless the protocol closed the connection in it. When the
process runs out of descriptors or memory, accepting pauses for a second (the backlog
keeps the waiting connections) instead of spinning on the ready listener.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from _socket import socket as RawSocket  # noqa: N812 - the C socket (see channel.py)
from collections.abc import Callable
from typing import Any, cast

from pymmproxy.logsetup import get_logger
from pymmproxy.net.channel import ClientSide
from pymmproxy.net.reactor import IN, Reactor

ACCEPT_BATCH = 128  # connections per readiness event; the rest come next iteration
RETRY_DELAY = 1.0  # seconds without accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """Serves a listening socket: the reactor-side equivalent of ``asyncio.Server``."""

    __slots__ = ("factory", "log", "paused", "reactor", "sock")

    def __init__(
        self,
        sock: socket.socket,
        reactor: Reactor,
        factory: Callable[[], asyncio.Protocol],
        log: Any = None,  # noqa: ANN401 - a structlog logger (the instance's), else a new one
    ) -> None:
        self.sock = sock
        self.reactor = reactor
        self.factory = factory
        self.paused: asyncio.TimerHandle | None = None
        self.log = log if log is not None else get_logger()
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Accepted sockets inherit TCP_NODELAY (Linux): set once here, not per connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reactor.add(sock.fileno(), IN, self)

    def on_event(self, mask: int) -> None:
        del mask
        accept = cast("Any", self.sock)._accept  # (fd, addr): no socket object made for us
        family = self.sock.family
        reactor, factory = self.reactor, self.factory
        for _ in range(ACCEPT_BATCH):
            if self.paused is not None:  # a connection of this batch ran out of descriptors
                return
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            conn = RawSocket(family, socket.SOCK_STREAM, 0, fd)  # blocking: see DONTWAIT
            ClientSide(conn, reactor, factory()).start(addr)

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno not in _RESOURCE_ERRNOS:
            return  # ECONNABORTED, EPERM (a firewall), ...: that connection is gone, go on
        self.pause(exc.strerror or str(exc))

    def pause(self, error: str) -> None:
        """Stop accepting for ``RETRY_DELAY`` (descriptors or memory ran short): new
        connections wait in the listen backlog, and while the shortage lasts at most one per
        ``RETRY_DELAY`` is accepted only to be reset. Also called when an accepted
        connection found no descriptor for its target."""
        if self.paused is not None or self.sock.fileno() < 0:
            return
        self.reactor.park(self.sock.fileno())
        self.paused = self.reactor.loop.call_later(RETRY_DELAY, self._resume)
        self.log.warning("daemon.accept_paused", error=error, seconds=RETRY_DELAY)

    def _resume(self) -> None:
        self.paused = None
        if self.sock.fileno() >= 0:
            self.reactor.unpark(self.sock.fileno(), IN)

    def fatal(self, exc: Exception) -> None:
        self.reactor.loop.call_exception_handler(
            {"message": "error accepting a connection", "exception": exc}
        )

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting and close the listening socket (idempotent).

        The socket leaves the epoll set explicitly: it may be a ``dup`` (``serve`` hands
        each listener one), and closing a dup leaves the open file, and so its epoll
        registration, behind.
        """
        fd = self.sock.fileno()
        if fd < 0:
            return
        if self.paused is not None:  # parked: already out of the set
            self.paused.cancel()
            self.paused = None
        else:
            self.reactor.park(fd)
        self.reactor.forget(fd)
        self.sock.close()
