"""The netlink route dump: what a namespace's local and broadcast routes read back as."""

from __future__ import annotations

import socket
import subprocess

from pymmproxy.net.localroutes import RT_TABLE_LOCAL, RTN_BROADCAST, RTN_LOCAL, Route, local_routes
from tests.nsutil import netns, require_root_and_tools, run_in


def test_local_and_broadcast_routes_of_every_table() -> None:
    require_root_and_tools()
    with netns("pmlr") as ns:
        for argv in (
            ["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
            ["link", "set", "d0", "up"],
            ["addr", "add", "203.0.113.5/24", "dev", "d0"],
            ["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "1000"],
            ["-6", "route", "add", "local", "2001:db8:5::/64", "dev", "lo"],
        ):
            subprocess.run(["ip", "-n", ns.name, *argv], check=True)
        v4 = run_in(ns, lambda: local_routes(socket.AF_INET))
        v6 = run_in(ns, lambda: local_routes(socket.AF_INET6))
    assert Route(RTN_LOCAL, RT_TABLE_LOCAL, "203.0.113.5", 32) in v4
    assert Route(RTN_BROADCAST, RT_TABLE_LOCAL, "203.0.113.255", 32) in v4
    assert Route(RTN_LOCAL, 1000, "0.0.0.0", 0) in v4  # a table id above 255 (RTA_TABLE)
    assert Route(RTN_LOCAL, RT_TABLE_LOCAL, "2001:db8:5::", 64) in v6
    assert Route(RTN_LOCAL, RT_TABLE_LOCAL, "::1", 128) in v6
    assert all(r.kind in (RTN_LOCAL, RTN_BROADCAST) for r in v4 + v6)
