"""HAProxy for the lb namespace: a generated ``mode tcp`` config and a stats-socket reader."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from pymmproxy.lab.topology import LB_FRONT_V4, LB_FRONT_V6, WORKLOAD_V4

INSTALL_HINT = "apt-get install -y haproxy"


@dataclass(frozen=True)
class Frontend:
    """One HAProxy frontend on the lb's client side (v4 and v6) and its single backend.

    ``version`` is the PROXY protocol version sent to the backend (1, 2, or None for
    plain TCP); ``check`` adds ``check check-send-proxy`` (PROXY v2 LOCAL health checks
    when ``version`` is 2) with ``option httpchk``: the server is UP only if the check's
    HTTP request got an answer *through* the proxy (a plain TCP check would pass on connect
    and reset the connection right after its header, before anything is relayed).
    """

    port: int
    backend: str
    version: int | None = 2
    check: bool = False

    @property
    def name(self) -> str:
        return f"p{self.port}"

    def server_line(self) -> str:
        words = [f"server wk {self.backend}"]
        if self.version == 2:
            words.append("send-proxy-v2")
        elif self.version == 1:
            words.append("send-proxy")
        if self.check:
            words.append("check inter 500ms fall 2 rise 1")
            if self.version:
                words.append("check-send-proxy")
        return " ".join(words)


DEFAULT_FRONTENDS = (
    Frontend(80, f"{WORKLOAD_V4}:8001", 2),
    Frontend(81, f"{WORKLOAD_V4}:8002", 1),
)


def render_config(frontends: tuple[Frontend, ...] | list[Frontend], stats_socket: Path) -> str:
    """The whole haproxy.cfg for ``frontends``."""
    lines = [
        "global",
        "    maxconn 4096",
        "    nbthread 2",
        f"    stats socket {stats_socket} mode 600 level admin",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout client-fin 30s",
        "    timeout server-fin 30s",
    ]
    for fe in frontends:
        lines += [
            f"frontend fe_{fe.name}",
            f"    bind {LB_FRONT_V4}:{fe.port}",
            f"    bind [{LB_FRONT_V6}]:{fe.port}",
            f"    default_backend be_{fe.name}",
            f"backend be_{fe.name}",
            *(["    option httpchk GET /"] if fe.check else []),
            f"    {fe.server_line()}",
        ]
    return "\n".join(lines) + "\n"


def stats_command(stats_socket: Path, command: str, timeout: float = 3.0) -> str:
    """Send one command to HAProxy's stats socket and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(stats_socket))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def server_status(stats_socket: Path, frontend: Frontend) -> str:
    """``UP``/``DOWN``/``no check``... of the frontend's server, from ``show stat``."""
    text = stats_command(stats_socket, "show stat")
    header, *rows = text.strip().splitlines()
    cols = header.lstrip("# ").split(",")
    for row in rows:
        values = dict(zip(cols, row.split(","), strict=False))
        if values.get("pxname") == f"be_{frontend.name}" and values.get("svname") == "wk":
            return values.get("status", "")
    return ""
