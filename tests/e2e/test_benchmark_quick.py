"""CI runs the benchmark's ``--quick`` mode as a smoke test: it works, it reports; no timings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nsutil import require, require_root_and_tools

pytestmark = [pytest.mark.e2e, pytest.mark.netns]
ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_quick_runs_every_candidate(tmp_path: Path) -> None:
    require_root_and_tools("haproxy", "go-mmproxy", "nginx", "wrk", "iperf3")
    require(shutil.which("nsenter") is not None, "needs nsenter (util-linux)")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(tmp_path.glob("*.json"))
    assert len(results) == 1
    assert results[0].with_suffix(".md").exists()
    assert results[0].with_suffix(".png").stat().st_size > 1000
    data = json.loads(results[0].read_text())
    assert not data["failed"], data["failed"]
    for name in ("pymmproxy", "pymmproxy-1", "go-mmproxy", "haproxy", "direct"):
        assert name in data["results"], sorted(data["results"])
    table = results[0].with_suffix(".md").read_text()
    assert "vs go-mmproxy" in table
    assert "udp" in table.lower()
    # the scheduler view of the load phases (this kernel keeps schedstats)
    assert "**Scheduling**" in table
    ka = data["results"]["pymmproxy"]["keepalive"]
    assert ka["on_cpu"] > 0
    assert 0 <= ka["host_idle"] <= 1
    assert 0 < ka["host_busy"] <= os.cpu_count()  # CPU-seconds per second, whole host
    assert ka["host_us"] > 0
