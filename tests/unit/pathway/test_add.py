"""``pathway.add`` / ``delete`` with fake rtnetlink and firewall: all or nothing, IPv6 off."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest

import pymmproxy.pathway as pathway
from pymmproxy.errors import PathwayError
from pymmproxy.pathway.firewall.base import BackendName, FirewallBackend
from pymmproxy.pathway.ipv6 import LO_DISABLED, NO_KERNEL_IPV6, Ipv6State
from pymmproxy.pathway.plan import Family, FirewallSpec, plan

ON = Ipv6State()
P = plan(123)
ROUTE4, ROUTE6 = P.routes
FWMARK4, LOOP4, FWMARK6, LOOP6 = P.rules
SAVE4, RESTORE4, SAVE6, RESTORE6 = P.firewall


class Kernel:
    """What is installed, and which entries refuse to be added or removed."""

    def __init__(self) -> None:
        self.state: set[object] = set()
        self.refuse_add: dict[object, Exception] = {}
        self.refuse_del: dict[object, Exception] = {}
        self.foreign_first: dict[object, str] = {}  # a delete of it would be refused
        self.seen: list[object] = []

    def add(self, spec: object) -> bool:
        self.seen.append(spec)
        if spec in self.refuse_add:
            raise self.refuse_add[spec]
        if spec in self.state:
            return False
        self.state.add(spec)
        return True

    def delete(self, spec: object) -> bool:
        self.seen.append(spec)
        if spec in self.refuse_del:
            raise self.refuse_del[spec]
        if spec not in self.state:
            return False
        self.state.remove(spec)
        return True


class FakeRouting:
    kernel: ClassVar[Kernel]

    def __enter__(self) -> FakeRouting:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_route(self, spec: Any) -> bool:
        return self.kernel.add(spec)

    add_rule = add_route

    def del_route(self, spec: Any) -> bool:
        return self.kernel.delete(spec)

    del_rule = del_route

    def route_refusal(self, spec: Any) -> str:
        return self.kernel.foreign_first.get(spec, "")

    rule_refusal = route_refusal


class FakeFirewall(FirewallBackend):
    """Adds entry by entry, like the legacy backend (so a failure can come half-way)."""

    name: ClassVar[BackendName] = "legacy"
    kernel: ClassVar[Kernel]

    def present(self, specs: Sequence[FirewallSpec]) -> list[bool]:
        return [s in self.kernel.state for s in specs]

    def add(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        return [s for s in specs if self.kernel.add(s)]

    def delete(self, specs: Sequence[FirewallSpec]) -> list[FirewallSpec]:
        return [s for s in specs if self.kernel.delete(s)]

    def close(self) -> None:
        pass


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel()
    FakeRouting.kernel = k
    FakeFirewall.kernel = k
    monkeypatch.setattr(pathway, "Routing", FakeRouting)
    monkeypatch.setattr(pathway, "open_backend", lambda _name: FakeFirewall())
    return k


ALL = {*P.routes, *P.rules, *P.firewall}


def add(ipv6: Ipv6State = ON) -> list[str]:
    return pathway.add(123, backend="legacy", ipv6=ipv6)


def test_add_installs_everything_once(kernel: Kernel) -> None:
    assert len(add()) == 10
    assert kernel.state == ALL
    assert add() == []


def test_a_failing_firewall_undoes_routes_and_rules(kernel: Kernel) -> None:
    kernel.state.add(FWMARK4)  # there before: must stay
    kernel.refuse_add[SAVE6] = PathwayError("ip6tables -t mangle -A PREROUTING ...: no chain")
    with pytest.raises(PathwayError) as caught:
        add()
    assert str(caught.value) == (
        "pathway add 123: ip6tables -t mangle -A PREROUTING ...: no chain;"
        " rolled back the 7 changes made before"  # 2 routes, 3 rules, 2 firewall entries
    )
    assert kernel.state == {FWMARK4}


def test_a_failing_ipv6_route_undoes_the_ipv4_one(kernel: Kernel) -> None:
    kernel.refuse_add[ROUTE6] = PathwayError("ip -6 route add local ::/0 dev lo table 123: x")
    with pytest.raises(PathwayError, match=r"x; rolled back the 1 change made before$"):
        add()
    assert kernel.state == set()


def test_a_failure_before_any_change_is_reported_as_is(kernel: Kernel) -> None:
    kernel.refuse_add[ROUTE4] = PermissionError(errno.EPERM, "ip route add")
    with pytest.raises(PathwayError) as caught:
        add()
    assert str(caught.value) == (
        "pathway add 123: permission denied (need root, or CAP_NET_ADMIN; the legacy backend "
        "CAP_NET_RAW too)"
    )
    assert kernel.seen == [ROUTE4]


def test_what_cannot_be_undone_is_named(kernel: Kernel) -> None:
    kernel.refuse_add[SAVE4] = PathwayError("iptables -t mangle -A PREROUTING ...: boom")
    kernel.refuse_del[LOOP4] = PathwayError("ip rule del ...: busy")
    kernel.refuse_del[ROUTE6] = OSError(errno.EIO, "I/O error")
    with pytest.raises(PathwayError) as caught:
        add()
    assert str(caught.value) == (
        "pathway add 123: iptables -t mangle -A PREROUTING ...: boom; rollback failed,"
        " still in place: ip -6 route add local ::/0 dev lo table 123;"
        " ip rule add from 127.0.0.0/8 iif lo lookup 123 pref 101 protocol 112"
    )
    assert kernel.state == {ROUTE6, LOOP4}


@pytest.mark.parametrize("off", [Ipv6State(off=LO_DISABLED), Ipv6State(False, NO_KERNEL_IPV6)])
def test_ipv6_off_adds_and_reads_only_ipv4(kernel: Kernel, off: Ipv6State) -> None:
    assert len(add(off)) == 5
    assert {s.family for s in kernel.seen} == {Family.V4}  # type: ignore[attr-defined]
    assert kernel.state == {s for s in ALL if s.family is Family.V4}


def test_del_reaches_ipv6_leftovers_unless_the_kernel_has_no_ipv6(kernel: Kernel) -> None:
    kernel.state |= ALL
    assert len(pathway.delete(123, backend="legacy", ipv6=Ipv6State(off=LO_DISABLED))) == 10
    kernel.state |= {s for s in ALL if s.family is Family.V4}
    kernel.seen.clear()
    assert len(pathway.delete(123, backend="legacy", ipv6=Ipv6State(False, NO_KERNEL_IPV6))) == 5
    assert {s.family for s in kernel.seen} == {Family.V4}  # type: ignore[attr-defined]


@pytest.mark.parametrize("refused", [LOOP6, ROUTE4])
def test_a_refused_del_changes_nothing_and_says_so(kernel: Kernel, refused: object) -> None:
    kernel.state |= ALL
    kernel.foreign_first[refused] = "ip ... del ...: refused, the kernel would delete a foreign x"
    kernel.foreign_first[FWMARK4] = ""
    with pytest.raises(PathwayError) as caught:
        pathway.delete(123, backend="legacy", ipv6=ON)
    assert str(caught.value) == (
        "pathway del 123: ip ... del ...: refused, the kernel would delete a foreign x;"
        " nothing was deleted"
    )
    assert kernel.state == ALL
    assert kernel.seen == []  # not even the firewall entries were touched
