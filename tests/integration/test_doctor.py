"""``pymmproxy doctor`` in namespaces where things are deliberately missing.

Doctor always runs inside the namespace (``ip netns exec NS python -m pymmproxy doctor``),
with a config dir in tmp. Pathway breakage gets a fresh namespace per test. Instance
breakage shares one namespace with the pathway installed: every instance of one config
is broken in exactly one way, so one doctor run shows that each fault fails exactly its
own check and nothing else.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pymmproxy import instancelock
from tests.integration.conftest import PY, ns_socket
from tests.nsutil import Netns, netns, nobody_python, require_root_and_tools, unique

pytestmark = pytest.mark.netns

MARK = 123
LISTEN = "198.51.100.2"
TPORT = 8080  # the "service": listening sockets on 127.0.0.1 and ::1
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
PATHWAY_KEYS = {"rules", "routes", "connmark", "loopback"}
Doc = dict[str, Any]


def doctor(
    ns: Netns, *args: str, prefix: tuple[str, ...] = (), python: tuple[str, ...] = (PY,)
) -> tuple[int, Doc]:
    argv = [*prefix, *python, "-m", "pymmproxy", "doctor", "--json", *args]
    res = ns.run(argv, check=False)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, json.loads(res.stdout)


def failing(doc: Doc, subject: str | None = None) -> set[tuple[str, str]]:
    return {
        (c["key"], c["subject"])
        for c in doc["checks"]
        if c["level"] == "FAIL" and subject in (None, c["subject"])
    }


def row(doc: Doc, key: str, subject: str = "") -> dict[str, Any]:
    found = [c for c in doc["checks"] if c["key"] == key and c["subject"] == subject]
    assert len(found) == 1, (key, subject, doc["checks"])
    return found[0]  # type: ignore[no-any-return]


def write_config(cfg: Path, *lines: str, allow: str = "198.51.100.0/24\n") -> Path:
    cfg.mkdir(exist_ok=True)
    (cfg / "pathways.conf").write_text(f"{MARK}\n")
    (cfg / "allow.txt").write_text(allow)
    (cfg / "instances.tsv").write_text("".join(f"{line}\n" for line in lines))
    return cfg


def tsv(name: str, listen: str, tport: int = TPORT, *extra: str, t4: str = "127.0.0.1") -> str:
    return "\t".join([name, str(MARK), listen, t4, str(tport), "::1", *extra])


def pathway_add(ns: Netns) -> None:
    ns.run([PY, "-m", "pymmproxy", "pathway", "add", str(MARK)])


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[Netns, Path]]:
    """A new namespace with the listen address, the service, one good instance."""
    require_root_and_tools("nft", "setpriv")
    with netns("pmd") as ns:
        ns.run(["ip", "addr", "add", f"{LISTEN}/32", "dev", "lo"])
        services = [ns_socket(ns, fam) for fam in (socket.AF_INET, socket.AF_INET6)]
        for s, host in zip(services, ("127.0.0.1", "::1"), strict=True):
            s.bind((host, TPORT))
            s.listen(8)
        cfg = write_config(tmp_path / "cfg", tsv(unique("doc-"), f"{LISTEN}:8443"))
        try:
            yield ns, cfg
        finally:
            for s in services:
                s.close()


# -- the pathway of MARK, one piece missing at a time -------------------------------------------


def test_nothing_installed_fails_each_pathway_check_then_add_passes(
    fresh: tuple[Netns, Path],
) -> None:
    ns, cfg = fresh
    code, doc = doctor(ns, "--config-dir", str(cfg))
    assert code == 1
    assert failing(doc) == {(key, str(MARK)) for key in PATHWAY_KEYS}
    for key in PATHWAY_KEYS:
        assert row(doc, key, str(MARK))["fix"] == f"pymmproxy pathway add {MARK}"
    fwmark_rule = "ip rule add fwmark 123 lookup 123 pref 100 protocol 112"
    assert fwmark_rule in row(doc, "rules", "123")["commands"]

    table = ns.run([PY, "-m", "pymmproxy", "doctor", "--config-dir", str(cfg)], check=False)
    assert table.returncode == 1
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["STATUS", "CHECK", "DETAIL"]
    detail_col = lines[0].index("DETAIL")
    fail_rows = [i for i, line in enumerate(lines) if line.startswith("FAIL")]
    assert len(fail_rows) == 4
    for i in fail_rows:
        assert lines[i][detail_col - 2 : detail_col] == "  "
        assert lines[i + 1] == " " * detail_col + f"fix: pymmproxy pathway add {MARK}"
    assert lines[-1] == "4 failed, 7 ok"

    pathway_add(ns)
    code, doc = doctor(ns, "--config-dir", str(cfg))
    assert code == 0, failing(doc)
    assert {c["level"] for c in doc["checks"]} == {"OK"}
    assert doc["ok"] is True
    assert doc["summary"] == "all 11 checks passed"


def test_missing_loopback_rule_fails_only_that_check(fresh: tuple[Netns, Path]) -> None:
    ns, cfg = fresh
    pathway_add(ns)
    ns.run(["ip", "rule", "del", "from", "127.0.0.0/8", "iif", "lo", "lookup", str(MARK)])
    code, doc = doctor(ns, "--config-dir", str(cfg))
    assert code == 1
    assert failing(doc) == {("loopback", str(MARK))}
    loopback = row(doc, "loopback", str(MARK))
    assert "127.0.0.0/8" in loopback["detail"]
    assert "::1" not in loopback["detail"]
    assert loopback["commands"] == [
        "ip rule add from 127.0.0.0/8 iif lo lookup 123 pref 101 protocol 112"
    ]

    # net.ipv4.tcp_fwmark_accept=1 (this namespace's own copy) covers TCP: only a warning,
    ns.run(["sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=1"])
    code, doc = doctor(ns, "--config-dir", str(cfg))
    assert code == 0
    assert row(doc, "loopback", str(MARK))["level"] == "WARN"
    assert "covers TCP replies only" in row(doc, "loopback", str(MARK))["detail"]

    # but not when a UDP instance uses the mark.
    text = (cfg / "instances.tsv").read_text()
    udp = tsv("dns-" + unique(""), f"{LISTEN}:5353", 53, "proto=udp")
    (cfg / "instances.tsv").write_text(f"{text}{udp}\n")
    code, doc = doctor(ns, "--config-dir", str(cfg))
    assert code == 1
    assert failing(doc) == {("loopback", str(MARK))}
    assert udp.split("\t")[0] in row(doc, "loopback", str(MARK))["detail"]


def test_removed_nft_table_fails_only_connmark(fresh: tuple[Netns, Path]) -> None:
    ns, cfg = fresh
    pathway_add(ns)
    ns.run(["nft", "delete", "table", "inet", "pymmproxy"])
    code, doc = doctor(ns, "--config-dir", str(cfg))
    assert code == 1
    assert failing(doc) == {("connmark", str(MARK))}
    assert "save-mark" in row(doc, "connmark", str(MARK))["detail"]
    assert row(doc, "backend")["detail"].startswith("nft (auto: ")


def test_legacy_tables_on_an_nft_host_warn(fresh: tuple[Netns, Path]) -> None:
    require_root_and_tools("iptables-legacy")
    ns, _ = fresh
    pathway_add(ns)
    ns.run(["iptables-legacy", "-t", "mangle", "-S"])  # instantiates the legacy mangle table
    code, doc = doctor(ns, "--mark", str(MARK), "--backend", "nft")
    assert code == 0
    legacy = row(doc, "legacy-tables")
    assert legacy["level"] == "WARN"
    assert "iptables-legacy tables present: mangle (IPv4)" in legacy["detail"]


def test_unprivileged_run_fails_the_privilege_check(fresh: tuple[Netns, Path]) -> None:
    ns, _ = fresh
    code, doc = doctor(ns, "--mark", str(MARK), prefix=tuple(NOBODY), python=nobody_python())
    assert code == 1
    privileges = row(doc, "privileges")
    assert privileges["level"] == "FAIL"
    assert privileges["detail"].startswith("uid 65534 without CAP_NET_ADMIN")
    assert "CAP_NET_ADMIN" in privileges["fix"]
    assert "permission denied" in row(doc, "pathway", str(MARK))["detail"]


# -- instances, each broken in one way, one doctor run -----------------------------------------


class Broken:
    """Instance names of the shared config, by what is wrong with them."""

    def __init__(self) -> None:
        p = unique("doc-")
        self.good, self.nolocal, self.down = f"{p}-good", f"{p}-nolocal", f"{p}-down"
        self.empty, self.noallow = f"{p}-empty", f"{p}-noallow"
        self.squatted, self.running = f"{p}-squatted", f"{p}-running"
        self.udp_ok, self.udp_remote = f"{p}-udp", f"{p}-udp-remote"

    def lines(self) -> list[str]:
        return [
            tsv(self.good, f"{LISTEN}:8443"),
            tsv(self.nolocal, "203.0.113.9:8444"),
            tsv(self.down, f"{LISTEN}:8445", TPORT + 1),
            tsv(self.empty, f"{LISTEN}:8446", TPORT, "allow=empty.txt"),
            tsv(self.noallow, f"{LISTEN}:8447", TPORT, "allow=missing.txt"),
            tsv(self.squatted, f"{LISTEN}:8448"),
            tsv(self.running, f"{LISTEN}:8449"),
            tsv(self.udp_ok, f"{LISTEN}:8450", 53, "proto=udp"),
            tsv(self.udp_remote, f"{LISTEN}:8451", 53, "proto=udp", t4="192.0.2.53"),
        ]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Netns, Path, Broken, Doc]]:
    require_root_and_tools("nft")
    b = Broken()
    with netns("pmd") as ns:
        ns.run(["ip", "addr", "add", f"{LISTEN}/32", "dev", "lo"])
        pathway_add(ns)
        socks = []
        for fam, host, port in (
            (socket.AF_INET, "127.0.0.1", TPORT),
            (socket.AF_INET6, "::1", TPORT),
            (socket.AF_INET, LISTEN, 8448),  # someone else's listener
            (socket.AF_INET, LISTEN, 8449),  # "the running instance"
        ):
            s = ns_socket(ns, fam)
            s.bind((host, port))
            s.listen(8)
            socks.append(s)
        cfg = write_config(tmp_path_factory.mktemp("doctor") / "cfg", *b.lines())
        (cfg / "empty.txt").write_text("# nobody yet\n")
        lock = instancelock.acquire(b.running)
        assert lock is not None
        try:
            with lock:
                code, doc = doctor(ns, "--config-dir", str(cfg))
            assert code == 1
            yield ns, cfg, b, doc
        finally:
            lock.path.unlink(missing_ok=True)  # a unique name: nobody else can hold it
            for s in socks:
                s.close()


def test_host_and_pathway_checks_pass_and_so_does_a_good_instance(
    report: tuple[Netns, Path, Broken, Doc],
) -> None:
    ns, cfg, b, doc = report
    assert failing(doc, "") == set()
    assert failing(doc, str(MARK)) == set()
    assert failing(doc, b.good) == set()
    assert row(doc, "listen", b.good)["detail"] == f"{LISTEN}:8443 can be bound"
    assert row(doc, "target6", b.good)["detail"] == f"[::1]:{TPORT} accepts TCP connections"
    code, single = doctor(ns, "--config-dir", str(cfg), "--instance", b.good)
    assert code == 0, failing(single)
    assert {c["subject"] for c in single["checks"]} == {"", str(MARK), b.good}


def test_listen_address_not_local_fails(report: tuple[Netns, Path, Broken, Doc]) -> None:
    _, cfg, b, doc = report
    assert failing(doc, b.nolocal) == {("listen", b.nolocal)}
    listen = row(doc, "listen", b.nolocal)
    assert listen["detail"] == "203.0.113.9 is not an address of this host"
    assert f"{cfg}/instances.tsv:2" in listen["fix"]


def test_target_down_fails(report: tuple[Netns, Path, Broken, Doc]) -> None:
    _, _, b, doc = report
    assert failing(doc, b.down) == {("target4", b.down), ("target6", b.down)}
    target4 = row(doc, "target4", b.down)
    assert (
        target4["detail"] == f"127.0.0.1:{TPORT + 1}: connection refused (is the service running?)"
    )
    assert target4["fix"].startswith(f"start the service on 127.0.0.1:{TPORT + 1}")


def test_empty_or_missing_allow_list_fails(report: tuple[Netns, Path, Broken, Doc]) -> None:
    _, cfg, b, doc = report
    assert failing(doc, b.empty) == {("allow", b.empty)}
    assert row(doc, "allow", b.empty)["detail"] == (
        f"{cfg}/empty.txt is empty: every PROXY header would be refused"
    )
    assert failing(doc, b.noallow) == {("allow", b.noallow)}
    assert "missing.txt: cannot read" in row(doc, "allow", b.noallow)["detail"]


def test_listen_in_use_fails_unless_the_instance_itself_holds_it(
    report: tuple[Netns, Path, Broken, Doc],
) -> None:
    _, _, b, doc = report
    assert failing(doc, b.squatted) == {("listen", b.squatted)}
    squatted = row(doc, "listen", b.squatted)
    assert "in use by another process" in squatted["detail"]
    assert "ss -ltnp 'sport = :8448'" in squatted["fix"]
    running = row(doc, "listen", b.running)
    assert running["level"] == "OK"
    assert "in use by this instance" in running["detail"]


def test_udp_target_must_be_local(report: tuple[Netns, Path, Broken, Doc]) -> None:
    _, _, b, doc = report
    assert failing(doc, b.udp_ok) == set()
    assert "local address" in row(doc, "target4", b.udp_ok)["detail"]
    assert failing(doc, b.udp_remote) == {("target4", b.udp_remote)}
    assert "192.0.2.53 is not a local address" in row(doc, "target4", b.udp_remote)["detail"]
