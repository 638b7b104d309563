"""Per-client upstream sockets of the UDP proxy: an LRU flow table with idle expiry and a cap.

A flow is one connected, transparent UDP socket bound to the client's address and port. The
table is an ``OrderedDict`` used as an LRU list: every datagram (either direction) moves its
flow to the end, so the front is always the flow idle the longest. That makes both idle
expiry (a periodic sweep pops from the front until it meets a live flow) and eviction at the
client cap (pop the front) O(1) per flow, with no timer per flow or per datagram.

Upstream sockets are watched with ``loop.add_reader`` rather than wrapped in transports:
creating a flow stays synchronous (no task, no await while later datagrams queue up), and a
reply costs one callback and one ``recv``.
"""

from __future__ import annotations

import asyncio
from _socket import socket as RawSocket  # noqa: N812 - what connect_upstream makes
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

#: Largest UDP payload.
MAX_DATAGRAM = 65535


class Flow:
    """One client's upstream socket and where its replies go."""

    __slots__ = ("key", "sock", "send", "lb", "via", "last", "client", "target")

    def __init__(
        self,
        key: Hashable,
        sock: RawSocket,
        *,
        lb: Any,  # noqa: ANN401 - the listener's peer address tuple
        client: tuple[str, int] | None,
        target: tuple[str, int],
        now: float,
    ) -> None:
        self.key = key
        self.sock = sock
        self.send = sock.send
        self.lb = lb
        #: ``sendmsg`` ancillary data naming the address to answer from (wildcard
        #: listeners, see pymmproxy.net.pktinfo); None: the kernel picks
        self.via: list[tuple[int, int, bytes]] | None = None
        self.last = now
        self.client = client
        self.target = target


def watch_again(
    loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[..., object], *args: object
) -> None:
    """Watch ``fd`` again after its socket reported an error.

    libuv stops watching a socket that polled as failed (POLLERR: an ICMP port unreachable
    from a target that was down for a moment) before it calls us, whichever call then
    consumed the error: without this the socket's later datagrams would never be read. (One
    re-arm per error: ``recv`` and ``send`` clear it.)
    """
    loop.remove_reader(fd)
    loop.add_reader(fd, callback, *args)


Deliver = Callable[[memoryview, "Flow"], None]
OnError = Callable[[Flow, OSError], None]


class FlowTable:
    """The flows of one listener, keyed by client address (see the module doc)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        close_after: float,
        max_clients: int,
        deliver: Deliver,
        on_error: OnError,
    ) -> None:
        self.loop = loop
        self.time = loop.time
        self.close_after = close_after
        self.max_clients = max(1, max_clients)
        self.flows: OrderedDict[Hashable, Flow] = OrderedDict()
        self.deliver = deliver
        self.on_error = on_error
        #: One receive buffer for every flow: a reply is read into it and handed on as a
        #: memoryview slice, so no per-datagram 64 KiB allocation.
        self._buffer = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buffer)
        self.opened = 0
        self.expired = 0
        self.evicted = 0
        self.replies = 0
        self.reply_bytes = 0
        #: Sweep period: fine enough for short ``close_after`` values, at most once a second.
        self.tick = max(0.05, min(1.0, close_after / 10))
        self._timer: asyncio.TimerHandle | None = loop.call_later(self.tick, self._sweep)

    def __len__(self) -> int:
        return len(self.flows)

    def add(
        self,
        key: Hashable,
        sock: RawSocket,
        lb: Any,  # noqa: ANN401
        client: tuple[str, int] | None,
        target: tuple[str, int],
    ) -> tuple[Flow, Flow | None]:
        """Track a new flow; returns it and the flow evicted to make room (already closed)."""
        evicted = self.evict_oldest() if len(self.flows) >= self.max_clients else None
        flow = Flow(key, sock, lb=lb, client=client, target=target, now=self.loop.time())
        self.loop.add_reader(sock.fileno(), self._readable, flow)
        self.flows[key] = flow
        self.opened += 1
        return flow, evicted

    def evict_oldest(self) -> Flow | None:
        """Close the flow idle the longest (out of descriptors: make room); None if none."""
        if not self.flows:
            return None
        _, flow = self.flows.popitem(last=False)
        self._close(flow)
        self.evicted += 1
        return flow

    def _readable(self, flow: Flow) -> None:
        """Forward one reply of the target to the flow's load balancer.

        One ``recv`` per wake-up: the poll is level-triggered, so a second queued reply
        simply wakes us again, and the common case saves the ``EAGAIN`` call that draining
        until empty would cost.
        """
        try:
            size = flow.sock.recv_into(self._buffer)
        except BlockingIOError:
            return
        except OSError as exc:  # e.g. ECONNREFUSED: ICMP port unreachable from the target
            self.on_error(flow, exc)
            self.rearm(flow)
            return
        self.replies += 1
        self.reply_bytes += size
        flow.last = self.time()
        self.flows.move_to_end(flow.key)  # a closed flow has no reader, so it is present
        self.deliver(self._view[:size], flow)

    def rearm(self, flow: Flow) -> None:
        """Watch ``flow``'s socket again after it reported an error (:func:`watch_again`),
        whether the ``recv`` here or a ``send`` of the listener consumed it: else a target
        restart would leave the flow's later replies unread until it expires, which it
        never does while the client keeps sending."""
        watch_again(self.loop, flow.sock.fileno(), self._readable, flow)

    def _sweep(self) -> None:
        """Close the flows idle for at least ``close_after`` seconds, oldest first."""
        # ``last`` is exact (loop time of the last datagram), so nothing closes early; a flow
        # closes at most one tick after its deadline.
        limit = self.loop.time() - self.close_after
        flows = self.flows
        while flows:
            flow = next(iter(flows.values()))
            if flow.last > limit:
                break
            del flows[flow.key]
            self._close(flow)
            self.expired += 1
        self._timer = self.loop.call_later(self.tick, self._sweep)

    def _close(self, flow: Flow) -> None:
        try:
            self.loop.remove_reader(flow.sock.fileno())
        finally:
            flow.sock.close()

    def close(self) -> int:
        """Stop the sweep and close every flow; returns how many were open."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        count = len(self.flows)
        while self.flows:
            _, flow = self.flows.popitem()
            self._close(flow)
        return count
