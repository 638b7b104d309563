"""Run processes and open sockets inside named network namespaces.

Processes are started as ``nsenter --net=/run/netns/NAME -- argv`` (util-linux): nsenter
``setns()``es and then ``exec``s, so the Popen pid *is* the program's pid and its
``/proc/PID/net/tcp*`` show the sockets of that namespace (used for readiness checks
without making a connection). Sockets for the test process itself are opened by a
short-lived thread that ``setns()``es only itself (network namespaces are per thread);
namespaces are created the same way (a thread ``unshare()``s and bind-mounts its own
namespace on ``/run/netns/NAME``, as ``ip netns add`` does), so nothing forks.
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED, MNT_DETACH = 4096, 16384, 1 << 20, 2
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
            self.argv(argv),
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=env,
            stdin=None if input is not None else subprocess.DEVNULL,
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

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` in a short-lived thread that has joined this namespace."""

        return _in_thread(lambda: enter_netns(self.path), fn, timeout, self.name)

    @classmethod
    def create(cls, name: str) -> Ns:
        """Create ``/run/netns/NAME`` like ``ip netns add`` (no fork: a thread unshares)."""
        ns = cls(name)
        NETNS_DIR.mkdir(exist_ok=True)
        libc = _libc()
        run_dir = str(NETNS_DIR).encode()
        if libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None) != 0:
            _check(libc.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None), "bind netns dir")
            _check(libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None), "share netns dir")
        os.close(os.open(ns.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))

        def enter() -> None:
            _check(libc.unshare(CLONE_NEWNET), f"unshare for {name}")
            own = b"/proc/thread-self/ns/net"
            _check(libc.mount(own, str(ns.path).encode(), b"none", MS_BIND, None), f"bind {name}")

        try:
            _in_thread(enter, lambda: None, 10.0, name)
        except BaseException:
            ns.remove()
            raise
        return ns

    def remove(self) -> None:
        """Unmount and delete ``/run/netns/NAME`` (like ``ip netns del``; idempotent)."""
        _libc().umount2(str(self.path).encode(), MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def socket(
        self, family: socket.AddressFamily, kind: socket.SocketKind = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket created inside this namespace (usable from any thread afterwards)."""
        return self.call(lambda: socket.socket(family, kind))

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl of *this namespace* (``net.ipv6.conf.all.accept_dad``...)."""
        path = Path("/proc/sys", *key.split("."))
        self.call(lambda: path.write_text(value))


def enter_netns(path: Path) -> None:
    """setns() the calling *thread* into the namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _check(_libc().setns(fd, CLONE_NEWNET), f"setns {path}")
    finally:
        os.close(fd)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _in_thread(enter: Callable[[], None], fn: Callable[[], T], timeout: float, what: str) -> T:
    """``enter()`` then ``fn()`` in a fresh thread (namespace changes stay in that thread)."""
    box: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            enter()
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    thread = threading.Thread(target=work, name=f"netns-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if errors:
        raise errors[0]
    if not box:
        raise LabError(f"netns step in {what} did not finish within {timeout}s")
    return box[0]


class Proc:
    """A lab process with its log file; ``stop()`` ends its whole process group."""

    def __init__(
        self,
        name: str,
        ns: Ns,
        argv: Sequence[str],
        log: Path,
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

    def wait_listening(self, port: int, timeout: float = 20.0) -> None:
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


class HasPath(Protocol):
    """Anything naming a namespace file (the lab's ``Ns``, the benchmark's ``Netns``)."""

    @property
    def path(self) -> Path: ...


def kill_namespace_pids(ns: HasPath) -> int:
    """SIGKILL every process (but this one) in namespace ``ns``; return how many."""
    try:
        target = ns.path.stat()
    except OSError:
        return 0
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
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
