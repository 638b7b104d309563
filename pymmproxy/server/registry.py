"""The set of instances one ``pymmproxy serve`` process runs, changed as a whole.

:meth:`Registry.apply` moves from the running set to a desired one in two phases. First
everything that can fail: instance locks for new names, listening sockets for new
addresses, TPROXY rules. If any of it fails, what was prepared is undone and the error is
raised: the old set keeps running untouched. Then the switch, which cannot fail:

* removed instances stop accepting and drain in the background (``drain_timeout``);
* changed instances (listen address, targets, mark, limits, ports) are restarted: the old
  listener stops accepting and drains, a new one starts. A listening socket whose address
  stays is handed over (duplicated), so connections queued in it are not refused;
* an instance whose allow list alone changed gets the new list in place;
* untouched instances (and all open connections) are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from pymmproxy import instancelock
from pymmproxy.errors import PymmproxyError
from pymmproxy.instancelock import InstanceLock
from pymmproxy.logsetup import get_logger
from pymmproxy.net.sockets import IP_TRANSPARENT, IPV6_TRANSPARENT, SOL_IP, SOL_IPV6
from pymmproxy.policy import AllowList
from pymmproxy.server.listener import Listener, bind, log_allow
from pymmproxy.settings import Endpoint, InstanceSettings, Transport

SocketKey = tuple[Transport, Endpoint]


@dataclass(frozen=True, slots=True)
class Spec:
    """What one instance runs: its settings and, in TPROXY mode, its port range."""

    settings: InstanceSettings
    ports: tuple[int, int] | None = None

    @property
    def key(self) -> SocketKey:
        return self.settings.transport, self.settings.listen

    def same_but_allow(self, other: Spec) -> bool:
        """Equal apart from the allow list (which can change in place)."""
        return replace(self.settings, allowed=None) == replace(other.settings, allowed=None) and (
            self.ports == other.ports
        )


@dataclass(slots=True)
class _Running:
    spec: Spec
    listener: Listener
    lock: InstanceLock | None = None


@dataclass(slots=True)
class Changes:
    """What one :meth:`Registry.apply` did, by instance name."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    allow_updated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # added/restarted: name -> why not


class Registry:
    """Running instances, their listening sockets, locks and TPROXY rules."""

    def __init__(
        self, *, verbosity: int = 0, reuse_port: bool = False, locks: bool = True,
        manage_rules: bool = True, backend: str = "auto", udp: bool = True,
    ) -> None:  # fmt: skip
        self.verbosity = verbosity
        self.reuse_port = reuse_port
        self.locks = locks  # take instance locks (off in forked workers: the parent holds them)
        self.manage_rules = manage_rules  # install/remove TPROXY rules (one worker does)
        self.backend = backend
        #: run UDP instances (one worker does: a flow table is not shared between processes)
        self.udp = udp
        self.running: dict[str, _Running] = {}
        #: instances whose start failed, with the lock they keep (as a parent with workers
        #: keeps it): tried again at the next apply, released once the config drops them
        self.failed: dict[str, InstanceLock | None] = {}
        self.draining: list[Listener] = []
        self._sockets: dict[SocketKey, socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self.log = get_logger()

    def listeners(self) -> list[Listener]:
        return [r.listener for r in self.running.values()] + self.draining

    async def apply(self, desired: Mapping[str, Spec]) -> Changes:
        """Make the running set ``desired`` (PymmproxyError: nothing changed)."""
        async with self._lock:
            return await self._apply(desired)

    async def _apply(self, desired: Mapping[str, Spec]) -> Changes:
        if not self.udp:
            desired = {
                n: s for n, s in desired.items() if s.settings.transport is not Transport.UDP
            }
        old = self.running
        changes = Changes()
        for name, spec in desired.items():
            if name not in old:
                changes.added.append(name)
            elif not old[name].spec.same_but_allow(spec):
                changes.restarted.append(name)
            elif old[name].spec != spec:
                changes.allow_updated.append(name)
        changes.removed = [name for name in old if name not in desired]
        starting = changes.added + changes.restarted
        locks, sockets = self._prepare(desired, changes.added, starting)
        try:
            self._sync_rules(desired, starting, changes.removed)
        except PymmproxyError:
            self._release_new(locks)
            for sock in sockets.values():
                sock.close()
            raise
        self._sockets.update(sockets)
        for name in list(self.failed):  # tried again below, or dropped from the config
            lock = self.failed.pop(name)
            if name not in desired and lock is not None:
                lock.release()
        for name in changes.allow_updated:
            running = old[name]
            running.spec = desired[name]
            if running.listener.ctx is not None:
                running.listener.ctx.allow = AllowList(desired[name].settings.allowed)
                log_allow(running.listener.log, "daemon.reload", running.listener.ctx.allow)
        for name in [n for n in old if n in desired and n not in starting]:
            ctx = old[name].listener.ctx  # kept instances: the host's addresses may have changed
            if ctx is not None:
                ctx.refresh_own_addresses()
        for name in changes.restarted:
            if (held := old[name].lock) is not None:
                locks[name] = held
        for name in changes.removed + changes.restarted:
            self._retire(old[name], release=name in changes.removed)
            del old[name]
        for name in starting:
            error = await self._start(name, desired[name], locks.get(name))
            if error is not None:
                changes.failed[name] = error
        self._drop_rules([n for n in changes.failed if desired[n].ports is not None])
        used = {running.spec.key for running in self.running.values()}
        for key in [k for k in self._sockets if k not in used]:
            self._sockets.pop(key).close()
        return changes

    def _prepare(
        self, desired: Mapping[str, Spec], added: list[str], starting: list[str]
    ) -> tuple[dict[str, InstanceLock], dict[SocketKey, socket.socket]]:
        """Locks for new names and sockets for new addresses (all or nothing)."""
        locks: dict[str, InstanceLock] = {}
        sockets: dict[SocketKey, socket.socket] = {}
        try:
            for name in added if self.locks else ():
                held = self.failed.get(name)  # still ours since its start failed
                locks[name] = held if held is not None else instancelock.require(name)
            for name in starting:
                spec = desired[name]
                sock = self._sockets.get(spec.key) or sockets.get(spec.key)
                if sock is None:
                    try:
                        sock = bind(spec.settings, reuse_port=self.reuse_port)
                    except PymmproxyError as exc:
                        raise PymmproxyError(f"instance {name}: {exc}") from None
                    sockets[spec.key] = sock
                if spec.ports is not None:
                    v6 = sock.family == socket.AF_INET6  # (IPv4 alone for [::] without IPv6)
                    level, option = (SOL_IPV6, IPV6_TRANSPARENT) if v6 else (SOL_IP, IP_TRANSPARENT)
                    try:
                        sock.setsockopt(level, option, 1)
                    except OSError as exc:
                        raise PymmproxyError(
                            f"instance {name}: cannot make {spec.settings.listen} transparent "
                            f"for ports=: {exc.strerror or exc} (need CAP_NET_ADMIN, or root)"
                        ) from None
        except BaseException:
            self._release_new(locks)
            for sock in sockets.values():
                sock.close()
            raise
        return locks, sockets

    def _release_new(self, locks: Mapping[str, InstanceLock]) -> None:
        """Release the locks :meth:`_prepare` took (not those kept from a failed start)."""
        for name, lock in locks.items():
            if self.failed.get(name) is not lock:
                lock.release()

    def _sync_rules(
        self, desired: Mapping[str, Spec], starting: list[str], removed: list[str]
    ) -> None:
        """Install the TPROXY rules of starting instances, remove those of stopping ones."""
        if not self.manage_rules:
            return
        old = self.running
        install = {n: p for n in starting if (p := desired[n].ports) is not None}
        drop = [n for n in removed if old[n].spec.ports is not None]
        drop += [n for n in starting if n in old and old[n].spec.ports and n not in install]
        if install or drop:
            self._apply_rules(desired, install, drop)

    def _drop_rules(self, names: list[str]) -> None:
        """Remove the TPROXY rules of instances that are not running after all."""
        if not names or not self.manage_rules:
            return
        try:
            self._apply_rules({}, {}, names)
        except PymmproxyError as exc:
            self.log.error("serve.tproxy_rule_failed", error=str(exc))  # noqa: TRY400

    def _apply_rules(
        self, desired: Mapping[str, Spec], install: Mapping[str, tuple[int, int]], drop: list[str]
    ) -> None:
        """Install ``install``'s port ranges for those instances, remove ``drop``'s rules."""
        from pymmproxy.pathway import tproxy  # noqa: PLC0415 - netlink/nft only when needed

        rules = {n: tproxy.rules_for(n, desired[n].settings.listen, p) for n, p in install.items()}
        for change in tproxy.apply(rules, drop, backend=self.backend):
            self.log.info("serve.tproxy_rule", change=change)

    async def _start(self, name: str, spec: Spec, lock: InstanceLock | None) -> str | None:
        """Start ``name``; on failure (out of descriptors, a taken metrics port ...) log and
        return why. It is then not running: its socket and context are closed, it keeps its
        lock (:attr:`failed`), and the next reload tries it again as a new instance."""
        listener = Listener(spec.settings, verbosity=self.verbosity, ports=spec.ports)
        try:
            await listener.start(self._sockets[spec.key].dup())
        except (PymmproxyError, OSError) as exc:
            error = str(exc)
            listener.log.error("serve.start_failed", error=error)  # noqa: TRY400
            self.failed[name] = lock
            return error
        self.running[name] = _Running(spec, listener, lock)
        return None

    def _retire(self, running: _Running, *, release: bool) -> None:
        """Stop accepting and drain in the background."""
        listener = running.listener
        listener.close()
        if release and running.lock is not None:
            running.lock.release()
        self.draining.append(listener)
        task = asyncio.get_running_loop().create_task(
            listener.drain(running.spec.settings.limits.drain_timeout)
        )
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._drained(t, listener))

    def _drained(self, task: asyncio.Task[None], listener: Listener) -> None:
        self._tasks.discard(task)
        with contextlib.suppress(ValueError):
            self.draining.remove(listener)

    def close(self) -> None:
        """Stop accepting everywhere (and remove this process's TPROXY rules)."""
        for running in self.running.values():
            running.listener.close()
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        try:
            self._sync_rules({}, [], list(self.running))
        except PymmproxyError as exc:
            self.log.error("serve.tproxy_rule_failed", error=str(exc))  # noqa: TRY400

    async def drain(self) -> None:
        """Drain every instance at once, then release the locks."""
        drains = [
            r.listener.drain(r.spec.settings.limits.drain_timeout) for r in self.running.values()
        ]
        await asyncio.gather(*drains, *self._tasks)
        for running in self.running.values():
            if running.lock is not None:
                running.lock.release()
        for lock in self.failed.values():
            if lock is not None:
                lock.release()
        self.failed.clear()

    def abort(self) -> None:
        for listener in self.listeners():
            listener.abort()
