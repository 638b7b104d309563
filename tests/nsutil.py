"""Minimal network-namespace helpers for tests (names are unique per run; always torn down)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: a developer without the README's packages may opt into skips (never under CI)
ALLOW_SKIP = os.environ.get("PYMMPROXY_TESTS_ALLOW_SKIP") == "1" and not IN_CI
ROOT = Path(__file__).resolve().parents[1]
#: setpriv prefix for running as nobody (callers add their capability options)
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
#: what a daemon or pathway command run as nobody imports
NOBODY_IMPORTS = ("pymmproxy", "uvloop", "structlog", "pyroute2", "prometheus_client", "iptc",
                  "libxtwrapper")  # fmt: skip
SYSTEM_BIN = "/usr/local/bin:/usr/bin:/bin"
T = TypeVar("T")


def require(condition: bool, why: str) -> None:
    """Fail when a prerequisite is missing (the README's test command installs them all);
    skip instead only with ``PYMMPROXY_TESTS_ALLOW_SKIP=1``, and never under ``CI=true``."""
    if condition:
        return
    if not ALLOW_SKIP:
        pytest.fail(f"prerequisite missing: {why} (PYMMPROXY_TESTS_ALLOW_SKIP=1 skips instead)")
    pytest.skip(why)


def require_root_and_tools(*tools: str) -> None:
    require(os.geteuid() == 0, "needs root for network namespaces")
    for tool in ("ip", *tools):
        require(shutil.which(tool) is not None, f"needs {tool} on PATH")


def unique(prefix: str) -> str:
    """A namespace/interface-safe unique name (<= 15 chars for interfaces)."""
    return f"{prefix}{secrets.token_hex(3)}"


class Netns:
    """A named network namespace with loopback up."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            ["ip", "netns", "exec", self.name, *argv],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def popen(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)  # type: ignore[call-overload, no-any-return]

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


@contextmanager
def netns(prefix: str = "pmt") -> Iterator[Netns]:
    name = unique(prefix)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield Netns(name)
    finally:
        pids = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", name], check=False)


CLONE_NEWNET = 0x40000000


def run_in(ns: Netns, fn: Callable[[], T]) -> T:
    """``fn()`` in a thread that entered ``ns`` (``setns``): the sockets it makes live there."""
    box: list[Any] = []

    def enter_and_run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                box.append(OSError(ctypes.get_errno(), f"setns {ns.name} failed"))
                return
        finally:
            os.close(fd)
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box.append(exc)

    thread = threading.Thread(target=enter_and_run)
    thread.start()
    thread.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return cast("T", box[0])


@functools.cache
def nobody_python() -> tuple[str, ...]:
    """An interpreter command that uid 65534 can run with pymmproxy importable.

    The venv's own python if nobody can use it (checked); else the base or system python of
    the same version with the checkout and the venv's site-packages on PYTHONPATH; else (a
    checkout nobody can read, e.g. under a 0700 temp dir) that python with a world-readable
    copy of just the packages the daemon imports.
    """
    probe = ["-c", "import pymmproxy.cli, uvloop, structlog, pyroute2"]
    site = next(p for p in sys.path if p.endswith("site-packages"))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"  # same ABI
    system = shutil.which(version, path=SYSTEM_BIN) or version
    candidates = [
        (sys.executable,),
        ("env", f"PYTHONPATH={ROOT}:{site}", sys._base_executable),
        ("env", f"PYTHONPATH={ROOT}:{site}", system),
    ]
    for python in candidates:
        res = subprocess.run([*NOBODY, *python, *probe], cwd="/", capture_output=True, check=False)
        if res.returncode == 0:
            return python
    staged = _stage_imports()
    for base in (system, sys._base_executable):
        python = ("env", f"PYTHONPATH={staged}", base)
        res = subprocess.run([*NOBODY, *python, *probe], cwd="/", capture_output=True, check=False)
        if res.returncode == 0:
            return python
    require(False, "no python that uid 65534 can run with pymmproxy importable")
    raise AssertionError("unreachable")


def _stage_imports() -> Path:
    """Copy NOBODY_IMPORTS into a world-readable directory (removed at exit)."""
    stage = Path(tempfile.mkdtemp(prefix="pymmproxy-nobody-"))
    atexit.register(shutil.rmtree, stage, ignore_errors=True)
    for name in NOBODY_IMPORTS:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        if spec.submodule_search_locations:
            source = Path(next(iter(spec.submodule_search_locations)))
            shutil.copytree(source, stage / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif spec.origin:
            shutil.copy2(spec.origin, stage)
    for path in (stage, *stage.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return stage


def recv_all(s: socket.socket, *, reset_is_eof: bool = False) -> bytes:
    """Everything ``s`` receives until EOF (or, with ``reset_is_eof``, until a reset)."""
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        if not reset_is_eof:
            raise
    return b"".join(chunks)
