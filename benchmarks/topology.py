"""Three network namespaces for one benchmark run, built with ``ip`` and torn down always.

::

    client ns            lb ns (HAProxy, send-proxy-v2)          workload ns
    192.0.2.10  ----  192.0.2.1 | 198.51.100.1  ----  198.51.100.2  candidates, pathway
                                                                   nginx 127.0.0.1:8080
                                                                   iperf3 -s :5201

Only TEST-NET addresses and loopback; every sysctl is set inside one of these namespaces
(``nsenter --net``), never in the host's. Names carry a random suffix per run.
"""

from __future__ import annotations

import contextlib
import resource
import secrets
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pymmproxy.lab.nsexec import LabError, Ns, kill_namespace_pids
from pymmproxy.lab.topology import port_refused

T = TypeVar("T")

CLIENT_IP = "192.0.2.10"
LB_FRONT = "192.0.2.1"
LB_BACK = "198.51.100.1"
WORKLOAD_IP = "198.51.100.2"
NOFILE = 65536


class BenchError(LabError):
    """A benchmark step failed; the message says which."""


def _raise_nofile() -> None:
    """preexec_fn: lift the fd limit (2000+ idle connections need ~4000 fds per proxy)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))


class Netns(Ns):
    """One named network namespace: the lab's handle, with programs started under a raised
    fd limit and failures reported as :class:`BenchError`."""

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            self.argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
            preexec_fn=_raise_nofile,
        )
        if check and res.returncode != 0:
            raise BenchError(
                f"{' '.join(argv)} in {self.name} failed ({res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-400:]}"
            )
        return res

    def popen(  # type: ignore[override]
        self,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session (pid == the program's pid: nsenter execs)."""
        with log.open("ab") as out:
            return subprocess.Popen(
                self.argv(argv),
                stdin=stdin,
                stdout=stdout if stdout is not None else out,
                stderr=out,
                start_new_session=True,
                env=env,
                preexec_fn=_raise_nofile,  # noqa: PLW1509 - only setrlimit
            )


class Topology:
    """client, lb and workload namespaces joined by two veth pairs."""

    def __init__(self) -> None:
        self.suffix = secrets.token_hex(3)
        self.client = Netns(f"pmxb-cl-{self.suffix}")
        self.lb = Netns(f"pmxb-lb-{self.suffix}")
        self.workload = Netns(f"pmxb-wk-{self.suffix}")
        self.created: list[Netns] = []

    def __enter__(self) -> Topology:
        try:
            self.build()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def build(self) -> None:
        s = self.suffix
        for ns in (self.client, self.lb, self.workload):
            _ip("netns", "add", ns.name)
            self.created.append(ns)
            _ip("-n", ns.name, "link", "set", "lo", "up")
        _ip(
            "link",
            "add",
            f"bc{s}",
            "netns",
            self.client.name,
            "type",
            "veth",
            "peer",
            "name",
            f"bl{s}",
            "netns",
            self.lb.name,
        )
        _ip(
            "link",
            "add",
            f"bm{s}",
            "netns",
            self.lb.name,
            "type",
            "veth",
            "peer",
            "name",
            f"bw{s}",
            "netns",
            self.workload.name,
        )
        for ns, ifname, addr in (
            (self.client, f"bc{s}", CLIENT_IP),
            (self.lb, f"bl{s}", LB_FRONT),
            (self.lb, f"bm{s}", LB_BACK),
            (self.workload, f"bw{s}", WORKLOAD_IP),
        ):
            prefix = 24
            _ip("-n", ns.name, "addr", "add", f"{addr}/{prefix}", "dev", ifname)
            _ip("-n", ns.name, "link", "set", ifname, "up")
        _ip("-n", self.client.name, "route", "add", "default", "via", LB_FRONT)
        # replies to spoofed client addresses would leave towards the lb (which does not
        # forward): only the pathway brings them back
        _ip("-n", self.workload.name, "route", "add", "default", "via", LB_BACK)
        for ns in (self.client, self.lb, self.workload):
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")
            ns.sysctl("net.core.somaxconn", "8192")
            ns.sysctl("net.ipv4.tcp_max_syn_backlog", "8192")
        # One client address cycling through its ports makes the candidates' spoofed
        # (client ip, client port) binds collide with their own TIME_WAIT sockets from a
        # connection the client closed first (idle holder, end of a wrk run): go-mmproxy and
        # HAProxy then drop the connection, pymmproxy falls back to another port. Real
        # clients do not reuse ports that fast; no TIME_WAIT in the workload ns removes the
        # artifact for every candidate alike.
        self.workload.sysctl("net.ipv4.tcp_max_tw_buckets", "0")
        self._wait_links()

    def _wait_links(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for ns, addr in ((self.client, LB_FRONT), (self.lb, WORKLOAD_IP)):
            while not port_refused(ns, addr, timeout=0.2):
                if time.monotonic() > deadline:
                    raise BenchError(f"link {ns.name} -> {addr} not up after {timeout}s")
                time.sleep(0.05)

    def destroy(self) -> None:
        """Kill everything in the namespaces, then delete them (idempotent)."""
        while self.created:
            ns = self.created.pop()
            kill_namespace_pids(ns)
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    ["ip", "netns", "del", ns.name], capture_output=True, timeout=10, check=False
                )


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if res.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {res.stderr.strip()}")
