"""Where the idle CPU time goes under keep-alive load: ``python -m benchmarks.schedtrace``.

The benchmark's scheduling table shows that the host leaves more CPU idle with one
pymmproxy process than with HAProxy's two threads, although the load never stops. This
tool says why, from the scheduler's own events: for each candidate it runs the keep-alive
load on the benchmark's topology, records ``perf sched record -a`` for the middle of it,
and splits every idle CPU-second by what the candidate's threads were doing meanwhile:

- ``waiting``: one of them was runnable but queued behind another task on the *other*
  CPU (the idle CPU did not pull it over);
- ``running``: one ran while everything else waited on it (the candidate was the
  chain's serial point);
- ``asleep``: none was runnable (the rest of the chain was the bottleneck).

Episodes of ``waiting`` are also listed by length. Needs ``perf`` (Debian ``linux-perf``)
and root; builds and removes its own namespaces, like ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import measures as m
from benchmarks.candidates import CANDIDATES, Bench
from benchmarks.topology import BenchError, Topology

_SWITCH = re.compile(
    r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:.*?prev_pid=(\d+)\s.*?prev_state=(\S+)"
    r"\s+==>\s+.*?next_pid=(\d+)"
)
_WAKE = re.compile(r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_wak(?:ing|eup_new):.*?\spid=(\d+)\s")
LONG_US = 100  # episodes at least this long are counted apart


@dataclass(frozen=True)
class Event:
    """One scheduler event of ``perf script``: a switch on ``cpu``, or a wake-up of ``tid``."""

    time: float
    cpu: int
    kind: str  # "switch" | "wake"
    tid: int  # switch: the task leaving the CPU; wake: the task woken
    next_tid: int = 0  # switch: the task taking the CPU (0: idle)
    preempted: bool = False  # switch: the task left still runnable (state R)


def parse(lines: Iterable[str]) -> Iterator[Event]:
    """The switch and wake-up events of ``perf script -F cpu,time,event,trace`` output."""
    for line in lines:
        sw = _SWITCH.search(line)
        if sw:
            cpu, t, prev, state, nxt = sw.groups()
            yield Event(float(t), int(cpu), "switch", int(prev), int(nxt), state.startswith("R"))
            continue
        wk = _WAKE.search(line)
        if wk:
            cpu, t, tid = wk.groups()
            yield Event(float(t), int(cpu), "wake", int(tid))


@dataclass
class Split:
    """Idle CPU-seconds by what the candidate's threads did meanwhile (see the docstring)."""

    cpus: int
    seconds: float = 0.0  # wall time covered (from the first moment every CPU was seen)
    waiting: float = 0.0
    running: float = 0.0
    asleep: float = 0.0
    episodes: list[float] = field(default_factory=list)  # lengths of "waiting" stretches, s

    @property
    def cpu_seconds(self) -> float:
        return self.seconds * self.cpus

    @property
    def idle(self) -> float:
        return self.waiting + self.running + self.asleep

    def share(self, part: float) -> float:
        """``part`` as a share of all CPU time."""
        return part / self.cpu_seconds if self.cpu_seconds else 0.0


def analyse(events: Iterable[Event], tids: set[int], cpus: int) -> Split:
    """Split the idle CPU time of a trace by the state of the threads ``tids``."""
    current: dict[int, int] = {}  # cpu -> tid on it (0: idle)
    state: dict[int, str] = {}  # tid -> "R" on a CPU, "W" runnable and queued, "S" asleep
    out = Split(cpus)
    last: float | None = None
    since: float | None = None  # start of the current "waiting while a CPU idles" stretch
    for ev in events:
        if last is not None and len(current) == cpus:
            dt = ev.time - last
            idle = sum(1 for tid in current.values() if tid == 0)
            out.seconds += dt
            if idle:
                states = {state.get(t, "S") for t in tids}
                if "W" in states:
                    out.waiting += dt * idle
                elif "R" in states:
                    out.running += dt * idle
                else:
                    out.asleep += dt * idle
        last = ev.time
        if ev.kind == "switch":
            current[ev.cpu] = ev.next_tid
            if ev.tid in tids:
                state[ev.tid] = "W" if ev.preempted else "S"
            if ev.next_tid in tids:
                state[ev.next_tid] = "R"
        elif ev.tid in tids and state.get(ev.tid, "S") == "S":
            state[ev.tid] = "W"
        stuck = (
            len(current) == cpus
            and 0 in current.values()
            and any(state.get(t) == "W" for t in tids)
        )
        if stuck and since is None:
            since = ev.time
        elif not stuck and since is not None:
            out.episodes.append(ev.time - since)
            since = None
    return out


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def trace_one(
    topo: Topology, port: int, tids: set[int], seconds: float, conns: int
) -> tuple[float, Split]:
    """Keep-alive load on the LB's ``port`` for ``seconds``; trace its middle half."""
    cpus = os.cpu_count() or 1
    result: list[m.WrkResult] = []

    def load() -> None:
        result.append(m.run_wrk(topo.client, port, seconds, connections=conns, threads=2))

    with tempfile.TemporaryDirectory(prefix="pmxsched-") as tmp:
        data = Path(tmp) / "sched.data"
        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(seconds / 4)
        record = ["perf", "sched", "record", "-a", "-o", str(data), "--", "sleep"]
        subprocess.run(
            [*record, str(seconds / 2)], capture_output=True, check=True, timeout=seconds + 30
        )
        loader.join()
        script = ["perf", "script", "-i", str(data), "-F", "cpu,time,event,trace"]
        text = subprocess.run(
            script, capture_output=True, text=True, check=True, timeout=300
        ).stdout
    rate = result[0].rps if result else 0.0
    return rate, analyse(parse(text.splitlines()), tids, cpus)


def trace(names: list[str], seconds: float, conns: int) -> list[tuple[str, float, Split]]:
    """Start the candidates on the benchmark's topology and trace each under load."""
    if shutil.which("perf") is None:
        raise BenchError("perf not found (apt-get install -y linux-perf)")
    cands = [c for c in CANDIDATES if c.name in names]
    rows: list[tuple[str, float, Split]] = []
    work = Path(tempfile.mkdtemp(prefix="pmxsched-"))
    try:
        with Topology() as topo:
            bench = Bench(topo, work, tuple(cands))
            try:
                bench.start_fixed()
                procs = {}
                for cand in cands:
                    procs[cand.name] = bench.start_candidate(cand, bulk=False)
                    procs[cand.name].wait_listening(cand.http_port)
                for cand in cands:  # warm-up
                    m.run_wrk(topo.client, cand.lb_http_port, 1, connections=conns, threads=2)
                for cand in cands:
                    tids = {int(t.name) for t in m.tree_tasks(procs[cand.name].popen.pid)}
                    rate, split = trace_one(topo, cand.lb_http_port, tids, seconds, conns)
                    rows.append((cand.name, rate, split))
            finally:
                bench.stop_all()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def table(rows: list[tuple[str, float, Split]]) -> str:
    head = (
        "| candidate | req/s | host idle | idle: a candidate thread waited | idle: it ran, the "
        "rest waited on it | idle: it slept | waits while a CPU idled: count, p50, p90 µs, "
        f"share >= {LONG_US} µs |\n|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for name, rate, s in rows:
        eps = s.episodes
        long_share = sum(e for e in eps if e >= LONG_US / 1e6) / s.seconds if s.seconds else 0
        lines.append(
            f"| {name} | {rate:,.0f} | {s.share(s.idle):.1%} | {s.share(s.waiting):.1%} "
            f"| {s.share(s.running):.1%} | {s.share(s.asleep):.1%} | {len(eps)}, "
            f"{quantile(eps, 0.5) * 1e6:.0f}, {quantile(eps, 0.9) * 1e6:.0f}, {long_share:.1%} |"
        )
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.schedtrace", description=__doc__)
    ap.add_argument("--only", default="pymmproxy,pymmproxy-1,haproxy,go-mmproxy")
    ap.add_argument("--seconds", type=float, default=4.0, help="keep-alive load per candidate")
    ap.add_argument("--connections", type=int, default=50)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {c.name for c in CANDIDATES if c.is_proxy})
    if unknown:
        ap.error(f"unknown or non-proxy candidate(s): {', '.join(unknown)}")
    try:
        rows = trace(names, args.seconds, args.connections)
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        sys.stderr.write(f"schedtrace failed: {exc}\n")
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
