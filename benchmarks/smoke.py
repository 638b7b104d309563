"""``smoke() -> dict``: a tiny ``--quick`` run (pymmproxy as installed, and direct) for a CI test.

It checks that the harness works end to end (namespaces, pathway, HAProxy, nginx, wrk,
iperf3, memory and CPU sampling, the report); it asserts no timing. About 25 s; < 60 s.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.run import Plan, Progress, run

SMOKE_CANDIDATES = ("pymmproxy", "direct")


def smoke(out: Path | None = None, *, verbose: bool = True) -> dict[str, Any]:
    """Run the quick plan for pymmproxy and direct; return the result dict.

    The dict has ``results`` (per candidate), ``failed`` (candidate -> reason), ``markdown``
    and ``files`` (the report files written to ``out``; a temporary directory, removed
    afterwards, when ``out`` is None).
    """
    plan = Plan.make(quick=True)
    tmp = None
    if out is None:
        tmp = out = Path(tempfile.mkdtemp(prefix="pmxbench-smoke-"))
    say = Progress() if verbose else (lambda _msg: None)
    try:
        data = run(plan, SMOKE_CANDIDATES, out, udp=False, say=say)
        data["files"] = sorted(p.name for p in out.iterdir())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return data


if __name__ == "__main__":
    import json

    res = smoke()
    print(json.dumps({k: res[k] for k in ("seconds", "failed", "files")}))
