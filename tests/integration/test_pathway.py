"""``pymmproxy pathway`` against a real kernel, each test in a fresh network namespace.

What pymmproxy reads back itself (``status``: pyroute2, libnftables JSON, python-iptables)
is cross-checked with the host's own tools (``ip``, ``nft``, ``iptables-legacy-save``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pymmproxy.pathway.firewall.detect import find_binary
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
        # negated matches decode to ['!', '0x7b']: not ours, and no traceback either
        ns.run(["iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-m", "mark", "!",
                "--mark", "0x7b", "-j", "CONNMARK", "--save-mark"])  # fmt: skip
        ns.run(["ip6tables-legacy", "-t", "mangle", "-A", "OUTPUT", "-m", "connmark", "!",
                "--mark", "0x7b", "-j", "CONNMARK", "--restore-mark"])  # fmt: skip


def assert_host_tools_see(ns: Netns, mark: int, backend: str) -> None:
    hexmark = f"{mark:#x}"
    for fam, src in (("-4", "127.0.0.0/8"), ("-6", "::1")):
        rules = ns.run(["ip", fam, "rule"]).stdout
        assert f"100:\tfrom all fwmark {hexmark} lookup {mark} proto 112\n" in rules
        assert f"101:\tfrom {src} iif lo lookup {mark} proto 112\n" in rules
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


def detected(ns: Netns) -> str:
    """The backend ``auto`` picks inside ``ns`` (detection reads the namespace's tables)."""
    code = "from pymmproxy.pathway.firewall.detect import detect_backend as d; print(d().backend)"
    return ns.run([PY, "-c", code], cwd="/").stdout.strip()


def test_all_marks_and_instances_from_config_with_auto_backend(ns: Netns, tmp_path: Path) -> None:
    expected = detected(ns)
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
        f"pymmproxy: pathway {command} 123: permission denied (need root, or CAP_NET_ADMIN; "
        "the legacy backend CAP_NET_RAW too)\n"
    )
    assert dump(ns) == before


# -- IPv6 switched off inside the namespace -------------------------------------------------

IPV6_OFF_NOTE = "IPv6 off on this host (net.ipv6.conf.lo.disable_ipv6=1): IPv6 parts skipped"


def switch_ipv6_off(ns: Netns) -> None:
    """``disable_ipv6=1`` for all devices and lo, in this namespace only."""
    sh(ns, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.lo.disable_ipv6=1")
    assert ns.run(["cat", "/proc/sys/net/ipv6/conf/lo/disable_ipv6"]).stdout == "1\n"


def doctor_json(ns: Netns, backend: str) -> tuple[int, dict[str, Any]]:
    argv = [PY, "-m", "pymmproxy", "doctor", "--json", "--mark", "123", "--backend", backend]
    res = ns.run(argv, check=False, cwd="/")
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, json.loads(res.stdout)


def legacy_v4_mangle_only(ns: Netns, backend: str) -> None:
    """For legacy: the v4 mangle table exists before (the kernel keeps it once made)."""
    if backend == "legacy":
        ns.run(["iptables-legacy", "-t", "mangle", "-S"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_off_adds_reads_and_deletes_the_ipv4_parts(ns: Netns, backend: str) -> None:
    switch_ipv6_off(ns)
    legacy_v4_mangle_only(ns, backend)
    before = dump(ns)
    warning = f"pymmproxy: warning: {IPV6_OFF_NOTE}\n"

    first = cli(ns, "add", "123", "--backend", backend)
    assert (first.returncode, first.stderr) == (0, warning)
    added = first.stdout.splitlines()
    assert len(added) == 5
    assert not [c for c in added if "ip -6" in c or "ip6tables" in c or "ipv6" in c]
    again = cli(ns, "add", "123", "--backend", backend)
    assert (again.returncode, again.stderr, again.stdout) == (
        0, warning, "pathway 123: already in place\n",
    )  # fmt: skip

    assert "100:\tfrom all fwmark 0x7b lookup 123 proto 112\n" in ns.run(["ip", "rule"]).stdout
    assert "lookup 123" not in ns.run(["ip", "-6", "rule"]).stdout
    assert (
        ns.run(["ip", "route", "show", "table", "123"]).stdout
        == "local default dev lo scope host \n"
    )
    if backend == "nft":
        ruleset = ns.run(["nft", "list", "table", "inet", "pymmproxy"]).stdout
        assert ruleset.count("meta nfproto ipv4") == 2
        assert "ipv6" not in ruleset
    else:
        assert "--save-mark" in ns.run(["iptables-legacy-save", "-t", "mangle"]).stdout
        assert "mangle" not in ns.run(["cat", "/proc/net/ip6_tables_names"]).stdout

    for _ in range(2):
        status = ok(ns, "status", "123", "--backend", backend)
        assert status[0].startswith(f"pathway 123: complete (firewall backend {backend}")
        assert "  route local          present  -" in status
        assert status[-1] == f"  {IPV6_OFF_NOTE}"
        code, doc = doctor_json(ns, backend)
        assert code == 0, doc
        rows = {c["key"]: c for c in doc["checks"]}
        assert rows["ipv6"]["level"] == "OK"
        assert rows["ipv6"]["detail"] == (
            "off on this host (net.ipv6.conf.lo.disable_ipv6=1): IPv6 parts skipped"
        )
        for key in ("rules", "routes", "connmark"):
            assert (rows[key]["level"], rows[key]["detail"]) == ("OK", "present (IPv4)")
        assert rows["loopback"]["detail"] == "from 127.0.0.0/8 iif lo rule present"

    removed = ok(ns, "del", "123", "--backend", backend)
    assert len(removed) == 5
    assert dump(ns) == before
    assert ok(ns, "del", "123", "--backend", backend) == ["pathway 123: already absent"]
    assert dump(ns) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_del_removes_ipv6_leftovers_after_ipv6_went_off(ns: Netns, backend: str) -> None:
    if backend == "legacy":
        sh(ns, "iptables-legacy -t mangle -S", "ip6tables-legacy -t mangle -S")
    before = dump(ns)
    ok(ns, "add", "123", "--backend", backend)
    switch_ipv6_off(ns)  # the kernel drops the IPv6 route of lo; rules and mangle entries stay
    assert "lookup 123" in ns.run(["ip", "-6", "rule"]).stdout
    removed = ok(ns, "del", "123", "--backend", backend)
    assert "ip -6 rule del fwmark 123 lookup 123 pref 100" in removed
    assert not [c for c in removed if c.startswith("ip -6 route")]  # already gone
    assert len(removed) == 9
    after = dump(ns)
    kept = ("rules4", "rules6", "nft", "legacy4", "legacy6")  # routes: lo lost its IPv6 ones
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}
    assert "table 123" not in after["routes4"] + after["routes6"]


def test_kernel_refusal_names_the_entry_and_is_no_permission_error(ns: Netns) -> None:
    switch_ipv6_off(ns)
    code = (
        "from pymmproxy.pathway.routing import Routing\n"
        "from pymmproxy.pathway.plan import plan\n"
        "with Routing() as r:\n"
        "    try:\n"
        "        r.add_route(plan(123).routes[1])\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e)\n"
    )
    out = ns.run([PY, "-c", code], cwd="/").stdout
    assert out == (
        "PathwayError ip -6 route add local ::/0 dev lo table 123: IPv6 is disabled on nexthop"
        " device (EACCES); IPv6 is off on lo (net.ipv6.conf.lo.disable_ipv6=1?)\n"
    )


# -- failures: all or nothing per mark, every mark tried ----------------------------------------


def test_failed_add_rolls_back_what_it_made_and_tries_every_mark(ns: Netns, tmp_path: Path) -> None:
    # a foreign chain where ours must go: the nft batch fails after the rules are in
    sh(ns, "nft add table inet pymmproxy")
    ns.run(["nft", "add chain inet pymmproxy output { type filter hook input priority 0 ; }"])
    sh(ns, "ip rule add fwmark 123 lookup 123 pref 100")  # there before: must stay
    before = dump(ns)
    res = cli(ns, "add", "123", "--backend", "nft")
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith("pymmproxy: pathway add 123: nftables: ")
    assert res.stderr.endswith("; rolled back the 5 changes made before\n")
    assert dump(ns) == before

    (tmp_path / "pathways.conf").write_text("123\n124\n")
    tmp_path.chmod(0o755)
    res = cli(ns, "add-all", "--config-dir", str(tmp_path), "--backend", "nft")
    assert res.returncode == 1
    failed = res.stderr.splitlines()
    assert [line.split(":")[1] for line in failed] == [" pathway add 123", " pathway add 124"]
    assert dump(ns) == before


# -- auto detection reads this namespace's tables -------------------------------------------------


def detection(ns: Netns) -> tuple[str, str]:
    code = "from pymmproxy.pathway.firewall.detect import detect_backend as d; r = d()\n"
    code += "print(r.backend); print(r.reason)"
    backend, reason = ns.run([PY, "-c", code], cwd="/").stdout.splitlines()
    return backend, reason


def test_auto_detection_follows_the_kernel_state(ns: Netns) -> None:
    installed = find_binary()
    assert installed is not None
    backend, reason = detection(ns)
    assert reason.startswith("kernel: no legacy tables, no iptables-nft tables; ")
    assert backend == installed.variant
    sh(ns, "iptables-legacy -t filter -A INPUT -j ACCEPT")
    assert detection(ns) == (
        "legacy", "kernel: legacy tables with rules [filter (IPv4)], no iptables-nft tables"
    )  # fmt: skip
    status = cli(ns, "status", "123")
    assert (
        "(firewall backend legacy, auto: kernel: legacy tables with rules [filter (IPv4)]"
        in status.stdout
    )
    sh(ns, "nft add table ip nat")  # as iptables-nft would: both kinds, the binary decides
    backend, reason = detection(ns)
    assert reason.startswith(
        "kernel: legacy tables with rules [filter (IPv4)], iptables-nft tables [ip nat]; "
    )
    assert backend == installed.variant
    with netns("pmn") as other:
        sh(other, "nft add table ip6 filter")
        assert detection(other) == (
            "nft", "kernel: iptables-nft tables [ip6 filter], no legacy tables"
        )  # fmt: skip


def test_auto_stays_with_our_nft_table_after_a_legacy_read(ns: Netns) -> None:
    """A stock nft host: one ``iptables-legacy -L`` leaves an empty legacy filter table."""
    require_root_and_tools("iptables-legacy")
    before = dump(ns)
    ok(ns, "add", "123", "--backend", "nft")
    ns.run(["iptables-legacy", "-L"])
    assert "filter" in ns.run(["cat", "/proc/net/ip_tables_names"]).stdout
    assert detection(ns) == ("nft", "kernel: our table inet pymmproxy exists")
    status = ok(ns, "status", "123")
    assert status[0] == (
        "pathway 123: complete (firewall backend nft, auto: kernel: our table inet pymmproxy "
        "exists)"
    )
    _, doc = doctor_json(ns, "auto")
    assert "other-backend" not in {c["key"] for c in doc["checks"]}
    assert len(ok(ns, "del", "123")) == 10
    assert ns.run(["nft", "list", "table", "inet", "pymmproxy"], check=False).returncode != 0
    after = dump(ns)
    assert {k: after[k] for k in ("rules4", "rules6", "routes4", "routes6", "nft")} == {
        k: before[k] for k in ("rules4", "rules6", "routes4", "routes6", "nft")
    }
    # nothing of ours left anywhere, only the empty legacy table: the binary decides again
    assert detection(ns)[1].startswith("kernel: empty legacy tables [filter (IPv4)], ")


def test_auto_follows_our_legacy_rules_and_doctor_warns_about_the_other(ns: Netns) -> None:
    ok(ns, "add", "123", "--backend", "legacy")
    assert detection(ns) == ("legacy", "kernel: our CONNMARK rules are in the legacy mangle table")
    code, doc = doctor_json(ns, "nft")  # asked for nft: our legacy rules are elsewhere
    rows = {c["key"]: c for c in doc["checks"]}
    assert rows["other-backend"]["level"] == "WARN"
    assert code == 1  # the nft CONNMARK rules are missing: that part fails, the warning not
    assert ok(ns, "status", "123")[0].startswith("pathway 123: complete (firewall backend legacy")
    hint = "pymmproxy pathway del 123 --backend legacy && pymmproxy pathway add 123 --backend nft"
    assert hint in rows["other-backend"]["fix"]
    # following the hint leaves a complete pathway (in nft), not one without rules and routes
    for command in hint.split(" && "):
        ok(ns, *command.split()[2:])
    assert ok(ns, "status", "123")[0].startswith("pathway 123: complete (firewall backend nft")
    assert "--save-mark" not in ns.run(["iptables-legacy-save", "-t", "mangle"]).stdout
    code, doc = doctor_json(ns, "nft")
    assert code == 0, doc
    assert "other-backend" not in {c["key"] for c in doc["checks"]}
    assert len(ok(ns, "del", "123")) == 10


# -- foreign rules and routes the kernel's loose delete would match -----------------------------

FOREIGN_RULE = "100:\tfrom all fwmark 0x7b iif foo [detached] lookup 123\n"
FOREIGN_ROUTE = "local default dev lo metric 10 pref medium"


def foreign_lookalikes(ns: Netns) -> None:
    sh(
        ns,
        "ip rule add fwmark 123 iif foo lookup 123 pref 100",
        "ip -6 route add local ::/0 dev lo table 123 metric 10",
    )


def assert_only_foreign_left(ns: Netns) -> None:
    rules = ns.run(["ip", "rule"]).stdout
    assert FOREIGN_RULE in rules
    assert "proto 112" not in rules + ns.run(["ip", "-6", "rule"]).stdout
    assert ns.run(["ip", "-6", "route", "show", "table", "123"]).stdout.splitlines() == [
        FOREIGN_ROUTE
    ]
    assert ns.run(["ip", "route", "show", "table", "123"]).stdout == ""


def test_rollback_keeps_foreign_lookalikes_and_removes_ours(ns: Netns) -> None:
    foreign_lookalikes(ns)
    # a foreign chain where ours must go: the nft batch fails after the rules are in
    sh(ns, "nft add table inet pymmproxy")
    ns.run(["nft", "add chain inet pymmproxy output { type filter hook input priority 0 ; }"])
    res = cli(ns, "add", "123", "--backend", "nft")
    assert res.returncode == 1
    assert res.stderr.endswith("; rolled back the 6 changes made before\n"), res.stderr
    assert_only_foreign_left(ns)


def test_del_keeps_foreign_lookalikes_before_and_after_ours(ns: Netns) -> None:
    foreign_lookalikes(ns)  # listed before ours
    ok(ns, "add", "123", "--backend", "nft")
    assert ok(ns, "status", "123", "--backend", "nft")[0].startswith("pathway 123: complete")
    assert len(ok(ns, "del", "123", "--backend", "nft")) == 10
    assert_only_foreign_left(ns)
    assert ok(ns, "del", "123", "--backend", "nft") == ["pathway 123: already absent"]
    assert_only_foreign_left(ns)
    # ours first, the look-alikes added after
    sh(ns, "ip rule del fwmark 123 iif foo lookup 123 pref 100",
       "ip -6 route del local ::/0 dev lo table 123 metric 10")  # fmt: skip
    ok(ns, "add", "123", "--backend", "nft")
    foreign_lookalikes(ns)
    assert len(ok(ns, "del", "123", "--backend", "nft")) == 10
    assert_only_foreign_left(ns)


def test_rules_of_earlier_versions_are_ours(ns: Netns) -> None:
    """No protocol on the rules (as pymmproxy added them before): still found and deleted,
    unless the kernel would take a foreign look-alike listed first (then: refused)."""
    ok(ns, "add", "123", "--backend", "nft")
    for fam in ("-4", "-6"):
        src = "127.0.0.0/8" if fam == "-4" else "::1/128"
        for old in ("fwmark 123 lookup 123 pref 100", f"from {src} iif lo lookup 123 pref 101"):
            ns.run(["ip", fam, "rule", "del", *old.split(), "protocol", "112"])
            ns.run(["ip", fam, "rule", "add", *old.split()])
    assert "proto 112" not in ns.run(["ip", "rule"]).stdout
    assert ok(ns, "add", "123", "--backend", "nft") == ["pathway 123: already in place"]
    sh(ns, "ip rule add fwmark 123 iif foo lookup 123 pref 100")  # listed after ours: fine
    assert len(ok(ns, "del", "123", "--backend", "nft")) == 10
    assert FOREIGN_RULE in ns.run(["ip", "rule"]).stdout
    sh(ns, "ip rule add fwmark 123 lookup 123 pref 100")  # an old rule after the foreign one
    res = cli(ns, "del", "123", "--backend", "nft")
    assert res.returncode == 1
    assert "refused, the kernel would delete a foreign rule" in res.stderr
    assert FOREIGN_RULE in ns.run(["ip", "rule"]).stdout


# -- look-alikes the whitelist, the kernel-order walk and the pre-checks must respect ----------


def test_realms_and_protocol_static_lookalikes_are_foreign(ns: Netns) -> None:
    """A rule with realms (FRA_FLOW) or systemd-networkd's ``protocol static`` is not ours:
    status does not count it, del leaves it."""
    realms = "100:\tfrom all fwmark 0x7b lookup 123 realms 5\n"
    static = "101:\tfrom 127.0.0.0/8 iif lo lookup 123 proto static\n"
    sh(ns, "ip rule add fwmark 123 lookup 123 pref 100 realms 5",
       "ip rule add from 127.0.0.0/8 iif lo lookup 123 pref 101 protocol static")  # fmt: skip
    status = cli(ns, "status", "123", "--backend", "nft").stdout
    assert "  rule fwmark          MISSING  MISSING" in status.splitlines(), status
    assert "  rule loopback reply  MISSING  MISSING" in status.splitlines(), status
    assert ok(ns, "del", "123", "--backend", "nft") == ["pathway 123: already absent"]
    assert (
        ok(ns, "add", "123", "--backend", "nft")[0]
        == "ip route add local 0.0.0.0/0 dev lo table 123"
    )
    rules = ns.run(["ip", "rule"]).stdout
    assert realms in rules
    assert static in rules
    assert "100:\tfrom all fwmark 0x7b lookup 123 proto 112\n" in rules
    assert len(ok(ns, "del", "123", "--backend", "nft")) == 10
    assert ns.run(["ip", "rule"]).stdout.count("lookup 123") == 2
    assert realms in ns.run(["ip", "rule"]).stdout
    assert static in ns.run(["ip", "rule"]).stdout


SRC_ROUTE = "local default dev lo scope host src 127.0.0.1 "


def refused(ns: Netns, *args: str) -> str:
    """Run a pathway command that must fail and change nothing; its stderr."""
    before = dump(ns)
    res = cli(ns, *args)
    assert res.returncode == 1, res.stdout
    assert res.stdout == ""
    assert dump(ns) == before  # nothing at all changed
    return res.stderr


def test_del_refuses_to_take_a_route_with_a_preferred_source_first(ns: Netns) -> None:
    """``ip route del`` of ours would take the ``src`` route listed before it: refused, and
    the refusal comes before any change, firewall entries included."""
    ok(ns, "add", "123", "--backend", "nft")
    sh(ns, "ip route prepend local 0.0.0.0/0 dev lo table 123 src 127.0.0.1")
    assert ok(ns, "status", "123", "--backend", "nft")[0].startswith("pathway 123: complete")
    assert refused(ns, "del", "123", "--backend", "nft") == (
        "pymmproxy: pathway del 123: ip route del local 0.0.0.0/0 dev lo table 123: refused, the"
        " kernel would delete a foreign route listed before ours (local 0.0.0.0/0 dev lo table"
        " 123 proto 3 src 127.0.0.1); delete that one first; nothing was deleted\n"
    )
    sh(ns, "ip route del local 0.0.0.0/0 dev lo table 123 src 127.0.0.1")
    ok(ns, "add", "123", "--backend", "nft")
    sh(ns, "ip route append local 0.0.0.0/0 dev lo table 123 src 127.0.0.1")  # after ours
    assert len(ok(ns, "del", "123", "--backend", "nft")) == 10
    assert ns.run(["ip", "route", "show", "table", "123"]).stdout.splitlines() == [SRC_ROUTE]


def test_a_refused_rule_del_changes_nothing(ns: Netns) -> None:
    """An old rule of ours (protocol 0) behind a foreign one the kernel would take first."""
    ok(ns, "add", "123", "--backend", "nft")
    sh(ns, "ip -6 rule del fwmark 123 lookup 123 pref 100 protocol 112",
       "ip -6 rule add fwmark 123 iif foo lookup 123 pref 100",
       "ip -6 rule add fwmark 123 lookup 123 pref 100")  # fmt: skip
    stderr = refused(ns, "del", "123", "--backend", "nft")
    assert stderr.count("\n") == 1
    assert "ip -6 rule del fwmark 123 lookup 123 pref 100: refused" in stderr
    assert stderr.endswith("; nothing was deleted\n")


def test_add_over_a_blackhole_route_is_a_one_line_error(ns: Netns) -> None:
    sh(ns, "ip route add blackhole 0.0.0.0/0 table 123")
    assert refused(ns, "add", "123", "--backend", "nft") == (
        "pymmproxy: pathway add 123: ip route add local 0.0.0.0/0 dev lo table 123: refused,"
        " table 123 already holds another route for 0.0.0.0/0 (blackhole 0.0.0.0/0 table 123"
        " proto 3); delete it or use another mark\n"
    )
    assert "  route local          MISSING  MISSING" in cli(ns, "status", "123").stdout


def test_legacy_rule_count_needs_only_cap_net_admin(ns: Netns) -> None:
    """IPT_SO_GET_INFO on a UDP socket: no CAP_NET_RAW needed."""
    sh(
        ns,
        "iptables-legacy -t filter -A INPUT -j ACCEPT",
        "ip6tables-legacy -t mangle -A OUTPUT -j ACCEPT",
    )
    code = (
        "from pymmproxy.pathway.firewall.detect import _legacy_rule_count as c\n"
        "print(c('filter', 'IPv4'), c('mangle', 'IPv6'))"
    )
    caps = ["--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin"]
    res = ns.run([*NOBODY[:-1], *caps, *nobody_python(), "-c", code], cwd="/", check=False)
    assert (res.returncode, res.stdout, res.stderr) == (0, "1 1\n", "")


def test_a_protocol_112_lookalike_with_a_source_makes_add_refuse(ns: Netns) -> None:
    """The kernel's duplicate check skips selectors we leave unset (here ``from``): its
    EEXIST is not "ours is there" unless ours really is."""
    sh(ns, "ip rule add fwmark 123 lookup 123 pref 100 protocol 112 from 10.0.0.0/8")
    res = cli(ns, "add", "123", "--backend", "nft")
    assert res.returncode == 1, res.stdout
    assert res.stderr.count("\n") == 1
    assert (
        "ip rule add fwmark 123 lookup 123 pref 100 protocol 112: refused, the kernel holds a"
        " look-alike rule at pref 100 that is not ours" in res.stderr
    )
    assert "from 10.0.0.0/8 fwmark 0x7b lookup 123 proto 112" in ns.run(["ip", "rule"]).stdout


def test_a_loopback_lookalike_with_fwmark_0_and_an_mtu_route_are_foreign(ns: Netns) -> None:
    """``fwmark 0/0xffffffff`` matches only unmarked packets, a route with ``mtu`` carries
    metrics we never set: neither is ours, and del leaves both."""
    sh(ns, "ip rule add from 127.0.0.0/8 iif lo fwmark 0/0xffffffff lookup 123 pref 101")
    assert ok(ns, "add", "123", "--backend", "nft")
    lookalike = "101:\tfrom 127.0.0.0/8 fwmark 0 iif lo lookup 123"
    assert lookalike in ns.run(["ip", "rule"]).stdout
    assert ok(ns, "status", "123", "--backend", "nft")[0].startswith("pathway 123: complete")
    sh(ns, "ip route prepend local 0.0.0.0/0 dev lo table 123 mtu 1400")
    res = cli(ns, "del", "123", "--backend", "nft")
    assert res.returncode == 1  # the kernel would take the mtu route first: refused
    assert "foreign route listed before ours" in res.stderr
    sh(ns, "ip route del local 0.0.0.0/0 dev lo table 123 mtu 1400")
    assert len(ok(ns, "del", "123", "--backend", "nft")) == 10
    assert lookalike in ns.run(["ip", "rule"]).stdout  # the foreign rule stays


def test_a_refusal_names_the_foreign_rules_extra_selectors(ns: Netns) -> None:
    """A look-alike with ``ipproto``/``oif`` listed before an old rule of ours: the refusal
    says what sets it apart, so the operator knows which rule to delete."""
    sh(ns, "ip rule add fwmark 123 lookup 123 pref 100 protocol 112 ipproto tcp oif lo",
       "ip rule add fwmark 123 lookup 123 pref 100")  # fmt: skip
    res = cli(ns, "del", "123", "--backend", "nft")
    assert res.returncode == 1
    assert "(pref 100, iif any, proto 112, also oifname, ip_proto)" in res.stderr, res.stderr
