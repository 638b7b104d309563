"""``-listeners auto``: the affinity mask, capped by cgroup v2 / v1 CPU quotas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pymmproxy.cpus import quota_cpus, usable_cpus


@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_rounds_up_and_the_tightest_ancestor_wins(tmp_path: Path) -> None:
    root, me = tmp_path / "cg", tmp_path / "self"
    write(me, "0::/system.slice/pymmproxy.service\n")
    write(root / "system.slice/pymmproxy.service/cpu.max", "150000 100000\n")
    assert quota_cpus(root, me) == 2
    write(root / "system.slice/cpu.max", "100000 100000\n")
    assert quota_cpus(root, me) == 1
    write(root / "system.slice/cpu.max", "max 100000\n")
    assert quota_cpus(root, me) == 2


def test_v1_cfs_quota(tmp_path: Path) -> None:
    root, me = tmp_path / "cg", tmp_path / "self"
    write(me, "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\n")
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "250000\n")
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert quota_cpus(root, me) == 3
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert quota_cpus(root, me) is None
    write(me, "2:cpuacct,cpu:/docker/abc\n")  # listed in another order than mounted
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "100000\n")
    assert quota_cpus(root, me) == 1


def test_no_quota_no_cgroup_or_garbage(tmp_path: Path) -> None:
    root, me = tmp_path / "cg", tmp_path / "self"
    assert quota_cpus(root, me) is None  # no /proc/self/cgroup
    write(me, "0::/a\n")
    assert quota_cpus(root, me) is None  # no cpu.max anywhere
    write(root / "a/cpu.max", "lots 0\n")
    assert quota_cpus(root, me) is None


@pytest.mark.usefixtures("four_cpus")
def test_usable_cpus_is_the_mask_capped_by_the_quota(tmp_path: Path) -> None:
    root, me = tmp_path / "cg", tmp_path / "self"
    assert usable_cpus(root, me) == 4
    write(me, "0::/c\n")
    write(root / "c/cpu.max", "50000 100000\n")
    assert usable_cpus(root, me) == 1
    write(root / "c/cpu.max", "800000 100000\n")
    assert usable_cpus(root, me) == 4


def test_usable_cpus_without_an_affinity_mask(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(_pid: int) -> set[int]:
        raise OSError("not here")

    monkeypatch.setattr(os, "sched_getaffinity", refuse)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cpus(tmp_path / "cg", tmp_path / "self") == 1
