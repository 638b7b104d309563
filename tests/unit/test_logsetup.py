"""Log lines: one ``write()`` each, so workers sharing stderr never merge two lines."""

from __future__ import annotations

import json
import sys

import pytest

from pymmproxy import logsetup


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_each_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _Recorder()
    monkeypatch.setattr(sys, "stderr", stderr)
    logsetup.configure(0, "auto")
    log = logsetup.get_logger(instance="vps01-ssh")
    log.info("daemon.listening", port=2222)
    log.warning("conn.failed", reason="bad_header")
    assert len(stderr.writes) == 2
    for text in stderr.writes:
        assert text.endswith("\n")
        assert text.count("\n") == 1
        assert json.loads(text)["instance"] == "vps01-ssh"


class _Broken(_Recorder):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_line_that_cannot_be_written_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr gone (``pymmproxy ... 2>&1 | head``): logging must not raise into a signal
    handler or a connection's callback."""
    monkeypatch.setattr(sys, "stderr", _Broken())
    logsetup.configure(0, "json")
    logsetup.get_logger().info("daemon.signal", signal="SIGTERM")
    logsetup.get_logger().error("daemon.reload_failed", error="x")
