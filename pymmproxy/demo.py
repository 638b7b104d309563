"""``pymmproxy demo``: show, in throw-away network namespaces, that services see real clients.

Builds the lab (client → HAProxy → pymmproxy → whoami), installs the pathway, sends
requests from several IPv4 and IPv6 client addresses through HAProxy's PROXY v2 and v1
frontends, prints what the service saw, tears everything down. Exit 0 only if every
request was seen from its real client address and port. Needs root; touches nothing
outside its own namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from pymmproxy.errors import ArgParser
from pymmproxy.lab import (
    CLIENT_V4,
    CLIENT_V6,
    GO_MMPROXY,
    HTTP_GET,
    LB_FRONT_V4,
    LB_FRONT_V6,
    PYMMPROXY,
    WORKLOAD_V4,
    Lab,
    LabError,
    mmproxy_argv,
)

MARK = 123
LISTENERS = ((2, 80, 8001), (1, 81, 8002))  # (PROXY version, HAProxy port, proxy port)
CLIENTS = (*CLIENT_V4[:2], *CLIENT_V6[:2])


def _fail(message: str) -> int:
    sys.stderr.write(f"pymmproxy demo: {message}\n")
    return 1


def _progress(message: str) -> None:
    print(f"  .. {message}", flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _rows(
    jobs: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]
) -> list[tuple[str, str, str, bool]]:
    """(client address, PROXY version, address the service saw, match) per request."""
    rows = []
    versions = {fe: version for version, fe, _ in LISTENERS}
    for job, res in zip(jobs, results, strict=True):
        client = _endpoint(str(job["src"]), int(res["sport"]))
        words = str(res["text"]).partition("\r\n\r\n")[2].split()
        seen = _endpoint(words[0], int(words[1])) if len(words) == 2 else "-"
        why = "" if res["error"] is None else f" ({res['error']})"
        rows.append((client, f"v{versions[job['port']]}", seen + why, seen == client))
    return rows


def run_demo(program: Sequence[str], name: str) -> int:
    """Build the lab, run the requests, print the table; 0 if every row matches."""
    started = time.monotonic()
    _progress("building network namespaces (client, lb, workload) and starting HAProxy")
    with Lab() as lab:
        _progress(f"namespaces {lab.client.name}, {lab.lb.name}, {lab.workload.name} ready")
        lab.install_pathway(MARK)
        _progress(f"pathway for fwmark {MARK} installed in the workload namespace")
        lab.start_service("whoami", "127.0.0.1:8080", "[::1]:8080")
        allowed = lab.allowed_subnets(f"{WORKLOAD_V4.rsplit('.', 1)[0]}.1/32")
        for version, _, port in LISTENERS:
            argv = mmproxy_argv(
                program, f"{WORKLOAD_V4}:{port}", mark=MARK, allowed_subnets=allowed, verbose=1
            )
            lab.start_proxy(argv, name=f"{name}-{port}")
            _progress(f"{name} listening on {WORKLOAD_V4}:{port} (HAProxy sends PROXY v{version})")
        jobs = [
            {
                "src": src,
                "dst": LB_FRONT_V6 if ":" in src else LB_FRONT_V4,
                "port": fe,
                "send": HTTP_GET,
                "timeout": 5,
            }
            for _, fe, _ in LISTENERS
            for src in CLIENTS
        ]
        results = lab.clients(jobs)
        _progress(f"sent {len(jobs)} requests; tearing down")
    rows = _rows(jobs, results)
    width = max(len(r[0]) for r in rows)
    print(f"\n  {'client address':<{width}}  proxy  {'service saw':<{width}}  match")
    for client, proto, seen, ok in rows:
        print(f"  {client:<{width}}  {proto:<5}  {seen:<{width}}  {'yes' if ok else 'NO'}")
    good = sum(r[3] for r in rows)
    verdict = "OK" if good == len(rows) else "FAILED"
    elapsed = time.monotonic() - started
    print(
        f"\n{verdict}: {good}/{len(rows)} requests seen from their real client address "
        f"({elapsed:.1f}s)"
    )
    return 0 if good == len(rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``pymmproxy demo [--proxy pymmproxy|go-mmproxy]``."""
    ap = ArgParser(prog="pymmproxy demo", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--proxy",
        choices=["pymmproxy", "go-mmproxy"],
        default="pymmproxy",
        help="which daemon to run behind HAProxy (default: pymmproxy)",
    )
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if os.geteuid() != 0:
        return _fail("needs root (network namespaces)")
    if shutil.which("haproxy") is None:
        return _fail("haproxy not found: apt-get install haproxy")
    if shutil.which("nsenter") is None:
        return _fail("nsenter not found: apt-get install util-linux")
    program = PYMMPROXY if args.proxy == "pymmproxy" else GO_MMPROXY
    if args.proxy == "go-mmproxy" and shutil.which("go-mmproxy") is None:
        return _fail("go-mmproxy not found: apt-get install go-mmproxy")
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    print(f"pymmproxy demo: client -> HAProxy -> {args.proxy} -> whoami, in network namespaces")
    try:
        return run_demo(program, args.proxy)
    except LabError as exc:
        return _fail(str(exc))
    except (OSError, NetlinkError) as exc:  # e.g. no veth support here (a container)
        why = os.strerror(exc.code) if isinstance(exc, NetlinkError) else exc.strerror or exc
        return _fail(f"cannot build the lab: {why} (lab torn down)")
    except KeyboardInterrupt:
        return _fail("interrupted (lab torn down)") + 129
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
