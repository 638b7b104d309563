"""The upstream half of a relayed TCP connection: the transparent socket to the target.

A :class:`pymmproxy.net.channel.Channel` in the instance's reactor, like the load
balancer's side. It begins connecting (usually already connected: on loopback the
handshake finishes inside ``connect()``), then reports back to its
:class:`pymmproxy.server.tcp.ClientProtocol` through ``upstream_made`` / ``upstream_eof`` /
``upstream_lost``, and pauses or resumes the client's reading when its own unsent bytes
cross the high/low water marks.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from pymmproxy.net.channel import Channel, os_error

if TYPE_CHECKING:
    from pymmproxy.server.tcp import ClientProtocol


class Upstream(Channel):
    """A connected (or connecting) upstream socket relaying for its ``owner``."""

    __slots__ = ()
    owner: ClientProtocol

    def start(self, *, connected: bool) -> None:
        """Begin: relay at once if ``connect()`` already completed, else wait for it."""
        if connected:
            self.reading = True
            self.register()
            self.owner.upstream_made(self)
        else:
            self.connecting = self.writing = True
            self.register()

    def _on_writable(self) -> None:
        if self.connecting:
            self._connected()
        else:
            Channel._on_writable(self)

    def _connected(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._teardown(os_error(err))
            return
        try:
            self.sock.getpeername()
        except OSError:  # not connected yet: a stale event for a reused descriptor
            return
        self.connecting = self.writing = False
        self.reading = True
        self._watch()
        self.owner.upstream_made(self)

    def _got_data(self, data: bytes) -> None:  # no peer: not relaying yet, or its side is gone
        self.count += len(data)
        self.owner.transport.write(data)

    def _got_eof(self) -> None:
        self.owner.upstream_eof()

    def _lost(self, exc: Exception | None) -> None:
        self.owner.upstream_lost(exc)
