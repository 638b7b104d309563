"""Markdown table, ratios, target check and a PNG bar chart for one run's result dict."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    get: Callable[[Row], float | None]
    higher_better: bool
    fmt: str = "{:,.0f}"


def _path(*keys: str) -> Callable[[Row], float | None]:
    def get(row: Row) -> float | None:
        cur: Any = row
        for k in keys:
            if not isinstance(cur, dict) or cur.get(k) is None:
                return None
            cur = cur[k]
        return float(cur)

    return get


METRICS = (
    Metric("ka_rps", "keep-alive req/s", _path("keepalive", "rps"), True),
    Metric("ka_p50", "keep-alive p50 ms", _path("keepalive", "p50_ms"), False, "{:.2f}"),
    Metric("ka_p99", "keep-alive p99 ms", _path("keepalive", "p99_ms"), False, "{:.2f}"),
    Metric("conn_rps", "new conns/s", _path("close", "rps"), True),
    Metric("conn_p99", "new-conn p99 ms", _path("close", "p99_ms"), False, "{:.2f}"),
    Metric("bulk", "bulk Gbit/s", _path("bulk_gbps"), True, "{:.2f}"),
    Metric("mem", "idle KB/conn", _path("idle_kb_per_conn"), False, "{:.2f}"),
    Metric(
        "pss",
        "base PSS MB",
        lambda r: None if r.get("pss_base_kb") is None else r["pss_base_kb"] / 1024,
        False,
        "{:.1f}",
    ),
    Metric("cpu_conn", "CPU µs/conn", _path("cpu_us_per_conn"), False, "{:.0f}"),
    Metric("cpu_req", "CPU µs/req (k-a)", _path("cpu_us_per_request"), False, "{:.1f}"),
    Metric("cpu_gb", "CPU ms/GB", _path("cpu_ms_per_gb"), False, "{:.0f}"),
    Metric("startup", "startup ms", _path("startup_ms"), False, "{:.0f}"),
)
BY_KEY = {mt.key: mt for mt in METRICS}
RATIO_METRICS = ("ka_rps", "ka_p99", "conn_rps", "bulk", "mem", "cpu_conn", "cpu_gb", "startup")

# (metric, reference, factor, ">=" or "<=") — the daemon's targets (issue 10)
TARGETS = (
    ("ka_rps", "go-mmproxy", 1.3, ">="),
    ("ka_rps", "haproxy", 0.95, ">="),
    ("ka_p99", "go-mmproxy", 1.0, "<="),
    ("conn_rps", "go-mmproxy", 1.0, ">="),
    ("bulk", "direct", 0.95, ">="),
    ("mem", "go-mmproxy", 0.15, "<="),
    ("mem", "haproxy", 0.6, "<="),
)


def value(results: dict[str, Row], name: str, key: str) -> float | None:
    row = results.get(name)
    return None if row is None else BY_KEY[key].get(row)


def ratio(results: dict[str, Row], name: str, ref: str, key: str) -> float | None:
    a, b = value(results, name, key), value(results, ref, key)
    if a is None or b is None or b == 0:
        return None
    return a / b


def check_targets(results: dict[str, Row]) -> list[dict[str, Any]]:
    out = []
    for name, row in results.items():
        if row.get("kind") != "pymmproxy":
            continue
        for key, ref, factor, op in TARGETS:
            r = ratio(results, name, ref, key)
            met = None if r is None else (r >= factor if op == ">=" else r <= factor)
            out.append(
                {
                    "candidate": name,
                    "metric": key,
                    "reference": ref,
                    "op": op,
                    "factor": factor,
                    "ratio": r,
                    "met": met,
                }
            )
    return out


def _cell(mt: Metric, v: float | None) -> str:
    return "—" if v is None else mt.fmt.format(v)


def markdown(data: dict[str, Any]) -> str:
    results: dict[str, Row] = data["results"]
    names = list(results)
    plan = data["plan"]
    kind = "quick" if plan["quick"] else "full"
    ver = data.get("versions", {})
    lines = [
        f"# pymmproxy benchmark, {data['date']} ({kind} run, {data.get('seconds', '?')} s)",
        "",
        f"HAProxy (`send-proxy-v2`, `mode tcp`) → candidate → nginx / iperf3, in network "
        f"namespaces; wrk -t{plan['threads']} -c{plan['connections']}; {plan['rounds']} "
        f"alternating round(s) per measure of: keep-alive "
        f"{plan['keepalive']} s, `Connection: close` {plan['close']} s, iperf3 {plan['bulk']} s, "
        f"{plan['idle_conns']} idle connections. Python {ver.get('python')}, kernel "
        f"{ver.get('kernel')}, {ver.get('cpus')} CPUs, {ver.get('haproxy')}, go-mmproxy "
        f"{ver.get('go-mmproxy')}, nginx {ver.get('nginx')}. Host load average at start / end: "
        f"{data.get('loadavg_start', '?')} / {data.get('loadavg_end', '?')} (other work on the "
        "machine slows every candidate; the alternating rounds spread it evenly).",
        "",
        "| candidate | " + " | ".join(mt.label for mt in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for name in names:
        lines.append(
            f"| {name} | " + " | ".join(_cell(mt, mt.get(results[name])) for mt in METRICS) + " |"
        )
    for ref in ("go-mmproxy", "haproxy", "direct"):
        if ref not in results:
            continue
        lines += [
            "",
            f"**Ratios vs {ref}** (candidate / {ref}; for ms, KB and µs lower is better)",
            "",
            "| candidate | " + " | ".join(BY_KEY[k].label for k in RATIO_METRICS) + " |",
            "|---|" + "---:|" * len(RATIO_METRICS),
        ]
        for name in names:
            if name == ref:
                continue
            cells = []
            for k in RATIO_METRICS:
                r = ratio(results, name, ref, k)
                cells.append("—" if r is None else f"{r:.2f}x")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    targets = check_targets(results)
    if targets:
        cands = sorted({t["candidate"] for t in targets})
        lines += [
            "",
            "**Targets** (pymmproxy)",
            "",
            "| target | " + " | ".join(cands) + " |",
            "|---|" + "---|" * len(cands),
        ]
        for key, ref, factor, op in TARGETS:
            cells = []
            for c in cands:
                t = next(
                    t
                    for t in targets
                    if t["candidate"] == c and t["metric"] == key and t["reference"] == ref
                )
                if t["ratio"] is None:
                    cells.append("n/a")
                else:
                    cells.append(f"{t['ratio']:.2f}x {'met' if t['met'] else '**missed**'}")
            lines.append(
                f"| {BY_KEY[key].label} {op} {factor}x {ref} | " + " | ".join(cells) + " |"
            )
    lines += scheduling_markdown(results)
    errs = {
        n: (r.get("keepalive", {}).get("errors", 0), r.get("close", {}).get("errors", 0))
        for n, r in results.items()
    }
    if any(a or b for a, b in errs.values()):
        lines += [
            "",
            "wrk socket errors (keep-alive, close): "
            + ", ".join(f"{n} {a}/{b}" for n, (a, b) in errs.items()),
        ]
    if data.get("failed"):
        lines += ["", "**Failed:** " + "; ".join(f"{n}: {e}" for n, e in data["failed"].items())]
    if data.get("udp") is not None:
        lines += ["", "## UDP (benchmarks.udp_bench)", "", udp_markdown(data["udp"])]
    return "\n".join(lines) + "\n"


def scheduling_markdown(results: dict[str, Row]) -> list[str]:
    """Where the candidate's threads were during the middle of the load phases: on a CPU,
    or runnable and waiting for one (CPU-seconds per second, summed over threads), and how
    much of the host's CPU stayed idle meanwhile (``/proc/PID/task/*/schedstat``,
    ``/proc/stat``). Empty when the kernel keeps no schedstats."""
    phases = (("keepalive", "keep-alive"), ("close", "new conns"))
    have = [n for n, r in results.items() if any("host_idle" in r.get(p, {}) for p, _ in phases)]
    if not have:
        return []
    per = {"keepalive": "req", "close": "conn"}
    head = [
        f"{label} {col}"
        for phase, label in phases
        for col in ("on CPU", "waiting", "host idle", f"host CPU µs/{per[phase]}")
    ]
    out = [
        "",
        "**Scheduling** (middle of each load phase, mean over rounds: the candidate's threads "
        "on a CPU and runnable but waiting for one, in CPU-seconds per second summed over "
        "threads; the host's idle CPU share; the whole host's busy CPU time per request or "
        "connection: load generator, both HAProxys, service and candidate together)",
        "",
        "| candidate | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    for name in have:
        cells = []
        for phase, _ in phases:
            row = results[name].get(phase, {})
            for key, fmt in (
                ("on_cpu", "{:.2f}"), ("cpu_wait", "{:.2f}"), ("host_idle", "{:.0%}"),
                ("host_us", "{:.0f}"),
            ):  # fmt: skip
                cells.append("—" if row.get(key) is None else fmt.format(row[key]))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def udp_markdown(udp: object) -> str:
    """A table when the UDP result is {name: {metric: value}}, else its JSON."""
    if isinstance(udp, dict) and isinstance(udp.get("markdown"), str):
        return str(udp["markdown"])
    rows = udp.get("results", udp) if isinstance(udp, dict) else None
    if isinstance(rows, dict) and rows and all(isinstance(v, dict) for v in rows.values()):
        cols = sorted({k for v in rows.values() for k in v if not isinstance(v[k], dict | list)})
        out = ["| candidate | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for name, row in rows.items():
            cells = [
                (f"{row[c]:,.2f}" if isinstance(row.get(c), float) else str(row.get(c, "—")))
                for c in cols
            ]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(out)
    return "```json\n" + json.dumps(udp, indent=2, default=str) + "\n```"


def chart(data: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - optional (bench extra), only for the PNG

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    results: dict[str, Row] = data["results"]
    names = list(results)
    keys = ("ka_rps", "ka_p99", "conn_rps", "bulk", "mem", "cpu_conn")
    colors = {
        "pymmproxy": "#2b7bba",
        "go-mmproxy": "#e07b39",
        "haproxy": "#5a9e4b",
        "direct": "#888888",
    }
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, key in zip(axes.flat, keys, strict=True):
        mt = BY_KEY[key]
        vals = [mt.get(results[n]) for n in names]
        bars = ax.bar(
            names,
            [v or 0 for v in vals],
            color=[colors.get(results[n].get("kind", ""), "#999") for n in names],
        )
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(
                "—" if v is None else mt.fmt.format(v),
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(
            f"{mt.label} ({'higher' if mt.higher_better else 'lower'} is better)", fontsize=10
        )
        ax.tick_params(axis="x", labelrotation=25, labelsize=8)
    kind = "quick" if data["plan"]["quick"] else "full"
    fig.suptitle(f"pymmproxy benchmark {data['date']} ({kind})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_reports(data: dict[str, Any], out: Path, stamp: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data["targets"] = check_targets(data["results"])
    data["markdown"] = markdown(data)
    paths = [out / f"{stamp}.json", out / f"{stamp}.md"]
    paths[0].write_text(json.dumps(data, indent=2, default=str) + "\n")
    paths[1].write_text(data["markdown"])
    if data["results"]:
        try:
            chart(data, out / f"{stamp}.png")
            paths.append(out / f"{stamp}.png")
        except ImportError:
            pass  # matplotlib missing: .venv/bin/pip install -e '.[bench]'
    return paths
