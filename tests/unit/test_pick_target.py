"""Which target a header goes to: the header's family, not the load balancer's."""

from __future__ import annotations

import socket

import pytest

from pymmproxy.errors import UpstreamError
from pymmproxy.server.context import pick_target

T4 = ("127.0.0.1", 22)
T6 = ("::1", 22)


@pytest.mark.parametrize("lb", ["198.51.100.1", "2001:db8::1", "::ffff:198.51.100.1"])
def test_header_family_picks_target_whatever_the_lb(lb: str) -> None:
    assert pick_target(("192.0.2.1", 1), T4, T6, lb_host=lb) == (socket.AF_INET, T4)
    assert pick_target(("2001:db8:1::1", 1), T4, T6, lb_host=lb) == (socket.AF_INET6, T6)


def test_local_prefers_the_lb_family_then_the_other() -> None:
    assert pick_target(None, T4, T6, lb_host="2001:db8::1") == (socket.AF_INET6, T6)
    assert pick_target(None, T4, T6, lb_host="::ffff:198.51.100.1") == (socket.AF_INET, T4)
    assert pick_target(None, T4, None, lb_host="2001:db8::1") == (socket.AF_INET, T4)
    assert pick_target(None, None, T6, lb_host="198.51.100.1") == (socket.AF_INET6, T6)


def test_missing_family_target_is_a_clear_error() -> None:
    with pytest.raises(UpstreamError, match="no -6 target"):
        pick_target(("2001:db8:1::1", 1), T4, None, lb_host="198.51.100.1")
    with pytest.raises(UpstreamError, match="no -4 target"):
        pick_target(("192.0.2.1", 1), None, T6, lb_host="198.51.100.1")
    with pytest.raises(UpstreamError, match="no target configured"):
        pick_target(None, None, None, lb_host="198.51.100.1")
