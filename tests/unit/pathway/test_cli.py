"""``pymmproxy pathway`` argument handling and config files (no kernel access)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymmproxy.pathway import ItemStatus, PathwayStatus
from pymmproxy.pathway import cli as pcli
from pymmproxy.pathway.plan import Family, plan


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def add(self, mark: int, *, backend: str = "auto") -> list[str]:
        self.calls.append(("add", mark, backend))
        return [f"ip rule add fwmark {mark} lookup {mark} pref 100"]

    def delete(self, mark: int, *, backend: str = "auto") -> list[str]:
        self.calls.append(("del", mark, backend))
        return []

    def status(self, mark: int, *, backend: str = "auto") -> PathwayStatus:
        self.calls.append(("status", mark, backend))
        return _status(mark, complete=mark != 13)


def _status(mark: int, *, complete: bool) -> PathwayStatus:
    p = plan(mark)
    items = [ItemStatus(s.item, s.family, True, s.command()) for s in (*p.rules, *p.routes)]
    items += [ItemStatus(f.item, f.family, complete, f.command()) for f in p.firewall]
    return PathwayStatus(mark, "nft", "requested", 0, tuple(items))


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Recorder:
    r = Recorder()
    monkeypatch.setattr(pcli, "add", r.add)
    monkeypatch.setattr(pcli, "delete", r.delete)
    monkeypatch.setattr(pcli, "status", r.status)
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
