"""``pymmproxy demo`` end to end, plus its one-line refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pymmproxy import demo
from tests.e2e.helpers import program, require_lab

pytestmark = [pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.netns
def test_demo_command_exits_0_with_matching_rows() -> None:
    require_lab()
    program("py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "pymmproxy", "demo"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.rstrip().endswith((" yes", " NO"))]
    assert len(rows) == 8, res.stdout
    assert all(row.rstrip().endswith(" yes") for row in rows), res.stdout
    assert "OK: 8/8" in res.stdout
    assert {"v1", "v2"} <= {row.split()[1] for row in rows}
    assert any("[2001:db8:1::" in row for row in rows)


def test_demo_needs_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert demo.main([]) == 1
    assert capsys.readouterr().err == "pymmproxy demo: needs root (network namespaces)\n"


def test_demo_says_how_to_install_haproxy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_which = shutil.which
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda n: None if n == "haproxy" else real_which(n))
    assert demo.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pymmproxy demo: ")
    assert "apt-get install haproxy" in err
    assert err.count("\n") == 1


def test_a_lab_that_cannot_be_built_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """E.g. inside a container without veth support: netlink refuses the link."""
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    def refused(*args: object) -> int:
        raise NetlinkError(95, "Operation not supported")

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda n: f"/usr/bin/{n}")
    monkeypatch.setattr(demo, "run_demo", refused)
    assert demo.main([]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["pymmproxy demo: cannot build the lab: Operation not supported (lab torn down)"]
