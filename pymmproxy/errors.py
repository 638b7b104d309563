"""The one exception tree of pymmproxy.

Every error meant for an operator derives from :class:`PymmproxyError` and renders as a
single line. Commands turn it into ``pymmproxy: <line>`` and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

_NEGATIVE = re.compile(r"-\d")  # a negative number, as a flag's value


class PymmproxyError(Exception):
    """Base of all errors pymmproxy reports to an operator."""

    exit_code = 1


class UsageError(PymmproxyError):
    """Bad command-line arguments (exit 2, like argparse)."""

    exit_code = 2


class ArgParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a :class:`UsageError` (one line, exit 2)
    instead of argparse's usage block, and whose help is also Go's ``-help``."""

    def __init__(self, *, add_help: bool = True, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(add_help=False, **kwargs)
        if add_help:
            self.add_argument("-h", "-help", "--help", action="help", help="show this help")

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """As argparse, but a flag's value may be negative as in Go's flag package
        (``-close-after -1``): with ``-4``/``-6`` defined, argparse would take ``-1`` for a
        flag, and say "expected one argument" instead of what is wrong with the value. A
        flag's own name (``-mark -4 ...``) is still taken as a missing value."""
        given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._join_negative(given), namespace)

    def _join_negative(self, args: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            action = self._option_string_actions.get(arg)
            takes_value = action is not None and action.nargs is None
            value = args[i + 1] if i + 1 < len(args) else ""
            if takes_value and _NEGATIVE.match(value) and value not in self._option_string_actions:
                out.append(f"{arg}={value}")
                i += 2
                continue
            if arg == "--":  # the rest is positional, as argparse takes it
                out.extend(args[i:])
                break
            out.append(arg)
            i += 1
        return out


class ConfigError(PymmproxyError):
    """A bad line in a configuration file, rendered as ``path:line: message``."""

    exit_code = 2

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ProtocolError(PymmproxyError):
    """A PROXY protocol header that cannot be accepted.

    ``kind`` is a short stable identifier (``bad_signature``, ``crc_mismatch``, ...) used in
    logs and metrics; the message is the human explanation.
    """

    kind = "protocol"

    def __init__(self, message: str, kind: str | None = None) -> None:
        if kind is not None:
            self.kind = kind
        super().__init__(message)


class PolicyDenied(PymmproxyError):  # noqa: N818 - reads as the event it reports
    """A peer or header refused by policy (allow list, forbidden source address)."""


class UpstreamError(PymmproxyError):
    """The target could not be reached, or the transparent socket could not be set up.

    ``reason`` is the stable short name logged and counted (``target_refused``, ...).
    """

    def __init__(self, message: str, reason: str = "upstream_error") -> None:
        self.reason = reason
        super().__init__(message)


class PathwayError(PymmproxyError):
    """Policy routing / firewall state could not be read or changed."""


def one_line_errors(command: Callable[[], int]) -> int:
    """Run a subcommand: a :class:`PymmproxyError` becomes ``pymmproxy: <line>`` on stderr
    and its exit code; argparse's own exit (``--help``, usage errors) keeps its code."""
    try:
        return command()
    except PymmproxyError as exc:
        sys.stderr.write(f"pymmproxy: {exc}\n")
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
