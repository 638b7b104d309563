"""``pymmproxy pathway`` against a real kernel, each test in a fresh network namespace.

What pymmproxy reads back itself (``status``: pyroute2, libnftables JSON, python-iptables)
is cross-checked with the host's own tools (``ip``, ``nft``, ``iptables-legacy-save``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymmproxy.pathway.firewall.detect import detect_backend
from pymmproxy.pathway.plan import plan
from tests.nsutil import Netns, netns, nobody_python, require_root_and_tools

pytestmark = pytest.mark.netns

PY = sys.executable
BACKENDS = ["nft", "legacy"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
DUMPS = {
    "rules4": ["ip", "rule"],
    "rules6": ["ip", "-6", "rule"],
    "routes4": ["ip", "route", "show", "table", "all"],
    "routes6": ["ip", "-6", "route", "show", "table", "all"],
    "nft": ["nft", "list", "ruleset"],
    "legacy4": ["iptables-legacy-save"],
    "legacy6": ["ip6tables-legacy-save"],
}


@pytest.fixture
def ns() -> Iterator[Netns]:
    require_root_and_tools("nft", "iptables-legacy-save", "ip6tables-legacy-save", "setpriv")
    with netns("pmp") as n:
        yield n


def cli(ns: Netns, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    python = nobody_python() if prefix else (PY,)
    return ns.run([*prefix, *python, "-m", "pymmproxy.pathway", *args], check=False, cwd="/")


def ok(ns: Netns, *args: str) -> list[str]:
    res = cli(ns, *args)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    return res.stdout.splitlines()


def dump(ns: Netns) -> dict[str, str]:
    """Everything a pathway could touch, as the host tools print it (timestamps dropped)."""
    out = {}
    for key, argv in DUMPS.items():
        text = ns.run(argv).stdout
        out[key] = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return out


def sh(ns: Netns, *commands: str) -> None:
    for command in commands:
        ns.run(command.split())


def foreign_state(ns: Netns, backend: str) -> None:
    """Entries that resemble a pathway of mark 123 but are not ours: must survive del."""
    sh(
        ns,
        "ip rule add from 198.51.100.0/24 lookup 123 pref 100",
        "ip -6 rule add from 2001:db8:5::/48 iif lo lookup 123 pref 101",
        "ip route add unreachable 198.51.100.0/24 table 123",
        "ip -6 route add local 2001:db8:5::/48 dev lo table 123",
    )
    if backend == "nft":
        sh(ns, "nft add table inet other")
        ns.run(["nft", "add chain inet other pre { type filter hook prerouting priority -150 ; }"])
        sh(ns, "nft add rule inet other pre meta mark 0x7b ct mark set meta mark")
    else:
        sh(
            ns,
            "iptables-legacy -t mangle -A PREROUTING -m mark --mark 0x7b/0xff"
            " -j CONNMARK --save-mark",
            "ip6tables-legacy -t mangle -A OUTPUT -m connmark --mark 0x7b"
            " -j CONNMARK --restore-mark --nfmask 0xff",
        )


def assert_host_tools_see(ns: Netns, mark: int, backend: str) -> None:
    hexmark = f"{mark:#x}"
    for fam, src in (("-4", "127.0.0.0/8"), ("-6", "::1")):
        rules = ns.run(["ip", fam, "rule"]).stdout
        assert f"100:\tfrom all fwmark {hexmark} lookup {mark}\n" in rules
        assert f"101:\tfrom {src} iif lo lookup {mark}\n" in rules
    routes4 = ns.run(["ip", "route", "show", "table", str(mark)]).stdout.splitlines()
    assert "local default dev lo scope host " in routes4
    routes6 = ns.run(["ip", "-6", "route", "show", "table", str(mark)]).stdout.splitlines()
    assert "local default dev lo metric 1024 pref medium" in routes6
    if backend == "nft":
        ruleset = ns.run(["nft", "list", "table", "inet", "pymmproxy"]).stdout
        for proto in ("ipv4", "ipv6"):
            assert f"meta nfproto {proto} meta mark 0x{mark:08x} ct mark set meta mark" in ruleset
            assert f"meta nfproto {proto} ct mark 0x{mark:08x} meta mark set ct mark" in ruleset
        # the host's iptables (nft variant) must not complain about legacy tables
        assert "legacy" not in ns.run(["iptables-save"]).stderr
    else:
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            saved = ns.run([tool, "-t", "mangle"]).stdout
            masks = "--nfmask 0xffffffff --ctmask 0xffffffff"
            save = f"-A PREROUTING -m mark --mark {hexmark} -j CONNMARK --save-mark {masks}"
            restore = f"-A OUTPUT -m connmark --mark {hexmark} -j CONNMARK --restore-mark {masks}"
            assert save in saved.splitlines()
            assert restore in saved.splitlines()


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_twice_del_twice_restores_everything(ns: Netns, backend: str) -> None:
    foreign_state(ns, backend)
    before = dump(ns)
    changes = ok(ns, "add", "123", "--backend", backend)
    assert len(changes) == 10
    status = ok(ns, "status", "123", "--backend", backend)
    assert status[0].startswith(f"pathway 123: complete (firewall backend {backend}, requested)")
    assert_host_tools_see(ns, 123, backend)
    after_add = dump(ns)

    assert ok(ns, "add", "123", "--backend", backend) == ["pathway 123: already in place"]
    assert dump(ns) == after_add

    assert len(ok(ns, "del", "123", "--backend", backend)) == 10
    assert dump(ns) == before
    assert ok(ns, "del", "123", "--backend", backend) == ["pathway 123: already absent"]
    assert dump(ns) == before
    assert cli(ns, "status", "123", "--backend", backend).returncode == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_state_as_the_documented_commands(ns: Netns, backend: str) -> None:
    ok(ns, "add", "4000000000", "--backend", backend)
    ours = dump(ns)
    with netns("pmq") as ref:
        for command in plan(4_000_000_000).commands():
            tool, _, rest = command.partition(" ")
            if not tool.endswith("tables"):
                sh(ref, command)
            elif backend == "legacy":
                sh(ref, f"{tool}-legacy {rest}")
        theirs = dump(ref)
    keys = ["rules4", "rules6", "routes4", "routes6"]
    if backend == "legacy":
        keys += ["legacy4", "legacy6"]
    assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_marks_coexist(ns: Netns, backend: str) -> None:
    ok(ns, "add", "124", "--backend", backend)
    only_124 = dump(ns)
    ok(ns, "add", "123", "--backend", backend)
    assert_host_tools_see(ns, 123, backend)
    assert_host_tools_see(ns, 124, backend)
    ok(ns, "del", "123", "--backend", backend)
    assert dump(ns) == only_124
    assert ok(ns, "status", "124", "--backend", backend)[0].startswith("pathway 124: complete")


def test_all_marks_and_instances_from_config_with_auto_backend(ns: Netns, tmp_path: Path) -> None:
    expected = detect_backend().backend
    (tmp_path / "pathways.conf").write_text("# pathways\n123\n124  # second\n")
    (tmp_path / "instances.tsv").write_text("web 126 0.0.0.0:8443 127.0.0.1 443 ::1\n")
    tmp_path.chmod(0o755)
    before = dump(ns)
    ok(ns, "add-all", "--config-dir", str(tmp_path))
    status = ok(ns, "status", "--config-dir", str(tmp_path))
    assert status[0].startswith(f"pathway 123: complete (firewall backend {expected}, auto: ")
    assert sum(line.startswith("pathway 124: complete") for line in status) == 1
    ok(ns, "add", "web", "--config-dir", str(tmp_path))
    assert_host_tools_see(ns, 123, expected)
    assert_host_tools_see(ns, 126, expected)
    ok(ns, "del", "web", "--config-dir", str(tmp_path))
    ok(ns, "del-all", "--config-dir", str(tmp_path))
    assert dump(ns) == before


@pytest.mark.parametrize("mark", ["255"])
def test_bad_mark_is_a_one_line_usage_error(ns: Netns, mark: str) -> None:
    res = cli(ns, "add", mark)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith("pymmproxy: ")


@pytest.mark.parametrize(
    ("command", "backend"),
    # add fails at the first rtnetlink change, del/status when the firewall backend opens
    [("add", "nft"), ("del", "nft"), ("status", "nft"), ("del", "legacy"), ("status", "legacy")],
)
def test_unprivileged_gets_a_clear_error(ns: Netns, command: str, backend: str) -> None:
    before = dump(ns)
    res = cli(ns, command, "123", "--backend", backend, prefix=tuple(NOBODY))
    assert res.returncode == 1
    assert res.stderr == (
        f"pymmproxy: pathway {command} 123: permission denied (need root or CAP_NET_ADMIN)\n"
    )
    assert dump(ns) == before
