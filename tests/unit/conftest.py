"""Unit tests share one process: no test inherits another's logging set-up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import structlog

from tests.nsutil import netns, require_root_and_tools, run_in

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """``logsetup.configure`` binds structlog to the ``sys.stderr`` of the moment, which
    pytest's capture closes after the test that called it."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def own_netns() -> Iterator[Callable[[Callable[[], T]], T]]:
    """``own_netns(fn)`` runs ``fn`` in a network namespace of this test's own (loopback up):
    a unit test that binds or connects sockets never touches the host's namespace."""
    require_root_and_tools()
    with netns("pmu") as ns:
        yield lambda fn: run_in(ns, fn)
