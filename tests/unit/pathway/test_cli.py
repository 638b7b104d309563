"""``pymmproxy pathway`` argument handling and config files (no kernel access)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymmproxy.errors import PathwayError
from pymmproxy.pathway import ItemStatus, PathwayStatus
from pymmproxy.pathway import cli as pcli
from pymmproxy.pathway.ipv6 import LO_DISABLED, NO_KERNEL_IPV6, Ipv6State
from pymmproxy.pathway.plan import Family, plan

FAILING = 66  # the fake add / del / status fail for this mark


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.ipv6: list[Ipv6State | None] = []

    def _call(self, verb: str, mark: int, backend: str, ipv6: Ipv6State | None) -> None:
        self.calls.append((verb, mark, backend))
        self.ipv6.append(ipv6)
        if mark == FAILING:
            raise PathwayError(f"pathway {verb} {mark}: ip rule {verb} ...: kernel says no")

    def add(self, mark: int, *, backend: str = "auto", ipv6: Ipv6State | None = None) -> list[str]:
        self._call("add", mark, backend, ipv6)
        return [f"ip rule add fwmark {mark} lookup {mark} pref 100"]

    def delete(
        self, mark: int, *, backend: str = "auto", ipv6: Ipv6State | None = None
    ) -> list[str]:
        self._call("del", mark, backend, ipv6)
        return []

    def status(
        self, mark: int, *, backend: str = "auto", ipv6: Ipv6State | None = None
    ) -> PathwayStatus:
        self._call("status", mark, backend, ipv6)
        return _status(mark, complete=mark != 13)


def _status(mark: int, *, complete: bool, note: str = "") -> PathwayStatus:
    p = plan(mark)
    items = [ItemStatus(s.item, s.family, True, s.command()) for s in (*p.rules, *p.routes)]
    items += [ItemStatus(f.item, f.family, complete, f.command()) for f in p.firewall]
    return PathwayStatus(mark, "nft", "requested", 0, tuple(items), note)


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Recorder:
    r = Recorder()
    monkeypatch.setattr(pcli, "add", r.add)
    monkeypatch.setattr(pcli, "delete", r.delete)
    monkeypatch.setattr(pcli, "status", r.status)
    monkeypatch.setattr(pcli, "probe_ipv6", Ipv6State)  # IPv6 on, whatever the test host
    monkeypatch.setenv("PYMMPROXY_CONFIG_DIR", str(tmp_path))
    return r


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("pymmproxy: ")
    return err.strip()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: command"),
        (["frob"], "invalid choice: 'frob'"),
        (["add"], "add needs at least one MARK or INSTANCE"),
        (["del"], "del needs at least one MARK or INSTANCE"),
        (["add-all", "5"], "add-all takes no MARK/INSTANCE"),
        (["add", "0"], "bad mark 0: must be 1..4294967295"),
        (["add", "254"], "bad mark 254: 254 is a reserved routing table id"),
        (["add", "4294967296"], "bad mark 4294967296"),
        (["add", "0xzz"], "bad mark '0xzz': not a number"),
        (["add", "9" * 4301], f"bad mark {'9' * 20}...: must be 1..4294967295"),
        (["status", "1" * 21], f"bad mark {'1' * 20}...: must be 1..4294967295"),
        (["add", "5", "--backend", "pf"], "invalid choice: 'pf'"),
        (["add", "5", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2(
    rec: Recorder, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert pcli.main(argv) == 2
    assert message in _err(capsys)
    assert rec.calls == []


def test_parse_mark_arg_at_the_length_limit() -> None:
    assert pcli.parse_mark_arg("0" * 19 + "5") == 5
    assert pcli.parse_mark_arg("0x" + "0" * 17 + "7b") == 123
    assert pcli.parse_mark_arg("vps01-ssh") is None


def test_add_and_del_marks(rec: Recorder, capsys: pytest.CaptureFixture[str]) -> None:
    assert pcli.main(["add", "5", "0x7b", "5", "--backend", "legacy"]) == 0
    assert rec.calls == [("add", 5, "legacy"), ("add", 123, "legacy")]
    assert "ip rule add fwmark 123" in capsys.readouterr().out
    assert pcli.main(["del", "123"]) == 0
    assert capsys.readouterr().out == "pathway 123: already absent\n"


def test_all_commands_read_pathways_conf(
    rec: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pathways.conf").write_text("# marks\n123\n\n  0x7c  # hex\n")
    assert pcli.main(["add-all"]) == 0
    assert pcli.main(["del-all", "--config-dir", str(tmp_path)]) == 0
    assert [c[:2] for c in rec.calls] == [("add", 123), ("add", 124), ("del", 123), ("del", 124)]


@pytest.mark.parametrize("command", ["add-all", "del-all"])
def test_all_commands_try_every_mark(
    rec: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    (tmp_path / "pathways.conf").write_text(f"123\n{FAILING}\n124\n")
    assert pcli.main([command]) == 1
    assert [c[1] for c in rec.calls] == [123, FAILING, 124]
    out, err = capsys.readouterr()
    verb = command.removesuffix("-all")
    assert err == f"pymmproxy: pathway {verb} {FAILING}: ip rule {verb} ...: kernel says no\n"
    assert "123" in out
    assert "124" in out


def test_listed_marks_are_all_tried_too(rec: Recorder, capsys: pytest.CaptureFixture[str]) -> None:
    assert pcli.main(["add", str(FAILING), "5"]) == 1
    assert [c[1] for c in rec.calls] == [FAILING, 5]
    assert pcli.main(["status", "5", str(FAILING), "6"]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 2  # one line per failure (add 66, status 66)
    assert "pathway 5: complete" in out
    assert "pathway 6: complete" in out


def test_all_marks_ok_exit_0(rec: Recorder, tmp_path: Path) -> None:
    (tmp_path / "pathways.conf").write_text("123\n124\n")
    assert pcli.main(["add-all"]) == 0
    assert pcli.main(["status"]) == 0


def test_ipv6_off_warns_once_and_passes_the_state(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    off = Ipv6State(off=LO_DISABLED)
    monkeypatch.setattr(pcli, "probe_ipv6", lambda: off)
    assert pcli.main(["add", "5", "6"]) == 0
    warning = f"pymmproxy: warning: IPv6 off on this host ({LO_DISABLED}): IPv6 parts skipped\n"
    assert capsys.readouterr().err == warning
    assert rec.ipv6 == [off, off]
    assert pcli.main(["del", "5"]) == 0  # del still removes IPv6 leftovers: nothing skipped
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(pcli, "probe_ipv6", lambda: Ipv6State(kernel=False, off=NO_KERNEL_IPV6))
    assert pcli.main(["del", "5"]) == 0
    assert "IPv6 parts skipped" in capsys.readouterr().err


def test_status_shows_the_ipv6_note() -> None:
    note = f"IPv6 off on this host ({LO_DISABLED}): IPv6 parts skipped"
    assert pcli.format_status(_status(5, complete=True, note=note)).endswith(f"\n  {note}")
    assert "IPv6" not in pcli.format_status(_status(5, complete=True))


def test_empty_pathways_conf(
    rec: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pathways.conf").write_text("# nothing yet\n")
    assert pcli.main(["add-all"]) == 0
    assert "no pathways in" in capsys.readouterr().out
    assert rec.calls == []


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("123\nabc\n", 2, "bad fwmark 'abc': expected a number"),
        ("\n\n0\n", 3, "bad fwmark 0: must be 1..4294967295"),
        ("255\n", 1, "bad fwmark 255: 255 is a reserved routing table id"),
        ("1 2\n", 1, "expected one fwmark, got 2 fields"),
        ("7\n# c\n7\n", 3, "duplicate fwmark 7 (first on line 1)"),
    ],
)
def test_pathways_conf_errors(
    rec: Recorder,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    line: int,
    message: str,
) -> None:
    conf = tmp_path / "pathways.conf"
    conf.write_text(text)
    assert pcli.main(["add-all"]) == 2
    assert _err(capsys) == f"pymmproxy: {conf}:{line}: {message}"
    assert rec.calls == []


def test_missing_pathways_conf(
    rec: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pcli.main(["del-all"]) == 2
    assert f"{tmp_path / 'pathways.conf'}: cannot read" in _err(capsys)


def test_instance_names_resolve(
    rec: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "instances.tsv").write_text(
        "# name fwmark listen target4 port target6\n"
        "web 123 0.0.0.0:8443 127.0.0.1 443 ::1\n"
        "mail\t124\t0.0.0.0:8465\t127.0.0.1\t465\t-\n"
    )
    assert pcli.main(["add", "mail", "web", "123"]) == 0
    assert rec.calls == [("add", 124, "auto"), ("add", 123, "auto")]
    assert pcli.main(["add", "nope"]) == 2
    assert "no instance 'nope'" in _err(capsys)


def test_bad_instances_file(
    rec: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = tmp_path / "instances.tsv"
    tsv.write_text("web 254 0.0.0.0:8443 127.0.0.1 443 ::1\n")
    assert pcli.main(["status", "web"]) == 2
    assert _err(capsys).startswith(f"pymmproxy: {tsv}:1: ")


def test_status_table_and_exit_code(rec: Recorder, capsys: pytest.CaptureFixture[str]) -> None:
    assert pcli.main(["status", "12"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:3] == [
        "pathway 12: complete (firewall backend nft, requested)",
        "  item                 v4       v6",
        "  rule fwmark          present  present",
    ]
    assert "net.ipv4.tcp_fwmark_accept = 0" in out
    assert pcli.main(["status", "12", "13"]) == 1
    out = capsys.readouterr().out
    assert "pathway 13: INCOMPLETE" in out
    assert "  mangle save-mark     MISSING  MISSING" in out


def test_status_rows_mark_unplanned_cells() -> None:
    st = PathwayStatus(
        5, "legacy", "requested", None, (ItemStatus("rule fwmark", Family.V4, True, ""),)
    )
    assert st.rows()[0] == ("rule fwmark", True, None)
    assert "  rule fwmark          present  -" in pcli.format_status(st)
    assert "tcp_fwmark_accept = unreadable" in pcli.format_status(st)


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert pcli.main(["--help"]) == 0
    assert "add-all" in capsys.readouterr().out


def test_a_target_that_is_no_mark_and_no_readable_instances_file_says_both(
    rec: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pcli.main(["add", "0x"]) == 2
    assert _err(capsys) == "pymmproxy: bad mark '0x': not a number"
    assert pcli.main(["add", "web"]) == 2
    assert _err(capsys) == (
        "pymmproxy: 'web' is not a mark (decimal or 0x hex), and no instance can be looked "
        f"up: {tmp_path / 'instances.tsv'}: cannot read: No such file or directory"
    )
