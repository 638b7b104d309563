"""Fixtures for daemon integration tests: one workload namespace, sockets created inside it.

``setns(2)`` with CLONE_NEWNET changes the namespace of the calling *thread* only, so
``ns_socket`` creates a socket in a short-lived thread that entered the namespace; the
socket then stays in that namespace and is used from the test thread like any other.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.nsutil import Netns, netns, recv_all, require_root_and_tools

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
PY = sys.executable
LB_V4 = "198.51.100.2"
LB_V6 = "2001:db8:2::2"
MARK = 123
T = TypeVar("T")


def ns_socket(
    ns: Netns, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket living in ``ns``."""
    box: list[object] = []

    def make() -> None:
        fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                box.append(OSError(ctypes.get_errno(), "setns failed"))
                return
            box.append(socket.socket(family, kind))
        finally:
            os.close(fd)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    result = box[0]
    if isinstance(result, BaseException):
        raise result
    assert isinstance(result, socket.socket)
    return result


def ns_connect(ns: Netns, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection from inside ``ns`` (the socket is closed if the connect fails)."""
    s = ns_socket(ns, socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except OSError:
        s.close()
        raise
    return s


def wait_for(cond: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
    """Poll ``cond`` until it returns something truthy, and return that.

    ``timeout`` is a hang guard, not a speed claim: keep it generous (several seconds).
    """
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.05)
    return got


def catches(pid: int, signum: int) -> bool:
    """``pid`` has a handler for ``signum`` (its bit in SigCgt of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught >> (signum - 1) & 1)


def closed_soon(s: socket.socket) -> bool:
    """True if the proxy ends ``s`` (EOF or reset) before the socket's timeout.

    For ends where either is right; a refused or failed connection must be reset: use
    :func:`reset_by_proxy` for those.
    """
    try:
        return recv_all(s) == b""
    except ConnectionResetError:
        return True


def reset_by_proxy(conn: socket.socket | Callable[[], socket.socket], data: bytes = b"") -> None:
    """Assert that the proxy ends the connection with a reset (RST), not a FIN.

    ``conn`` is a connected socket, or a function that connects one (a connection refused
    at accept may be reset before ``connect()`` returns, which then raises the reset).
    ``data`` is sent first, then one ``recv``: a reset raises ConnectionResetError from
    connect, send or recv; a FIN makes recv return b"" even if our own send drew a reset
    from the closed socket afterwards (Linux reports the FIN first, and a reset in
    CLOSE_WAIT is EPIPE, not ECONNRESET). Data, or the socket's timeout (the hang guard),
    fails too.

    A socket closed with bytes it never read sends a reset by itself: for the assertion to
    tell the proxy's abort from a plain close, the proxy must have read everything sent on
    ``conn`` before it ends it (so nothing is sent on connections refused at accept).
    """
    try:
        s = conn() if callable(conn) else conn
    except ConnectionResetError:
        return
    with s:
        try:
            if data:
                s.sendall(data)
            got = s.recv(65536)
        except ConnectionResetError:
            return
    end = "a FIN (a normal close)" if got == b"" else f"data {got[:64]!r}"
    raise AssertionError(f"expected a reset from the proxy, got {end}")


def wait_port(ns: Netns, host: str, port: int, timeout: float = 10.0) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = ns_socket(ns, family)
        s.settimeout(0.5)
        try:
            s.connect((host, port))
        except OSError:
            time.sleep(0.05)
        else:
            return
        finally:
            s.close()
    raise AssertionError(f"nothing listening on {host}:{port} in {ns.name}")


class Workload:
    """A namespace with a foreign default route, the pathway, and test services."""

    def __init__(self, ns: Netns, tmp: Path) -> None:
        self.ns = ns
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.tmp / log).open("ab") as out:
            proc = self.ns.popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def service(self, kind: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
        proc = self.spawn(
            [PY, "-m", "pymmproxy.lab.services", kind, "--listen", f"127.0.0.1:{port}",
             "--listen", f"[::1]:{port}", *extra],
            f"service-{kind}-{port}.log",
        )  # fmt: skip
        wait_port(self.ns, "127.0.0.1", port)
        return proc

    def daemon(self, *args: str, port: int, allow: str = "198.51.100.0/24\n2001:db8:2::/64\n",
               log: str | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        allow_file = self.tmp / f"allow-{port}.txt"
        allow_file.write_text(allow)
        argv = [PY, "-m", "pymmproxy", "-l", f"[::]:{port}", "-mark", str(MARK),
                "-allowed-subnets", str(allow_file), "-v", "2", *args]  # fmt: skip
        name = log or f"daemon-{port}.log"
        path, line = self.tmp / name, '"daemon.listening"'
        before = path.read_text().count(line) if path.exists() else 0  # (logs are appended)
        proc = self.spawn(argv, name)
        # A worker listens (the parent's own bind-and-close check before forking could
        # take a probe of the port, although nobody would accept the next connection).
        wait_for(lambda: path.read_text().count(line) > before or proc.poll() is not None,
                 what=f"daemon.listening in {name}")  # fmt: skip
        wait_port(self.ns, LB_V4, port)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / name).read_text()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def log_events(wl: Workload, name: str, event: str) -> list[dict[str, Any]]:
    """The ``event`` lines of a daemon's or lab service's JSON log (a line still being
    written is left out)."""
    lines = wl.log(name).split("\n")[:-1]
    return [
        e for line in lines if line.startswith("{") and (e := json.loads(line))["event"] == event
    ]


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workload]:
    require_root_and_tools("haproxy")
    with netns("pmw") as ns:
        # No dummy driver on this kernel: a veth pair with both ends here does the job.
        ns.run(["ip", "link", "add", "wl0", "type", "veth", "peer", "name", "wl1"])
        ns.run(["ip", "link", "set", "wl1", "up"])
        ns.run(["ip", "link", "set", "wl0", "up"])
        ns.run(["ip", "addr", "add", f"{LB_V4}/24", "dev", "wl0"])
        ns.run(["ip", "-6", "addr", "add", f"{LB_V6}/64", "dev", "wl0", "nodad"])
        # A default route that is NOT where replies belong: the reason pathways exist.
        ns.run(["ip", "route", "add", "default", "via", "198.51.100.1", "dev", "wl0"])
        ns.run(["ip", "-6", "route", "add", "default", "via", "2001:db8:2::1", "dev", "wl0"])
        ns.run([PY, "-m", "pymmproxy", "pathway", "add", str(MARK)])
        wl = Workload(ns, tmp_path_factory.mktemp("workload"))
        try:
            yield wl
        finally:
            wl.stop_all()
        crashed = [p.name for p in wl.tmp.glob("daemon-*.log") if "Traceback" in p.read_text()]
        assert not crashed, f"daemon logged a traceback: {crashed}"
