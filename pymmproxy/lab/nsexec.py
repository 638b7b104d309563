"""Run processes and open sockets inside named network namespaces.

Processes are started as ``nsenter --net=/run/netns/NAME -- argv`` (util-linux): nsenter
``setns()``es and then ``exec``s, so the Popen pid *is* the program's pid and its
``/proc/PID/net/tcp*`` show the sockets of that namespace (used for readiness checks
without making a connection). Sockets for the test process itself are opened by a
short-lived thread that ``setns()``es only itself (network namespaces are per thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_TCP_LISTEN = "0A"


class LabError(RuntimeError):
    """A lab step failed (the message says which and why)."""


class Ns:
    """Handle for a named network namespace (same ``run``/``popen``/``argv`` as tests' Netns)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = NETNS_DIR / name

    def __repr__(self) -> str:
        return f"Ns({self.name!r})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,  # noqa: A002 - same name as subprocess.run
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(argv), check=check, capture_output=True, text=True, timeout=timeout,
            input=input, env=env, stdin=None if input is not None else subprocess.DEVNULL,
        )

    def popen(
        self, argv: Sequence[str], log: Path | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session; stdout+stderr go to ``log`` (or are discarded)."""
        out = log.open("ab") if log else subprocess.DEVNULL
        try:
            return subprocess.Popen(
                self.argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        finally:
            if log and not isinstance(out, int):
                out.close()

    def socket(
        self, family: socket.AddressFamily, kind: socket.SocketKind = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket created inside this namespace (usable from any thread afterwards)."""
        box: dict[str, socket.socket | BaseException] = {}

        def work() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {self.name}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                box["sock"] = socket.socket(family, kind)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                box["err"] = exc

        thread = threading.Thread(target=work, name=f"setns-{self.name}", daemon=True)
        thread.start()
        thread.join(5)
        got = box.get("sock") or box.get("err")
        if isinstance(got, socket.socket):
            return got
        raise got if isinstance(got, BaseException) else LabError(f"setns {self.name} hung")


class Proc:
    """A lab process with its log file; ``stop()`` ends its whole process group."""

    def __init__(
        self, name: str, ns: Ns, argv: Sequence[str], log: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name, self.ns, self.argv, self.log_path = name, ns, list(argv), log
        self.popen = ns.popen(self.argv, log, env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds; return the exit code."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(wait)
        return self.popen.poll()

    def wait_listening(self, port: int, timeout: float = 10.0) -> None:
        """Poll this process's namespace for a TCP listener on ``port`` (no connection made)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise LabError(f"{self.name} exited ({self.popen.returncode}): {self.tail()}")
            if port in listening_ports(self.pid):
                return
            time.sleep(0.03)
        raise LabError(f"{self.name} not listening on :{port} after {timeout}s: {self.tail()}")

    def tail(self, lines: int = 8) -> str:
        return " | ".join(self.log().strip().splitlines()[-lines:])


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of ``pid``."""
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == _TCP_LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def kill_namespace_pids(ns: Ns) -> int:
    """SIGKILL every process whose network namespace is ``ns``; return how many."""
    try:
        target = ns.path.stat()
    except OSError:
        return 0
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            st = (entry / "ns" / "net").stat()
        except OSError:
            continue
        if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed
