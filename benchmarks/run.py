"""Run the benchmark: ``python -m benchmarks.run [--quick] [--out DIR] [--only NAMES]``.

Builds client/lb/workload namespaces, installs the pathway with pymmproxy's own module,
starts nginx, ``iperf3 -s`` and the load balancer (HAProxy, ``send-proxy-v2``), then for each
candidate in turn: startup time, idle memory per connection, keep-alive req/s and latency
(wrk), new connections/s (wrk, ``Connection: close``) with CPU per connection, bulk
throughput (iperf3) with CPU per GB. Writes ``<out>/<stamp>.json``, ``.md`` and ``.png``.
Needs root; touches nothing outside the namespaces it creates (always removed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import measures as m
from benchmarks.candidates import CANDIDATES, NAMES, Bench, Candidate, Proc, check_tools
from benchmarks.report import write_reports
from benchmarks.topology import BenchError, Topology
from pymmproxy.cpus import usable_cpus
from pymmproxy.lab.nsexec import LabError

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Plan:
    """Durations (s, per round) and sizes of one run."""

    quick: bool
    warmup: int
    close_warmup: int
    keepalive: int
    close: int
    bulk: int
    rounds: int
    idle_conns: int
    settle: float
    connections: int = 50
    close_connections: int = 50
    threads: int = 2

    @classmethod
    def make(
        cls, quick: bool, *, connections: int = 50, threads: int = 2, rounds: int | None = None
    ) -> Plan:
        if quick:
            return cls(
                True,
                warmup=0,
                close_warmup=0,
                keepalive=1,
                close=1,
                bulk=1,
                rounds=rounds or 1,
                idle_conns=300,
                settle=0.3,
                connections=connections,
                close_connections=connections,
                threads=threads,
            )
        return cls(
            False,
            warmup=2,
            close_warmup=1,
            keepalive=3,
            close=2,
            bulk=2,
            rounds=rounds or 5,
            idle_conns=2000,
            settle=1.5,
            connections=connections,
            close_connections=connections,
            threads=threads,
        )


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        sys.stderr.write(f"[{time.monotonic() - self.t0:6.1f}s] {msg}\n")
        sys.stderr.flush()


class Runner:
    """All candidates run side by side (idle when not measured); the timed measures go in
    rounds that alternate between candidates, so background load drifts hit all alike."""

    def __init__(
        self,
        bench: Bench,
        cands: tuple[Candidate, ...],
        plan: Plan,
        say: Callable[[str], None],
        profile_dir: Path | None,
    ) -> None:
        self.bench, self.plan, self.say, self.profile_dir = bench, plan, say, profile_dir
        self.cands = list(cands)
        self.procs: dict[str, tuple[Proc | None, Proc | None]] = {}
        self.results: dict[str, dict[str, Any]] = {
            c.name: {  # pymmproxy's worker processes (its default: one per usable CPU)
                "kind": c.kind,
                "listeners": (c.listeners or usable_cpus()) if c.kind == "pymmproxy" else None,
            }
            for c in cands
        }
        self.failed: dict[str, str] = {}
        self.rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
            c.name: {"keepalive": [], "close": [], "bulk": []} for c in cands
        }

    @property
    def alive(self) -> list[Candidate]:
        return [c for c in self.cands if c.name not in self.failed]

    def step(self, cand: Candidate, fn: Callable[..., None], *args: object) -> None:
        """Run one step for ``cand``: a failed measure is retried once, then recorded; only
        a failed start or a dead process drops the candidate."""
        if cand.name in self.failed:
            return
        for attempt in (1, 2):
            try:
                fn(cand, *args)
                break
            except LabError as exc:  # BenchError, or the lab helpers' own
                dead = [
                    p
                    for p in self.procs.get(cand.name, (None, None))
                    if p is not None and not p.alive
                ]
                if fn == self.start or dead:
                    why = f"{exc}" + "".join(f"; {p.name} died: {p.tail()}" for p in dead)
                    self.say(f"{cand.name}: FAILED: {why}")
                    self.failed[cand.name] = why
                    self.results.pop(cand.name, None)
                    for proc in self.procs.pop(cand.name, (None, None)):
                        if proc is not None:
                            self.bench.stop(proc)
                    return
                what = f"{fn.__name__}{'/' + str(args[0]) if args else ''}"
                self.say(f"{cand.name}: {what} failed (attempt {attempt}): {exc}")
                if attempt == 2:
                    self.results[cand.name].setdefault("measure_errors", []).append(
                        f"{what}: {exc}"
                    )
                time.sleep(1)

    def run(self) -> None:
        plan = self.plan
        for cand in self.alive:
            self.step(cand, self.start)
        for cand in self.alive:
            self.step(cand, self.warm_up)
        for cand in self.alive:
            self.step(cand, self.idle_memory)
        for what in ("keepalive", "close", "bulk"):
            for rnd in range(plan.rounds):
                order = (
                    self.alive[rnd % max(1, len(self.alive)) :]
                    + self.alive[: rnd % max(1, len(self.alive))]
                )
                for cand in order:
                    self.step(cand, self.measure, what, rnd)
        if self.profile_dir is not None:
            for cand in self.alive:
                if cand.kind == "pymmproxy":
                    self.step(cand, self.profile)
        for cand in self.alive:
            self.aggregate(cand)

    def start(self, cand: Candidate) -> None:
        if not cand.is_proxy:
            self.procs[cand.name] = (None, None)
            return
        probe = m.StartupProbe(self.bench.topo.lb, cand.http_port)
        probe.start()
        t0 = time.monotonic()
        http = self.bench.start_candidate(cand, bulk=False)
        self.procs[cand.name] = (http, None)
        ms = probe.result(t0) * 1e3
        bulk = self.bench.start_candidate(cand, bulk=True)
        self.procs[cand.name] = (http, bulk)
        bulk.wait_listening(cand.bulk_port)
        self.results[cand.name]["startup_ms"] = ms
        self.say(f"{cand.name}: started, first answered connection {ms:.0f} ms after exec")

    def warm_up(self, cand: Candidate) -> None:
        plan, client = self.plan, self.bench.topo.client
        if plan.warmup:
            m.run_wrk(
                client,
                cand.lb_http_port,
                plan.warmup,
                connections=plan.connections,
                threads=plan.threads,
            )
        if plan.close_warmup:
            m.run_wrk(
                client,
                cand.lb_http_port,
                plan.close_warmup,
                connections=plan.close_connections,
                threads=plan.threads,
                close=True,
            )

    def idle_memory(self, cand: Candidate) -> None:
        http = self.procs[cand.name][0]
        if http is None:
            return
        res = measure_idle(self.bench, cand, http, self.plan)
        self.results[cand.name].update(res)
        self.say(
            f"{cand.name}: {res['idle_conns']} idle conns, "
            f"{res['idle_kb_per_conn']:.2f} KB/conn "
            f"(PSS {res['pss_base_kb'] / 1024:.1f} MB base, {res['processes']} processes)"
        )

    def measure(self, cand: Candidate, what: str, rnd: int) -> None:
        plan, client = self.plan, self.bench.topo.client
        http, bulk = self.procs[cand.name]
        proc = bulk if what == "bulk" else http
        cpu0 = m.tree_cpu_seconds(proc.pid) if proc else None
        tag = f"{cand.name} [{what} {rnd + 1}/{plan.rounds}]"
        if what == "bulk":
            gbps, nbytes = m.run_iperf3(client, cand.lb_bulk_port, plan.bulk)
            row: dict[str, Any] = {"gbps": gbps, "bytes": nbytes}
            msg = f"{gbps:.2f} Gbit/s"
        else:
            close = what == "close"
            seconds = plan.close if close else plan.keepalive
            window = m.SchedWindow(proc.pid if proc else None, seconds)
            window.start()
            w = m.run_wrk(
                client,
                cand.lb_http_port,
                seconds,
                connections=plan.close_connections if close else plan.connections,
                threads=plan.threads,
                close=close,
            )
            window.join()
            row = {**w.as_dict(), **window.result}
            if "host_busy" in row and w.rps > 0:  # the whole chain's CPU per request
                row["host_us"] = row["host_busy"] / w.rps * 1e6
            msg = (
                f"{w.rps:,.0f} {'conns' if close else 'req'}/s, p50 {w.p50_ms:.2f} ms, "
                f"p99 {w.p99_ms:.2f} ms"
                + (f", socket errors {w.socket_errors}" if w.errors else "")
            )
        if proc is not None and cpu0 is not None:
            row["cpu_s"] = m.tree_cpu_seconds(proc.pid) - cpu0
            if what == "bulk":
                msg += f", CPU {row['cpu_s'] / (row['bytes'] / 1e9) * 1e3:.0f} ms/GB"
            else:
                msg += f", CPU {row['cpu_s'] / max(1, row['requests']) * 1e6:.0f} µs/" + (
                    "conn" if what == "close" else "req"
                )
        if "cpu_wait" in row:
            msg += f", on CPU {row['on_cpu']:.2f} / waiting {row['cpu_wait']:.2f}"
        if "host_idle" in row:  # the load phases only (SchedWindow)
            msg += f", host idle {row['host_idle']:.0%}"
        if "host_us" in row:
            msg += f", host CPU {row['host_us']:.0f} µs/" + ("conn" if what == "close" else "req")
        self.rounds[cand.name][what].append(row)
        self.say(f"{tag}: {msg}")

    def profile(self, cand: Candidate) -> None:
        """One extra (uncounted) new-connection round under py-spy."""
        http = self.procs[cand.name][0]
        assert http is not None
        assert self.profile_dir is not None
        spy = start_profile(http, cand, self.plan, self.profile_dir)
        m.run_wrk(
            self.bench.topo.client,
            cand.lb_http_port,
            self.plan.close,
            connections=self.plan.close_connections,
            threads=self.plan.threads,
            close=True,
        )
        if spy is not None:
            finish_profile(spy, self.results[cand.name], self.say)

    def aggregate(self, cand: Candidate) -> None:
        res, rounds = self.results[cand.name], self.rounds[cand.name]
        res["rounds"] = rounds
        for what, cpu_key, scale in (
            ("keepalive", "cpu_us_per_request", 1e6),
            ("close", "cpu_us_per_conn", 1e6),
        ):
            rows = rounds[what]
            if not rows:
                continue
            reqs = sum(r["requests"] for r in rows)
            secs = sum(r["seconds"] for r in rows)
            res[what] = {
                "requests": reqs,
                "seconds": secs,
                # the median round: one round that other work on the machine slowed (or
                # spared) moves a mean of few rounds by ~10 %, the median not at all
                "rps": _median([r["requests"] / r["seconds"] for r in rows if r["seconds"]]) or 0.0,
                "p50_ms": _median([r["p50_ms"] for r in rows]),
                "p90_ms": _median([r["p90_ms"] for r in rows]),
                "p99_ms": _median([r["p99_ms"] for r in rows]),
                "p99_ms_max": max((r["p99_ms"] or 0.0) for r in rows),
                "errors": sum(r["errors"] for r in rows),
                "socket_errors": {
                    k: sum(r["socket_errors"][k] for r in rows) for k in rows[0]["socket_errors"]
                },
                "non2xx": sum(r["non2xx"] for r in rows),
            }
            if all("cpu_s" in r for r in rows):
                res[cpu_key] = sum(r["cpu_s"] for r in rows) / max(1, reqs) * scale
            for key in ("on_cpu", "cpu_wait", "host_idle", "host_busy", "host_us"):  # mean
                if all(key in r for r in rows):
                    res[what][key] = sum(r[key] for r in rows) / len(rows)
        rows = rounds["bulk"]
        if rows:
            res["bulk_gbps"] = _median([r["gbps"] for r in rows])
            res["bulk_bytes"] = sum(r["bytes"] for r in rows)
            if all("cpu_s" in r for r in rows):
                res["cpu_ms_per_gb"] = (
                    sum(r["cpu_s"] for r in rows) / (res["bulk_bytes"] / 1e9) * 1e3
                )


def _median(values: list[float | None]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def measure_idle(bench: Bench, cand: Candidate, http: Proc, plan: Plan) -> dict[str, Any]:
    time.sleep(plan.settle)
    base = m.tree_pss_kb(http.pid)
    holder = m.hold_idle(bench.topo.client, cand.lb_http_port, plan.idle_conns, bench.workdir)
    try:
        time.sleep(plan.settle)
        held = m.tree_pss_kb(http.pid)
    finally:
        m.release(holder)
    time.sleep(plan.settle)
    return {
        "idle_conns": plan.idle_conns,
        "pss_base_kb": base,
        "pss_idle_kb": held,
        "idle_kb_per_conn": (held - base) / plan.idle_conns,
        "processes": len(m.tree_pids(http.pid)),
    }


# -- optional py-spy profile of the new-connection load -----------------------------------
def start_profile(
    http: Proc, cand: Candidate, plan: Plan, profile_dir: Path
) -> tuple[subprocess.Popen[bytes], Path] | None:
    if cand.kind != "pymmproxy":
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    out = profile_dir / f"{cand.name}-close.collapsed"
    argv = [
        spy,
        "record",
        "--pid",
        str(http.pid),
        "--subprocesses",
        "--nonblocking",
        "--rate",
        "250",
        "--duration",
        str(plan.close),
        "--format",
        "raw",
        "-o",
        str(out),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc, out


def finish_profile(
    spy: tuple[subprocess.Popen[bytes], Path], res: dict[str, Any], say: Callable[[str], None]
) -> None:
    from benchmarks.profile import summarize  # noqa: PLC0415

    proc, out = spy
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    if out.exists():
        res["profile"] = summarize(out)
        say(f"profile written to {out}")


# -- the run ------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return "?"
        text = (res.stdout or res.stderr).strip().splitlines()
        return text[0] if text else "?"

    def deb(pkg: str) -> str:
        return first_line(["dpkg-query", "-W", "-f", "${Version}", pkg])

    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "haproxy": first_line(["haproxy", "-v"]),
        "go-mmproxy": deb("go-mmproxy"),
        "nginx": deb("nginx-light") if deb("nginx-light") != "?" else deb("nginx"),
        "wrk": deb("wrk"),
        "iperf3": deb("iperf3"),
    }


def run(
    plan: Plan,
    names: tuple[str, ...],
    out: Path | None,
    *,
    udp: bool = True,
    profile: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (written to ``out`` unless None)."""
    say = say or Progress()
    check_tools()
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces)")
    cands = tuple(c for c in CANDIDATES if c.name in names)
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H%M%S") + ("-quick" if plan.quick else "")
    data: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "plan": asdict(plan),
        "versions": versions(),
        "loadavg_start": _loadavg(),
        "results": {},
        "failed": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="pmxbench-"))
    profile_dir = (out or workdir) / f"{stamp}-profile" if profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with Topology() as topo:
            say(f"namespaces {topo.client.name}, {topo.lb.name}, {topo.workload.name} up")
            bench = Bench(topo, workdir, cands)
            try:
                bench.start_fixed()
                say("pathway 123, nginx, iperf3 -s and the load balancer running")
                runner = Runner(bench, cands, plan, say, profile_dir)
                runner.run()
                data["results"], data["failed"] = runner.results, runner.failed
            finally:
                bench.stop_all()
        if udp:
            data["udp"] = run_udp(plan.quick, say)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    data["seconds"] = round(time.monotonic() - started, 1)
    data["loadavg_end"] = _loadavg()
    if out is not None:
        paths = write_reports(data, out, stamp)
        for p in paths:
            say(f"wrote {p}")
    say(f"done in {data['seconds']:.0f} s")
    return data


def _loadavg() -> str:
    """The host's load average (other work on the machine shows up in the numbers)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_udp(quick: bool, say: Callable[[str], None]) -> object:
    """The UDP engineer's ``benchmarks.udp_bench.run_udp_bench(quick)``, if it exists."""
    if not (Path(__file__).resolve().parent / "udp_bench.py").exists():
        return None
    say("--- udp (benchmarks.udp_bench) ---")
    try:
        mod = importlib.import_module("benchmarks.udp_bench")
        fn = getattr(mod, "run_udp_bench", None)
        if fn is None:
            return {"error": "benchmarks.udp_bench has no run_udp_bench"}
        return fn(quick)
    except Exception as exc:  # noqa: BLE001 - its failure must not lose the TCP results
        say(f"udp bench failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _sigterm(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="short smoke run (<= 1 minute)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"output directory ({RESULTS})")
    ap.add_argument(
        "--only",
        default=",".join(NAMES),
        help=f"comma-separated candidates (default: {','.join(NAMES)})",
    )
    ap.add_argument("--no-udp", action="store_true", help="skip benchmarks.udp_bench")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternating rounds per timed measure (full 5, quick 1)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the pymmproxy candidates under the new-connection load "
        "(slows them: do not compare those numbers)",
    )
    args = ap.parse_args(argv)
    names = tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        ap.error(f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    plan = Plan.make(
        args.quick, connections=args.connections, threads=args.threads, rounds=args.rounds
    )
    try:
        data = run(plan, names, args.out, udp=not args.no_udp, profile=args.profile)
    except LabError as exc:  # BenchError, or the lab helpers' own
        sys.stderr.write(f"benchmark failed: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; namespaces removed\n")
        return 130
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(json.dumps({k: data[k] for k in ("date", "seconds", "failed")}) + "\n")
    return 1 if data["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
