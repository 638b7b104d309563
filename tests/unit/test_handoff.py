"""The parent-to-workers handoff: a forked child reads what the parent published later."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pymmproxy.errors import PymmproxyError
from pymmproxy.handoff import _HEAD, Handoff


def test_nothing_published_is_none() -> None:
    """A worker that gets a SIGHUP straight from a terminal before any reload: no config."""
    handoff = Handoff()
    assert handoff.take() is None
    handoff.close()


def test_a_failed_publish_keeps_readers_off_until_the_next_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handoff = Handoff()
    handoff.publish("old")
    real = os.ftruncate

    def no_memory(fd: int, size: int) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(os, "ftruncate", no_memory)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        handoff.publish("lost")
    monkeypatch.setattr("pymmproxy.handoff._ATTEMPTS", 3)
    with pytest.raises(PymmproxyError, match="kept changing"):  # odd: mid-write
        handoff.take()
    monkeypatch.setattr(os, "ftruncate", real)
    handoff.publish("new")  # never an even header before its bytes
    assert handoff.take() == "new"
    handoff.close()


def test_a_child_forked_before_takes_each_later_value() -> None:
    handoff = Handoff()
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: take whatever is there whenever told (a "SIGHUP")
        code = 1
        try:
            for _ in range(2):
                os.read(to_child_r, 1)
                os.write(from_child_w, repr(handoff.take()).encode()[:64].ljust(64))
            code = 0
        finally:
            os._exit(code)
    try:
        for value in ({"a": (1, 2)}, {"a": (1, 2), "b": "x" * 100_000}):
            handoff.publish(value)
            os.write(to_child_w, b"!")
            got = os.read(from_child_r, 64).strip()
            assert got == repr(value).encode()[:64].strip()
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            os.close(fd)
        handoff.close()


def test_a_reader_waits_while_the_parent_writes() -> None:
    """An odd generation means a write is under way: the reader waits for the even one."""
    handoff = Handoff()
    handoff.publish("old")
    os.pwrite(handoff.fd, _HEAD.pack(handoff.generation + 1, 0), 0)  # a write begins
    handoff.generation += 1

    def finish() -> None:
        time.sleep(0.05)
        handoff.generation -= 1
        handoff.publish("new")

    thread = threading.Thread(target=finish)
    thread.start()
    assert handoff.take() == "new"
    thread.join()
    handoff.close()
