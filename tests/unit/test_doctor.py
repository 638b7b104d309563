"""``pymmproxy doctor``: verdicts from fake probe results, the report formats, the CLI errors."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from pymmproxy.conffiles import Instance
from pymmproxy.doctor import checks, probes
from pymmproxy.doctor.checks import Check, Level, evaluate, exit_code
from pymmproxy.doctor.cli import format_json, format_table, main, summary
from pymmproxy.doctor.facts import (
    BackendFacts,
    Facts,
    InstanceFacts,
    MarkFacts,
    Outcome,
    Privileges,
    TargetFacts,
)
from pymmproxy.pathway import ItemStatus, PathwayStatus, plan
from pymmproxy.pathway.firewall.detect import read_legacy_tables
from pymmproxy.pathway.ipv6 import LO_DISABLED, Ipv6State
from pymmproxy.settings import Endpoint, Transport

NET_ADMIN = 1 << 12
ROOT = Privileges(0, 0x1FFFFFFFFFF)
NFT = BackendFacts("nft", "auto: test")


def status(mark: int = 123, missing: tuple[tuple[str, int], ...] = (), fwa: int | None = 0):
    """A PathwayStatus with the ``(item, family)`` pairs of ``missing`` absent."""
    p = plan(mark)
    items = tuple(
        ItemStatus(s.item, s.family, (s.item, s.family.value) not in missing, f"cmd {s.item}")
        for s in (*p.rules, *p.routes, *p.firewall)
    )
    return PathwayStatus(mark, "nft", "auto: test", fwa, items)


def by_key(found: list[Check]) -> dict[str, Check]:
    return {c.key: c for c in found}


def instance(transport: Transport = Transport.TCP, **kw: object) -> Instance:
    fields: dict[str, object] = {
        "name": "vps01-ssh",
        "mark": 123,
        "listen": Endpoint("198.51.100.2", 8443),
        "target4": Endpoint("127.0.0.1", 22),
        "target6": None,
        "transport": transport,
        "line": 3,
    }
    fields.update(kw)
    return Instance(**fields)  # type: ignore[arg-type]


def facts_of(inst: Instance | None = None, **kw: object) -> InstanceFacts:
    inst = inst or instance()
    fields: dict[str, object] = {
        "inst": inst,
        "where": "/etc/pymmproxy/instances.tsv:3",
        "bind": Outcome(),
        "holder_pid": None,
        "targets": (TargetFacts("target_ipv4", Endpoint("127.0.0.1", 22), Outcome()),),
        "allow_path": Path("/etc/pymmproxy/allow.txt"),
        "allow_count": 2,
    }
    fields.update(kw)
    return InstanceFacts(**fields)  # type: ignore[arg-type]


# -- privileges ---------------------------------------------------------------------------------


def test_root_and_net_admin_pass() -> None:
    assert checks.check_privileges(ROOT) == Check("privileges", "", "privileges", Level.OK, "root")
    ok = checks.check_privileges(Privileges(998, NET_ADMIN))
    assert (ok.level, ok.detail) == (Level.OK, "uid 998 with CAP_NET_ADMIN")


@pytest.mark.parametrize(("euid", "caps"), [(65534, 0), (1000, 1 << 10), (0, 0)])
def test_missing_net_admin_fails_with_a_fix(euid: int, caps: int) -> None:
    c = checks.check_privileges(Privileges(euid, caps))
    assert c.level is Level.FAIL
    assert "without CAP_NET_ADMIN" in c.detail
    assert "sudo pymmproxy doctor" in c.fix
    assert "pymmproxy@.service" in c.fix


def test_unreadable_capabilities_warn() -> None:
    assert checks.check_privileges(Privileges(0, None)).level is Level.WARN


# -- backend ------------------------------------------------------------------------------------


def test_backend_says_where_rules_live() -> None:
    nft = checks.check_backend(NFT)
    assert [c.level for c in nft] == [Level.OK, Level.OK]
    assert "table inet pymmproxy" in nft[0].detail
    legacy = checks.check_backend(BackendFacts("legacy", "requested", ("mangle (IPv4)",)))
    assert len(legacy) == 1  # legacy tables are the point there, not a warning
    assert "iptables-legacy-save -t mangle" in legacy[0].detail


def test_legacy_tables_on_nft_host_warn() -> None:
    found = checks.check_backend(BackendFacts("nft", "auto", ("mangle (IPv4)", "filter (IPv6)")))
    legacy = by_key(found)["legacy-tables"]
    assert legacy.level is Level.WARN
    assert "iptables-legacy tables present: mangle (IPv4), filter (IPv6)" in legacy.detail
    assert "iptables-legacy-save" in legacy.fix
    unreadable = checks.check_backend(BackendFacts("nft", "auto", None))
    assert by_key(unreadable)["legacy-tables"].level is Level.WARN


def test_our_entries_in_the_backend_not_chosen_warn() -> None:
    nft = checks.check_backend(BackendFacts("nft", "auto", ("mangle (IPv4)",), legacy_entries=True))
    other = by_key(nft)["other-backend"]
    assert other.level is Level.WARN
    assert "legacy mangle" in other.detail
    assert other.fix.endswith(
        "pymmproxy pathway del MARK --backend legacy && pymmproxy pathway add MARK "
        "--backend nft (del also removes the mark's rules and routes, add puts them back)"
    )
    legacy = checks.check_backend(BackendFacts("legacy", "requested", (), nft_table=True))
    assert by_key(legacy)["other-backend"].level is Level.WARN
    assert "table inet pymmproxy exists" in by_key(legacy)["other-backend"].detail
    assert checks.exit_code(nft + legacy) == 0  # a warning, not a failure
    both = BackendFacts("nft", "auto", (), nft_table=True)
    assert "other-backend" not in by_key(checks.check_backend(both))  # in the chosen one
    assert "other-backend" not in by_key(checks.check_backend(BackendFacts("legacy", "x")))


def test_other_backend_hint_names_the_marks_and_keeps_the_pathway() -> None:
    """Following the hint must not leave the pathway without its rules and routes."""
    facts = BackendFacts("nft", "auto", ("mangle (IPv4)",), legacy_entries=True, other_marks=(7, 9))
    found = by_key(checks.check_backend(facts))
    assert found["other-backend"].fix == (
        "inspect: iptables-legacy-save -t mangle; remove them, keeping the pathway: "
        "pymmproxy pathway del 7 --backend legacy && pymmproxy pathway add 7 --backend nft; "
        "pymmproxy pathway del 9 --backend legacy && pymmproxy pathway add 9 --backend nft "
        "(del also removes the mark's rules and routes, add puts them back)"
    )
    assert "del 7 --backend legacy && pymmproxy pathway add 7 --backend nft" in (
        found["legacy-tables"].fix
    )
    legacy = BackendFacts("legacy", "requested", (), nft_table=True, other_marks=(5,))
    fix = by_key(checks.check_backend(legacy))["other-backend"].fix
    assert (
        "pymmproxy pathway del 5 --backend nft && pymmproxy pathway add 5 --backend legacy" in fix
    )


# -- pathway ------------------------------------------------------------------------------------


def test_complete_pathway_passes() -> None:
    found = checks.check_pathway(MarkFacts(123, status()))
    assert [c.key for c in found] == ["rules", "routes", "connmark", "loopback"]
    assert {c.level for c in found} == {Level.OK}
    assert {c.subject for c in found} == {"123"}


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("rule fwmark", "rules"),
        ("route local", "routes"),
        ("mangle save-mark", "connmark"),
        ("mangle restore-mark", "connmark"),
        ("rule loopback reply", "loopback"),
    ],
)
@pytest.mark.parametrize("family", [4, 6])
def test_one_missing_item_fails_only_its_check(item: str, key: str, family: int) -> None:
    found = by_key(checks.check_pathway(MarkFacts(123, status(missing=((item, family),)))))
    failed = {k for k, c in found.items() if c.level is Level.FAIL}
    assert failed == {key}
    assert found[key].fix == "pymmproxy pathway add 123"
    assert found[key].commands == (f"cmd {item}",)
    if key == "loopback":
        assert ("'from ::1/128" if family == 6 else "'from 127.0.0.0/8") in found[key].detail
    else:
        assert f"(IPv{family})" in found[key].detail


def test_requested_backend_is_part_of_the_fix() -> None:
    st = status(missing=(("route local", 4),))
    st = PathwayStatus(st.mark, "legacy", "requested", 0, st.items)
    routes = by_key(checks.check_pathway(MarkFacts(123, st)))["routes"]
    assert routes.fix == "pymmproxy pathway add 123 --backend legacy"
    assert routes.detail == "missing: route local default dev lo table 123 (IPv4)"


def test_unreadable_pathway_is_one_failure() -> None:
    found = checks.check_pathway(MarkFacts(7, None, "permission denied"))
    assert [(c.key, c.level) for c in found] == [("pathway", Level.FAIL)]
    assert found[0].detail == "cannot read: permission denied"
    assert found[0].fix == "sudo pymmproxy pathway status 7"


LOOPBACK_GONE = (("rule loopback reply", 4), ("rule loopback reply", 6))


def test_missing_loopback_rules_fail_without_tcp_fwmark_accept() -> None:
    c = checks.check_pathway(MarkFacts(123, status(missing=LOOPBACK_GONE, fwa=0)))[-1]
    assert c.level is Level.FAIL
    assert "'from 127.0.0.0/8 iif lo' and 'from ::1/128 iif lo' rules missing" in c.detail
    assert "tcp_fwmark_accept=0" in c.detail


def test_tcp_fwmark_accept_covers_tcp_only() -> None:
    st = status(missing=LOOPBACK_GONE, fwa=1)
    tcp_only = checks.check_pathway(MarkFacts(123, st))[-1]
    assert tcp_only.level is Level.WARN
    assert "covers TCP replies only" in tcp_only.detail
    with_udp = checks.check_pathway(MarkFacts(123, st, udp_instances=("dns",)))[-1]
    assert with_udp.level is Level.FAIL
    assert with_udp.detail.endswith("UDP instances use this mark: dns")
    assert with_udp.fix == "pymmproxy pathway add 123"


def _ipv4_only(missing: tuple[tuple[str, int], ...] = ()) -> PathwayStatus:
    """What ``status`` reports where IPv6 is off: IPv4 items only, and the note."""
    st = status(missing=missing)
    items = tuple(i for i in st.items if i.family.value == 4)
    note = Ipv6State(off=LO_DISABLED).note
    return PathwayStatus(st.mark, st.backend, st.backend_reason, 0, items, note)


def test_ipv6_off_is_one_ok_row_and_pathways_pass_with_ipv4() -> None:
    assert checks.check_ipv6(Ipv6State()) == []
    (row,) = checks.check_ipv6(Ipv6State(off=LO_DISABLED))
    assert (row.key, row.level, row.name) == ("ipv6", Level.OK, "IPv6")
    assert row.detail == f"off on this host ({LO_DISABLED}): IPv6 parts skipped"
    found = checks.check_pathway(MarkFacts(123, _ipv4_only()))
    assert {c.level for c in found} == {Level.OK}
    assert [c.detail for c in found] == [
        "present (IPv4)",
        "present (IPv4)",
        "present (IPv4)",
        "from 127.0.0.0/8 iif lo rule present",
    ]
    loopback = checks.check_pathway(MarkFacts(123, _ipv4_only(LOOPBACK_GONE)))[-1]
    assert loopback.level is Level.FAIL
    assert "'from 127.0.0.0/8 iif lo' rule missing" in loopback.detail
    facts = Facts(ROOT, NFT, (MarkFacts(123, _ipv4_only()),), ipv6=Ipv6State(off=LO_DISABLED))
    report = evaluate(facts)
    assert [c.key for c in report][:4] == ["privileges", "backend", "legacy-tables", "ipv6"]
    assert exit_code(report) == 0


def test_both_families_are_named_when_ipv6_is_on() -> None:
    found = checks.check_pathway(MarkFacts(123, status()))
    assert found[0].detail == "present (IPv4, IPv6)"
    assert found[-1].detail == "from 127.0.0.0/8 and ::1/128 iif lo rules present"


# -- instances ----------------------------------------------------------------------------------


def test_good_instance_passes() -> None:
    found = checks.check_instance(facts_of())
    assert [c.key for c in found] == ["listen", "target4", "allow"]
    assert {c.level for c in found} == {Level.OK}
    assert found[2].detail == "2 networks in /etc/pymmproxy/allow.txt"


def test_listen_in_use() -> None:
    in_use = Outcome(errno.EADDRINUSE, "Address already in use")
    other = checks.check_listen(facts_of(bind=in_use))
    assert other.level is Level.FAIL
    assert "ss -ltnp 'sport = :8443'" in other.fix
    assert other.fix.endswith("/etc/pymmproxy/instances.tsv:3")
    mine = checks.check_listen(facts_of(bind=in_use, holder_pid=4242))
    assert (mine.level, mine.detail) == (
        Level.OK,
        "198.51.100.2:8443 in use by this instance, running as pid 4242",
    )
    udp = checks.check_listen(facts_of(instance(Transport.UDP), bind=in_use))
    assert "ss -lunp" in udp.fix


def test_listen_free_while_the_instance_runs_warns() -> None:
    c = checks.check_listen(facts_of(holder_pid=0))
    assert c.level is Level.WARN
    assert "pid ?" in c.detail


@pytest.mark.parametrize(
    ("code", "detail", "fix"),
    [
        (errno.EADDRNOTAVAIL, "198.51.100.2 is not an address of this host", "ip addr add"),
        (errno.EACCES, "port 8443 needs CAP_NET_BIND_SERVICE", "CAP_NET_BIND_SERVICE"),
        (errno.EINVAL, "cannot bind 198.51.100.2:8443: Invalid argument", "check listen_addr"),
    ],
)
def test_listen_failures(code: int, detail: str, fix: str) -> None:
    c = checks.check_listen(facts_of(bind=Outcome(code, "Invalid argument")))
    assert (c.level, c.detail) == (Level.FAIL, detail)
    assert fix in c.fix


@pytest.mark.parametrize(
    ("outcome", "detail"),
    [
        (Outcome(errno.ECONNREFUSED, "x"), "127.0.0.1:22: connection refused"),
        (Outcome(errno.ETIMEDOUT, "timed out"), "127.0.0.1:22: no answer within 2 s"),
        (Outcome(errno.ENETUNREACH, "Network is unreachable"), "Network is unreachable"),
    ],
)
def test_tcp_target_down(outcome: Outcome, detail: str) -> None:
    f = facts_of(targets=(TargetFacts("target_ipv4", Endpoint("127.0.0.1", 22), outcome),))
    c = checks.check_target(f, f.targets[0])
    assert c.level is Level.FAIL
    assert detail in c.detail
    assert c.fix == (
        "start the service on 127.0.0.1:22, or fix target_ipv4/target_port in "
        "/etc/pymmproxy/instances.tsv:3"
    )


def test_udp_target_is_only_checked_to_be_local() -> None:
    ep = Endpoint("::1", 53)
    ok = facts_of(instance(Transport.UDP), targets=(TargetFacts("target_ipv6", ep, Outcome()),))
    c = checks.check_target(ok, ok.targets[0])
    assert (c.key, c.level) == ("target6", Level.OK)
    assert "cannot be probed" in c.detail
    gone = Outcome(errno.EADDRNOTAVAIL, "Cannot assign requested address")
    bad = facts_of(instance(Transport.UDP), targets=(TargetFacts("target_ipv6", ep, gone),))
    c = checks.check_target(bad, bad.targets[0])
    assert c.level is Level.FAIL
    assert c.detail.startswith("::1 is not a local address")


def test_allow_list_must_load_and_be_non_empty() -> None:
    empty = checks.check_allow(facts_of(allow_count=0))
    assert (empty.level, empty.detail) == (
        Level.FAIL,
        "/etc/pymmproxy/allow.txt is empty: every PROXY header would be refused",
    )
    broken = checks.check_allow(facts_of(allow_count=None, allow_error="allow.txt:2: bad"))
    assert (broken.level, broken.detail) == (Level.FAIL, "allow.txt:2: bad")
    assert "load balancers" in broken.fix
    one = checks.check_allow(facts_of(allow_count=1))
    assert one.detail == "1 network in /etc/pymmproxy/allow.txt"


# -- the whole report ---------------------------------------------------------------------------


def test_evaluate_orders_rows_and_warnings_do_not_fail() -> None:
    facts = Facts(
        ROOT,
        BackendFacts("nft", "auto", ("mangle (IPv4)",)),
        (MarkFacts(123, status()),),
        (facts_of(),),
    )
    found = evaluate(facts)
    assert [c.key for c in found] == [
        "privileges", "backend", "legacy-tables", "rules", "routes", "connmark", "loopback",
        "listen", "target4", "allow",
    ]  # fmt: skip
    assert exit_code(found) == 0
    assert summary(found) == "1 warning, 9 ok"
    broken = evaluate(Facts(Privileges(1, 0), NFT))
    assert exit_code(broken) == 1
    assert summary(broken) == "1 failed, 2 ok"


def test_table_is_aligned_and_shows_fixes_for_non_ok_rows() -> None:
    found = evaluate(Facts(ROOT, NFT, (MarkFacts(123, status(missing=LOOPBACK_GONE)),)))
    text = format_table(found)
    lines = text.splitlines()
    col = lines[0].index("DETAIL")
    rows = [line for line in lines[1:-1] if not line.startswith(" ")]
    assert len(rows) == len(found)
    assert all(line[col - 2 : col] == "  " and line[col] != " " for line in rows)
    fixes = [line for line in lines if line.startswith(" ")]
    assert fixes == [" " * col + "fix: pymmproxy pathway add 123"]
    assert lines[-1] == "1 failed, 6 ok"


def test_json_has_everything_a_machine_needs() -> None:
    found = evaluate(Facts(ROOT, NFT, (MarkFacts(123, status(missing=(("route local", 6),))),)))
    doc = json.loads(format_json(found))
    assert (doc["ok"], doc["exit_code"]) == (False, 1)
    routes = next(c for c in doc["checks"] if c["key"] == "routes")
    assert routes == {
        "key": "routes",
        "subject": "123",
        "name": "pathway 123: local routes",
        "level": "FAIL",
        "detail": "missing: route local default dev lo table 123 (IPv6)",
        "fix": "pymmproxy pathway add 123",
        "commands": ["cmd route local"],
    }


# -- probes that are safe anywhere ----------------------------------------------------------------


def test_privileges_parses_capeff(tmp_path: Path) -> None:
    proc = tmp_path / "status"
    proc.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000003000\n")
    assert probes.privileges(proc).cap_eff == 0x3000
    assert probes.privileges(tmp_path / "missing").cap_eff is None


def test_legacy_tables_lists_names_per_family(tmp_path: Path) -> None:
    v4, v6 = tmp_path / "ip_tables_names", tmp_path / "ip6_tables_names"
    v4.write_text("mangle\nfilter\n")
    v6.write_text("")
    files = ((v4, "IPv4"), (v6, "IPv6"), (tmp_path / "absent", "IPv6"))
    assert read_legacy_tables(files) == ("mangle (IPv4)", "filter (IPv4)")


def test_socket_probes_on_loopback(own_netns: Any) -> None:
    own_netns(_probe_loopback)


def _probe_loopback() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        taken = probes.bind(Endpoint("127.0.0.1", port), Transport.TCP)
        assert taken.code == errno.EADDRINUSE
        assert probes.connect(Endpoint("127.0.0.1", port), 1.0).ok
    assert probes.connect(Endpoint("127.0.0.1", port), 1.0).code == errno.ECONNREFUSED
    assert probes.bind(Endpoint("127.0.0.1", port), Transport.UDP).ok
    assert probes.local_address("127.0.0.1").ok
    assert probes.local_address("192.0.2.1").code == errno.EADDRNOTAVAIL


# -- command line -------------------------------------------------------------------------------


def config(tmp_path: Path, *lines: str) -> Path:
    (tmp_path / "pathways.conf").write_text("123\n")
    (tmp_path / "instances.tsv").write_text("".join(f"{line}\n" for line in lines))
    return tmp_path


GOOD = "vps01-ssh\t123\t198.51.100.2:8443\t127.0.0.1\t22\t::1"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--mark", "1", "--instance", "x"],
            "argument --instance: not allowed with argument --mark",
        ),
        (["--mark", "x"], "bad mark 'x': expected a number"),
        (["--mark", "254"], "bad mark 254: 254 is a reserved routing table id"),
        (["--timeout", "0"], "argument --timeout: --timeout: must be in (0, 60]"),
        (["--backend", "pf"], "argument --backend: invalid choice: 'pf'"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"pymmproxy: {message}")
    assert err.count("\n") == 1


def test_config_errors_exit_2_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, GOOD, "broken line")
    assert main(["--config-dir", str(cfg)]) == 2
    assert capsys.readouterr().err == (
        f"pymmproxy: {cfg}/instances.tsv:2: expected <name> <fwmark> <listen_addr> "
        "<target_ipv4> <target_port> <target_ipv6>, got 2 columns\n"
    )
    assert main(["--config-dir", str(tmp_path / "nowhere")]) == 2
    assert "pathways.conf: cannot read" in capsys.readouterr().err


def test_unknown_instance_lists_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, GOOD)
    assert main(["--config-dir", str(cfg), "--instance", "nope"]) == 2
    assert capsys.readouterr().err == (
        f"pymmproxy: no instance 'nope' in {cfg}/instances.tsv (known: vps01-ssh)\n"
    )


def test_other_backend_hint_adds_back_only_the_configured_marks() -> None:
    """A mark left in the other backend but no longer in pathways.conf is only deleted."""
    facts = BackendFacts("nft", "auto", (), legacy_entries=True, other_marks=(123, 77))
    fix = by_key(checks.check_backend(facts, frozenset({123})))["other-backend"].fix
    assert (
        "pymmproxy pathway del 123 --backend legacy && pymmproxy pathway add 123 --backend nft;"
        " pymmproxy pathway del 77 --backend legacy (not in pathways.conf: no add)"
    ) in fix
