"""Measures and their parsers: wrk, iperf3, PSS, CPU and scheduler time of a process tree,
startup.

The parsers are pure functions (tested on captured output); the runners start the client
tools inside the client namespace with bounded durations and timeouts.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.topology import CLIENT_IP, LB_FRONT, WORKLOAD_IP, BenchError, Netns
from pymmproxy.lab.nsexec import enter_netns

CLK_TCK = os.sysconf("SC_CLK_TCK")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# -- wrk ----------------------------------------------------------------------------------
@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    errors: int
    non2xx: int
    socket_errors: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _duration_s(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output."""
    m = re.search(r"(\d+) requests in ([\d.]+\w+),", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m or not rps:
        raise BenchError(f"cannot parse wrk output: {text.strip()[-300:]}")
    pct: dict[int, float] = {}
    for p, val in re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)\s*$", text, re.MULTILINE):
        pct[int(p)] = _duration_s(val) * 1e3
    kinds = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if err:
        kinds = dict(zip(kinds, (int(x) for x in err.groups()), strict=True))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(m.group(1)),
        seconds=_duration_s(m.group(2)),
        rps=float(rps.group(1)),
        p50_ms=pct.get(50),
        p90_ms=pct.get(90),
        p99_ms=pct.get(99),
        errors=sum(kinds.values()),
        socket_errors=kinds,
        non2xx=int(non2xx.group(1)) if non2xx else 0,
    )


def run_wrk(
    client: Netns, port: int, seconds: float, *, connections: int, threads: int, close: bool = False
) -> WrkResult:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "3s",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{LB_FRONT}:{port}/")
    res = client.run(argv, timeout=seconds + 30, check=False)
    if res.returncode != 0:
        raise BenchError(f"wrk failed ({res.returncode}): {(res.stderr or res.stdout)[-300:]}")
    return parse_wrk(res.stdout)


# -- iperf3 -------------------------------------------------------------------------------
def parse_iperf3(text: str) -> tuple[float, int]:
    """(Gbit/s received, bytes received) from ``iperf3 -J`` output."""
    data = json.loads(text)
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    summ = data["end"]["sum_received"]
    return summ["bits_per_second"] / 1e9, int(summ["bytes"])


def run_iperf3(client: Netns, port: int, seconds: int) -> tuple[float, int]:
    argv = [
        "iperf3",
        "-c",
        LB_FRONT,
        "-p",
        str(port),
        "-t",
        str(max(1, seconds)),
        "-J",
        "--connect-timeout",
        "3000",
    ]
    res = client.run(argv, timeout=seconds + 30, check=False)
    if not res.stdout.strip():
        raise BenchError(f"iperf3 failed ({res.returncode}): {res.stderr[-300:]}")
    return parse_iperf3(res.stdout)


# -- process tree: PSS and CPU ------------------------------------------------------------
def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants (forked workers included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def pss_kb(pid: int) -> int:
    """Proportional set size of one process, from /proc/PID/smaps_rollup (kB)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise BenchError(f"no Pss in /proc/{pid}/smaps_rollup")


def tree_pss_kb(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            total += pss_kb(pid)
        except OSError:  # exited meanwhile
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """utime+stime of one process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def tree_cpu_seconds(root: int) -> float:
    total = 0.0
    for pid in tree_pids(root):
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def parse_schedstat(text: str) -> tuple[int, int]:
    """``/proc/PID/task/TID/schedstat``: (ns on a CPU, ns runnable but waiting for one)."""
    fields = text.split()
    return int(fields[0]), int(fields[1])


def tree_tasks(root: int) -> list[Path]:
    """``/proc/PID/task/TID`` of every thread of ``root`` and its descendants."""
    tasks: list[Path] = []
    for pid in tree_pids(root):
        try:
            tasks.extend(Path(f"/proc/{pid}/task").iterdir())
        except OSError:  # exited meanwhile
            continue
    return tasks


def tree_sched_ns(root: int) -> tuple[int, int] | None:
    """On-CPU and waiting-for-a-CPU nanoseconds summed over every thread of the tree
    (None when the kernel keeps no schedstats)."""
    run = wait = 0
    seen = False
    for task in tree_tasks(root):
        try:
            r, w = parse_schedstat((task / "schedstat").read_text())
        except (OSError, IndexError, ValueError):
            continue
        run, wait, seen = run + r, wait + w, True
    return (run, wait) if seen else None


class SchedWindow(threading.Thread):
    """Scheduler view of the middle of a load phase of ``seconds`` (its first and last fifth,
    start-up and wind-down, left out): the proxy tree's threads on a CPU and runnable but
    waiting for one (``on_cpu``, ``cpu_wait``: seconds per second of wall time, summed over
    threads), the host's idle share (``host_idle``) and the CPU-seconds per second the whole
    host was busy, steal left out (``host_busy``: the load generator, both HAProxys, the
    service and the candidate together). ``result`` is filled by ``join``."""

    def __init__(self, root: int | None, seconds: float) -> None:
        super().__init__(daemon=True)
        self.root, self.seconds = root, seconds
        self.result: dict[str, float] = {}

    def run(self) -> None:
        time.sleep(self.seconds / 5)
        sched0 = None if self.root is None else tree_sched_ns(self.root)
        host0, t0 = host_cpu_jiffies(), time.monotonic()
        time.sleep(self.seconds * 3 / 5)
        sched1 = None if self.root is None else tree_sched_ns(self.root)
        host1, wall = host_cpu_jiffies(), time.monotonic() - t0
        idle, total, steal = (b - a for a, b in zip(host0, host1, strict=True))
        if total > 0:
            self.result["host_idle"] = idle / total
            # the jiffies' own clock (all CPUs' jiffies / online CPUs), not ``wall``: a
            # reader delayed between /proc/stat and the clock would skew a short window
            self.result["host_busy"] = (total - idle - steal) / total * ONLINE_CPUS
        if sched0 is not None and sched1 is not None:
            self.result["on_cpu"] = (sched1[0] - sched0[0]) / 1e9 / wall
            self.result["cpu_wait"] = (sched1[1] - sched0[1]) / 1e9 / wall


def parse_proc_stat_cpu(text: str) -> tuple[int, int, int]:
    """The ``cpu`` line of ``/proc/stat``: (idle + iowait, all, steal) jiffies."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            vals = [int(v) for v in line.split()[1:]]
            # guest time is already counted in user; steal is time the host took away
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            return idle, sum(vals[:8]), vals[7] if len(vals) > 7 else 0
    raise BenchError("no cpu line in /proc/stat")


ONLINE_CPUS = os.sysconf("SC_NPROCESSORS_ONLN")  # the CPUs /proc/stat counts


def host_cpu_jiffies() -> tuple[int, int, int]:
    return parse_proc_stat_cpu(Path("/proc/stat").read_text())


# -- idle connections ---------------------------------------------------------------------
def hold_idle(
    client: Netns, port: int, count: int, workdir: Path, timeout: float = 60
) -> subprocess.Popen[bytes]:
    """Start ``benchmarks.holder`` in the client ns; returns once ``count`` conns are idle."""
    argv = [sys.executable, "-m", "benchmarks.holder", LB_FRONT, str(port), str(count)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = client.popen(
        argv, workdir / "holder.log", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = _readline(proc, timeout)
    info = json.loads(line) if line else {}
    if info.get("open") != count:
        release(proc)
        raise BenchError(f"idle holder: {info or 'no answer'} (want {count} open)")
    return proc


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    box: list[bytes] = []
    assert proc.stdout is not None
    out = proc.stdout
    thread = threading.Thread(target=lambda: box.append(out.readline()), daemon=True)
    thread.start()
    thread.join(timeout)
    return box[0].decode() if box else ""


def release(proc: subprocess.Popen[bytes]) -> None:
    """Tell the holder to close its connections and wait for it."""
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(15)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait(5)


# -- startup ------------------------------------------------------------------------------
HTTP_GET = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def proxy_v2_header(src: str, sport: int, dst: str, dport: int) -> bytes:
    """A PROXY protocol v2 PROXY/TCP4 header."""
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    addrs = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(addrs)) + addrs


class StartupProbe:
    """From the lb ns, retry a PROXY-v2 HTTP request to a candidate until one is answered.

    ``start()`` before starting the candidate, then ``result(t0)``: seconds from ``t0`` (taken
    just before the candidate's exec) to the first answered request through it.
    """

    def __init__(self, lb: Netns, port: int, *, proxy: bool = True, timeout: float = 20) -> None:
        self.lb, self.port, self.proxy, self.timeout = lb, port, proxy, timeout
        self.done_at: float | None = None
        self.error = ""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        enter_netns(self.lb.path)
        deadline = time.monotonic() + self.timeout
        rng = random.Random()
        while time.monotonic() < deadline:
            if self._attempt(rng.randrange(20000, 60000)):
                self.done_at = time.monotonic()
                return
            time.sleep(0.002)
        self.error = f"no answer on :{self.port} within {self.timeout}s"

    def _attempt(self, sport: int) -> bool:
        try:
            with socket.create_connection((WORKLOAD_IP, self.port), timeout=2) as sock:
                head = (
                    proxy_v2_header(CLIENT_IP, sport, WORKLOAD_IP, self.port) if self.proxy else b""
                )
                sock.sendall(head + HTTP_GET)
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
        except OSError:
            return False
        return data.startswith(b"HTTP/1.1 200")

    def result(self, t0: float) -> float:
        self._thread.join(self.timeout + 5)
        if self.done_at is None:
            raise BenchError(f"startup probe: {self.error or 'did not finish'}")
        return self.done_at - t0
