"""When IPv6 counts as off, and which families each verb then covers (no kernel access)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pymmproxy.pathway import ipv6
from pymmproxy.pathway.ipv6 import Ipv6State, decide
from pymmproxy.pathway.plan import BOTH, Family

V4 = (Family.V4,)


@pytest.mark.parametrize(
    ("sock", "lo", "expected"),
    [
        (None, "0\n", Ipv6State()),
        (None, None, Ipv6State()),  # unreadable sysctl: let the kernel decide
        (None, "1\n", Ipv6State(kernel=True, off=ipv6.LO_DISABLED)),
        (errno.EAFNOSUPPORT, None, Ipv6State(kernel=False, off=ipv6.NO_KERNEL_IPV6)),
        (errno.EMFILE, "0\n", Ipv6State()),  # out of fds says nothing about IPv6
    ],
)
def test_decide(sock: int | None, lo: str | None, expected: Ipv6State) -> None:
    assert decide(sock, lo) == expected


def test_families_per_verb() -> None:
    on = Ipv6State()
    assert [on.families(v) for v in ("add", "del", "status")] == [BOTH, BOTH, BOTH]
    assert on.note == ""
    lo_off = decide(None, "1")
    # del still reaches IPv6 rules / firewall entries left from before IPv6 went off
    assert [lo_off.families(v) for v in ("add", "del", "status")] == [V4, BOTH, V4]
    assert lo_off.note == (
        "IPv6 off on this host (net.ipv6.conf.lo.disable_ipv6=1): IPv6 parts skipped"
    )
    no_kernel = decide(errno.EAFNOSUPPORT, None)
    assert [no_kernel.families(v) for v in ("add", "del", "status")] == [V4, V4, V4]
    assert "ipv6.disable=1" in no_kernel.note


def test_probe_reads_lo_sysctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipv6, "_socket_errno", lambda: None)
    sysctl = tmp_path / "disable_ipv6"
    sysctl.write_text("1\n")
    assert ipv6.probe(sysctl).off == ipv6.LO_DISABLED
    sysctl.write_text("0\n")
    assert ipv6.probe(sysctl).off == ""
    monkeypatch.setattr(ipv6, "_socket_errno", lambda: errno.EAFNOSUPPORT)
    assert ipv6.probe(tmp_path / "absent") == Ipv6State(kernel=False, off=ipv6.NO_KERNEL_IPV6)
