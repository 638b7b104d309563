"""The three-namespace lab network, built with pyroute2 (no ``ip`` shell-outs).

::

    client ns                 lb ns (HAProxy)                      workload ns
    192.0.2.10-13        192.0.2.1 | 198.51.100.1            198.51.100.2 (proxy, pathway)
    2001:db8:1::10-13 -- 2001:db8:1::1 | 2001:db8:2::1 -- 2001:db8:2::2  services on lo

The workload's default routes point at the lb, which does not forward: without a pathway
a service's reply to a spoofed client address leaves towards the lb and is lost.
Only TEST-NET / documentation prefixes are used, and only inside the lab's namespaces.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import NetNS, netns

from pymmproxy.lab.nsexec import Ns, kill_namespace_pids

IFA_F_NODAD = 0x02
AF_INET6 = 10

CLIENT_V4 = ("192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.13")
CLIENT_V6 = ("2001:db8:1::10", "2001:db8:1::11", "2001:db8:1::12", "2001:db8:1::13")
LB_FRONT_V4, LB_FRONT_V6 = "192.0.2.1", "2001:db8:1::1"
LB_BACK_V4, LB_BACK_V6 = "198.51.100.1", "2001:db8:2::1"
WORKLOAD_V4, WORKLOAD_V6 = "198.51.100.2", "2001:db8:2::2"


@dataclass
class Topology:
    """Names of the lab's namespaces and veths (random suffix per run)."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    created: list[str] = field(default_factory=list)

    @property
    def client(self) -> Ns:
        return Ns(f"pmxlab-cl-{self.suffix}")

    @property
    def lb(self) -> Ns:
        return Ns(f"pmxlab-lb-{self.suffix}")

    @property
    def workload(self) -> Ns:
        return Ns(f"pmxlab-wk-{self.suffix}")

    def build(self) -> None:
        """Create namespaces, veths, addresses and routes; on failure undo what was made."""
        try:
            for ns in (self.client, self.lb, self.workload):
                netns.create(ns.name)
                self.created.append(ns.name)
                _with_ns(ns, _lo_up)
            _veth(self.client, f"vcl{self.suffix}", self.lb, f"vlc{self.suffix}")
            _veth(self.lb, f"vlw{self.suffix}", self.workload, f"vwl{self.suffix}")
            _configure(self.client, f"vcl{self.suffix}", CLIENT_V4, CLIENT_V6)
            _configure(self.lb, f"vlc{self.suffix}", (LB_FRONT_V4,), (LB_FRONT_V6,))
            _configure(self.lb, f"vlw{self.suffix}", (LB_BACK_V4,), (LB_BACK_V6,))
            _configure(self.workload, f"vwl{self.suffix}", (WORKLOAD_V4,), (WORKLOAD_V6,))
            _default_routes(self.client, LB_FRONT_V4, LB_FRONT_V6)
            _default_routes(self.workload, LB_BACK_V4, LB_BACK_V6)
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Kill anything left in the namespaces and remove them (idempotent)."""
        while self.created:
            name = self.created.pop()
            kill_namespace_pids(Ns(name))
            with contextlib.suppress(OSError, FileNotFoundError):
                netns.remove(name)


def _with_ns(ns: Ns, fn: Callable[[Any], None]) -> None:
    with NetNS(ns.name) as ipr:
        fn(ipr)


def _lo_up(ipr: Any) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _veth(ns_a: Ns, if_a: str, ns_b: Ns, if_b: str) -> None:
    with NetNS(ns_a.name) as ipr:
        ipr.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": ns_b.name})


def _configure(ns: Ns, ifname: str, v4: tuple[str, ...], v6: tuple[str, ...]) -> None:
    with NetNS(ns.name) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        for addr in v4:
            ipr.addr("add", index=idx, address=addr, prefixlen=24)
        for addr in v6:  # no duplicate address detection: usable at once
            ipr.addr("add", index=idx, address=addr, prefixlen=64, flags=IFA_F_NODAD)
        ipr.link("set", index=idx, state="up")


def _default_routes(ns: Ns, gw4: str, gw6: str) -> None:
    with NetNS(ns.name) as ipr:
        ipr.route("add", dst="0.0.0.0/0", gateway=gw4)
        ipr.route("add", dst="::/0", gateway=gw6, family=AF_INET6)
