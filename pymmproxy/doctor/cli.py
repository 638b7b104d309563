"""``pymmproxy doctor [--instance NAME | --mark M] [--config-dir DIR] [--backend B] [--json]``.

Scope: ``--instance`` checks that instance and its mark; ``--mark`` checks only that
pathway (no config is read); neither checks every mark of ``pathways.conf`` and every
instance of ``instances.tsv``. Exit codes: 0 nothing failed (warnings allowed), 1 a check
failed, 2 bad usage or configuration (one ``pymmproxy: ...`` line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from pymmproxy import conffiles
from pymmproxy.doctor import probes
from pymmproxy.doctor.checks import Check, Level, evaluate, exit_code
from pymmproxy.doctor.facts import Facts
from pymmproxy.errors import ArgParser, UsageError, one_line_errors
from pymmproxy.pathway.cli import parse_mark_arg
from pymmproxy.pathway.firewall import BACKEND_CHOICES
from pymmproxy.settings import Transport


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--timeout: {text!r} is not a number") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError("--timeout: must be in (0, 60]")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="pymmproxy doctor",
        allow_abbrev=False,
        description="Check privileges, pathways, listen addresses, targets and allow lists; "
        "every failure comes with the command that fixes it.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--instance", metavar="NAME", help="check this instance and its mark")
    scope.add_argument("--mark", metavar="M", help="check only the pathway of this fwmark")
    p.add_argument("--config-dir", metavar="DIR", help="directory with instances.tsv etc.")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="firewall backend")
    p.add_argument("--timeout", type=_timeout, default=2.0, metavar="SECONDS",
                   help="TCP connect timeout for target checks (default 2)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def gather(args: argparse.Namespace) -> Facts:
    """Run the probes that the arguments ask for."""
    if args.mark is not None:
        mark = parse_mark_arg(args.mark)
        if mark is None:
            raise UsageError(f"bad mark {args.mark!r}: expected a number")
        ipv6 = probes.ipv6()
        only = (probes.mark(mark, args.backend, ipv6=ipv6),)
        return Facts(probes.privileges(), probes.backend(args.backend), only, ipv6=ipv6)
    config_dir = conffiles.resolve_config_dir(args.config_dir)
    pathways = conffiles.load_pathways(config_dir / conffiles.PATHWAYS_FILE)
    instances_file = config_dir / conffiles.INSTANCES_FILE
    instances = conffiles.load_instances(instances_file, pathways)
    if args.instance is not None:
        if args.instance not in instances:
            known = ", ".join(instances) or "none"
            raise UsageError(f"no instance {args.instance!r} in {instances_file} (known: {known})")
        chosen = [instances[args.instance]]
        marks = [chosen[0].mark]
    else:
        chosen = list(instances.values())
        marks = list(pathways)
    default_allow = conffiles.allow_list_path(config_dir)
    ipv6 = probes.ipv6()

    def udp_users(mark: int) -> tuple[str, ...]:
        return tuple(
            i.name for i in instances.values() if i.mark == mark and i.transport is Transport.UDP
        )

    return Facts(
        probes.privileges(),
        probes.backend(args.backend),
        tuple(probes.mark(m, args.backend, udp_users(m), ipv6) for m in marks),
        tuple(
            probes.instance(i, instances_file, i.allow_file or default_allow, args.timeout)
            for i in chosen
        ),
        ipv6,
    )


def summary(checks: Sequence[Check]) -> str:
    """``all 12 checks passed`` or ``2 failed, 1 warning, 9 ok``."""
    failed = sum(c.level is Level.FAIL for c in checks)
    warned = sum(c.level is Level.WARN for c in checks)
    if not failed and not warned:
        return f"all {len(checks)} checks passed"
    parts = [f"{failed} failed"] if failed else []
    if warned:
        parts.append(f"{warned} warning{'' if warned == 1 else 's'}")
    parts.append(f"{len(checks) - failed - warned} ok")
    return ", ".join(parts)


def format_table(checks: Sequence[Check]) -> str:
    """Aligned STATUS / CHECK / DETAIL columns; a ``fix:`` line under each non-OK row."""
    width = max([len("CHECK"), *(len(c.name) for c in checks)])
    pad = " " * (6 + 2 + width + 2)
    lines = [f"{'STATUS':<6}  {'CHECK':<{width}}  DETAIL"]
    for c in checks:
        lines.append(f"{c.level:<6}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.level is not Level.OK:
            lines.append(f"{pad}fix: {c.fix}")
    lines.append(summary(checks))
    return "\n".join(lines) + "\n"


def format_json(checks: Sequence[Check]) -> str:
    """``{"ok", "exit_code", "summary", "checks": [...]}``, one object per check."""
    code = exit_code(list(checks))
    doc = {
        "ok": code == 0,
        "exit_code": code,
        "summary": summary(checks),
        "checks": [dataclasses.asdict(c) for c in checks],
    }
    return json.dumps(doc, indent=2) + "\n"


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Probe, judge, print; returns the exit code (raises PymmproxyError on bad input)."""
    checks = evaluate(gather(args))
    out.write(format_json(checks) if args.json else format_table(checks))
    return exit_code(checks)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; usage and config errors are one ``pymmproxy: ...`` line, exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    return one_line_errors(lambda: run(build_parser().parse_args(args), sys.stdout))
