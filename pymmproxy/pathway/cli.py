"""``pymmproxy pathway add|del|add-all|del-all|status [MARK|INSTANCE ...]``.

A numeric argument is a fwmark (decimal or ``0x`` hex), anything else the name of an
instance in ``instances.tsv``. ``add-all`` / ``del-all`` (and ``status`` without arguments)
use every fwmark of ``pathways.conf``. Every mark is tried even when one fails; each failure
is one ``pymmproxy: ...`` line on stderr. Where IPv6 is off, ``add`` and ``status`` cover
IPv4 only (``add`` says so in a warning line). Exit codes: 0 done / complete, 1 a pathway
error for any mark or (``status``) something missing, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from pymmproxy import conffiles
from pymmproxy.errors import ArgParser, ConfigError, PathwayError, UsageError, one_line_errors
from pymmproxy.pathway import PathwayStatus, add, delete, status
from pymmproxy.pathway.firewall import BACKEND_CHOICES
from pymmproxy.pathway.ipv6 import Ipv6State
from pymmproxy.pathway.ipv6 import probe as probe_ipv6
from pymmproxy.pathway.plan import BOTH
from pymmproxy.settings import MAX_MARK, MAX_MARK_TEXT, validate_mark

COMMANDS = ("add", "del", "add-all", "del-all", "status")


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="pymmproxy pathway",
        allow_abbrev=False,
        description="Manage the policy routing + CONNMARK pathways of fwmarks.",
    )
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("targets", nargs="*", metavar="MARK|INSTANCE")
    p.add_argument("--config-dir", metavar="DIR", help="directory with pathways.conf etc.")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="firewall backend")
    return p


def parse_mark_arg(text: str) -> int | None:
    """The fwmark written as ``text`` (decimal or ``0x`` hex), None if it is not a number."""
    if text.isascii() and text.isdigit():
        if len(text) > MAX_MARK_TEXT:
            raise UsageError(f"bad mark {text[:MAX_MARK_TEXT]}...: must be 1..{MAX_MARK}")
        return validate_mark(int(text))
    if text[:2].lower() == "0x":
        try:
            return validate_mark(int(text, 16))
        except ValueError:
            raise UsageError(f"bad mark {text!r}: not a number") from None
    return None


def resolve_targets(targets: Sequence[str], config_dir: Path) -> list[int]:
    """Marks for the arguments; instance names are looked up in ``instances.tsv``."""
    marks: list[int] = []
    instances: dict[str, conffiles.Instance] | None = None
    for text in targets:
        mark = parse_mark_arg(text)
        if mark is None:
            if instances is None:
                path = config_dir / conffiles.INSTANCES_FILE
                try:
                    instances = conffiles.load_instances(path, None)
                except ConfigError as exc:
                    if exc.line is not None:  # a bad line: file:line first, as everywhere
                        raise
                    raise UsageError(
                        f"{text!r} is not a mark (decimal or 0x hex), and no instance can be "
                        f"looked up: {exc}"
                    ) from None
            if text not in instances:
                known = ", ".join(instances) or "none"
                where = config_dir / conffiles.INSTANCES_FILE
                raise UsageError(f"no instance {text!r} in {where} (known: {known})")
            mark = instances[text].mark
        if mark not in marks:
            marks.append(mark)
    return marks


def _all_marks(config_dir: Path) -> list[int]:
    return list(conffiles.load_pathways(config_dir / conffiles.PATHWAYS_FILE))


def _cell(value: bool | None) -> str:
    return "-" if value is None else ("present" if value else "MISSING")


def format_status(st: PathwayStatus) -> str:
    """A readable table: one row per item, columns v4 and v6."""
    width = max(len(name) for name, _, _ in st.rows())
    lines = [
        f"pathway {st.mark}: {'complete' if st.complete else 'INCOMPLETE'}"
        f" (firewall backend {st.backend}, {st.backend_reason})",
        f"  {'item':<{width}}  {'v4':<8} v6",
    ]
    lines += [f"  {n:<{width}}  {_cell(v4):<8} {_cell(v6)}" for n, v4, v6 in st.rows()]
    fwa = "unreadable" if st.tcp_fwmark_accept is None else str(st.tcp_fwmark_accept)
    lines.append(f"  net.ipv4.tcp_fwmark_accept = {fwa} (not needed with the loopback rules)")
    if st.ipv6_note:
        lines.append(f"  {st.ipv6_note}")
    return "\n".join(lines)


def _marks(args: argparse.Namespace, config_dir: Path) -> list[int]:
    """The marks a command works on (``-all`` and bare ``status``: pathways.conf)."""
    command: str = args.command
    if command.endswith("-all"):
        if args.targets:
            raise UsageError(f"{command} takes no MARK/INSTANCE (it reads pathways.conf)")
        return _all_marks(config_dir)
    if args.targets:
        return resolve_targets(args.targets, config_dir)
    if command == "status":
        return _all_marks(config_dir)
    raise UsageError(f"{command} needs at least one MARK or INSTANCE")


def _change(verb: str, mark: int, backend: str, ipv6: Ipv6State) -> list[str]:
    """The output lines of ``add`` / ``del`` for one mark."""
    action = add if verb == "add" else delete
    changes = action(mark, backend=backend, ipv6=ipv6)
    if changes:
        return changes
    return [f"pathway {mark}: {'already in place' if verb == 'add' else 'already absent'}"]


def _each(marks: list[int], step: Callable[[int], list[str]], out: TextIO, err: TextIO) -> bool:
    """Run ``step`` for every mark, even after one fails; whether all succeeded.

    A step's lines go to ``out``, a failure is one ``pymmproxy: ...`` line on ``err``.
    """
    ok = True
    for mark in marks:
        try:
            lines = step(mark)
        except PathwayError as exc:
            err.write(f"pymmproxy: {exc}\n")
            ok = False
            continue
        out.write("".join(f"{line}\n" for line in lines))
    return ok


def run(args: argparse.Namespace, out: TextIO, err: TextIO | None = None) -> int:
    """Carry out parsed arguments; raises PymmproxyError on bad usage or configuration."""
    err = sys.stderr if err is None else err
    config_dir = conffiles.resolve_config_dir(args.config_dir)
    command: str = args.command
    marks = _marks(args, config_dir)
    if not marks:
        out.write(f"no pathways in {config_dir / conffiles.PATHWAYS_FILE}\n")
        return 0
    backend: str = args.backend
    ipv6 = probe_ipv6()
    if command == "status":
        reports: list[PathwayStatus] = []

        def show(mark: int) -> list[str]:
            reports.append(status(mark, backend=backend, ipv6=ipv6))
            return [*([""] if len(reports) > 1 else []), format_status(reports[-1])]

        read_all = _each(marks, show, out, err)
        return 0 if read_all and all(r.complete for r in reports) else 1
    verb = "add" if command.startswith("add") else "del"
    if ipv6.families(verb) != BOTH:
        err.write(f"pymmproxy: warning: {ipv6.note}\n")
    return 0 if _each(marks, lambda m: _change(verb, m, backend, ipv6), out, err) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; every error is one ``pymmproxy: ...`` line on stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    return one_line_errors(lambda: run(build_parser().parse_args(args), sys.stdout))
