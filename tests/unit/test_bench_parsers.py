"""The benchmark's pure parts: wrk/iperf3/schedstat/``/proc/stat`` parsers and the report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import measures as m
from benchmarks import schedtrace
from benchmarks.candidates import CANDIDATES
from benchmarks.report import check_targets, markdown, scheduling_markdown
from benchmarks.run import Runner
from benchmarks.topology import BenchError

# Captured from wrk 4.1.0 (Debian 12) against a local HTTP server.
WRK = """\
Running 1s test @ http://127.0.0.1:8080/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.87ms  652.65us   7.22ms   75.93%
    Req/Sec     1.02k    79.69     1.19k    81.82%
  Latency Distribution
     50%    1.82ms
     75%    2.17ms
     90%    2.59ms
     99%    4.19ms
  1119 requests in 1.10s, 1.23MB read
Requests/sec:   1017.25
Transfer/sec:      1.12MB
"""
# The same run with the two lines wrk adds when things go wrong.
WRK_ERRORS = WRK.replace(
    "Requests/sec:",
    "  Socket errors: connect 0, read 12, write 1, timeout 3\n"
    "  Non-2xx or 3xx responses: 5\nRequests/sec:",
)


def test_wrk_output_gives_rate_latency_and_no_errors() -> None:
    w = m.parse_wrk(WRK)
    assert (w.requests, w.seconds, w.rps) == (1119, 1.10, 1017.25)
    assert (w.p50_ms, w.p90_ms, w.p99_ms) == pytest.approx((1.82, 2.59, 4.19))
    assert (w.errors, w.non2xx) == (0, 0)


def test_wrk_socket_errors_and_non_2xx_are_counted() -> None:
    w = m.parse_wrk(WRK_ERRORS)
    assert w.socket_errors == {"connect": 0, "read": 12, "write": 1, "timeout": 3}
    assert (w.errors, w.non2xx) == (16, 5)


def test_wrk_output_without_a_summary_is_an_error() -> None:
    with pytest.raises(BenchError, match="cannot parse wrk output"):
        m.parse_wrk("unable to connect to 127.0.0.1:8081 Connection refused\n")


def test_iperf3_json_and_its_error_form() -> None:
    ok = {"end": {"sum_received": {"bits_per_second": 5.5e9, "bytes": 1_375_000_000}}}
    assert m.parse_iperf3(json.dumps(ok)) == (5.5, 1_375_000_000)
    with pytest.raises(BenchError, match="the server is busy"):
        m.parse_iperf3(json.dumps({"error": "the server is busy running a test"}))


def test_schedstat_and_proc_stat_parsers() -> None:
    assert m.parse_schedstat("1500000 250000 42\n") == (1_500_000, 250_000)
    stat = "cpu  100 5 50 800 20 0 25 7 0 0\ncpu0 50 2 25 400 10 0 12 3 0 0\n"
    # idle + iowait, user..steal (guest time is already inside user), and steal
    assert m.parse_proc_stat_cpu(stat) == (820, 1007, 7)
    with pytest.raises(BenchError):
        m.parse_proc_stat_cpu("intr 1 2 3\n")


def test_this_process_has_schedstats_and_the_host_has_cpu_times() -> None:
    sched = m.tree_sched_ns(os.getpid())
    if not Path(f"/proc/{os.getpid()}/schedstat").exists():
        assert sched is None
        return
    assert sched is not None
    assert sched[0] > 0  # this test ran on a CPU
    idle, total, steal = m.host_cpu_jiffies()
    assert 0 <= idle <= total
    assert 0 <= steal <= total


@pytest.mark.parametrize("stat_seconds", [0.8, 1.2])
def test_host_busy_uses_the_jiffies_own_clock(
    monkeypatch: pytest.MonkeyPatch, stat_seconds: float
) -> None:
    # a fully busy host whose reader got the clock late (0.8 s of jiffies in a 1 s window)
    # or early (1.2 s): busy is still every online CPU, not 0.8x or 1.2x of them
    jiffies = iter([(0, 0, 0), (0, int(100 * stat_seconds) * m.ONLINE_CPUS, 0)])
    clock = iter([10.0, 11.0])
    monkeypatch.setattr(m, "host_cpu_jiffies", lambda: next(jiffies))
    monkeypatch.setattr(m.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(m.time, "sleep", lambda _s: None)
    window = m.SchedWindow(None, 1.0)
    window.run()
    assert window.result == {"host_idle": 0.0, "host_busy": float(m.ONLINE_CPUS)}


def _results() -> dict[str, dict[str, object]]:
    sched = {"on_cpu": 0.61, "cpu_wait": 0.35, "host_idle": 0.08, "host_us": 117.4}
    return {
        "go-mmproxy": {"kind": "go-mmproxy", "keepalive": {"rps": 100.0}, "close": {"rps": 50.0}},
        "pymmproxy-1": {
            "kind": "pymmproxy",
            "keepalive": {"rps": 140.0, **sched},
            "close": {"rps": 49.0, "host_idle": 0.1},
        },
        "haproxy": {"kind": "haproxy", "keepalive": {"rps": 150.0}},
    }


def test_scheduling_table_lists_only_measured_candidates() -> None:
    lines = scheduling_markdown(_results())
    rows = [line for line in lines if line.startswith("| ")]
    assert rows[0].startswith("| candidate | keep-alive on CPU | keep-alive waiting |")
    assert "| keep-alive host CPU µs/req |" in rows[0]
    assert rows[0].endswith("| new conns host idle | new conns host CPU µs/conn |")
    assert rows[1:] == ["| pymmproxy-1 | 0.61 | 0.35 | 8% | 117 | — | — | 10% | — |"]
    assert scheduling_markdown({"x": {"keepalive": {"rps": 1.0}}}) == []


def test_targets_use_ratios_within_the_run() -> None:
    by = {(t["metric"], t["reference"]): t for t in check_targets(_results())}
    assert by["ka_rps", "go-mmproxy"]["ratio"] == pytest.approx(1.4)
    assert by["ka_rps", "go-mmproxy"]["met"] is True
    assert by["ka_rps", "haproxy"]["met"] is False  # 0.93 < 0.95
    assert by["conn_rps", "go-mmproxy"]["met"] is False  # 0.98
    assert by["bulk", "direct"]["met"] is None  # not measured: neither met nor missed


def test_markdown_report_has_tables_targets_and_scheduling() -> None:
    data = {
        "date": "2026-11-25T00:00:00",
        "plan": {"quick": True, "threads": 2, "connections": 50, "rounds": 1,
                 "keepalive": 1, "close": 1, "bulk": 1, "idle_conns": 10},
        "results": _results(),
    }  # fmt: skip
    text = markdown(data)
    assert "**Ratios vs go-mmproxy**" in text
    assert "| keep-alive req/s >= 1.3x go-mmproxy | 1.40x met |" in text
    assert "**Scheduling**" in text


# -- benchmarks.schedtrace ------------------------------------------------------------------
def _switch(cpu: int, t: float, prev: int, state: str, nxt: int) -> str:
    return (
        f"[{cpu:03d}] {t:.6f}: sched:sched_switch: prev_comm=x prev_pid={prev} prev_prio=120 "
        f"prev_state={state} ==> next_comm=y next_pid={nxt} next_prio=120"
    )


def test_schedtrace_parses_switches_and_wakeups_only() -> None:
    lines = [
        "  python  8199 [001]  1059.542223:       sched:sched_switch: prev_comm=python "
        "prev_pid=8199 prev_prio=120 prev_state=R+ ==> next_comm=nginx next_pid=8196 next_prio=120",
        "  haproxy  8194 [000]  1059.560120:       sched:sched_waking: comm=python pid=8199 "
        "prio=120 target_cpu=001",
        "  nginx  8196 [000]  1059.542241: sched:sched_stat_runtime: comm=nginx pid=8196 "
        "runtime=21602 [ns]",
        _switch(0, 2.5, 7, "S", 0),
    ]
    assert list(schedtrace.parse(lines)) == [
        schedtrace.Event(1059.542223, 1, "switch", 8199, 8196, preempted=True),
        schedtrace.Event(1059.560120, 0, "wake", 8199),
        schedtrace.Event(2.5, 0, "switch", 7, 0, preempted=False),
    ]


def test_schedtrace_splits_idle_time_by_the_candidates_state() -> None:
    lines = [
        _switch(0, 0.0, 1, "S", 10),  # the candidate (10) runs on CPU 0
        _switch(1, 0.0, 2, "S", 0),  # CPU 1 idles: 0-1 s "running"
        _switch(0, 1.0, 10, "R", 3),  # preempted: 1-2 s "waiting" while CPU 1 idles
        _switch(1, 2.0, 0, "R", 4),  # both busy 2-3 s
        _switch(0, 3.0, 3, "S", 0),  # CPU 0 idles, the candidate still queued: 3-4 s "waiting"
        _switch(1, 4.0, 4, "S", 10),  # it runs on CPU 1: 4-5 s "running"
        _switch(1, 5.0, 10, "S", 0),  # it sleeps: both idle 5-6 s, "asleep"
        "[000] 6.000000: sched:sched_waking: comm=python pid=10 prio=120 target_cpu=000",
        _switch(0, 7.0, 0, "R", 10),  # woken 6-7 s with both CPUs idle: "waiting" x 2
    ]
    split = schedtrace.analyse(schedtrace.parse(lines), {10}, cpus=2)
    assert (split.seconds, split.cpu_seconds) == (7.0, 14.0)
    assert (split.waiting, split.running, split.asleep) == (4.0, 2.0, 2.0)
    assert split.episodes == [1.0, 1.0, 1.0]
    assert split.share(split.idle) == 8 / 14
    assert "| pymmproxy-1 | 1,000 | 57.1% | 28.6% | 14.3% | 14.3% | 3, 1000000" in (
        schedtrace.table([("pymmproxy-1", 1000.0, split)])
    )


def test_rates_are_the_median_round() -> None:
    """One disturbed round (other work on the VM) does not move a candidate's rate."""

    def ka(rps: float) -> dict[str, object]:
        return {"requests": rps * 3, "seconds": 3.0, "p50_ms": 1.0, "p90_ms": 2.0,
                "p99_ms": 3.0, "errors": 0, "socket_errors": {"read": 0}, "non2xx": 0,
                "cpu_s": rps * 3 * 20e-6}  # fmt: skip

    cand = CANDIDATES[0]
    rounds = {
        "keepalive": [ka(r) for r in (25_000, 26_000, 17_000, 24_000, 25_500)],
        "close": [],
        "bulk": [{"gbps": g, "bytes": 10**9, "cpu_s": 0.5} for g in (6.0, 2.0, 6.2)],
    }
    fake = SimpleNamespace(results={cand.name: {}}, rounds={cand.name: rounds})
    Runner.aggregate(fake, cand)  # type: ignore[arg-type]
    res = fake.results[cand.name]
    assert res["keepalive"]["rps"] == pytest.approx(25_000)
    assert res["cpu_us_per_request"] == pytest.approx(20)
    assert res["bulk_gbps"] == pytest.approx(6.0)
    assert res["cpu_ms_per_gb"] == pytest.approx(500)
