"""One TCP connection from the load balancer: allow list -> header -> connect -> relay.

The client side is an ``asyncio.Protocol`` that parses the PROXY header from its first
``data_received`` calls (pure parser, no I/O), then builds the transparent upstream socket
by hand and hands it, still connecting, to ``loop.create_connection(sock=...)``. After that
the two protocols relay bytes directly (see :mod:`pymmproxy.net.relay`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from pymmproxy.errors import ProtocolError, UpstreamError
from pymmproxy.net.relay import UpstreamProtocol, endpoint, os_reason
from pymmproxy.net.sockets import still_connecting, upstream_socket
from pymmproxy.proxyproto import parse_header
from pymmproxy.server.context import IDLE_CHECKS, LOCAL_KEYS, VERSION_KEYS, InstanceContext

_HEADER, _CONNECTING, _RELAY, _CLOSED = range(4)
MAX_HEADER_BYTES = 65535 + 16


class ClientProtocol(asyncio.Protocol):
    """The load balancer's connection; owns the upstream for its whole life."""

    __slots__ = (
        "ctx", "transport", "peer", "buf", "state", "timer", "upstream", "up_proto",
        "client_eof", "up_eof", "bytes_up", "bytes_down", "started", "source", "target", "reason",
        "idle_mark", "idle_checks",
    )  # fmt: skip

    def __init__(self, ctx: InstanceContext) -> None:
        self.ctx = ctx
        self.buf = b""
        self.state = _HEADER
        self.timer: asyncio.TimerHandle | None = None
        self.upstream: asyncio.Transport | None = None
        self.up_proto: UpstreamProtocol | None = None
        self.client_eof = False
        self.up_eof = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.source: tuple[str, int] | None = None
        self.target: tuple[str, int] | None = None
        self.reason = "done"
        self.idle_mark = 0
        self.idle_checks = 0

    # -- accept and header ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ctx = self.ctx
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.peer: Any = transport.get_extra_info("peername")
        self.started = time.monotonic()
        ctx.stats.accepted += 1
        if self.peer is None:  # reset before we got to it: getpeername() failed
            self.state = _CLOSED
            ctx.stats.rejected["gone_before_accept"] += 1
            self.transport.abort()
            return
        if not ctx.allow.allows(self.peer[0]):
            refused = "not_allowed"
        elif ctx.max_connections and ctx.stats.active >= ctx.max_connections:
            refused = "over_limit"
        elif ctx.max_pending_headers and ctx.stats.pending_headers >= ctx.max_pending_headers:
            refused = "pending_limit"  # e.g. slowloris: new connections go, old ones stay
        else:
            refused = ""
        if refused:
            self.state = _CLOSED
            ctx.reject(refused, self.peer)
            self.transport.abort()
            return
        ctx.opened(self)
        ctx.stats.pending_headers += 1
        self.timer = ctx.loop.call_later(ctx.header_timeout, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            self.bytes_up += len(data)
            upstream.write(data)
            return
        if self.state != _HEADER:  # connecting: reading is paused, keep what raced in
            self.buf += data
            return
        buf = self.buf + data if self.buf else data
        try:
            parsed = parse_header(buf)
        except ProtocolError as exc:
            self._fail_header(exc)
            return
        if parsed is None:
            self.buf = buf
            return
        header, used = parsed
        self.buf = buf[used:]
        self._leave_header()
        try:
            self._connect(header)
        except ProtocolError as exc:  # a UNIX-family PROXY header
            self._fail_header(exc)
        except UpstreamError as exc:
            self._fail("upstream_error", str(exc))

    def _connect(self, header: Any) -> None:  # noqa: ANN401 - proxyproto.Header
        ctx = self.ctx
        stats = ctx.stats
        if stats.header_wait is not None:
            stats.header_wait.observe(time.monotonic() - self.started)
        source = header.relayable_source
        if source is None:
            stats.versions[LOCAL_KEYS[header.version, header.command]] += 1
            lb = self.peer[0]
            chosen = ctx.local_target(":" in lb and not lb.startswith("::ffff:"))
            if chosen is None:
                raise UpstreamError("no target configured")
            family, target = chosen
        elif ":" in source[0]:
            family, target = socket.AF_INET6, ctx.target6  # type: ignore[assignment]
            if target is None:
                raise UpstreamError(f"IPv6 client {source[0]} but no -6 target configured")
        else:
            family, target = socket.AF_INET, ctx.target4  # type: ignore[assignment]
            if target is None:
                raise UpstreamError(f"IPv4 client {source[0]} but no -4 target configured")
        self.source = source
        self.target = target
        if source is not None:
            stats.versions[VERSION_KEYS[header.version]] += 1
            if ctx.sources is not None and (kind := ctx.sources.refuses(source[0])):
                self._refuse_source(kind)
                return
        sock = upstream_socket(family, target, source, ctx.mark)
        if ctx.probe is not None:
            ctx.probe.watch(sock)
        self.state = _CONNECTING
        self.transport.pause_reading()
        ctx.loop.create_task(self._hand_over(sock))

    async def _hand_over(self, sock: socket.socket) -> None:
        try:
            await self.ctx.loop.create_connection(lambda: UpstreamProtocol(self), sock=sock)
        except OSError as exc:
            sock.close()
            self._fail("target_error", exc.strerror or str(exc))

    @property
    def state_name(self) -> str:
        """Where the connection is: header, connecting, relay or closed."""
        return ("header", "connecting", "relay", "closed")[self.state]

    # -- called by UpstreamProtocol ------------------------------------------------------
    def upstream_made(self, transport: asyncio.Transport) -> None:
        if self.state == _CLOSED:
            transport.abort()
            return
        self.upstream = transport
        self.state = _RELAY
        self.ctx.stats.relayed += 1
        if self.buf:
            self.bytes_up += len(self.buf)
            transport.write(self.buf)
            self.buf = b""
        if self.client_eof:
            transport.write_eof()
        else:
            self.transport.resume_reading()
        self.timer = self.ctx.loop.call_later(self.ctx.connect_timeout, self._connect_timeout)

    def upstream_eof(self) -> None:
        self.up_eof = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self.client_eof:
            self._close()

    def upstream_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.state != _CLOSED:
            self._fail(os_reason(exc, before_data=self.bytes_down == 0), str(exc))
        else:
            self._close()

    # -- client side of the relay --------------------------------------------------------
    def eof_received(self) -> bool:
        self.client_eof = True
        if self.state == _HEADER:
            self._fail_header(None)
            return False
        upstream = self.upstream
        if upstream is not None:
            if upstream.can_write_eof():
                upstream.write_eof()
            if self.up_eof:
                self._close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_header()
        if exc is not None and self.state == _RELAY:
            self.reason = os_reason(exc, before_data=False)
        self._close(abort=exc is not None)
        if self in self.ctx.conns:  # else rejected before it was counted
            self.ctx.closed(self)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            upstream.resume_reading()

    def idle_check(self) -> None:
        """Called by the instance's idle sweep: close after IDLE_CHECKS sweeps without data."""
        if self.state != _RELAY:
            return
        seen = self.bytes_up + self.bytes_down
        if seen != self.idle_mark:
            self.idle_mark = seen
            self.idle_checks = 0
            return
        self.idle_checks += 1
        if self.idle_checks >= IDLE_CHECKS:
            self.reason = "idle_timeout"
            self.ctx.stats.errors[self.reason] += 1
            self._close()

    # -- failure and teardown --------------------------------------------------------------
    def _leave_header(self) -> None:
        if self.state == _HEADER:
            self.state = _CONNECTING
            self.ctx.stats.pending_headers -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _header_timeout(self) -> None:
        self.timer = None
        self._leave_header()
        self.reason = "header_timeout"
        self.ctx.failed(self.reason, self.peer, waited=self.ctx.header_timeout)
        self._close(abort=True)

    def _connect_timeout(self) -> None:
        self.timer = None
        upstream = self.upstream
        if upstream is None or upstream.is_closing():
            return
        sock = upstream.get_extra_info("socket")
        if sock is not None and still_connecting(sock):
            detail = f"no answer from target within {self.ctx.connect_timeout}s"
            self._fail("connect_timeout", detail)

    def _fail_header(self, exc: ProtocolError | None) -> None:
        self._leave_header()
        if exc is None:
            self.reason = "eof_before_header"
            self.ctx.failed(self.reason, self.peer, received=len(self.buf))
        else:
            self.reason = f"bad_header:{exc.kind}"
            self.ctx.stats.header_errors[exc.kind] += 1
            self.ctx.failed("bad_header", self.peer, kind=exc.kind, error=str(exc))
        self._close(abort=True)

    def _refuse_source(self, kind: str) -> None:
        """The header asks to spoof an address we never spoof (see ``SourcePolicy``)."""
        self.reason = f"source_refused:{kind}"
        self.ctx.stats.sources_refused[kind] += 1
        self.ctx.failed("source_refused", self.peer, kind=kind, client=endpoint(self.source))
        self._close(abort=True)

    def _fail(self, reason: str, detail: str) -> None:
        if self.state == _CLOSED:
            return
        self.reason = reason
        self.ctx.failed(
            reason, self.peer, error=detail, client=endpoint(self.source),
            target=endpoint(self.target),
        )  # fmt: skip
        self._close(abort=True)

    def _close(self, *, abort: bool = False) -> None:
        self.state = _CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for transport in (self.transport, self.upstream):
            if transport is not None and not transport.is_closing():
                if abort:
                    transport.abort()
                else:
                    transport.close()
