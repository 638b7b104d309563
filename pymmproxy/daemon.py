"""Process lifecycle: bind -> READY -> serve -> (SIGTERM) stop accepting -> drain -> exit 0.

:class:`Lifecycle` is the part every daemon shares; :class:`Daemon` runs one listener
(flags or ``--instance``), ``pymmproxy serve`` many (:mod:`pymmproxy.serve`). Signals are
delivered to the event loop (``loop.add_signal_handler``), never polled:

* SIGTERM / SIGINT: stop accepting, tell systemd ``STOPPING=1``, let open connections
  finish for up to the drain timeout, then abort the rest. A second signal aborts at once,
  unless it comes within ``REPEAT_WINDOW`` of the first: a worker may get one stop twice
  (from systemd's or a terminal's signal to the whole group, and from its parent).
* SIGHUP: reload (for one listener: ask the reload callback for a new allow list); a
  failing reload keeps the old state and logs why.
* SIGUSR1: one ``daemon.stats`` line per listener.

With ``-listeners N`` (N > 1; the default ``auto`` is one per usable CPU) the process forks N
workers after all imports (copy-on-write memory), each with its own ``SO_REUSEPORT``
listeners; the parent relays signals, reports READY once every worker is bound, and exits
with the worst worker status.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import gc
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import uvloop
from structlog.typing import FilteringBoundLogger as BoundLogger

from pymmproxy.errors import PymmproxyError
from pymmproxy.handoff import Handoff
from pymmproxy.logsetup import get_logger
from pymmproxy.net.sockets import check_spoofing, raise_nofile_limit
from pymmproxy.notify import Notifier
from pymmproxy.policy import AllowList
from pymmproxy.server.context import InstanceContext
from pymmproxy.server.listener import Listener, bind, log_allow, status_line
from pymmproxy.settings import InstanceSettings

STATUS_INTERVAL = 5.0
REPEAT_WINDOW = 1.0  # s: a stop signal this soon after the first is the same stop
RESPAWN_LIMIT = 5  # workers forked again within RESPAWN_WINDOW before the daemon gives up
RESPAWN_WINDOW = 60.0
PR_SET_PDEATHSIG = 1  # prctl(2)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: what the parent of workers handles (forwards, or wakes up for)
_FORWARDED = (*_STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)


@dataclass(frozen=True, slots=True)
class Reloaded:
    """What SIGHUP may change without dropping connections."""

    allow: AllowList
    #: fields of the instance's line that changed too but need a restart (listen, mark ...)
    restart_needed: tuple[str, ...] = ()


#: None: nothing to reload (a worker's SIGHUP before its parent handed any config over)
Reloader = Callable[[], Reloaded | None]
#: Builds the app of one process: ``factory(on_ready, worker_index)``.
AppFactory = Callable[[Callable[[], None] | None, int], "Lifecycle"]


class Lifecycle(abc.ABC):
    """Signals, readiness, the STATUS ticker and the stop/drain sequence of one process."""

    def __init__(
        self,
        log: BoundLogger,
        notifier: Notifier | None,
        on_ready: Callable[[], None] | None,
    ) -> None:
        self.log = log
        self.notifier = notifier or Notifier(environ={})
        self.on_ready = on_ready
        #: set in forked workers: passes each STATUS line to the parent, which sums them up
        self.report_status: Callable[[str], None] | None = None
        #: set in a worker forked again after SIGHUPs: :meth:`catch_up_reload` once started
        self.catch_up = False
        #: set in a worker forked again (its siblings kept serving): a start that is only
        #: partly possible must not stop the daemon now
        self.respawned = False
        self._stop = asyncio.Event()
        self._first_stop: float | None = None  # monotonic time of the first stop signal

    @abc.abstractmethod
    async def start(self) -> None:
        """Bind and start serving (raise PymmproxyError to fail the start)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop accepting new connections."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait for open connections (bounded), then abort the rest."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Reset every open connection now."""

    @abc.abstractmethod
    def reload(self) -> None:
        """SIGHUP."""

    @abc.abstractmethod
    def dump(self) -> None:
        """SIGUSR1."""

    def catch_up_reload(self) -> None:
        """A worker forked again after SIGHUPs: do what the others did (reload), unless
        the factory already built this app from the state they reloaded to."""
        self.reload()

    @abc.abstractmethod
    def status(self) -> str:
        """One line for systemd's STATUS= (called every STATUS_INTERVAL seconds)."""

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Stop signals are ours before the listener is bound: a SIGTERM that comes while
        # it starts (the port already accepts into its backlog) stops it cleanly once
        # started, instead of the default action killing it.
        for signum in _STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_stop, signum)
        ticker: asyncio.Task[None] | None = None
        try:
            await self.start()
            if self.catch_up:
                self.catch_up_reload()
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            loop.add_signal_handler(signal.SIGUSR1, self.dump)
            if not self._stop.is_set():
                if self.on_ready is not None:
                    self.on_ready()
                self.notifier.ready()
                ticker = loop.create_task(self._tick())
            await self._stop.wait()
            self.close()
            self.notifier.stopping()
            await self.drain()
        finally:
            if ticker is not None:
                ticker.cancel()
            for signum in (*_STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(signum)

    def _on_stop(self, signum: int) -> None:
        now = time.monotonic()
        if self._first_stop is None:
            self._first_stop = now
        elif now - self._first_stop >= REPEAT_WINDOW:  # asked again: don't wait any longer
            self.abort()
        self._stop.set()  # first: nothing below may keep the process from stopping
        self.log.info("daemon.signal", signal=signal.Signals(signum).name)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            line = self.status()
            self.notifier.status(line)
            if self.report_status is not None:
                self.report_status(line)


class Daemon(Lifecycle):
    """One listener (one worker process) and its connections."""

    def __init__(
        self,
        settings: InstanceSettings,
        *,
        verbosity: int = 0,
        reloader: Reloader | None = None,
        notifier: Notifier | None = None,
        on_ready: Callable[[], None] | None = None,
        forwarded: list[Reloaded] | None = None,
    ) -> None:
        log = get_logger(instance=settings.name) if settings.name else get_logger()
        super().__init__(log, notifier, on_ready)
        self.settings = settings
        self.verbosity = verbosity
        self.reloader = reloader
        #: with workers: what the parent loaded when it last forwarded a SIGHUP (see run())
        self.forwarded = forwarded if forwarded is not None else []
        self.listener = Listener(settings, verbosity=verbosity)

    @property
    def ctx(self) -> InstanceContext | None:
        return self.listener.ctx

    async def start(self) -> None:
        await self.listener.start(bind(self.settings, reuse_port=self.settings.listeners > 1))

    def close(self) -> None:
        self.listener.close()

    async def drain(self) -> None:
        await self.listener.drain(self.settings.limits.drain_timeout)

    def abort(self) -> None:
        self.listener.abort()

    def dump(self) -> None:
        self.listener.dump()

    def status(self) -> str:
        return status_line([self.listener.counts()])

    def reload(self) -> None:
        ctx = self.ctx
        if self.reloader is None or ctx is None:
            self.log.info("daemon.reload", changed=False)
            return
        try:
            new = self.reloader()
        except (PymmproxyError, OSError) as exc:
            self.log.error(  # noqa: TRY400 - an expected config error, no traceback
                "daemon.reload_failed", error=str(exc), kept=ctx.allow.describe()
            )
            return
        if new is None:
            self.log.info("daemon.reload_ignored", reason="no config from the parent yet")
            return
        self._apply(ctx, new)

    def catch_up_reload(self) -> None:
        """Take what the parent loaded at the last SIGHUP, not the file as it is now (it may
        have changed since without a SIGHUP); if that load failed, the others kept the
        start-up state, and so does this worker."""
        if self.forwarded and self.ctx is not None:
            self._apply(self.ctx, self.forwarded[-1])

    def _apply(self, ctx: InstanceContext, new: Reloaded) -> None:
        ctx.allow = new.allow
        ctx.refresh_own_addresses()
        log_allow(self.log, "daemon.reload", new.allow)
        if new.restart_needed:
            self.log.warning(
                "daemon.restart_needed", changed=list(new.restart_needed),
                hint="SIGHUP only reloads the allow list; restart the instance for these",
            )  # fmt: skip


def run(
    settings: InstanceSettings,
    *,
    verbosity: int = 0,
    reloader: Reloader | None = None,
) -> int:
    """Run the daemon (in-process, or as N forked workers); returns the exit status."""
    workers = settings.listeners
    settings = dataclasses.replace(settings, limits=settings.limits.share(workers))
    # Bind once up front so a bad listen address fails before forking, with one line; without
    # SO_REUSEPORT, so that a port another program serves with it is refused, not shared.
    bind(settings, reuse_port=False).close()
    check_spoofing([settings.mark])
    if settings.metrics is not None:  # and every worker's metrics port
        from pymmproxy.metrics import check  # noqa: PLC0415 - prometheus_client on demand

        check(settings.metrics, workers)
    log = get_logger(instance=settings.name) if settings.name else get_logger()
    forwarded: list[Reloaded] = []  # the parent's load at the last SIGHUP, for new workers
    # With workers the parent loads once and hands that to each (see pymmproxy.handoff).
    handoff = Handoff() if workers > 1 and reloader is not None else None

    def before_reload() -> bool:
        if reloader is None or handoff is None:
            return True
        try:
            loaded = reloader()
            if loaded is not None:
                handoff.publish(loaded)
        except (PymmproxyError, OSError) as exc:  # the workers keep what they run
            log.error("daemon.reload_failed", error=str(exc))  # noqa: TRY400
            return False
        forwarded[:] = [] if loaded is None else [loaded]  # published: now it is theirs
        return True

    def factory(on_ready: Callable[[], None] | None, _index: int) -> Lifecycle:
        notifier = None if on_ready else Notifier()
        return Daemon(
            settings, verbosity=verbosity, notifier=notifier, on_ready=on_ready,
            reloader=reloader if handoff is None else handoff.take, forwarded=forwarded,
        )  # fmt: skip

    try:
        return run_app(factory, workers, log, before_reload=before_reload)
    finally:
        if handoff is not None:
            handoff.close()


def run_app(
    factory: AppFactory,
    workers: int,
    log: BoundLogger,
    *,
    before_reload: Callable[[], bool] | None = None,
) -> int:
    """Run ``factory``'s app in this process (``workers <= 1``) or in N forked workers;
    with workers, ``before_reload`` runs in the parent on SIGHUP: False keeps it from them."""
    # Everything alive now (modules, config) lives until exit: move it out of the cyclic
    # GC's sight, so collections only walk what connections allocate, and forked workers
    # do not dirty (copy) the shared pages by touching GC headers.
    gc.collect()
    gc.freeze()
    raise_nofile_limit()
    if workers <= 1:
        uvloop.run(factory(None, 0).run())
        return 0
    return _run_workers(factory, workers, log, Notifier(), before_reload)


def _run_workers(
    factory: AppFactory,
    workers: int,
    log: BoundLogger,
    notifier: Notifier,
    before_reload: Callable[[], bool] | None = None,
) -> int:
    """Fork the workers; relay signals to them; READY once all are bound; sum their STATUS.

    Workers write one line per event into a shared pipe (``ready I`` / ``status I TEXT``;
    each line is far below PIPE_BUF, so writes never interleave). A worker that exits while
    the daemon is not stopping is logged and forked again (one that never got ready, or
    more than ``RESPAWN_LIMIT`` in ``RESPAWN_WINDOW``, stops the daemon with its status
    instead, so the supervisor sees the failure). The parent returns once every worker has
    exited, with the worst status of the final ones.
    """
    pipe_r, pipe_w = os.pipe()
    import ctypes  # noqa: PLC0415 - only with workers; before forking, so they share it

    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    children: dict[int, int] = {}  # pid -> worker index
    ready: set[str] = set()
    statuses: dict[str, str] = {}
    reloads: list[int] = []  # SIGHUPs for the loop below (before_reload locks and logs)
    state = _Supervision()
    respawns: list[float] = []  # when workers were forked again

    def forward(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            reloads.append(signum)  # not here: a handler can interrupt a log call or itself
            return
        if signum == signal.SIGCHLD:  # its byte on the wake-up fd is all we need
            return
        if signum in _STOP_SIGNALS:
            state.stopping = True
            notifier.stopping()
        _signal_all(list(children), signum)

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def spawn(index: int, *, again: bool = False) -> None:
        # Signals wait while the worker is forked and registered: a stop that came first
        # reaches it below, one that comes meanwhile is forwarded to it once unblocked, and
        # the child never runs the parent's handlers (it sets its own, then unblocks).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:  # the worker: none of the parent's signal plumbing
                signal.set_wakeup_fd(-1)
                for fd in (pipe_r, wake_r, wake_w):
                    os.close(fd)
                _worker_main(
                    factory, index, pipe_w, prctl, parent, catch_up=state.reloaded,
                    again=again, mask=mask,
                )  # fmt: skip
            children[pid] = index
            if state.stopping:
                _signal_all([pid], signal.SIGTERM)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    # The parent's handlers come first: a stop signal while the workers are forked must
    # not kill it (status -15) with workers already listening; spawn() passes the stop on.
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for signum in _FORWARDED:
        signal.signal(signum, forward)  # (USR1 would kill us)
    for index in range(workers):
        spawn(index)

    def on_line(line: str) -> None:
        kind, _, rest = line.partition(" ")
        worker, _, text = rest.partition(" ")
        if kind == "ready":
            ready.add(worker)
            if len(ready) == workers and not state.announced:
                state.announced = True
                notifier.ready()
                log.info("daemon.workers_ready", workers=workers)
        elif kind == "status":
            statuses[worker] = text
            notifier.status("; ".join(f"w{i}: {t}" for i, t in sorted(statuses.items())))

    def stop_all(code: int) -> None:
        state.stopping, state.worst = True, max(state.worst, code)
        notifier.stopping()
        _signal_all(list(children), signal.SIGTERM)

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            index = children.pop(pid, None)
            if index is None:
                continue
            code = _exit_code(status)
            if state.stopping:
                state.worst = max(state.worst, code)
                continue
            was_ready = str(index) in ready
            ready.discard(str(index))
            statuses.pop(str(index), None)
            now = time.monotonic()
            respawns[:] = [t for t in respawns if now - t < RESPAWN_WINDOW]
            if not was_ready or len(respawns) >= RESPAWN_LIMIT:
                why = "before it was ready"
                if was_ready:
                    why = f"{RESPAWN_LIMIT} restarts in {RESPAWN_WINDOW:.0f}s"
                log.error("daemon.worker_exited", worker=index, status=code, action="stop", why=why)
                stop_all(code or 1)
                continue
            log.error("daemon.worker_exited", worker=index, status=code, action="restart")
            respawns.append(now)
            spawn(index, again=True)

    def on_wake() -> bool:
        reap()
        # A worker ignores SIGHUP until its loop takes it over: hold reloads until all are up.
        while reloads and len(ready) == workers and not state.stopping:
            reloads.clear()
            if before_reload is None or _may_reload(before_reload, log):
                state.reloaded = True
                _signal_all(list(children), signal.SIGHUP)
        return bool(children)

    try:
        _read_lines(pipe_r, wake_r, on_line, on_wake)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for fd in (pipe_r, pipe_w, wake_r, wake_w):
            os.close(fd)
    return state.worst


@dataclass(slots=True)
class _Supervision:
    """What the parent of the workers knows besides its children."""

    stopping: bool = False  # a stop was forwarded: exits are expected now
    announced: bool = False  # READY=1 went out (once, not again after a restart)
    reloaded: bool = False  # a SIGHUP was forwarded: a worker forked again catches up
    worst: int = 0  # the worst exit status of the workers that ended the daemon


def _worker_main(
    factory: AppFactory,
    index: int,
    pipe: int,
    prctl: Any,  # noqa: ANN401 - a ctypes function
    parent: int,
    *,
    catch_up: bool,
    again: bool,
    mask: Iterable[int],
) -> None:
    """A forked worker: run its app, then leave with ``os._exit`` (never return). Signals
    arrive blocked; ``mask`` is the signal mask to restore once its handlers are set."""
    # Until the worker's loop takes SIGTERM over (the parent forwards it at once), it ends
    # the worker quietly: nothing is relayed yet, and the default action would make the
    # parent report a worker killed by SIGTERM (exit status 143).
    signal.signal(signal.SIGTERM, _exit_before_start)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _die_with_parent(prctl, parent)
    code = 0
    try:
        app = _worker_app(factory, index, pipe)
        app.catch_up, app.respawned = catch_up, again
        uvloop.run(app.run())
    except PymmproxyError as exc:
        sys.stderr.write(f"pymmproxy: {exc}\n")
        code = exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the worker's loop took SIGINT over
        code = 130
    except BaseException:  # noqa: BLE001 - never unwind into the parent's frames
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _exit_code(status: int) -> int:
    """A wait status as a shell would show it (killed by signal N: 128 + N)."""
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _exit_before_start(_signum: int, _frame: object) -> None:
    os._exit(0)


def _signal_all(pids: list[int], signum: int) -> None:
    for child in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)


def _may_reload(before_reload: Callable[[], bool], log: BoundLogger) -> bool:
    """``before_reload()``; an unexpected error refuses the reload instead of ending the
    parent (and with it every worker)."""
    try:
        return before_reload()
    except Exception as exc:  # noqa: BLE001 - logged; the workers keep serving
        error = f"{type(exc).__name__}: {exc}"
    log.error("daemon.reload_failed", error=f"{error}; the workers were not told")
    return False


def _read_lines(
    pipe: int, wake: int, on_line: Callable[[str], None], on_wake: Callable[[], bool]
) -> None:
    """Hand each line of the workers' ``pipe`` to ``on_line``; call ``on_wake`` after each
    wake-up (a signal's byte on ``wake``, or lines that may have made it possible), outside
    any signal handler, until it returns False (or the pipe's writers are all gone)."""
    poller = select.poll()  # not select(): descriptors past 1024 (a lock per instance)
    poller.register(pipe, select.POLLIN)
    poller.register(wake, select.POLLIN)
    pending = b""
    while on_wake():
        ready = {fd for fd, _ in poller.poll()}
        if wake in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake, 512):
                    pass
        if pipe in ready:
            chunk = os.read(pipe, 65536)
            if not chunk:
                return
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                on_line(line.decode("utf-8", "replace"))


def _die_with_parent(prctl: Any, parent: int) -> None:  # noqa: ANN401 - a ctypes function
    """Have the kernel SIGTERM this worker (drain, then exit) when the parent dies.

    Without it a SIGKILLed parent leaves its workers serving the ``SO_REUSEPORT`` port
    beside whatever is started next.
    """
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_app(factory: AppFactory, index: int, pipe: int) -> Lifecycle:
    """The app of worker ``index``, reporting readiness and status lines into ``pipe``."""

    def send(line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(pipe, line.replace("\n", " ")[:1000].encode() + b"\n")

    app = factory(lambda: send(f"ready {index}"), index)
    app.report_status = lambda text: send(f"status {index} {text}")
    return app
