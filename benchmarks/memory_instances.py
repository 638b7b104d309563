"""Memory of 10 proxy instances: ``pymmproxy serve`` vs 10 ``--instance`` vs 10 go-mmproxy.

Standalone, as root, from the repository root (about 15 s)::

    .venv/bin/python -m benchmarks.memory_instances [--instances 10] [--conns 50] [--json]

It creates one network namespace (random name, loopback only, removed at the end), installs
pathway 123 in it, starts an echo service, then runs each scenario in turn: start the
processes, wait until every port accepts, relay ``--conns`` connections per instance (v2
PROXY header with a spoofed TEST-NET client, 4 KiB echoed), measure, stop them. RSS and
PSS and USS are read from ``/proc/PID/smaps_rollup`` and summed over the scenario's
processes. PSS splits each shared page between the processes mapping it (also processes
outside the benchmark, e.g. other Pythons of the same venv), so it is the fairer total but
moves a little from run to run; USS counts only pages nobody else maps.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pymmproxy.proxyproto import Command, Family, Header, Transport, encode_v2

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
MARK = 123
BASE_PORT, ECHO_PORT = 18100, 18099
GO = shutil.which("go-mmproxy") or "/usr/bin/go-mmproxy"
_clients = itertools.count()


def smaps(pid: int) -> tuple[int, int, int]:
    """``(rss, pss, uss)`` of one process in KiB (USS: pages no other process maps)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return fields["Rss"], fields["Pss"], uss


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def relay(port: int, conns: int) -> None:
    """``conns`` spoofed connections through the proxy on ``port``, each echoing 4 KiB.

    Every client address:port is used once per run: go-mmproxy, unlike pymmproxy, does not
    fall back to another port when the spoofed one is still in TIME_WAIT.
    """
    payload = os.urandom(4096)
    for _ in range(conns):
        n = next(_clients)
        src = f"192.0.2.{1 + n % 250}"
        hdr = Header(2, Command.PROXY, Family.INET, Transport.STREAM, src, 20000 + n // 250,
                     "127.0.0.1", port)  # fmt: skip
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(encode_v2(hdr) + payload)
            got = b""  # no half-close: go-mmproxy closes both ways on the client's EOF
            while len(got) < len(payload) and (chunk := s.recv(65536)):
                got += chunk
        if got != payload:
            raise RuntimeError(f"port {port}: echo mismatch ({len(got)} bytes)")


def scenarios(n: int, work: Path) -> dict[str, list[list[str]]]:
    """Each scenario's command lines."""
    tag = secrets.token_hex(3)
    allow = work / "allow.txt"
    allow.write_text("127.0.0.0/8\n")
    (work / "pathways.conf").write_text(f"{MARK}\n")
    names = [f"mem{tag}-{i}" for i in range(n)]
    rows = [
        f"{name} {MARK} 127.0.0.1:{BASE_PORT + i} 127.0.0.1 {ECHO_PORT} ::1\n"
        for i, name in enumerate(names)
    ]
    (work / "instances.tsv").write_text("".join(rows))
    cfg = ["--config-dir", str(work), "-listeners", "1"]  # one process each: the floor
    go = [
        [GO, "-l", f"127.0.0.1:{BASE_PORT + i}", "-4", f"127.0.0.1:{ECHO_PORT}",
         "-6", f"[::1]:{ECHO_PORT}", "-mark", str(MARK), "-allowed-subnets", str(allow)]
        for i in range(n)
    ]  # fmt: skip
    return {
        f"pymmproxy serve ({n} instances, 1 process)": [[PY, "-m", "pymmproxy", "serve", *cfg]],
        f"pymmproxy --instance x {n}": [
            [PY, "-m", "pymmproxy", "--instance", name, *cfg] for name in names
        ],
        f"go-mmproxy x {n}": go,
    }


def measure(argvs: list[list[str]], n: int, conns: int, log: Path) -> dict[str, float]:
    with log.open("ab") as out:
        procs = [subprocess.Popen(a, stdout=out, stderr=out, cwd=ROOT) for a in argvs]
    try:
        for i in range(n):
            wait_port(BASE_PORT + i)
        for i in range(n):
            relay(BASE_PORT + i, conns)
        time.sleep(0.5)
        totals = [smaps(p.pid) for p in procs]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    rss, pss, uss = (sum(t[i] for t in totals) / 1024 for i in range(3))
    return {"processes": len(procs), "rss_mib": rss, "pss_mib": pss, "uss_mib": uss}


def inner(args: argparse.Namespace) -> int:
    """Runs inside the benchmark namespace."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run([PY, "-m", "pymmproxy", "pathway", "add", str(MARK)], check=True,
                   cwd=ROOT, capture_output=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="pmxmem-"))
    echo = subprocess.Popen(
        [PY, "-m", "pymmproxy.lab.services", "echo", "--listen", f"127.0.0.1:{ECHO_PORT}"],
        stdout=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    try:
        wait_port(ECHO_PORT)
        for name, argvs in scenarios(args.instances, work).items():
            if argvs[0][0] == GO and not Path(GO).exists():
                continue
            results[name] = measure(argvs, args.instances, args.conns, work / "proxies.log")
    finally:
        echo.kill()
        echo.wait()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{args.instances} instances, {args.conns} relayed connections each, then measured\n")
    print("| scenario | processes | RSS (MiB) | PSS (MiB) | USS (MiB) | PSS per instance |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        per = r["pss_mib"] / args.instances
        print(f"| {name} | {r['processes']:.0f} | {r['rss_mib']:.1f} | {r['pss_mib']:.1f} "
              f"| {r['uss_mib']:.1f} | {per:.2f} |")  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args)
    if os.geteuid() != 0:
        sys.exit("needs root (network namespace, IP_TRANSPARENT)")
    name = f"pmxmem{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        argv = [PY, "-m", "benchmarks.memory_instances", "--inner", *sys.argv[1:]]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(["ip", "netns", "exec", name, *argv], cwd=ROOT, env=env,
                              check=False, timeout=120).returncode  # fmt: skip
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              check=False).stdout.split()  # fmt: skip
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    sys.exit(main())
