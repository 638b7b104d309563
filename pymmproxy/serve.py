"""``pymmproxy serve [--instances A,B,...]``: instances of instances.tsv in one daemon.

Every instance (or the listed ones) gets its own listener, fwmark, targets, allow list,
limits and ``instance=`` log field, all on one event loop; ``-listeners N`` forks N workers
that each run all of them (``SO_REUSEPORT``; ``auto``, the default, is one per usable CPU, or
one process when an instance is a TPROXY port range). The limit flags of ``pymmproxy`` apply to
every instance; flags that describe a single proxy (``-l``, ``-4``, ``--instance`` ...) are
refused. An instance with ``ports=FIRST-LAST`` runs in TPROXY mode (:mod:`.server.tproxy`).

SIGHUP re-reads the configuration (``RELOADING=1`` .. ``READY=1`` for systemd) and applies
it as a whole (:mod:`.server.registry`): added instances start, removed ones stop accepting
and drain, changed ones restart, untouched ones keep their connections. A broken config
(``file:line: ...``), a listed instance gone missing, an address that cannot be bound or a
lock held elsewhere rejects the reload and the old set keeps running.

With workers, the parent holds the instance locks and checks a SIGHUP's new instances
(their locks, their addresses) before the workers hear of it (:class:`ParentGate`); each
worker then reloads on its own, and worker 0 owns the TPROXY rules.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from structlog.typing import FilteringBoundLogger as BoundLogger

from pymmproxy import instancelock, logsetup
from pymmproxy.conffiles import instance_settings, load_config, resolve_config_dir
from pymmproxy.cpus import usable_cpus
from pymmproxy.daemon import Lifecycle, run_app
from pymmproxy.errors import PymmproxyError, UsageError
from pymmproxy.handoff import Handoff
from pymmproxy.instancelock import InstanceLock
from pymmproxy.instances import TSV_FLAGS
from pymmproxy.logsetup import get_logger
from pymmproxy.net.sockets import check_spoofing
from pymmproxy.notify import Notifier
from pymmproxy.server.listener import bind, status_line
from pymmproxy.server.registry import Registry, Spec
from pymmproxy.settings import Endpoint, Limits, Transport

#: Flags of the single-proxy command line that make no sense here.
_REFUSED = {**TSV_FLAGS, "instance": "--instance"}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``pymmproxy``'s own flags (limits, -v, -listeners, --config-dir) plus ``--instances``."""
    from pymmproxy.cli import build_parser, explicit  # noqa: PLC0415 - cli imports us lazily

    parser = build_parser()
    parser.prog = "pymmproxy serve"
    parser.description = "Run the instances of instances.tsv in one daemon."
    parser.add_argument("--instances", metavar="A,B,...", help="only these instances")
    for action in parser._actions:
        if action.dest in _REFUSED:
            action.help = argparse.SUPPRESS  # instances.tsv sets them: not in --help
    args = parser.parse_args(list(argv))
    if given := explicit(parser, argv, _REFUSED):  # even with its default value (-p tcp)
        flag = _REFUSED[given[0]]
        raise UsageError(f"serve runs the instances of instances.tsv: {flag} is not allowed")
    return args


def selected(text: str | None) -> list[str] | None:
    """``--instances a,b`` as a list (None: all of them)."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--instances needs at least one name")
    return list(dict.fromkeys(names))


def load_specs(
    config_dir: Path,
    names: list[str] | None,
    limits: Limits,
    listeners: int,
    metrics: Endpoint | None = None,
) -> dict[str, Spec]:
    """What to run, from the config directory (ConfigError / UsageError if broken);
    ``metrics``: the one endpoint every instance reports on."""
    config = load_config(config_dir)
    specs: dict[str, Spec] = {}
    for name in config.instances if names is None else names:
        inst = config.instance(name)
        if inst.ports is not None and listeners > 1:
            raise UsageError(
                f"instance {name} is a TPROXY port range (ports=), whose rule belongs to one "
                f"process, not to each of {listeners} workers: (re)start serve with "
                "-listeners 1 (without -listeners it picks one process for such a config)"
            )
        settings = instance_settings(inst, config.allowed_for(inst), limits)
        settings = dataclasses.replace(
            settings, listeners=listeners, metrics=metrics, limits=limits.share(listeners)
        )
        specs[name] = Spec(settings, inst.ports)
    return specs


def auto_workers(specs: dict[str, Spec], cpus: int) -> int:
    """``-listeners auto``: one worker per CPU, or one process if an instance is a TPROXY
    port range (its rule belongs to one process) or if every instance is UDP (only the
    first worker runs UDP instances: a flow table is one process's)."""
    if any(spec.ports is not None for spec in specs.values()):
        return 1
    udp_only = bool(specs) and all(s.settings.transport is Transport.UDP for s in specs.values())
    return 1 if udp_only else cpus


class Serve(Lifecycle):
    """The lifecycle of one serve process (or worker) around a :class:`Registry`."""

    def __init__(
        self,
        load: Callable[[], dict[str, Spec] | None],
        initial: dict[str, Spec],
        registry: Registry,
        *,
        notifier: Notifier | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(get_logger(), notifier, on_ready)
        self.load = load
        self.initial = initial
        self.registry = registry
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if not self.initial:
            self.log.warning("serve.no_instances")
        changes = await self.registry.apply(self.initial)
        if changes.failed and not self.respawned:  # nothing starts half: stop what did, say
            # why (one line); a worker forked again serves what it can, as its siblings do
            self.registry.close()
            await self.registry.drain()
            name, why = next(iter(changes.failed.items()))
            raise PymmproxyError(f"instance {name}: cannot start: {why}")
        self.log.info("serve.started", instances=changes.added)

    def close(self) -> None:
        self.registry.close()

    async def drain(self) -> None:
        await self.registry.drain()

    def abort(self) -> None:
        self.registry.abort()

    def dump(self) -> None:
        for listener in self.registry.listeners():
            listener.dump()

    def status(self) -> str:
        counts = [listener.counts() for listener in self.registry.listeners()]
        return f"{len(self.registry.running)} instances: {status_line(counts)}"

    def catch_up_reload(self) -> None:
        """Nothing to do: a worker forked again starts from what the parent last admitted
        (:attr:`ParentGate.specs`), not from the files, which may have changed since."""

    def reload(self) -> None:
        if self._stop.is_set():
            self.log.info("serve.reload_ignored", reason="stopping")
            return
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        self.notifier.reloading()
        self.log.info("serve.reloading")
        try:
            desired = self.load()
            if desired is None:
                self.log.info("serve.reload_ignored", reason="no config from the parent yet")
                return
            changes = await self.registry.apply(desired)
        except (PymmproxyError, OSError) as exc:  # OSError: a file we may not read, say
            kept = sorted(self.registry.running)
            self.log.error("serve.reload_failed", error=str(exc), kept=kept)  # noqa: TRY400
        else:  # an instance that failed to start is named in ``failed``, at error level
            level = self.log.error if changes.failed else self.log.info
            level("serve.reload", **dataclasses.asdict(changes))
        finally:
            self.notifier.ready()


def main(argv: Sequence[str]) -> int:
    """Entry point of ``pymmproxy serve`` (errors propagate to :func:`pymmproxy.cli.main`)."""
    from pymmproxy.cli import limits_from_args, metrics_from_args  # noqa: PLC0415 - lazily

    args = parse_args(argv)
    logsetup.configure(args.verbose, args.log_format)
    config_dir = resolve_config_dir(args.config_dir)
    names = selected(args.instances)
    limits = limits_from_args(args)
    metrics = metrics_from_args(args)
    workers: int = args.listeners or auto_workers(
        load_specs(config_dir, names, limits, 1, metrics), usable_cpus()
    )
    if metrics is not None:
        from pymmproxy.metrics import check  # noqa: PLC0415 - prometheus_client on demand

        check(metrics, workers)

    def load() -> dict[str, Spec]:
        return load_specs(config_dir, names, limits, workers, metrics)

    initial = load()
    if initial:
        check_spoofing(spec.settings.mark for spec in initial.values())
    log = get_logger()
    log.info("serve.start", config_dir=str(config_dir), instances=list(initial), workers=workers)
    gate = ParentGate(load, log, Handoff() if workers > 1 else None)
    if workers > 1:  # fail before forking; the parent holds the locks for all workers
        gate.admit(initial)

    def factory(on_ready: Callable[[], None] | None, index: int) -> Lifecycle:
        registry = Registry(
            verbosity=args.verbose, reuse_port=workers > 1, locks=workers <= 1,
            manage_rules=index == 0, udp=index == 0,
        )  # fmt: skip
        notifier = None if on_ready else Notifier()
        # a worker forked again later starts from what the workers were last told
        specs = gate.specs if workers > 1 else initial
        # with workers, a reload applies what the parent loaded (see pymmproxy.handoff)
        loader = load if gate.handoff is None else gate.handoff.take
        return Serve(loader, specs, registry, notifier=notifier, on_ready=on_ready)

    try:
        return run_app(factory, workers, log, before_reload=gate.before_reload)
    finally:
        gate.release_all()
        if gate.handoff is not None:
            gate.handoff.close()


class ParentGate:
    """What the parent of a serve with workers settles before they hear of a SIGHUP.

    The parent holds the instance locks (a worker takes none). Before it tells the workers,
    it locks the instances the new config adds and test-binds every listen address that is
    new, so the refusals it can foresee happen here, once, and no worker applies a reload
    the others refuse for them: an instance already running elsewhere (a ``pymmproxy@NAME``
    unit, which would otherwise share its ``SO_REUSEPORT`` port) or an address another
    program holds. Locks of removed instances are let go as the workers are told. The
    workers apply the very config the parent admitted (:mod:`pymmproxy.handoff`), not the
    files as they are by then; a config that does not load is not passed on. What changes
    after this check (a port taken in between) can still make a worker refuse; it logs
    ``serve.reload_failed`` and the next SIGHUP settles it.
    """

    def __init__(
        self, load: Callable[[], dict[str, Spec]], log: BoundLogger, handoff: Handoff | None = None
    ) -> None:
        self.load, self.log = load, log
        self.handoff = handoff  # where the workers take an admitted config from
        self.specs: dict[str, Spec] = {}  # what the workers were last told to run
        self.held: dict[str, InstanceLock] = {}

    def admit(self, specs: dict[str, Spec]) -> list[str]:
        """Lock the names not held yet and test-bind the addresses not served yet, or
        neither (PymmproxyError): at start for every instance, on SIGHUP for what is new.
        Returns the names it locked."""
        known = {spec.key for spec in self.specs.values()}
        new = self.take(specs)
        try:
            for name, spec in specs.items():
                if spec.key not in known:
                    try:
                        bind(spec.settings, reuse_port=False).close()  # (see daemon.run)
                    except PymmproxyError as exc:
                        raise PymmproxyError(f"instance {name}: {exc}") from None
        except BaseException:
            self.drop(new)
            raise
        self.specs = specs
        return new

    def take(self, names: Iterable[str]) -> list[str]:
        """Lock every name not held yet (the ones it locked), or none (PymmproxyError)."""
        new: list[str] = []
        try:
            for name in names:
                if name in self.held:
                    continue
                self.held[name] = instancelock.require(name)
                new.append(name)
        except BaseException:
            self.drop(new)
            raise
        return new

    def drop(self, names: Iterable[str]) -> None:
        for name in names:
            self.held.pop(name).release()

    def before_reload(self) -> bool:
        """True if the workers may reload (see the class docstring); False, logged, if not."""
        old = self.specs
        try:
            specs = self.load()
            new = self.admit(specs)
        except (PymmproxyError, OSError) as exc:  # OSError: a file we may not read, say
            refused = str(exc)
        else:
            try:  # handed over first: only then is it the workers' (and new workers') config
                if self.handoff is not None:
                    self.handoff.publish(specs)
            except OSError as exc:
                self.drop(new)
                self.specs = old
                refused = f"cannot hand it to the workers: {exc}"
            else:
                self.drop([name for name in self.held if name not in specs])
                return True
        self.log.error("serve.reload_failed", error=f"{refused}; kept the running config")
        return False

    def release_all(self) -> None:
        self.drop(list(self.held))
