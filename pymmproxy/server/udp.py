"""``-p udp``: PROXY v2 DGRAM datagrams from the load balancer, relayed per client.

Every datagram from the load balancer (LB) must start with a PROXY v2 header (v1 is TCP
only); the rest is the client's payload. Per client address in the header there is one
transparent upstream socket (see :mod:`.udpflows`), bound to the client's address and port
and connected to the target, so the service sees the real client.

Replies follow go-mmproxy (``udp.go``): whatever the target sends on a flow's socket is
written, as is -- no PROXY header is added -- from the listening socket to the LB address
that carried the client's datagrams. go-mmproxy remembers the LB of a flow's *first*
datagram; this module uses the LB of its *latest* one, which is the same with one LB and
follows a client that moves to another LB. A wildcard listener (``0.0.0.0``, ``[::]``)
answers from the address the LB sent to (``IP_PKTINFO``, see :mod:`pymmproxy.net.pktinfo`);
go-mmproxy lets the kernel pick, which on a host with several addresses can be another one,
and an LB that checks where answers come from drops those. Like go-mmproxy:

* LOCAL datagrams are relayed without spoofing (the kernel picks our address), on one
  socket per LB, to the target of the LB's address family; they are counted and logged at
  a bounded rate.
* A flow is idle once no datagram has passed in either direction for ``-close-after``
  seconds; it is then closed (go-mmproxy closes after one to two periods, we within one
  sweep tick).
* The allow list is applied to the LB's address; refused and malformed datagrams are
  dropped, counted and logged at a bounded rate.

Differences on purpose: the target family follows the *client's* address (as for TCP), so a
v6 client behind a v4 LB reaches ``-6`` (go-mmproxy picks by the LB's family and fails to
bind); the number of flows is capped (``--udp-max-clients``), evicting the flow idle the
longest, so a flood of spoofed headers cannot exhaust file descriptors.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Hashable
from typing import Any

from pymmproxy.errors import ProtocolError, PymmproxyError, UpstreamError
from pymmproxy.logsetup import RateLimiter
from pymmproxy.net import pktinfo
from pymmproxy.net.relay import endpoint
from pymmproxy.net.sockets import upstream_socket
from pymmproxy.proxyproto import (
    SIGNATURE,
    V1_PREFIX,
    Command,
    Family,
    Header,
    Transport,
    parse_header,
)
from pymmproxy.server.context import InstanceContext
from pymmproxy.server.udpflows import MAX_DATAGRAM, Flow, FlowTable, watch_again

_INET_PROXY_DGRAM = 0x12  # family INET, transport DGRAM
_INET6_PROXY_DGRAM = 0x22
_V2_PROXY = 0x21  # version 2, command PROXY
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4-mapped
READ_BATCH = 64  # datagrams read per wake-up of a wildcard listener at most


class UdpListener(asyncio.DatagramProtocol):
    """The listening socket's protocol: allow list -> header -> flow -> upstream send."""

    def __init__(self, ctx: InstanceContext, sock: socket.socket) -> None:
        self.ctx = ctx
        #: Replies go straight out of the listening socket (non-blocking): a full send
        #: buffer drops the reply, as a busy link would, instead of queueing it.
        self.sock = sock
        self._sendto = sock.sendto
        self._sendmsg = sock.sendmsg
        #: A wildcard listener reads with recvmsg and answers from the address the LB sent
        #: to: what that needs, for the datagram being handled (None: the kernel picks).
        self._via: pktinfo.Ancillary | None = None
        self._reply_from = pktinfo.ReplyFrom()
        self._reading = False
        limits = ctx.settings.limits
        self.table = FlowTable(
            ctx.loop,
            close_after=limits.udp_close_after,
            max_clients=limits.udp_max_clients,
            deliver=self._deliver,
            on_error=self._flow_error,
        )
        self.flows = self.table.flows
        self.time = ctx.loop.time
        self.transport: asyncio.DatagramTransport | None = None
        self.datagrams = 0
        self.payload_bytes = 0
        self.dropped_replies = 0
        self._local_log = RateLimiter(burst=5, period=10.0)
        self._source_log = RateLimiter(burst=5, period=10.0)
        self._stats_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._stats_timer = self.ctx.loop.call_later(1.0, self._flush_stats)

    def read_own(self) -> None:
        """Read the socket with ``recvmsg`` (wildcard listeners) instead of a transport."""
        if not pktinfo.enable(self.sock):
            self.ctx.log.warning(
                "udp.not_transparent", note="replies to route-only local addresses (AnyIP) "
                "leave from the kernel's choice of address (no CAP_NET_ADMIN)",
            )  # fmt: skip
        self.ctx.loop.add_reader(self.sock.fileno(), self._readable)
        self._reading = True
        self._stats_timer = self.ctx.loop.call_later(1.0, self._flush_stats)

    def _readable(self) -> None:
        """Read what has queued (up to ``READ_BATCH`` datagrams), each with its local address."""
        recvmsg, reply_from = self.sock.recvmsg, self._reply_from
        for _ in range(READ_BATCH):
            try:
                data, ancdata, _, addr = recvmsg(MAX_DATAGRAM, pktinfo.ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error_received(exc)
                watch_again(self.ctx.loop, self.sock.fileno(), self._readable)
                return
            self._via = reply_from(ancdata)
            self.datagram_received(data, addr)

    # -- load balancer -> target -----------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Any) -> None:  # noqa: ANN401
        if not self.ctx.allow.allows(addr[0]):
            self.ctx.reject("not_allowed", addr)
            return
        # Fast path: a known client behind a v2 PROXY DGRAM header without TLVs. The key is
        # the raw source address and port bytes, which is what _route() builds for new flows.
        if len(data) >= 28 and data[12] == _V2_PROXY and data[14] == 0:
            ft = data[13]
            key, used = None, 0
            if ft == _INET_PROXY_DGRAM and data[15] == 12:
                key, used = data[16:20] + data[24:26], 28
            elif ft == _INET6_PROXY_DGRAM and data[15] == 36 and len(data) >= 52:
                if data[16:28] == _MAPPED_PREFIX:  # an IPv4 client: keyed as one (_route)
                    key, used = data[28:32] + data[48:50], 52
                else:
                    key, used = data[16:32] + data[48:50], 52
            if key is not None and data[:12] == SIGNATURE:
                flow = self.flows.get(key)
                if flow is not None:
                    self.flows.move_to_end(key)
                    flow.last = self.time()
                    flow.lb = addr
                    flow.via = self._via
                    try:
                        flow.send(data[used:])
                    except OSError as exc:
                        self._send_failed(flow, exc)
                    else:
                        self.datagrams += 1
                        self.payload_bytes += len(data) - used
                    return
        self._slow_path(data, addr)

    def _slow_path(self, data: bytes, addr: Any) -> None:  # noqa: ANN401
        """Full parse: new clients, LOCAL, TLVs, and everything that gets dropped."""
        ctx = self.ctx
        if data.startswith(V1_PREFIX):  # before parsing: any v1 line, whatever its protocol
            self._bad_header(addr, "v1_over_udp", "PROXY v1 is TCP only")
            return
        try:
            parsed = parse_header(data, max_v2_length=ctx.max_header_size)
        except ProtocolError as exc:
            self._bad_header(addr, exc.kind, str(exc))
            return
        if parsed is None:
            self._bad_header(addr, "truncated", f"{len(data)} bytes")
            return
        header, used = parsed
        key, source, target = self._route(header, addr)
        if target is None:
            return
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open(key, source, target, addr)
            if flow is None:
                return
        else:
            self.flows.move_to_end(key)
            flow.last = ctx.loop.time()
            flow.lb = addr
        flow.via = self._via
        self._send(flow, data[used:])

    def _route(
        self,
        header: Header,
        addr: Any,  # noqa: ANN401
    ) -> tuple[Hashable, tuple[str, int] | None, tuple[str, int] | None]:
        """Flow key, source to spoof and target of a parsed header (target None: dropped)."""
        ctx = self.ctx
        if header.command is Command.LOCAL:
            if ctx.verbosity >= 1 or self._local_log.allow():
                ctx.log.info("udp.local", lb=endpoint(addr), note="relayed without spoofing")
            # Like go-mmproxy: a dotted LB address (also ::ffff:a.b.c.d) picks the v4 target.
            chosen = ctx.local_target("." not in addr[0])
            if chosen is None:
                ctx.failed("no_target", addr, error="no target for LOCAL datagrams")
                return None, None, None
            return ("local", addr[0], addr[1]), None, chosen[1]
        if header.transport != Transport.DGRAM or header.family not in (Family.INET, Family.INET6):
            got = f"{header.family.name}/{header.transport.name}"
            self._bad_header(addr, "not_dgram", f"PROXY over UDP needs INET/INET6 DGRAM, got {got}")
            return None, None, None
        source = header.relayable_source  # never None for PROXY over INET/INET6
        v6 = source is not None and ":" in source[0]  # (an IPv4-mapped source is IPv4)
        target = ctx.target6 if v6 else ctx.target4
        if source is None or target is None:
            ctx.failed("no_target", addr, client=endpoint(source), error=f"no -{6 if v6 else 4}")
            return None, None, None
        if ctx.sources is not None and (kind := ctx.sources.refuses(source[0])):
            ctx.stats.sources_refused[kind] += 1
            ctx.failed("source_refused", addr, kind=kind, client=endpoint(source))
            return None, None, None
        family = socket.AF_INET6 if v6 else socket.AF_INET
        key = socket.inet_pton(family, source[0]) + source[1].to_bytes(2, "big")
        return key, source, target

    def _bad_header(self, addr: Any, kind: str, error: str) -> None:  # noqa: ANN401
        """Drop a datagram whose header is unusable: counted by kind, as for TCP."""
        self.ctx.stats.header_errors[kind] += 1
        self.ctx.failed("bad_header", addr, kind=kind, error=error)

    def _open(
        self,
        key: Hashable,
        source: tuple[str, int] | None,
        target: tuple[str, int],
        addr: Any,  # noqa: ANN401
    ) -> Flow | None:
        ctx = self.ctx
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        try:
            sock = upstream_socket(family, target, source, ctx.mark, kind=socket.SOCK_DGRAM)
        except UpstreamError as exc:
            # Out of descriptors (or memory): the flow idle the longest makes room, as the
            # cap would; one per new client, so a shortage cannot empty the table.
            evicted = self.table.evict_oldest() if exc.reason == "out_of_resources" else None
            if evicted is None:
                ctx.failed(exc.reason, addr, client=endpoint(source), error=str(exc))
                return None
            self._evicted(evicted)
            try:
                sock = upstream_socket(family, target, source, ctx.mark, kind=socket.SOCK_DGRAM)
            except UpstreamError as again:
                ctx.failed(again.reason, addr, client=endpoint(source), error=str(again))
                return None
        flow, evicted = self.table.add(key, sock, addr, source, target)
        if evicted is not None:
            self._evicted(evicted)
        ctx.stats.accepted += 1
        ctx.stats.versions["v2" if source is not None else "v2-local"] += 1  # per flow
        if ctx.verbosity >= 2:
            ctx.log.info(
                "udp.flow", lb=endpoint(addr), client=endpoint(source), target=endpoint(target)
            )
        return flow

    def _evicted(self, flow: Flow) -> None:
        self.ctx.reject("udp_evicted", flow.lb, client=endpoint(flow.client), flows=len(self.table))

    def _send(self, flow: Flow, payload: bytes) -> None:
        try:
            flow.send(payload)
        except OSError as exc:
            self._send_failed(flow, exc)
        else:
            self.datagrams += 1
            self.payload_bytes += len(payload)

    def _send_failed(self, flow: Flow, exc: OSError) -> None:
        if isinstance(exc, BlockingIOError):  # socket buffer full: drop, like a busy link
            self.ctx.failed("upstream_busy", flow.lb, client=endpoint(flow.client))
        else:  # (a send that consumed the socket's error: its POLLERR may stop the reader)
            self._flow_error(flow, exc)
            self.table.rearm(flow)

    # -- target -> load balancer -----------------------------------------------------------
    def _deliver(self, data: memoryview, flow: Flow) -> None:
        via = flow.via
        try:
            if via is None:
                self._sendto(data, flow.lb)
            else:
                self._sendmsg((data,), via, 0, flow.lb)
        except BlockingIOError:
            self.dropped_replies += 1
            self.table.reply_bytes -= len(data)  # counted as relayed when it was read
        except OSError as exc:
            if via is not None and exc.errno in pktinfo.NOT_A_SOURCE:
                self._source_refused(flow, via, exc)
                self._deliver(data, flow)  # (via is None now: the kernel picks)
                return
            self.table.reply_bytes -= len(data)
            # EMSGSIZE: an IPv6 target's reply can be longer (65527 B) than the IPv4 datagram
            # an IPv4 LB takes (65507 B); the LB itself is fine.
            reason = "reply_too_large" if exc.errno == errno.EMSGSIZE else "lb_unreachable"
            self.ctx.failed(reason, flow.lb, client=endpoint(flow.client), error=str(exc))

    def _source_refused(self, flow: Flow, via: pktinfo.Ancillary, exc: OSError) -> None:
        """The kernel will not send from the address the LB used (it was removed since, or
        the socket is not transparent): answer this flow from the kernel's pick until its
        next datagram, and ask for that address anew next time."""
        self._reply_from.forget(via)
        flow.via = None
        if self.ctx.verbosity >= 1 or self._source_log.allow():
            self.ctx.log.warning(
                "udp.reply_source", lb=endpoint(flow.lb), error=exc.strerror or str(exc),
                note="answered from the kernel's choice of address",
            )  # fmt: skip

    def _flow_error(self, flow: Flow, exc: OSError) -> None:
        reason = "target_refused" if exc.errno == errno.ECONNREFUSED else "upstream_io"
        self.ctx.failed(reason, flow.lb, client=endpoint(flow.client), error=str(exc))

    def error_received(self, exc: Exception) -> None:
        self.ctx.failed("lb_unreachable", None, error=str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    # -- lifecycle -------------------------------------------------------------------------
    def _flush_stats(self) -> None:
        self._collect()
        self._stats_timer = self.ctx.loop.call_later(1.0, self._flush_stats)

    def _collect(self) -> None:
        """Move the hot-path counters into ``ctx.stats`` (once a second and at close)."""
        stats, table = self.ctx.stats, self.table
        stats.relayed += self.datagrams
        stats.bytes_up += self.payload_bytes
        stats.bytes_down += table.reply_bytes
        stats.active = len(table)
        self.datagrams = self.payload_bytes = table.reply_bytes = 0
        if self.dropped_replies:
            stats.errors["reply_dropped"] += self.dropped_replies
            self.dropped_replies = 0

    def close(self) -> int:
        """Close the listener and every flow; returns how many flows were open."""
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        self._collect()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        elif self._reading:
            self._reading = False
            self.ctx.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        closed = self.table.close()
        self.ctx.stats.active = 0
        return closed


async def serve_udp(ctx: InstanceContext, sock: socket.socket) -> UdpListener:
    """Start relaying datagrams arriving on the bound UDP socket ``sock``.

    A specific listen address uses the event loop's datagram transport; a wildcard one is
    read with ``recvmsg``, to learn each datagram's local address (see the module doc).
    """
    if pktinfo.is_wildcard(sock):
        protocol = UdpListener(ctx, sock)
        try:
            protocol.read_own()
        except OSError as exc:
            protocol.close()  # its flow table's timer; the caller closes the socket
            what = f"cannot read local addresses on {ctx.settings.listen}: {exc.strerror or exc}"
            raise PymmproxyError(what) from None
        return protocol
    _, protocol = await ctx.loop.create_datagram_endpoint(lambda: UdpListener(ctx, sock), sock=sock)
    return protocol
