"""pymmproxy.notify against real AF_UNIX datagram sockets (filesystem path and abstract)."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymmproxy.notify import Notifier


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(65536).decode().split("\n")


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"pymmproxy-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(
    request: pytest.FixtureRequest,
    path_listener: tuple[socket.socket, str],
    abstract_listener: tuple[socket.socket, str],
) -> tuple[socket.socket, str]:
    return path_listener if request.param == "path" else abstract_listener


def test_lifecycle_messages(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    env = {"NOTIFY_SOCKET": address}
    n = Notifier(env)
    assert n.enabled
    assert n.ready()
    assert _recv(sock) == ["READY=1"]
    assert n.status("serving 3 instances")
    assert _recv(sock) == ["STATUS=serving 3 instances"]
    assert n.watchdog()
    assert _recv(sock) == ["WATCHDOG=1"]
    assert n.stopping("draining")
    assert _recv(sock) == ["STOPPING=1", "STATUS=draining"]


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    n = Notifier({"NOTIFY_SOCKET": address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = _recv(sock)
    assert fields[0] == "RELOADING=1"
    key, _, value = fields[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert n.ready("reloaded")
    assert _recv(sock) == ["READY=1", "STATUS=reloaded"]


def test_status_newlines_cannot_inject_fields(path_listener: tuple[socket.socket, str]) -> None:
    sock, address = path_listener
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.status("line one\nREADY=1")
    assert _recv(sock) == ["STATUS=line one READY=1"]


def test_extend_timeout(path_listener: tuple[socket.socket, str]) -> None:
    sock, address = path_listener
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.extend_timeout(2.5)
    assert _recv(sock) == ["EXTEND_TIMEOUT_USEC=2500000"]
    assert not n.extend_timeout(float("nan"))


def test_unsets_environment_by_default() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "OTHER": "y"}
    Notifier(env)
    assert env == {"OTHER": "y"}


def test_can_keep_environment() -> None:
    env = {"NOTIFY_SOCKET": "/run/x"}
    Notifier(env, unset_environment=False)
    assert env == {"NOTIFY_SOCKET": "/run/x"}


def test_reads_and_unsets_process_environment(
    monkeypatch: pytest.MonkeyPatch, path_listener: tuple[socket.socket, str]
) -> None:
    sock, address = path_listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    n = Notifier()
    assert "NOTIFY_SOCKET" not in os.environ
    assert n.ready()
    assert _recv(sock) == ["READY=1"]


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234", "@"])
def test_noop_without_usable_socket(value: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    n = Notifier(env)
    assert not n.enabled
    assert not n.ready()
    assert not n.stopping()
    assert not n.status("x")
    assert not n.reloading()
    assert not n.watchdog()


def test_never_raises_when_nobody_listens(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    assert n.enabled
    assert not n.ready()
    assert not n.status("still fine")
    too_long = Notifier({"NOTIFY_SOCKET": "/" + "x" * 200})
    assert not too_long.ready()
    abstract = Notifier({"NOTIFY_SOCKET": f"@nobody-{secrets.token_hex(8)}"})
    assert not abstract.ready()


def test_recovers_when_listener_appears_later(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    assert not n.ready()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        assert n.ready()
        assert _recv(sock) == ["READY=1"]


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "1", None),  # armed for another process
        ("0", None, None),
        ("junk", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    env: dict[str, str] = {}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid()) if pid == "self" else pid
    assert Notifier(env).watchdog_interval == expected
