"""UDP benchmark: pymmproxy vs go-mmproxy ``-p udp`` on the same traffic, one after the other.

One namespace (random name, always deleted) holds everything::

    load generator (LB role) --PROXY v2 DGRAM--> proxy [::]:9000 --spoofed--> echo 127.0.0.1:7000
    198.51.100.2                                 mark 123 pathway             (raw echo)

Two phases per proxy, each with a fresh proxy process:

* throughput: ``clients`` spoofed clients, ``window`` datagrams in flight (closed loop);
  the result is replies per second (each reply is one datagram relayed each way);
* latency: one datagram in flight; p50/p99 of the reply round trip.

Each proxy's CPU time per round trip (from ``/proc``) is reported too: on a shared machine it
is steadier than the rates. Two rounds, alternating which proxy goes first; the best value
of each metric is reported, every round is kept under ``rounds``.

With two or more CPUs the proxy is pinned to the last CPU and the load generator and echo to
the others (``taskset``), so both proxies get exactly one core. Run as root:
``python -m benchmarks.udp_bench [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
GO = shutil.which("go-mmproxy") or "/usr/bin/go-mmproxy"
LB = "198.51.100.2"
PORT, ECHO_PORT, MARK = 9000, 7000, 123
CLIENTS, WINDOW = 64, 32
ROUNDS = 2
NAMES = ("pymmproxy", "go-mmproxy")
TOOLS = "tests.integration.udp_tools"


class _Ns:
    """A throw-away namespace with the workload address, a foreign default route, a pathway."""

    def __init__(self) -> None:
        self.name = f"pmub{secrets.token_hex(3)}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> _Ns:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            for cmd in (
                "ip link set lo up",
                "ip link add wl0 type veth peer name wl1",
                "ip link set wl0 up",
                "ip link set wl1 up",
                f"ip addr add {LB}/24 dev wl0",
                "ip route add default via 198.51.100.1 dev wl0",
            ):
                self.run(cmd.split())
            self.run([PY, "-m", "pymmproxy", "pathway", "add", str(MARK)])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def argv(self, argv: list[str], cpus: str | None) -> list[str]:
        pin = ["taskset", "-c", cpus] if cpus else []
        return ["ip", "netns", "exec", self.name, *pin, *argv]

    def run(self, argv: list[str], cpus: str | None = None, timeout: float = 60) -> str:
        done = subprocess.run(
            self.argv(argv, cpus),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def spawn(self, argv: list[str], cpus: str | None, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                self.argv(argv, cpus), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self.procs.append(proc)
        return proc


def _cpus() -> tuple[str | None, str | None]:
    """(proxy CPU, load CPUs) for taskset, or (None, None) on a single CPU."""
    count = len(os.sched_getaffinity(0))
    if count < 2 or shutil.which("taskset") is None:
        return None, None
    ids = sorted(os.sched_getaffinity(0))
    return str(ids[-1]), ",".join(str(i) for i in ids[:-1])


def _proxy_argv(name: str, allow: Path) -> list[str]:
    exe = [GO] if name == "go-mmproxy" else [PY, "-m", "pymmproxy"]
    return [*exe, "-p", "udp", "-l", f"[::]:{PORT}", "-4", f"127.0.0.1:{ECHO_PORT}",
            "-6", f"[::1]:{ECHO_PORT}", "-mark", str(MARK), "-allowed-subnets", str(allow),
            "-close-after", "60"]  # fmt: skip


def _measure(
    ns: _Ns, name: str, workdir: Path, cpus: tuple[str | None, str | None], secs: dict[str, float]
) -> dict[str, Any]:
    """Start ``name``, run both phases against it, stop it."""
    proxy_cpu, load_cpus = cpus
    proc = ns.spawn(_proxy_argv(name, workdir / "allow.txt"), proxy_cpu, workdir / f"{name}.log")
    try:
        target = f"{LB}:{PORT}"
        ns.run([PY, "-m", TOOLS, "probe", "--proxy", target, "--bind", LB], load_cpus)
        load = [PY, "-m", TOOLS, "load", "--proxy", target, "--bind", LB, "--warmup", "0.5"]
        # Each phase uses its own clients: its flows are created during its own warm-up.
        cpu0 = _cpu_seconds(proc.pid)
        tput = json.loads(ns.run([*load, "--clients", str(CLIENTS), "--window", str(WINDOW),
                                  "--sport", "20000", "--duration", str(secs["throughput"])],
                                 load_cpus))  # fmt: skip
        cpu = _cpu_seconds(proc.pid) - cpu0
        lat = json.loads(ns.run([*load, "--clients", "16", "--window", "1", "--sport", "30000",
                                 "--duration", str(secs["latency"])], load_cpus))  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return {
        "dgrams_per_s": round(tput["dgrams_per_s"], 1),
        "loaded_rtt_p99_ms": round(tput["rtt_p99_ms"], 3),
        "rtt_p50_ms": round(lat["rtt_p50_ms"], 3),
        "rtt_p99_ms": round(lat["rtt_p99_ms"], 3),
        "timeouts": tput["timeouts"] + lat["timeouts"],
        # Proxy CPU time per round trip (one datagram relayed each way), warm-up included:
        # what the proxy costs, unaffected by how busy the rest of the machine is.
        "cpu_us_per_roundtrip": round(cpu / tput["total_replies"] * 1e6, 2)
        if tput["total_replies"]
        else None,
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best value of each metric over the rounds (the machine may be shared and noisy)."""
    best: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        pick = max if key == "dgrams_per_s" else min
        best[key] = pick(values) if values else None
    best["timeouts"] = sum(r["timeouts"] for r in runs)
    return best


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_udp_bench(quick: bool) -> dict[str, Any]:
    """Benchmark both proxies in one namespace, alternating; ~25 s quick, ~50 s full."""
    if os.geteuid() != 0:
        raise RuntimeError("udp_bench needs root (network namespaces)")
    if not Path(GO).exists():
        raise RuntimeError(f"go-mmproxy not found at {GO}")
    secs = {"throughput": 1.5, "latency": 0.75} if quick else {"throughput": 6.0, "latency": 2.0}
    cpus = _cpus()
    # The processes' logs: removed after a good run, kept (and named) after a failure.
    workdir = Path(tempfile.mkdtemp(prefix="pmxudp-"))
    (workdir / "allow.txt").write_text(f"{LB}/32\n")
    started = time.monotonic()
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in NAMES}
    try:
        with _Ns() as ns:
            ns.spawn([PY, "-m", TOOLS, "echo", "--raw", "--listen", f"127.0.0.1:{ECHO_PORT}",
                      "--listen", f"[::1]:{ECHO_PORT}"], cpus[1], workdir / "echo.log")  # fmt: skip
            for n in range(ROUNDS):
                for name in NAMES if n % 2 == 0 else NAMES[::-1]:  # alternate who goes first
                    rounds[name].append(_measure(ns, name, workdir, cpus, secs))
    except BaseException:
        print(f"udp_bench: logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    results = {name: _best(runs) for name, runs in rounds.items()}
    ours, theirs = results["pymmproxy"], results["go-mmproxy"]
    ratio = {
        "dgrams_per_s": round(ours["dgrams_per_s"] / theirs["dgrams_per_s"], 3)
        if theirs["dgrams_per_s"]
        else None,
        "rtt_p99": round(ours["rtt_p99_ms"] / theirs["rtt_p99_ms"], 3)
        if theirs["rtt_p99_ms"]
        else None,
    }
    out = {
        "results": results,
        "rounds": rounds,
        "ratio_pymmproxy_vs_go": ratio,
        "config": {
            "quick": quick,
            "rounds": ROUNDS,
            "aggregate": "best of rounds (max datagrams/s, min latency and CPU)",
            "seconds": secs,
            "clients": CLIENTS,
            "window": WINDOW,
            "payload_bytes": 64,
            "proxy_cpu": cpus[0],
            "load_cpus": cpus[1],
            "wall_s": round(time.monotonic() - started, 1),
        },
    }
    out["markdown"] = _markdown(out)
    return out


def _markdown(out: dict[str, Any]) -> str:
    rows = ["| proxy | datagrams/s | RTT p50 ms | RTT p99 ms | loaded RTT p99 ms "
            "| proxy CPU µs/round trip |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in out["results"].items():
        rows.append(
            f"| {name} | {r['dgrams_per_s']:,.0f} | {r['rtt_p50_ms']:.3f} | "
            f"{r['rtt_p99_ms']:.3f} | {r['loaded_rtt_p99_ms']:.3f} | {r['cpu_us_per_roundtrip']} |"
        )
    ratio = out["ratio_pymmproxy_vs_go"]
    cfg = out["config"]
    rows.append("")
    rows.append(
        f"pymmproxy/go-mmproxy: {ratio['dgrams_per_s']}x datagrams/s, {ratio['rtt_p99']}x p99 RTT "
        f"({cfg['clients']} clients, window {cfg['window']}, {cfg['payload_bytes']} B payload, "
        f"proxy on CPU {cfg['proxy_cpu']}, load on CPU {cfg['load_cpus']})"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.udp_bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short phases (~25 s in all)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    out = run_udp_bench(args.quick)
    print(json.dumps(out, indent=2) if args.json else out["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
