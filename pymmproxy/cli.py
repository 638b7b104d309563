"""Command line: go-mmproxy's flags as go-mmproxy spells them, GNU long names, subcommands.

``pymmproxy -l 0.0.0.0:8443 -4 127.0.0.1:443 -6 [::1]:443 -mark 123 -allowed-subnets F``
runs one proxy exactly like go-mmproxy; ``pymmproxy --instance NAME`` runs one from
``instances.tsv``; ``pymmproxy SUBCOMMAND ...`` dispatches to the subcommand's module.
This module only parses and dispatches; every error becomes one line and an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib import import_module

from pymmproxy import __version__
from pymmproxy.cpus import usable_cpus
from pymmproxy.errors import ArgParser, PymmproxyError, UsageError
from pymmproxy.settings import (
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_PENDING_HEADERS,
    MAX_MARK,
    MAX_MAX_HEADER_SIZE,
    MIN_MAX_HEADER_SIZE,
    Endpoint,
    InstanceSettings,
    Limits,
    Transport,
    target_problem,
)

MAX_KEEPIDLE = 32767  # the kernel's limit for TCP_KEEPIDLE/TCP_KEEPINTVL

SUBCOMMANDS = {
    "pathway": "pymmproxy.pathway.cli",
    "demo": "pymmproxy.demo",
    "doctor": "pymmproxy.doctor",
    "instances": "pymmproxy.instances",
    "serve": "pymmproxy.serve",
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="pymmproxy",
        allow_abbrev=False,
        description="PROXY-protocol transparent proxy (drop-in for go-mmproxy). "
        f"Subcommands: {', '.join(SUBCOMMANDS)} (pymmproxy SUBCOMMAND --help).",
    )
    add = p.add_argument
    # go-mmproxy's flag package also takes each of its flags with two dashes (--l, --4 ...)
    add("-l", "--l", "--listen", dest="listen", default="0.0.0.0:8443",
        help="address the proxy listens on")  # fmt: skip
    add("-4", "--4", "--target4", dest="target4", default="127.0.0.1:443",
        help="IPv4 target ('none': off)")  # fmt: skip
    add("-6", "--6", "--target6", dest="target6", default="[::1]:443",
        help="IPv6 target ('none': off)")  # fmt: skip
    add("-mark", "--mark", type=_int("mark"), default=0, help="SO_MARK for upstream packets")
    add("-allowed-subnets", "--allowed-subnets", metavar="FILE", help="allowed LB subnets")
    add("--allow-any", action="store_true", help="accept headers from any peer (unsafe)")
    add("-p", "--p", "--protocol", dest="protocol", default="tcp", choices=["tcp", "udp"])
    add("-v", "--v", "--verbose", dest="verbose", type=_verbosity, default=0, metavar="0|1|2",
        help="0: errors (rate-limited), 1: + failed connections, 2: + all")  # fmt: skip
    add("-listeners", "--listeners", type=_listeners, default=None, metavar="N|auto",
        help="worker processes (default auto: one per usable CPU)")  # fmt: skip
    add("-close-after", "--close-after", type=_int("close-after"), default=60, metavar="SECONDS")
    add("--udp-max-clients", type=_int("udp-max-clients"), default=4096, metavar="N",
        help="UDP: most clients tracked at once; the longest idle is evicted")  # fmt: skip
    add("--header-timeout", type=_float("header-timeout"), default=5.0, metavar="SECONDS")
    add("--connect-timeout", type=_float("connect-timeout"), default=10.0, metavar="SECONDS")
    add("--drain-timeout", type=_float("drain-timeout"), default=30.0, metavar="SECONDS")
    add("--max-connections", type=_int("max-connections"), default=0, metavar="N")
    add("--max-pending-headers", type=_int("max-pending-headers"), metavar="N",
        default=DEFAULT_MAX_PENDING_HEADERS, help="most connections still waiting for their "
        "PROXY header; more are refused at once (0 = no limit)")  # fmt: skip
    add("--max-header-size", type=_int("max-header-size"), metavar="BYTES",
        default=DEFAULT_MAX_HEADER_SIZE, help="largest PROXY v2 header accepted (default "
        f"{DEFAULT_MAX_HEADER_SIZE}; the spec's maximum is {MAX_MAX_HEADER_SIZE})")  # fmt: skip
    add("--idle-timeout", type=_float("idle-timeout", zero=True), default=0.0, metavar="SECONDS",
        help="close relayed connections silent this long (0 = never, like go-mmproxy)")  # fmt: skip
    add("--keepalive", type=_int("keepalive"), default=15, metavar="SECONDS",
        help="TCP keepalive probes after SECONDS idle, every SECONDS, on both sides "
        "(go-mmproxy's 15; 0 = off): finds peers gone without a FIN")  # fmt: skip
    add("--allow-any-source", action="store_true",
        help="also spoof loopback, multicast, link-local and own addresses (unsafe)")  # fmt: skip
    add("--metrics", metavar="ADDR:PORT", help="serve Prometheus metrics (off by default)")
    add("--log-format", choices=["json", "console", "auto"], default="auto")
    add("--instance", metavar="NAME", help="run instance NAME from instances.tsv")
    add("--config-dir", metavar="DIR", help="directory with instances.tsv etc.")
    add("--version", action="version", version=f"pymmproxy {__version__}")
    return p


def go_int(text: str) -> int:
    """An integer as Go's ``flag.Int`` reads it: decimal, ``0x``/``0o``/``0b`` prefixes,
    a leading ``0`` for octal, ``_`` between digits (ValueError otherwise)."""
    text = text.strip()
    body = text.lstrip("+-")
    if len(body) > 1 and body[0] == "0" and body[1] in "01234567_":  # Go's old-style octal
        return (-1 if text.startswith("-") else 1) * int(body, 8)
    return int(text, 0)


def _int(name: str) -> Callable[[str], int]:
    def conv(text: str) -> int:
        try:
            return go_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not an integer") from None

    return conv


def _verbosity(text: str) -> int:
    """``-v N``: go-mmproxy takes any N >= 0; above 2 is the same as 2."""
    value = _int("-v")(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"-v: {text!r} must be >= 0")
    return min(value, 2)


def _listeners(text: str) -> int | None:
    """``-listeners``: a count, or ``auto`` (None: one worker per usable CPU)."""
    return None if text.strip().lower() == "auto" else _int("listeners")(text)


def listeners_from_args(args: argparse.Namespace, transport: Transport | None = None) -> int:
    """How many worker processes ``-listeners`` asks for (``auto``: one per usable CPU for
    TCP; one process for UDP, whose flow table a second worker would not share: the kernel
    spreads datagrams over workers by the LB's socket, so a client arriving through another
    LB socket would get a second flow, from a random port)."""
    if args.listeners is not None:
        return int(args.listeners)
    udp = (transport or Transport(args.protocol)) is Transport.UDP
    return 1 if udp else usable_cpus()


def _float(name: str, *, zero: bool = False) -> Callable[[str], float]:
    def conv(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a number") from None
        if not (value >= 0 if zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name}: must be {'>=' if zero else '>'} 0")
        return value

    return conv


def _target(text: str, flag: str, v6: bool) -> Endpoint | None:
    if text.strip().lower() in {"", "none", "-"}:
        return None
    endpoint = Endpoint.parse(text, what=f"{flag} target")
    if endpoint.is_v6 != v6:
        raise UsageError(f"{flag} {text}: expected an IPv{6 if v6 else 4} address")
    if problem := target_problem(endpoint.host):
        raise UsageError(f"bad {flag} target {text}: {problem}")
    return endpoint


def settings_from_args(args: argparse.Namespace) -> InstanceSettings:
    """Turn go-mmproxy style flags into validated settings."""
    from pymmproxy.conffiles import load_allow_list  # noqa: PLC0415 - keep --help fast

    if args.mark and not 0 < args.mark <= MAX_MARK:  # 0: no mark (go-mmproxy's default)
        # Only the range: here the mark is SO_MARK alone (the routing set-up is the
        # operator's), so 253..255 pass as with go-mmproxy; pathways.conf checks table ids.
        raise UsageError(f"bad mark {args.mark}: must be 1..{MAX_MARK}")
    if args.allowed_subnets:
        allowed = load_allow_list(args.allowed_subnets)
    elif args.allow_any:
        allowed = None
    else:
        raise UsageError(
            "no allow list: pass -allowed-subnets FILE with your load balancers' addresses, "
            "or --allow-any to accept PROXY headers from anyone (unsafe)"
        )
    target4 = _target(args.target4, "-4", v6=False)
    target6 = _target(args.target6, "-6", v6=True)
    if target4 is None and target6 is None:
        raise UsageError("no target: give -4 and/or -6")
    return InstanceSettings(
        listen=Endpoint.parse_listen(args.listen, what="-l listen address"),
        target4=target4,
        target6=target6,
        mark=args.mark,
        transport=Transport(args.protocol),
        allowed=allowed,
        listeners=listeners_from_args(args),
        limits=limits_from_args(args),
        metrics=metrics_from_args(args),
    )


def metrics_from_args(args: argparse.Namespace) -> Endpoint | None:
    """The ``--metrics`` endpoint, or ``None`` when metrics are off (a wildcard means both
    families, as ``-l``'s does)."""
    text = getattr(args, "metrics", None)
    return None if not text else Endpoint.parse_listen(text, what="--metrics address")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The per-daemon limits shared by flag-driven and instance-driven runs."""
    if args.listeners is not None and args.listeners < 1:
        raise UsageError("-listeners must be >= 1")
    if args.close_after < 1:
        raise UsageError("-close-after must be >= 1")
    if args.max_connections < 0:
        raise UsageError("--max-connections must be >= 0")
    if args.udp_max_clients < 1:
        raise UsageError("--udp-max-clients must be >= 1")
    if not 0 <= getattr(args, "keepalive", 0) <= MAX_KEEPIDLE:
        raise UsageError(f"--keepalive must be 0..{MAX_KEEPIDLE} (seconds; 0 = off)")
    if getattr(args, "max_pending_headers", 0) < 0:
        raise UsageError("--max-pending-headers must be >= 0")
    size = getattr(args, "max_header_size", DEFAULT_MAX_HEADER_SIZE)
    if not MIN_MAX_HEADER_SIZE <= size <= MAX_MAX_HEADER_SIZE:
        raise UsageError(
            f"--max-header-size must be {MIN_MAX_HEADER_SIZE}..{MAX_MAX_HEADER_SIZE} (bytes)"
        )
    return Limits(
        header_timeout=args.header_timeout,
        connect_timeout=args.connect_timeout,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
        udp_close_after=float(args.close_after),
        udp_max_clients=args.udp_max_clients,
        max_pending_headers=getattr(args, "max_pending_headers", DEFAULT_MAX_PENDING_HEADERS),
        idle_timeout=getattr(args, "idle_timeout", 0.0),
        keepalive=getattr(args, "keepalive", 15),
        allow_any_source=getattr(args, "allow_any_source", False),
        max_header_size=size,
    )


_UNSET = object()


def explicit(
    parser: argparse.ArgumentParser, argv: Sequence[str], dests: Iterable[str]
) -> list[str]:
    """Which of ``dests`` the command line ``argv`` sets, even to their default value (argparse
    fills in a default only for what the namespace lacks)."""
    wanted = list(dests)
    seen = parser.parse_args(list(argv), argparse.Namespace(**dict.fromkeys(wanted, _UNSET)))
    return [dest for dest in wanted if getattr(seen, dest) is not _UNSET]


def _run_proxy(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pymmproxy import daemon, logsetup  # noqa: PLC0415 - imports uvloop only when serving
    from pymmproxy.policy import AllowList  # noqa: PLC0415

    logsetup.configure(args.verbose, args.log_format)
    if args.instance is not None:  # "" too: an unset $NAME must not fall back to flags
        from pymmproxy.instances import run_instance  # noqa: PLC0415

        return run_instance(args, argv)
    settings = settings_from_args(args)
    reloader = None
    if args.allowed_subnets:
        from pymmproxy.conffiles import load_allow_list  # noqa: PLC0415

        path = args.allowed_subnets

        def reloader() -> daemon.Reloaded:
            return daemon.Reloaded(allow=AllowList(load_allow_list(path)))

    return daemon.run(settings, verbosity=args.verbose, reloader=reloader)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pymmproxy`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            module = import_module(SUBCOMMANDS[argv[0]])
            return int(module.main(argv[1:]))
        return _run_proxy(build_parser().parse_args(argv), argv)
    except PymmproxyError as exc:
        sys.stderr.write(f"pymmproxy: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # what no check above foresaw (a permission, a limit): one line
        sys.stderr.write(f"pymmproxy: {exc}\n")
        return 1
