"""How many CPUs this process may use: what ``-listeners auto`` forks one worker for.

The affinity mask (``taskset``, cpusets, systemd's ``CPUAffinity=``) says which CPUs the
scheduler may put us on; a CFS quota (``docker --cpus``, ``CPUQuota=``, Kubernetes limits)
caps how much of them we get: cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` and
``cpu.cfs_period_us``, on our cgroup and every ancestor up to the mount point.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The affinity mask's CPU count, capped by the tightest CPU quota; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    quota = quota_cpus(root, self_cgroup)
    return max(1, cpus if quota is None else min(cpus, quota))


def quota_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int | None:
    """CPUs' worth of the tightest quota on our cgroup's path (rounded up), or None when
    there is none or nothing is readable."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:  # "ID:CONTROLLERS:PATH"; v2 is "0::PATH"
        controllers, sep, path = line.partition(":")[2].partition(":")
        if not sep:
            continue
        if not controllers:
            limits.append(_walk(root, path, _v2))
        elif "cpu" in controllers.split(","):
            mounts = (root / controllers, root / "cpu", root / "cpu,cpuacct")
            mount = next((m for m in mounts if m.is_dir()), mounts[0])
            limits.append(_walk(mount, path, _v1))
    found = [n for n in limits if n is not None]
    return min(found) if found else None


def _walk(mount: Path, path: str, read: Callable[[Path], int | None]) -> int | None:
    """The tightest limit ``read`` finds from ``mount/path`` up to ``mount``."""
    here, best = mount / path.strip().lstrip("/"), None
    while True:
        limit = read(here)
        if limit is not None:
            best = limit if best is None else min(best, limit)
        if here == mount or mount not in here.parents:
            return best
        here = here.parent


def _v2(directory: Path) -> int | None:
    """``cpu.max`` (``QUOTA PERIOD`` or ``max PERIOD``) as CPUs, rounded up."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else _ceil(int(quota), int(period))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1(directory: Path) -> int | None:
    """``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``, rounded up."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return None if quota < 0 else _ceil(quota, period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _ceil(quota: int, period: int) -> int:
    return max(1, -(-quota // period))
