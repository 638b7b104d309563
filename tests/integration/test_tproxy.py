"""TPROXY mode: one listener for a 120-port range, across a real veth (lab namespaces).

The "load balancer" is a socket in the lab's lb namespace sending hand-made PROXY headers
to the workload's address on ports of the range; the TPROXY rule hands them to the one
``IP_TRANSPARENT`` listener of ``pymmproxy serve``, which relays port ``p`` to
``9400 + (p - 8400)``. The rule itself is also checked with both firewall backends.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymmproxy.lab import Lab
from pymmproxy.proxyproto import Command, Family, Header, Transport, encode_v2
from tests.e2e.helpers import require_lab
from tests.nsutil import netns, recv_all, require_root_and_tools

pytestmark = [pytest.mark.netns]

PY = sys.executable
WK4, WK6 = "198.51.100.2", "2001:db8:2::2"
FIRST, LAST, LISTEN, TARGET = 8400, 8519, 8399, 9400
CHECKED = (8400, 8401, 8402, 8450, 8519)  # the ports with a service behind them
NAME = f"tp{secrets.token_hex(3)}"
ROW = f"{NAME} 123 [::]:{LISTEN} 127.0.0.1 {TARGET} ::1 allow=allow.txt"


def header(src: str, sport: int, dport: int) -> bytes:
    fam, dst = (Family.INET6, WK6) if ":" in src else (Family.INET, WK4)
    return encode_v2(Header(2, Command.PROXY, fam, Transport.STREAM, src, sport, dst, dport))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    require_lab()
    cfg = tmp_path_factory.mktemp("tproxy")
    (cfg / "pathways.conf").write_text("123\n")
    (cfg / "allow.txt").write_text("198.51.100.1/32\n2001:db8:2::1/128\n")
    (cfg / "instances.tsv").write_text(f"{ROW} ports={FIRST}-{LAST}\n")
    with Lab([], haproxy=False) as lab:
        lab.install_pathway(123)
        listens = [f"{h}:{TARGET + p - FIRST}" for p in CHECKED for h in ("127.0.0.1", "[::1]")]
        lab.start_service("whoami", *listens)
        argv = [PY, "-m", "pymmproxy", "serve", "--config-dir", str(cfg), "--log-format", "json"]
        lab.serve = lab.spawn(lab.workload, "serve", argv, port=LISTEN)  # type: ignore[attr-defined]
        lab.cfg = cfg  # type: ignore[attr-defined]
        wait_log(lab.serve, "serve.started")  # type: ignore[attr-defined]
        yield lab


def wait_log(proc: object, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log():  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, proc.log()  # type: ignore[attr-defined]
        time.sleep(0.05)


def ask(lab: object, dport: int, src: str, sport: int, hdr_port: int | None = None) -> str:
    v6 = ":" in src
    sock = lab.lb.socket(socket.AF_INET6 if v6 else socket.AF_INET)  # type: ignore[attr-defined]
    with sock as s:
        s.settimeout(5)
        s.connect((WK6 if v6 else WK4, dport))
        s.sendall(header(src, sport, hdr_port or dport) + b"GET / HTTP/1.0\r\n\r\n")
        data = recv_all(s, reset_is_eof=True)
    return data.decode().rpartition("\r\n\r\n")[2].strip()


def service_port(lab: object, src: str, sport: int) -> int:
    """The local port of the whoami connection from ``src``:``sport``."""
    proc = lab.procs[0]  # type: ignore[attr-defined]
    for line in proc.log().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event["event"] == "conn" and (event["peer"], event["port"]) == (src, sport):
                return int(event["lport"])
    raise AssertionError(f"no connection from {src}:{sport}")


def rules(lab: object) -> str:
    res = lab.run_in(lab.workload, ["nft", "list", "table", "inet", "pymmproxy"], check=False)  # type: ignore[attr-defined]
    return str(res.stdout)


def test_range_ports_reach_their_target_port(lab: object) -> None:
    for i, port in enumerate(CHECKED):
        src, sport = (
            (f"2001:db8:1::{30 + i}", 42000 + i) if i % 2 else (f"192.0.2.{30 + i}", 42000 + i)
        )
        assert ask(lab, port, src, sport) == f"{src} {sport}"
        assert service_port(lab, src, sport) == TARGET + port - FIRST


def test_header_port_wins_inside_range_else_original_destination(lab: object) -> None:
    assert ask(lab, 8401, "192.0.2.50", 42100, hdr_port=8402) == "192.0.2.50 42100"
    assert service_port(lab, "192.0.2.50", 42100) == TARGET + 2
    assert ask(lab, 8401, "192.0.2.51", 42101, hdr_port=443) == "192.0.2.51 42101"
    assert service_port(lab, "192.0.2.51", 42101) == TARGET + 1
    assert ask(lab, LISTEN, "192.0.2.52", 42102, hdr_port=443) == ""  # neither is in range
    assert "is outside ports=8400-8519" in lab.serve.log()  # type: ignore[attr-defined]


def test_rule_follows_reload_and_stop(lab: object) -> None:
    before = rules(lab)
    assert f"tcp dport {FIRST}-{LAST} tproxy ip to :{LISTEN} accept" in before
    assert f"tcp dport {FIRST}-{LAST} tproxy ip6 to :{LISTEN} accept" in before
    serve = lab.serve  # type: ignore[attr-defined]
    (lab.cfg / "instances.tsv").write_text(f"{ROW} ports={FIRST}-{LAST - 10}\n")  # type: ignore[attr-defined]
    serve.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while f"{FIRST}-{LAST - 10} tproxy" not in rules(lab) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = rules(lab)
    assert after.count("tproxy ip") == 2
    assert f"tcp dport {FIRST}-{LAST - 10} tproxy ip to :{LISTEN}" in after
    assert ask(lab, 8450, "192.0.2.53", 42103) == "192.0.2.53 42103"
    serve.popen.send_signal(signal.SIGTERM)
    assert serve.popen.wait(10) == 0
    left = rules(lab)
    assert "tproxy" not in left
    assert "ct mark set meta mark" in left  # the pathway is untouched


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_apply_is_idempotent(tmp_path: Path, backend: str) -> None:
    require_root_and_tools("nft", "iptables-legacy-save")
    script = f"""
import json
from pymmproxy.pathway import tproxy
from pymmproxy.settings import Endpoint
rules = {{"t": tproxy.rules_for("t", Endpoint("198.51.100.2", 7000), (7001, 7100))}}
out = [tproxy.apply(rules, backend="{backend}"), tproxy.apply(rules, backend="{backend}"),
       tproxy.present("t", backend="{backend}"), tproxy.apply({{}}, ["t"], backend="{backend}"),
       tproxy.apply({{}}, ["t"], backend="{backend}"), tproxy.present("t", backend="{backend}")]
print(json.dumps(out))
"""
    with netns("pmtp") as ns:
        res = ns.run([PY, "-c", script], cwd=str(Path(__file__).resolve().parents[2]))
        added, again, present, removed, removed_again, gone = json.loads(res.stdout)
        assert len(added) == 1
        assert (again, removed_again, gone) == ([], [], [])
        assert (len(present), len(removed)) == (1, 1)
        if backend == "legacy":
            assert "-d 198.51.100.2 --dport 7001:7100" in added[0]
        else:
            assert (
                "ip daddr 198.51.100.2 tcp dport 7001-7100 tproxy ip to 198.51.100.2:7000"
                in added[0]
            )
            assert ns.run(["nft", "list", "ruleset"]).stdout.strip() == ""
