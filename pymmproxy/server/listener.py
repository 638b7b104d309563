"""One instance's listener: serve on a bound socket, stop accepting, drain, report.

Shared by the single-instance daemon (:mod:`pymmproxy.daemon`) and ``pymmproxy serve``
(one ``Listener`` per instance, see :mod:`pymmproxy.server.registry`). A listener owns the
socket it is started with; callers that want to keep a listening socket across a restart
pass a ``dup()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import Counter
from typing import Any

from pymmproxy.logsetup import get_logger
from pymmproxy.net.acceptor import Acceptor
from pymmproxy.net.sockets import listen_socket
from pymmproxy.policy import AllowList
from pymmproxy.server.context import InstanceContext
from pymmproxy.server.tcp import ClientProtocol
from pymmproxy.server.tproxy import TproxyProtocol
from pymmproxy.server.udp import UdpListener, serve_udp
from pymmproxy.settings import InstanceSettings, Transport


def log_allow(log: Any, event: str, allow: AllowList, **fields: Any) -> None:  # noqa: ANN401
    """Log ``event`` with the allow list in force: at warning level when it refuses every
    load balancer (an emptied file), which an operator should not learn from the LB."""
    (log.warning if allow.denies_all else log.info)(event, allow=allow.describe(), **fields)


def bind(
    settings: InstanceSettings, *, reuse_port: bool, transparent: bool = False
) -> socket.socket:
    """The instance's listening socket (PymmproxyError with one line if it cannot bind)."""
    kind = socket.SOCK_DGRAM if settings.transport is Transport.UDP else socket.SOCK_STREAM
    return listen_socket(
        settings.listen, kind=kind, reuse_port=reuse_port, transparent=transparent,
        keepalive=settings.limits.keepalive,  # every accepted socket inherits it
    )  # fmt: skip


class Listener:
    """The server and connections of one instance in this process."""

    def __init__(
        self,
        settings: InstanceSettings,
        *,
        verbosity: int = 0,
        ports: tuple[int, int] | None = None,
    ) -> None:
        self.settings = settings
        self.verbosity = verbosity
        self.ports = ports  # a TPROXY port range: targets follow the destination port
        self.log = get_logger(instance=settings.name) if settings.name else get_logger()
        self.ctx: InstanceContext | None = None
        self._server: Acceptor | UdpListener | None = None
        self.aborted = 0  # connections reset by abort() (a second stop signal, the drain's end)

    async def start(self, sock: socket.socket) -> InstanceContext:
        """Serve on ``sock`` (bound, and listening for TCP); the listener owns it now."""
        loop = asyncio.get_running_loop()
        try:
            ctx = self.ctx = InstanceContext(self.settings, loop)  # (may fail: --metrics)
            ctx.verbosity = self.verbosity
            if self.settings.transport is Transport.UDP:
                # UDP has nothing to drain: close() shuts the listener and every flow.
                self._server = await serve_udp(ctx, sock)
            elif self.ports is not None:
                ports = self.ports
                self._server = Acceptor(
                    sock, ctx.reactor, lambda: TproxyProtocol(ctx, ports), self.log
                )
            else:
                self._server = Acceptor(sock, ctx.reactor, lambda: ClientProtocol(ctx), self.log)
            if isinstance(self._server, Acceptor):
                ctx.on_exhausted = self._server.pause
        except BaseException:
            sock.close()
            if self.ctx is not None:  # made before the failure: its timers, metrics, reactor
                self.ctx.close()
                self.ctx = None
            raise
        settings = self.settings
        log_allow(
            self.log,
            "daemon.listening",
            ctx.allow,
            listen=str(settings.listen),
            proto=str(settings.transport),
            target4=_str(settings.target4),
            target6=_str(settings.target6),
            mark=settings.mark,
            pid=os.getpid(),
            **({"tproxy_ports": f"{self.ports[0]}-{self.ports[1]}"} if self.ports else {}),
        )
        return ctx

    @property
    def open_connections(self) -> int:
        return 0 if self.ctx is None else len(self.ctx.conns)

    def close(self) -> None:
        """Stop accepting (idempotent); open connections keep running."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.ctx is not None:
            self.ctx.on_exhausted = None

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the open connections, then abort the rest."""
        self.close()
        ctx = self.ctx
        if ctx is None:
            return
        self.log.info("daemon.draining", open=len(ctx.conns), timeout=timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.idle.wait(), timeout)
        self.abort()
        await asyncio.sleep(0)
        ctx.close()
        self.log.info("daemon.stopped", aborted=self.aborted, accepted=ctx.stats.accepted)

    def abort(self) -> None:
        """Reset every open connection at once (counted for ``daemon.stopped``)."""
        if self.ctx is not None:
            conns = list(self.ctx.conns)
            # (a connection reset just now leaves the set at the next loop iteration)
            self.aborted += sum(not conn.transport.closed for conn in conns)
            for conn in conns:
                conn.abort()

    def dump(self) -> None:
        """One ``daemon.stats`` line with the counters and connection states."""
        if self.ctx is None:
            return
        stats = self.ctx.stats
        states = Counter(getattr(conn, "state_name", "?") for conn in self.ctx.conns)
        self.log.info(
            "daemon.stats",
            active=stats.active,
            pending_headers=stats.pending_headers,
            accepted=stats.accepted,
            relayed=stats.relayed,
            bytes_up=stats.bytes_up,
            bytes_down=stats.bytes_down,
            rejected=dict(stats.rejected),
            errors=dict(stats.errors),
            states=dict(states),
        )

    def counts(self) -> tuple[int, int, int, int]:
        """``(active, accepted, rejected, failed)``; also flushes suppressed-log counts."""
        ctx = self.ctx
        if ctx is None:
            return 0, 0, 0, 0
        ctx.flush_suppressed()
        stats = ctx.stats
        rejected, failed = sum(stats.rejected.values()), sum(stats.errors.values())
        return stats.active, stats.accepted, rejected, failed


def status_line(counts: list[tuple[int, int, int, int]]) -> str:
    """The systemd ``STATUS=`` text for the summed counts of some listeners."""
    active, accepted, rejected, failed = (sum(c[i] for c in counts) for i in range(4))
    return f"{active} active, {accepted} accepted, {rejected} rejected, {failed} failed"


def _str(value: object | None) -> str | None:
    return None if value is None else str(value)
