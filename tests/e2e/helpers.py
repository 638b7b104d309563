"""Shared e2e helpers: prerequisites, proxy implementations, one lab per module."""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pymmproxy.lab import (
    GO_MMPROXY,
    PYMMPROXY,
    Frontend,
    Lab,
    Proc,
    mmproxy_argv,
)
from tests.nsutil import require

ROOT = Path(__file__).resolve().parents[2]
IMPLS = ("go", "py")
MARK = 123
LB_ALLOWED = ("198.51.100.1/32", "2001:db8:2::1/128")
_sports = itertools.count(20000)


def next_sport() -> int:
    """A fresh client source port below the ephemeral range (no TIME_WAIT clashes)."""
    return next(_sports)


@functools.cache
def _pymmproxy_missing() -> str | None:
    res = subprocess.run(
        [sys.executable, "-c", "import pymmproxy.daemon, pymmproxy.cli"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return None if res.returncode == 0 else res.stderr.strip().splitlines()[-1]


def require_lab() -> None:
    require(os.geteuid() == 0, "needs root for network namespaces")
    require(shutil.which("nsenter") is not None, "needs nsenter (util-linux)")
    require(shutil.which("haproxy") is not None, "needs haproxy (apt-get install -y haproxy)")


def program(impl: str) -> tuple[str, ...]:
    """The proxy command for ``impl`` (fails when it is missing, see :func:`require`)."""
    if impl == "go":
        require(
            shutil.which("go-mmproxy") is not None,
            "needs go-mmproxy (apt-get install -y go-mmproxy)",
        )
        return GO_MMPROXY
    missing = _pymmproxy_missing()
    require(missing is None, f"pymmproxy daemon not importable: {missing}")
    return PYMMPROXY


def available() -> list[str]:
    """The implementations installed here (a missing one is reported by :func:`need`)."""
    found = []
    for impl in IMPLS:
        try:
            program(impl)
        except (pytest.skip.Exception, pytest.fail.Exception):
            continue
        found.append(impl)
    return found


@contextmanager
def module_lab(frontends: Sequence[Frontend]) -> Iterator[Lab]:
    """A lab with the pathway for MARK installed in the workload namespace."""
    require_lab()
    with Lab(frontends) as lab:
        lab.install_pathway(MARK)
        yield lab


def start_proxy(
    lab: Lab,
    impl: str,
    listen: str,
    target_port: int,
    *,
    allowed: Sequence[str] = LB_ALLOWED,
    extra: Sequence[str] = (),
) -> Proc:
    """Start ``impl`` listening on ``listen`` with targets 127.0.0.1/[::1]:``target_port``."""
    argv = mmproxy_argv(
        program(impl),
        listen,
        v4=f"127.0.0.1:{target_port}",
        v6=f"[::1]:{target_port}",
        mark=MARK,
        allowed_subnets=lab.allowed_subnets(*allowed),
        extra=extra,
    )
    return lab.start_proxy(argv, name=f"{impl}-{listen.rsplit(':', 1)[1]}")


def events(proc: Proc, kind: str | None = None) -> list[dict[str, Any]]:
    """The JSON events a lab service printed (``conn`` / ``done``)."""
    out = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if kind is None or event.get("event") == kind:
                out.append(event)
    return out


def wait_for(pred: Callable[[], Any], timeout: float = 5.0, step: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy (bounded); return that or the last."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step)


def body(result: dict[str, Any]) -> str:
    """The HTTP body whoami answered with (``"<ip> <port>"``)."""
    return str(result["text"]).partition("\r\n\r\n")[2].strip()


def need(impl: str, started: Sequence[str] | set[str] | dict[str, bool]) -> None:
    """Skip/fail like :func:`program` when ``impl`` is missing, else it must have started."""
    program(impl)
    assert impl in started
