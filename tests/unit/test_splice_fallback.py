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


def test_pipes_hold_at_most_their_share_of_descriptors_then_bulk_copies(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle connections keep the pipe a burst gave them; past the share of the descriptor
    limit (PIPE_SHARE), new bulk flows copy, so sockets for new connections stay free."""
    monkeypatch.setattr(channel_mod, "READ_SIZE", 512)
    budget = channel_mod.PipeBudget()
    budget.limit = 2  # room for one pipe
    monkeypatch.setattr(channel_mod, "PIPES", budget)
    first, first_up, lb1, svc1 = relay(reactor, pairs)
    second, second_up, lb2, svc2 = relay(reactor, pairs)
    payload = os.urandom(1 << 20)
    assert pump(reactor, lb1, svc1, payload) == payload
    assert first_up.pipe is not None  # kept while the connection lives
    assert budget.held == 2
    assert pump(reactor, lb2, svc2, payload) == payload  # copied, intact
    assert second_up.pipe is None
    assert not second.splicing
    first.abort()
    first_up.abort()
    assert budget.held == 0  # given back with the connection


def test_the_pipe_share_follows_the_descriptor_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_mod.resource, "getrlimit", lambda _: (64, 64))
    budget = channel_mod.PipeBudget()
    assert budget.allows(16)
    assert not budget.allows(18)  # 64 / PIPE_SHARE
