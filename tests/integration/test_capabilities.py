"""The daemon works as nobody with exactly the capabilities ``pymmproxy@.service`` grants.

``setpriv`` reproduces what systemd does with ``User=`` + ``AmbientCapabilities=`` +
``CapabilityBoundingSet=``: a non-root uid whose effective set is exactly those
capabilities. The capability names are read from the unit, so this follows the unit. The
pathway is installed as root (what ``pymmproxy-pathways.service`` does), the daemon listens
on port 443 (NET_BIND_SERVICE) and spoofs client addresses (NET_ADMIN). Without the
capabilities it must refuse each connection with one clear line and keep running.
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymmproxy.proxyproto import Command, Family, Header, Transport, encode_v2
from tests.integration.conftest import LB_V4, LB_V6, Workload, ns_socket, wait_port
from tests.nsutil import NOBODY, nobody_python, recv_all, require

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "pymmproxy@.service"
WHOAMI = 8090
NOCAPS_PORT = 8444
CAP_BITS = {"net_bind_service": 10, "net_admin": 12, "net_raw": 13}


def unit_caps(key: str) -> list[str]:
    """``CAP_NET_ADMIN CAP_NET_RAW`` on the ``key=`` line of the unit -> ``net_admin, ...``."""
    lines = re.findall(rf"^{key}=(.*)$", UNIT.read_text(), flags=re.MULTILINE)
    assert len(lines) == 1, f"expected one {key}= line in {UNIT}"
    caps = [c.removeprefix("CAP_").lower() for c in lines[0].split()]
    assert caps, f"{key}= is empty"
    return caps


def setpriv_with_unit_caps() -> list[str]:
    ambient = ",".join(f"+{c}" for c in unit_caps("AmbientCapabilities"))
    bounding = ",".join(f"+{c}" for c in unit_caps("CapabilityBoundingSet"))
    return [*NOBODY, f"--inh-caps=-all,{ambient}", f"--ambient-caps=-all,{ambient}",
            f"--bounding-set=-all,{bounding}", "--"]  # fmt: skip


def setpriv_without_caps() -> list[str]:
    return [*NOBODY, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]


@pytest.fixture(scope="module")
def wl(workload: Workload) -> Workload:
    """The shared workload namespace (pathway 123 installed as root) plus a whoami service."""
    require(shutil.which("setpriv") is not None, "needs setpriv")
    workload.service("whoami", WHOAMI)
    return workload


@pytest.fixture(scope="module")
def public_dir() -> Iterator[Path]:
    """A directory nobody can read (pytest's tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="pymmproxy-caps-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def start(wl: Workload, prefix: list[str], port: int, allow: Path, log: str):
    argv = [*prefix, *nobody_python(), "-m", "pymmproxy", "-l", f"[::]:{port}",
            "-4", f"127.0.0.1:{WHOAMI}", "-6", f"[::1]:{WHOAMI}", "-mark", "123",
            "-allowed-subnets", str(allow), "-v", "1"]  # fmt: skip
    proc = wl.spawn(argv, log)
    wait_port(wl.ns, LB_V4, port)
    return proc


def ask(wl: Workload, client: str, sport: int, port: int) -> bytes:
    """Send a PROXY v2 header for ``client`` (and an HTTP request); return the reply."""
    v6 = ":" in client
    fam, lb = (Family.INET6, LB_V6) if v6 else (Family.INET, LB_V4)
    raw = encode_v2(Header(2, Command.PROXY, fam, Transport.STREAM, client, sport, lb, port))
    with ns_socket(wl.ns, socket.AF_INET6 if v6 else socket.AF_INET) as s:
        s.settimeout(5)
        s.connect((lb, port))
        s.sendall(raw + b"GET / HTTP/1.0\r\n\r\n")
        return recv_all(s, reset_is_eof=True)


def proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_unit_capabilities_are_enough_without_root(wl: Workload, public_dir: Path) -> None:
    allow = public_dir / "allow.txt"
    allow.write_text("198.51.100.0/24\n2001:db8:2::/64\n")
    allow.chmod(0o644)
    proc = start(wl, setpriv_with_unit_caps(), 443, allow, "daemon-caps.log")

    st = proc_status(proc.pid)  # ip netns exec and setpriv exec: same pid as python
    assert st["Uid"].split() == ["65534"] * 4
    wanted = sum(1 << CAP_BITS[c] for c in unit_caps("AmbientCapabilities"))
    assert int(st["CapEff"], 16) == wanted
    assert int(st["CapAmb"], 16) == wanted

    for client, sport in (("192.0.2.77", 40001), ("2001:db8:1::77", 40002)):
        reply = ask(wl, client, sport, 443).decode()
        assert reply.rsplit("\r\n\r\n", 1)[-1].strip() == f"{client} {sport}"
    assert proc.poll() is None


def test_without_capabilities_the_start_fails_with_one_clear_line(
    wl: Workload, public_dir: Path
) -> None:
    allow = public_dir / "allow.txt"
    allow.write_text("198.51.100.0/24\n")
    allow.chmod(0o644)
    # A privileged port is refused up front, with one line ...
    res = wl.ns.run(
        [*setpriv_without_caps(), *nobody_python(), "-m", "pymmproxy", "-l", f"{LB_V4}:443",
         "-4", f"127.0.0.1:{WHOAMI}", "-6", "none", "-allowed-subnets", str(allow)],
        check=False, timeout=20,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr == f"pymmproxy: cannot listen on {LB_V4}:443: Permission denied\n"

    # ... and so does a daemon that could not spoof a single client (instead of starting,
    # reporting READY and failing every connection).
    res = wl.ns.run(
        [*setpriv_without_caps(), *nobody_python(), "-m", "pymmproxy", "-l",
         f"{LB_V4}:{NOCAPS_PORT}", "-4", f"127.0.0.1:{WHOAMI}", "-6", "none", "-mark", "123",
         "-allowed-subnets", str(allow)],
        check=False, timeout=20,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr == (
        "pymmproxy: cannot spoof client addresses: IP_TRANSPARENT and SO_MARK need "
        "CAP_NET_ADMIN (run as root, or grant it: the systemd units do; docker run --cap-add "
        "NET_ADMIN)\n"
    )
