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
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from pymmproxy.lab.nsexec import LabError, Ns, kill_namespace_pids

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
                Ns.create(ns.name)
                self.created.append(ns.name)
                _with_ns(ns, _lo_up)
                _namespace_sysctls(ns)
            _veth(self.client, f"vcl{self.suffix}", self.lb, f"vlc{self.suffix}")
            _veth(self.lb, f"vlw{self.suffix}", self.workload, f"vwl{self.suffix}")
            _configure(self.client, f"vcl{self.suffix}", CLIENT_V4, CLIENT_V6)
            _configure(self.lb, f"vlc{self.suffix}", (LB_FRONT_V4,), (LB_FRONT_V6,))
            _configure(self.lb, f"vlw{self.suffix}", (LB_BACK_V4,), (LB_BACK_V6,))
            _configure(self.workload, f"vwl{self.suffix}", (WORKLOAD_V4,), (WORKLOAD_V6,))
            _default_routes(self.client, LB_FRONT_V4, LB_FRONT_V6)
            _default_routes(self.workload, LB_BACK_V4, LB_BACK_V6)
            self.wait_ready()
        except BaseException:
            self.destroy()
            raise

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Probe each link (v4 and v6) until a closed port answers with a reset.

        A fresh veth carries IPv6 only after the kernel's link watcher has run (up to ~1 s).
        """
        deadline = time.monotonic() + timeout
        for ns, addr in (
            (self.client, LB_FRONT_V4),
            (self.client, LB_FRONT_V6),
            (self.lb, WORKLOAD_V4),
            (self.lb, WORKLOAD_V6),
        ):
            while not port_refused(ns, addr):
                if time.monotonic() > deadline:
                    raise LabError(f"lab link {ns.name} -> {addr} not up after {timeout}s")

    def destroy(self) -> None:
        """Kill anything left in the namespaces and remove them (idempotent)."""
        while self.created:
            name = self.created.pop()
            kill_namespace_pids(Ns(name))
            with contextlib.suppress(OSError):
                Ns(name).remove()


def port_refused(ns: Ns, addr: str, port: int = 9, timeout: float = 0.1) -> bool:
    """Whether a connect from ``ns`` to a closed ``addr:port`` is answered with a reset
    (the link carries traffic); a timeout or unreachable route is False."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with ns.socket(family) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return True


def _with_ns(ns: Ns, fn: Callable[[IPRoute], None]) -> None:
    """``fn(IPRoute())`` with the netlink socket opened (and used) inside ``ns``."""

    def work() -> None:
        with IPRoute() as ipr:
            fn(ipr)

    ns.call(work)


def _namespace_sysctls(ns: Ns) -> None:
    """Sysctls of a lab namespace (never the host's): IPv6 addresses usable at once."""
    for scope in ("all", "default"):
        ns.sysctl(f"net.ipv6.conf.{scope}.accept_dad", "0")


def _lo_up(ipr: IPRoute) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _veth(ns_a: Ns, if_a: str, ns_b: Ns, if_b: str) -> None:
    peer = {"ifname": if_b, "net_ns_fd": ns_b.name}
    _with_ns(ns_a, lambda ipr: ipr.link("add", ifname=if_a, kind="veth", peer=peer))


def _configure(ns: Ns, ifname: str, v4: tuple[str, ...], v6: tuple[str, ...]) -> None:
    def work(ipr: IPRoute) -> None:
        idx = ipr.link_lookup(ifname=ifname)[0]
        for addr in v4:
            ipr.addr("add", index=idx, address=addr, prefixlen=24)
        for addr in v6:  # no duplicate address detection: usable at once
            ipr.addr("add", index=idx, address=addr, prefixlen=64, flags=IFA_F_NODAD)
        ipr.link("set", index=idx, state="up")

    _with_ns(ns, work)


def _default_routes(ns: Ns, gw4: str, gw6: str) -> None:
    def work(ipr: IPRoute) -> None:
        ipr.route("add", dst="0.0.0.0/0", gateway=gw4)
        ipr.route("add", dst="::/0", gateway=gw6, family=AF_INET6)

    _with_ns(ns, work)
