"""One TCP connection from the load balancer: allow list -> header -> connect -> relay.

The client side is an ``asyncio.Protocol`` (driven by a
:class:`~pymmproxy.net.channel.ClientSide` in the instance's reactor) that parses the PROXY
header from its first ``data_received`` calls (pure parser, no I/O), then builds the
transparent upstream socket by hand (:class:`pymmproxy.net.upstream.Upstream`, in the same
reactor): no task and no loop handle per connection. Bytes that arrive while the target is
still connecting are buffered (reading pauses only past ``MAX_EARLY_BYTES``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pymmproxy.errors import ProtocolError, UpstreamError
from pymmproxy.net.channel import ClientSide
from pymmproxy.net.relay import endpoint, os_reason
from pymmproxy.net.sockets import connect_upstream
from pymmproxy.net.upstream import Upstream
from pymmproxy.proxyproto import Transport, parse_header
from pymmproxy.server.context import (
    IDLE_CHECKS,
    LOCAL_KEYS,
    VERSION_KEYS,
    InstanceContext,
    pick_target,
)

_HEADER, _CONNECTING, _RELAY, _CLOSED = range(4)
MAX_EARLY_BYTES = 256 * 1024  # buffered while connecting before the client is paused
_STREAM = Transport.STREAM


class ClientProtocol(asyncio.Protocol):
    """The load balancer's connection; owns the upstream for its whole life."""

    __slots__ = (
        "ctx", "transport", "buf", "state", "timer", "upstream", "pending", "paused",
        "client_eof", "up_eof", "early_up", "down", "started", "connect_started",
        "source", "target", "reason", "idle_mark", "idle_checks",
    )  # fmt: skip

    def __init__(self, ctx: InstanceContext) -> None:
        self.ctx = ctx
        self.buf = b""
        self.state = _HEADER
        self.timer: asyncio.TimerHandle | None = None
        self.upstream: Upstream | None = None  # set once connected
        self.pending: Upstream | None = None  # while connecting
        self.paused = False
        self.client_eof = False
        self.up_eof = False
        self.early_up = 0  # bytes this protocol sent up itself (the channels count the rest)
        self.down = 0  # bytes down, kept here once the upstream is dropped
        self.source: str | None = None  # the spoofed client, "host:port" (a str is lighter)
        self.target: tuple[str, int] | None = None
        self.reason = "done"
        self.idle_mark = 0
        self.idle_checks = 0

    # -- accept and header ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ctx = self.ctx
        self.transport: ClientSide = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")  # accept()'s address: never None
        # Only timed when something reads it (a float per idle connection otherwise).
        self.started = time.monotonic() if ctx.timed else 0.0
        ctx.stats.accepted += 1
        if not ctx.allow.allows(peer[0]):
            refused = "not_allowed"
        elif ctx.max_connections and ctx.stats.active >= ctx.max_connections:
            refused = "over_limit"
        elif ctx.max_pending_headers and ctx.stats.pending_headers >= ctx.max_pending_headers:
            refused = "pending_limit"  # e.g. slowloris: new connections go, old ones stay
        else:
            refused = ""
        if refused:
            self.state = _CLOSED
            ctx.reject(refused, peer)
            self.transport.abort()
            return
        ctx.opened(self)
        ctx.stats.pending_headers += 1
        self.timer = ctx.loop.call_later(ctx.header_timeout, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:  # (relaying channels skip this: ClientSide.peer)
            self.early_up += len(data)
            upstream.write(data)
            return
        if self.state != _HEADER:  # connecting: keep what arrives, within reason
            self.buf += data
            if len(self.buf) > MAX_EARLY_BYTES and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            return
        buf = self.buf + data if self.buf else data
        try:
            parsed = parse_header(buf, max_v2_length=self.ctx.max_header_size)
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
        except ProtocolError as exc:  # a UNIX-family PROXY header, or not over STREAM
            self._fail_header(exc)
        except UpstreamError as exc:
            self._fail(exc.reason, str(exc))
            if exc.reason == "out_of_resources" and self.ctx.on_exhausted is not None:
                self.ctx.on_exhausted(str(exc))  # the next ones wait in the backlog

    def _connect(self, header: Any) -> None:  # noqa: ANN401 - proxyproto.Header
        ctx = self.ctx
        stats = ctx.stats
        if stats.header_wait is not None:
            stats.header_wait.observe(time.monotonic() - self.started)
        source = header.relayable_source
        if source is not None and header.transport is not _STREAM:  # DGRAM, UNSPEC
            name = header.transport.name
            raise ProtocolError(f"PROXY over TCP needs transport STREAM, got {name}", "not_stream")
        if source is None:
            stats.versions[LOCAL_KEYS[header.version, header.command]] += 1
        lb_host = self.peer[0] if source is None else ""  # only LOCAL headers look at it
        family, target = pick_target(source, *self.targets(header), lb_host=lb_host)
        self.source = endpoint(source)
        self.target = target
        if source is not None:
            stats.versions[VERSION_KEYS[header.version]] += 1
            if ctx.sources is not None and (kind := ctx.sources.refuses(source[0])):
                self._refuse_source(kind)
                return
        if stats.connect_time is not None:
            self.connect_started = time.monotonic()
        sock, connected = connect_upstream(
            family, target, source, ctx.mark, keepalive=ctx.keepalive
        )
        self.state = _CONNECTING
        upstream = self.pending = Upstream(sock, ctx.reactor, self)
        if not connected:
            self.timer = ctx.loop.call_later(ctx.connect_timeout, self._connect_timeout)
        upstream.start(connected=connected)

    @property
    def bytes_up(self) -> int:
        """Bytes relayed to the target so far."""
        return self.early_up + self.transport.count

    @property
    def bytes_down(self) -> int:
        """Bytes relayed back to the load balancer so far."""
        return self.down if self.upstream is None else self.upstream.count

    @property
    def peer(self) -> Any:  # noqa: ANN401 - (host, port, ...) as accept() returned it
        """The load balancer's address (kept by the transport, not per connection here)."""
        return self.transport.get_extra_info("peername")

    def targets(self, header: Any) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:  # noqa: ANN401
        """The (IPv4, IPv6) targets for ``header``; TPROXY instances map them per port."""
        del header
        return self.ctx.target4, self.ctx.target6

    @property
    def state_name(self) -> str:
        """Where the connection is: header, connecting, relay or closed."""
        return ("header", "connecting", "relay", "closed")[self.state]

    # -- called by Upstream -------------------------------------------------------------
    def upstream_made(self, upstream: Upstream) -> None:
        """The target accepted: flush what arrived meanwhile and start relaying."""
        ctx = self.ctx
        self.pending = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.state == _CLOSED:
            upstream.abort()
            return
        hist = ctx.stats.connect_time
        if hist is not None:
            hist.observe(time.monotonic() - self.connect_started)
        self.upstream = upstream
        self.state = _RELAY
        ctx.stats.relayed += 1
        # From now on each side's bytes go straight to the other (Channel.peer).
        upstream.peer = self.transport
        self.transport.peer = upstream
        if self.buf:
            self.early_up += len(self.buf)
            upstream.write(self.buf)
            self.buf = b""
        if self.client_eof:
            upstream.write_eof()
        elif self.paused:
            self.paused = False
            if not upstream.paused_peer:  # else the upstream resumes it once it drains
                self.transport.resume_reading()

    def upstream_eof(self) -> None:
        self.up_eof = True
        if self.client_eof:
            self._close()  # both directions done: close() sends the FIN, no shutdown needed
        else:
            self.transport.write_eof()

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.state == _CLOSED:  # our own _close() let it go: it decides how we close
            return
        if exc is not None:
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
            if self.up_eof:
                self._close()  # both directions done
            else:
                upstream.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_header()
        if exc is not None and self.state == _RELAY:
            self.reason = os_reason(exc, before_data=False)
        self._close(abort=exc is not None)
        if self in self.ctx.conns:  # else rejected before it was counted
            self.ctx.closed(self)
        # Break the protocol <-> upstream cycle so both go by reference counting, not by
        # the cyclic GC (an upstream still flushing keeps itself alive through the reactor).
        if self.upstream is not None:
            self.down = self.upstream.count
        self.upstream = self.pending = None

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
            # Bytes queued all that time: a peer that stopped reading would hold a graceful
            # close (and our buffers) open for good. Else a FIN each way.
            self._close(abort=self._stuck())

    def _stuck(self) -> bool:
        """Either side holds bytes its peer has not taken."""
        up = self.upstream
        return self.transport.unsent() > 0 or (up is not None and up.unsent() > 0)

    # -- failure and teardown --------------------------------------------------------------
    def abort(self) -> None:
        """Reset both sides now (the drain ran out, or a second stop signal)."""
        if self.reason == "done":  # its conn.closed line must not read like a normal end
            self.reason = "aborted"
        self._close(abort=True, force=True)

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
        if self.state == _CONNECTING:
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
        self.ctx.failed("source_refused", self.peer, kind=kind, client=self.source)
        self._close(abort=True)

    def _fail(self, reason: str, detail: str) -> None:
        if self.state == _CLOSED:
            return
        self.reason = reason
        self.ctx.failed(
            reason, self.peer, error=detail, client=self.source,
            target=endpoint(self.target),
        )  # fmt: skip
        self._close(abort=True)

    def _close(self, *, abort: bool = False, force: bool = False) -> None:
        self.state = _CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending = self.pending
        if pending is not None:
            self.pending = None
            pending.abort()
        # A side still flushing after a graceful close is left to finish, except when forced
        # (a second stop signal, the drain's end): then nothing waits for a slow peer.
        for side in (self.transport, self.upstream):
            if side is None or side.closed:
                continue
            if force:
                side.abort()
            elif not side.is_closing():
                if abort:
                    side.abort()
                else:
                    side.close()
