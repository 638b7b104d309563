"""A bulk flow that cannot get its splice pipe keeps copying (README: "simply keeps copying")."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from pymmproxy.net import channel as channel_mod
from pymmproxy.net.reactor import Reactor
from tests.unit.test_reactor import loop, pairs, pump, reactor, relay

__all__ = ["loop", "pairs", "reactor"]  # fixtures, used by name


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_for_the_pipe_keeps_copying(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_mod, "READ_SIZE", 512)  # a full read marks a bulk flow
    tried: list[int] = []

    def no_pipe(flags: int) -> tuple[int, int]:
        tried.append(flags)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(channel_mod.os, "pipe2", no_pipe)
    client, upstream, lb, svc = relay(reactor, pairs)
    payload = os.urandom(1 << 20)
    assert pump(reactor, lb, svc, payload) == payload
    assert tried  # it did try to splice
    assert not client.splicing
    assert upstream.pipe is None
    assert client.count == len(payload)


def test_a_pipe_over_the_quota_is_closed_and_copying_goes_on(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_mod, "READ_SIZE", 512)
    real_fcntl = channel_mod.fcntl.fcntl
    refused: list[int] = []

    def over_quota(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == channel_mod.fcntl.F_SETPIPE_SZ:
            refused.append(fd)
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(channel_mod.fcntl, "fcntl", over_quota)
    client, upstream, lb, svc = relay(reactor, pairs)
    before = open_fds()
    payload = os.urandom(1 << 20)
    assert pump(reactor, lb, svc, payload) == payload
    assert refused
    assert open_fds() == before  # every small pipe it made was closed again
    assert not client.splicing
    assert upstream.pipe is None
    assert client.count == len(payload)
