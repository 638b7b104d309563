"""The services, the load balancer and the candidates (the receivers being compared).

Every candidate gets two listeners in the workload namespace: one in front of nginx
(HTTP measures, memory, startup) and one in front of ``iperf3 -s`` (bulk), because
go-mmproxy has one target per process. The load balancer (HAProxy in the lb namespace) has
one HTTP and one bulk frontend per candidate; "direct" is a plain backend to the service.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.topology import LB_FRONT, WORKLOAD_IP, BenchError, Netns, Topology
from pymmproxy.lab.nsexec import Proc as LabProc

REPO = Path(__file__).resolve().parents[1]
MARK = 123
NGINX_PORT = 8080
IPERF_PORT = 5201
BODY = "pymmproxy benchmark: a small static body.\n"
APT_HINT = "apt-get install -y haproxy go-mmproxy nginx-light wrk iperf3"


@dataclass(frozen=True)
class Candidate:
    """One receiver behind the load balancer."""

    name: str
    kind: str  # pymmproxy | go-mmproxy | haproxy | direct
    index: int
    listeners: int = 0  # pymmproxy's -listeners; 0: its default (one worker per usable CPU)

    @property
    def http_port(self) -> int:  # where the candidate listens (workload ns)
        return NGINX_PORT if self.kind == "direct" else 8100 + self.index

    @property
    def bulk_port(self) -> int:
        return IPERF_PORT if self.kind == "direct" else 8200 + self.index

    @property
    def lb_http_port(self) -> int:  # the LB frontend the clients use (lb ns)
        return 10000 + self.index

    @property
    def lb_bulk_port(self) -> int:
        return 11000 + self.index

    @property
    def is_proxy(self) -> bool:
        return self.kind != "direct"


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("go-mmproxy", "go-mmproxy", 0),
    Candidate("pymmproxy", "pymmproxy", 2),  # as installed: -listeners auto
    Candidate("pymmproxy-1", "pymmproxy", 1, listeners=1),
    Candidate("haproxy", "haproxy", 3),
    Candidate("direct", "direct", 4),
)
NAMES = tuple(c.name for c in CANDIDATES)


class Proc(LabProc):
    """A started program (the lab's process handle); ``stop()`` ends its process group."""

    def __init__(
        self, name: str, ns: Netns, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.ns, self.argv, self.log_path = name, ns, list(argv), log
        self.started = time.monotonic()
        self.popen = ns.popen(argv, log, env=env)


def check_tools() -> None:
    missing = [
        t
        for t in ("haproxy", "go-mmproxy", "nginx", "wrk", "iperf3", "nsenter", "ip")
        if shutil.which(t) is None
    ]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: {APT_HINT}")


class Bench:
    """The topology plus long-running processes: services, load balancer, candidates."""

    def __init__(self, topo: Topology, workdir: Path, candidates: tuple[Candidate, ...]) -> None:
        self.topo, self.workdir, self.candidates = topo, workdir, candidates
        self.procs: list[Proc] = []
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.allowed = workdir / "allowed-subnets.txt"
        self.allowed.write_text("198.51.100.0/24\n")

    def spawn(self, ns: Netns, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, ns, argv, self.workdir / f"{name}.log", self.env)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(grace=1.0)
        self.procs.clear()

    # -- fixed parts ------------------------------------------------------------------------
    def start_fixed(self) -> None:
        """Pathway, nginx, iperf3 server and the load balancer."""
        wk = self.topo.workload
        wk.run([sys.executable, "-m", "pymmproxy", "pathway", "add", str(MARK)], env=self.env)
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_config(self.workdir))
        nginx = self.spawn(
            wk, "nginx", ["nginx", "-p", str(self.workdir), "-e", "stderr", "-c", str(conf)]
        )
        iperf = self.spawn(wk, "iperf3-server", ["iperf3", "-s", "-p", str(IPERF_PORT)])
        lbconf = self.workdir / "haproxy-lb.cfg"
        lbconf.write_text(lb_config(self.candidates))
        lb = self.spawn(self.topo.lb, "haproxy-lb", ["haproxy", "-db", "-f", str(lbconf)])
        nginx.wait_listening(NGINX_PORT)
        iperf.wait_listening(IPERF_PORT)
        for cand in self.candidates:
            lb.wait_listening(cand.lb_http_port)
            lb.wait_listening(cand.lb_bulk_port)

    # -- candidates -------------------------------------------------------------------------
    def argv(self, cand: Candidate, listen_port: int, target_port: int) -> list[str]:
        listen = f"{WORKLOAD_IP}:{listen_port}"
        flags = [
            "-l",
            listen,
            "-4",
            f"127.0.0.1:{target_port}",
            "-6",
            f"[::1]:{target_port}",
            "-mark",
            str(MARK),
            "-allowed-subnets",
            str(self.allowed),
            "-v",
            "0",
        ]
        if cand.kind == "pymmproxy":
            workers = ["-listeners", str(cand.listeners)] if cand.listeners else []
            return [sys.executable, "-m", "pymmproxy", *flags, *workers]
        if cand.kind == "go-mmproxy":
            return ["go-mmproxy", *flags]
        if cand.kind == "haproxy":
            cfg = self.workdir / f"haproxy-recv-{listen_port}.cfg"
            cfg.write_text(receiver_config(listen_port, target_port))
            return ["haproxy", "-db", "-f", str(cfg)]
        raise BenchError(f"{cand.name} is not a proxy")

    def start_candidate(self, cand: Candidate, bulk: bool) -> Proc:
        """Start the HTTP (or bulk) instance of ``cand``; returns at once (not yet ready)."""
        port, target = (cand.bulk_port, IPERF_PORT) if bulk else (cand.http_port, NGINX_PORT)
        return self.spawn(
            self.topo.workload,
            f"{cand.name}-{'bulk' if bulk else 'http'}",
            self.argv(cand, port, target),
        )


def nginx_config(workdir: Path) -> str:
    return f"""\
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 65536;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
    client_header_timeout 600s;
    server {{
        listen 127.0.0.1:{NGINX_PORT} backlog=8192;
        listen {WORKLOAD_IP}:{NGINX_PORT} backlog=8192;
        location / {{ default_type text/plain; return 200 "{BODY.strip()}\\n"; }}
    }}
}}
"""


_HAPROXY_COMMON = """\
global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout client-fin 30s
    timeout server-fin 30s
"""


def lb_config(candidates: tuple[Candidate, ...]) -> str:
    """The load balancer: per candidate one HTTP and one bulk frontend."""
    lines = [_HAPROXY_COMMON]
    for cand in candidates:
        proxy = " send-proxy-v2" if cand.is_proxy else ""
        for kind, front, back in (
            ("http", cand.lb_http_port, cand.http_port),
            ("bulk", cand.lb_bulk_port, cand.bulk_port),
        ):
            lines += [
                f"listen {kind}_{cand.name}",
                f"    bind {LB_FRONT}:{front} backlog 8192",
                f"    server s {WORKLOAD_IP}:{back}{proxy}",
            ]
    return "\n".join(lines) + "\n"


def receiver_config(listen_port: int, target_port: int) -> str:
    """HAProxy as the receiver: PROXY header in, the client's address out (usesrc client)."""
    return (
        _HAPROXY_COMMON
        + f"""\
listen recv
    bind {WORKLOAD_IP}:{listen_port} accept-proxy backlog 8192
    server s 127.0.0.1:{target_port} source 0.0.0.0 usesrc client
"""
    )
