"""``pymmproxy --instance NAME``, ``pymmproxy instances`` and ``pathway add NAME`` in a namespace.

One namespace and config dir (in tmp) for the module: a whoami service on 127.0.0.1 and
::1, and instance ``vps01-ssh-<random>`` running from instances.tsv (the lock directory
/run/pymmproxy is shared with the host, hence the random suffix on every name).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pymmproxy import instancelock
from pymmproxy.proxyproto import Command, Family, Header, Transport, encode_v2
from tests.integration.conftest import LB_V4, LB_V6, PY, ns_socket, wait_port
from tests.nsutil import Netns, netns, recv_all, require_root_and_tools

pytestmark = pytest.mark.netns

WHOAMI = 8080
SSH_PORT = 8022


@dataclass
class Site:
    ns: Netns
    cfg: Path
    ssh: str  # mark 123, running
    router: str  # mark 124, pathway not installed up front
    web: str  # mark 125, pathway never installed
    daemon: subprocess.Popen[bytes]

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.ns.run([PY, "-m", "pymmproxy", *args], check=False, timeout=20, env=env)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_root_and_tools("nft")
    suffix = secrets.token_hex(3)
    ssh, router, web = f"vps01-ssh-{suffix}", f"router01-ssh-{suffix}", f"vps02-web-{suffix}"
    tmp = tmp_path_factory.mktemp("instances")
    cfg = tmp / "cfg"
    cfg.mkdir()
    (cfg / "pathways.conf").write_text("# one per proxy\n123\n124\n125\n")
    (cfg / "allow.txt").write_text("198.51.100.0/24\n2001:db8:2::/64\n")
    (cfg / "instances.tsv").write_text(
        f"{ssh}\t123\t{LB_V4}:{SSH_PORT}\t127.0.0.1\t{WHOAMI}\t::1\n"
        f"{router}\t124\t{LB_V4}:{SSH_PORT + 1}\t127.0.0.1\t{WHOAMI}\t::1\n"
        f"{web}\t125\t[::]:{SSH_PORT + 2}\t127.0.0.1\t{WHOAMI}\t-\n"
    )
    procs: list[subprocess.Popen[bytes]] = []
    with netns("pmi") as ns:
        ns.run(["ip", "link", "add", "wl0", "type", "veth", "peer", "name", "wl1"])
        for argv in (
            "ip link set wl1 up", "ip link set wl0 up",
            f"ip addr add {LB_V4}/24 dev wl0", f"ip -6 addr add {LB_V6}/64 dev wl0 nodad",
            "ip route add default via 198.51.100.1 dev wl0",  # replies must not go here
            "ip -6 route add default via 2001:db8:2::1 dev wl0",
        ):  # fmt: skip
            ns.run(argv.split())
        res = ns.run([PY, "-m", "pymmproxy", "pathway", "add", ssh, "--config-dir", str(cfg)])
        assert "ip rule add fwmark 123 lookup 123 pref 100" in res.stdout
        with (tmp / "whoami.log").open("wb") as out:
            procs.append(ns.popen([PY, "-m", "pymmproxy.lab.services", "whoami", "--listen",
                                   f"127.0.0.1:{WHOAMI}", "--listen", f"[::1]:{WHOAMI}"],
                                  stdout=out, stderr=subprocess.STDOUT))  # fmt: skip
        env = {**os.environ, "PYMMPROXY_CONFIG_DIR": str(cfg)}
        with (tmp / "daemon.log").open("wb") as out:
            daemon = ns.popen([PY, "-m", "pymmproxy", "--instance", ssh, "-v", "1"], env=env,
                              stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        procs.append(daemon)
        try:
            wait_port(ns, "127.0.0.1", WHOAMI)
            wait_port(ns, LB_V4, SSH_PORT)
            yield Site(ns, cfg, ssh, router, web, daemon)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(timeout=10)
            for name in (ssh, router, web):  # unique names: no one else can hold these
                for directory in instancelock.lock_dirs():
                    (directory / f"{name}.lock").unlink(missing_ok=True)
    assert "Traceback" not in (tmp / "daemon.log").read_text()


def whoami(site: Site, client: str, sport: int) -> str:
    """What the service saw, for a PROXY v2 header naming ``client`` (the LB is on IPv4)."""
    fam, dst = (Family.INET6, LB_V6) if ":" in client else (Family.INET, LB_V4)
    raw = encode_v2(Header(2, Command.PROXY, fam, Transport.STREAM, client, sport, dst, SSH_PORT))
    with ns_socket(site.ns) as s:
        s.settimeout(5)
        s.connect((LB_V4, SSH_PORT))
        s.sendall(raw + b"GET / HTTP/1.0\r\n\r\n")
        reply = recv_all(s)
    return reply.decode().rsplit("\r\n\r\n", 1)[-1].strip()


def test_instance_runs_and_relays_spoofed_clients(site: Site) -> None:
    assert whoami(site, "192.0.2.44", 40044) == "192.0.2.44 40044"
    assert whoami(site, "2001:db8:1::44", 40045) == "2001:db8:1::44 40045"


def test_second_start_exits_0_without_a_duplicate(site: Site) -> None:
    res = site.cli("--instance", site.ssh, "--config-dir", str(site.cfg))
    assert res.returncode == 0
    assert res.stderr == (
        f"pymmproxy: instance {site.ssh} is already running (pid {site.daemon.pid}); "
        "not starting another\n"
    )
    assert site.daemon.poll() is None
    assert instancelock.holder_pid(site.ssh) == site.daemon.pid
    assert whoami(site, "192.0.2.45", 40046) == "192.0.2.45 40046"


def test_unknown_instance_exits_2_listing_known_ones(site: Site) -> None:
    res = site.cli("--instance", "nope", "--config-dir", str(site.cfg))
    assert res.returncode == 2
    assert res.stderr == (
        f"pymmproxy: no instance 'nope' in {site.cfg}/instances.tsv "
        f"(known: {site.ssh}, {site.router}, {site.web})\n"
    )


def test_pathway_add_by_instance_name(site: Site) -> None:
    assert site.cli("pathway", "status", "124").returncode == 1
    res = site.cli("pathway", "add", site.router, "--config-dir", str(site.cfg))
    assert res.returncode == 0, res.stderr
    assert "ip rule add fwmark 124 lookup 124 pref 100 protocol 112" in res.stdout.splitlines()
    assert site.cli("pathway", "status", "124").returncode == 0
    again = site.cli("pathway", "add", site.router, "--config-dir", str(site.cfg))
    assert again.stdout == "pathway 124: already in place\n"


def test_instances_lists_pathway_status_and_running(site: Site) -> None:
    env = {**os.environ, "PYMMPROXY_CONFIG_DIR": str(site.cfg)}
    res = site.cli("instances", env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == [
        "NAME", "PROTO", "MARK", "LISTEN", "TARGET4", "TARGET6", "PATHWAY", "RUNNING",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[site.ssh] == [site.ssh, "tcp", "123", f"{LB_V4}:{SSH_PORT}",
                              f"127.0.0.1:{WHOAMI}", f"[::1]:{WHOAMI}", "ok",
                              "pid", str(site.daemon.pid)]  # fmt: skip
    assert rows[site.web][-3:] == ["-", "incomplete", "no"]


def test_bad_config_line_exits_2_with_file_and_line(site: Site, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pathways.conf").write_text("123\n")
    (bad / "allow.txt").write_text("198.51.100.0/24\n")
    (bad / "instances.tsv").write_text(
        f"{site.ssh}\t123\t{LB_V4}:9000\t127.0.0.1\t{WHOAMI}\t-\n"
        f"{site.web}\t999\t{LB_V4}:9001\t127.0.0.1\t{WHOAMI}\t-\n"
    )
    line = (
        f"pymmproxy: {bad}/instances.tsv:2: fwmark 999 is not listed in pathways.conf"
        " (known: 123)\n"
    )
    for args in (["--instance", site.web], ["instances"]):  # its own line, the whole file
        res = site.cli(*args, "--config-dir", str(bad))
        assert (res.returncode, res.stdout, res.stderr) == (2, "", line)
    # another instance's bad line does not stop this one (it is running already here)
    res = site.cli("--instance", site.ssh, "--config-dir", str(bad))
    assert res.returncode == 0
    assert "already running" in res.stderr
