"""The long fuzz harnesses stay runnable and clean (a short run of each in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.fuzz
@pytest.mark.parametrize("module", ["tests.fuzz_long", "tests.unit.proxyproto.fuzz_long"])
def test_long_fuzz_harness_short_run_is_clean(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "5000"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "5000 inputs" in proc.stdout
    assert ": 0" in proc.stdout.splitlines()[-1], proc.stdout[-500:]
