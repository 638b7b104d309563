"""Instances from ``instances.tsv``: ``pymmproxy --instance NAME`` and ``pymmproxy instances``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from pymmproxy import daemon, instancelock
from pymmproxy.conffiles import (
    Config,
    Instance,
    instance_settings,
    load_config,
    resolve_config_dir,
)
from pymmproxy.errors import ArgParser, ConfigError, PymmproxyError, UsageError
from pymmproxy.logsetup import get_logger
from pymmproxy.policy import AllowList

#: Flags of the single-proxy command line that instances.tsv sets (refused with
#: ``--instance`` and by ``serve``).
TSV_FLAGS = {
    "listen": "-l",
    "target4": "-4",
    "target6": "-6",
    "mark": "-mark",
    "allowed_subnets": "-allowed-subnets",
    "allow_any": "--allow-any",
    "protocol": "-p",
}


def refuse_tsv_flags(argv: Sequence[str]) -> None:
    """UsageError for a flag given with ``--instance`` that instances.tsv sets instead (even
    when given its default value: ``-p tcp`` for a UDP instance would otherwise mislead)."""
    from pymmproxy.cli import build_parser, explicit  # noqa: PLC0415 - cli imports us lazily

    if given := explicit(build_parser(), argv, TSV_FLAGS):
        flag = TSV_FLAGS[given[0]]
        raise UsageError(f"{flag} is not allowed with --instance: instances.tsv sets it")


def run_instance(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run one instance (``argv``: the command line ``args`` came from); a second start of a
    running instance exits 0 without starting."""
    from pymmproxy.cli import (  # noqa: PLC0415 - cli imports us lazily
        limits_from_args,
        listeners_from_args,
        metrics_from_args,
    )

    refuse_tsv_flags(argv)
    config_dir = resolve_config_dir(args.config_dir)
    skipped: list[ConfigError] = []  # other instances' bad lines: theirs to fix
    config = load_config(config_dir, only=args.instance, skipped=skipped)
    inst = config.instance(args.instance)
    if inst.ports is not None:
        raise UsageError(
            f"instance {inst.name} is a TPROXY port range (ports=); run it with "
            f"`pymmproxy serve --instances {inst.name}`, which installs its TPROXY rule"
        )
    settings = instance_settings(inst, config.allowed_for(inst), limits_from_args(args))
    settings = dataclasses.replace(
        settings,
        listeners=listeners_from_args(args, inst.transport),
        metrics=metrics_from_args(args),
    )
    lock = instancelock.acquire(inst.name)
    if lock is None:
        pid = instancelock.holder_pid(inst.name)
        sys.stderr.write(
            f"pymmproxy: instance {inst.name} is already running"
            f"{f' (pid {pid})' if pid else ''}; not starting another\n"
        )
        return 0
    log = get_logger(instance=inst.name)
    log.info("instance.start", config_dir=str(config_dir), line=inst.line)

    def warn_skipped(lines: list[ConfigError]) -> None:
        for exc in lines:  # at start and on every SIGHUP: theirs to fix, never in silence
            log.warning("instance.other_line_skipped", error=str(exc))

    warn_skipped(skipped)

    def reloader() -> daemon.Reloaded:
        again: list[ConfigError] = []
        fresh = load_config(config_dir, only=inst.name, skipped=again)
        now = fresh.instance(inst.name)
        warn_skipped(again)
        return daemon.Reloaded(
            allow=AllowList(fresh.allowed_for(now)), restart_needed=restart_needed(inst, now)
        )

    with lock:
        return daemon.run(settings, verbosity=args.verbose, reloader=reloader)


def restart_needed(running: Instance, fresh: Instance) -> tuple[str, ...]:
    """The fields of an instance's line that changed but only take effect on a restart."""
    fields = ("mark", "listen", "target4", "target6", "transport", "ports")
    return tuple(f for f in fields if getattr(running, f) != getattr(fresh, f))


def _status(config: Config, mark: int) -> str:
    try:
        from pymmproxy import pathway  # noqa: PLC0415 - netlink only when listing

        return "ok" if pathway.status(mark).complete else "incomplete"
    except PymmproxyError as exc:
        return f"unknown ({exc})"


def _running(pid: int | None) -> str:
    """The RUNNING cell: ``holder_pid`` is None when nobody holds the lock, 0 when the holder's
    pid cannot be read."""
    if pid is None:
        return "no"
    return f"pid {pid}" if pid else "yes (pid unknown)"


def main(argv: Sequence[str]) -> int:
    """``pymmproxy instances [--config-dir DIR]``: a table of instances and pathway status."""
    parser = ArgParser(prog="pymmproxy instances", allow_abbrev=False)
    parser.add_argument("--config-dir", metavar="DIR")
    args = parser.parse_args(argv)
    config = load_config(resolve_config_dir(args.config_dir))
    rows = [("NAME", "PROTO", "MARK", "LISTEN", "TARGET4", "TARGET6", "PATHWAY", "RUNNING")]
    status_by_mark: dict[int, str] = {}
    for inst in config.instances.values():
        if inst.mark not in status_by_mark:
            status_by_mark[inst.mark] = _status(config, inst.mark)
        rows.append((
            inst.name, str(inst.transport), str(inst.mark), str(inst.listen),
            str(inst.target4 or "-"), str(inst.target6 or "-"),
            status_by_mark[inst.mark], _running(instancelock.holder_pid(inst.name)),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        sys.stdout.write("\n")
    return 0
