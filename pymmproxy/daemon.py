"""Daemon lifecycle: bind -> READY -> serve -> (SIGTERM) stop accepting -> drain -> exit 0.

Signals are delivered to the event loop (``loop.add_signal_handler``), never polled:

* SIGTERM / SIGINT: close the listener, tell systemd ``STOPPING=1``, let open connections
  finish for up to the drain timeout, then abort the rest. A second signal aborts at once.
* SIGHUP: ask the reload callback for a new allow list (and verbosity); a failing reload
  keeps the old one and logs why.

With ``-listeners N`` (N > 1) the process forks N workers after all imports (copy-on-write
memory), each with its own ``SO_REUSEPORT`` listener; the parent relays signals, reports
READY once every worker is bound, and exits with the worst worker status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import uvloop

from pymmproxy.errors import PymmproxyError
from pymmproxy.logsetup import get_logger
from pymmproxy.net.sockets import listen_socket
from pymmproxy.notify import Notifier
from pymmproxy.policy import AllowList
from pymmproxy.server.context import InstanceContext
from pymmproxy.server.tcp import ClientProtocol
from pymmproxy.server.udp import UdpListener, serve_udp
from pymmproxy.settings import InstanceSettings, Transport

STATUS_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class Reloaded:
    """What SIGHUP may change without dropping connections."""

    allow: AllowList


Reloader = Callable[[], Reloaded]


class Daemon:
    """One listener (one worker process) and its connections."""

    def __init__(
        self,
        settings: InstanceSettings,
        *,
        verbosity: int = 0,
        reloader: Reloader | None = None,
        notifier: Notifier | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.verbosity = verbosity
        self.reloader = reloader
        self.notifier = notifier or Notifier(environ={})
        self.on_ready = on_ready
        self.log = get_logger(instance=settings.name) if settings.name else get_logger()
        self._stop = asyncio.Event()
        self._signals = 0
        self.ctx: InstanceContext | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.ctx = InstanceContext(self.settings, loop)
        ctx.verbosity = self.verbosity
        udp = self.settings.transport is Transport.UDP
        sock = listen_socket(
            self.settings.listen,
            kind=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM,
            reuse_port=self.settings.listeners > 1,
        )
        # UDP has nothing to drain: close() shuts the listener and every flow at once.
        server: asyncio.AbstractServer | UdpListener = (
            await serve_udp(ctx, sock)
            if udp
            else await loop.create_server(lambda: ClientProtocol(ctx), sock=sock)
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        loop.add_signal_handler(signal.SIGUSR1, self._on_dump)
        self.log.info(
            "daemon.listening",
            listen=str(self.settings.listen),
            proto=str(self.settings.transport),
            target4=_str(self.settings.target4),
            target6=_str(self.settings.target6),
            mark=self.settings.mark,
            allow=ctx.allow.describe(),
            pid=os.getpid(),
        )
        if self.on_ready is not None:
            self.on_ready()
        self.notifier.ready()
        ticker = loop.create_task(self._tick())
        try:
            await self._stop.wait()
            server.close()
            self.notifier.stopping()
            await self._drain(ctx)
        finally:
            ticker.cancel()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(signum)

    async def _drain(self, ctx: InstanceContext) -> None:
        timeout = self.settings.limits.drain_timeout
        self.log.info("daemon.draining", open=len(ctx.conns), timeout=timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.idle.wait(), timeout)
        left = len(ctx.conns)
        for conn in list(ctx.conns):
            conn.transport.abort()
        await asyncio.sleep(0)
        self.log.info("daemon.stopped", aborted=left, accepted=ctx.stats.accepted)

    def _on_stop(self, signum: int) -> None:
        self._signals += 1
        self.log.info("daemon.signal", signal=signal.Signals(signum).name)
        if self._signals > 1 and self.ctx is not None:
            for conn in list(self.ctx.conns):
                conn.transport.abort()
        self._stop.set()

    def _on_dump(self) -> None:
        """SIGUSR1: one ``daemon.stats`` line with the counters and connection states."""
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

    def _on_reload(self) -> None:
        if self.reloader is None or self.ctx is None:
            self.log.info("daemon.reload", changed=False)
            return
        try:
            new = self.reloader()
        except PymmproxyError as exc:
            self.log.error(  # noqa: TRY400 - an expected config error, no traceback
                "daemon.reload_failed", error=str(exc), kept=self.ctx.allow.describe()
            )
            return
        self.ctx.allow = new.allow
        self.log.info("daemon.reload", allow=new.allow.describe())

    async def _tick(self) -> None:
        ctx = self.ctx
        assert ctx is not None  # noqa: S101 - set in run() before the ticker starts
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            ctx.flush_suppressed()
            stats = ctx.stats
            self.notifier.status(
                f"{stats.active} active, {stats.accepted} accepted, "
                f"{sum(stats.rejected.values())} rejected, {sum(stats.errors.values())} failed"
            )


def run(
    settings: InstanceSettings,
    *,
    verbosity: int = 0,
    reloader: Reloader | None = None,
) -> int:
    """Run the daemon (in-process, or as N forked workers); returns the exit status."""
    notifier = Notifier()
    workers = settings.listeners
    # Bind once up front so a bad listen address fails before forking, with one line.
    kind = socket.SOCK_DGRAM if settings.transport is Transport.UDP else socket.SOCK_STREAM
    listen_socket(settings.listen, kind=kind, reuse_port=workers > 1).close()
    if workers <= 1:
        daemon = Daemon(settings, verbosity=verbosity, reloader=reloader, notifier=notifier)
        uvloop.run(daemon.run())
        return 0
    return _run_workers(settings, workers, verbosity, reloader, notifier)


def _run_workers(
    settings: InstanceSettings,
    workers: int,
    verbosity: int,
    reloader: Reloader | None,
    notifier: Notifier,
) -> int:
    log = get_logger(instance=settings.name) if settings.name else get_logger()
    ready_r, ready_w = os.pipe()
    pids: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # worker
            os.close(ready_r)

            def ready(fd: int = ready_w) -> None:
                os.write(fd, b"1")
                os.close(fd)

            daemon = Daemon(settings, verbosity=verbosity, reloader=reloader, on_ready=ready)
            code = 0
            try:
                uvloop.run(daemon.run())
            except PymmproxyError as exc:
                sys.stderr.write(f"pymmproxy: {exc}\n")
                code = exc.exit_code
            os._exit(code)
        pids.append(pid)
    os.close(ready_w)

    def forward(signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            notifier.stopping()
        for child in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    got = 0
    while got < workers:
        chunk = os.read(ready_r, workers)
        if not chunk:
            break
        got += len(chunk)
    os.close(ready_r)
    if got == workers:
        notifier.ready()
        log.info("daemon.workers_ready", workers=workers)
    worst = 0
    for child in pids:
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        worst = max(worst, code if code >= 0 else 128 - code)
    return worst


def _str(value: object | None) -> str | None:
    return None if value is None else str(value)
