"""``pymmproxy --instance NAME`` flags and the ``pymmproxy instances`` table (no daemon, no
netlink: the daemon, the lock and the pathway probe are stubbed)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from pymmproxy import cli, daemon, instancelock, instances, logsetup
from pymmproxy.settings import Endpoint, InstanceSettings

SSH = "vps01-ssh\t123\t100.101.102.123:2222\t127.0.0.1\t22\t::1\n"
WEB = "vps01-web\t123\t100.101.102.123:8443\t127.0.0.1\t443\t-\n"
WG = "vps01-wg\t123\t100.101.102.123:51820\t127.0.0.1\t51820\t-\tproto=udp\n"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "pathways.conf").write_text("123\n")
    (tmp_path / "instances.tsv").write_text(SSH + WEB + WG)
    (tmp_path / "allow.txt").write_text("192.0.2.0/24\n")
    return tmp_path


reloaders: list[Any] = []  # the reloader each daemon.run got


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[InstanceSettings, int]]:
    """What ``daemon.run`` was called with; no lock file, no logging set-up by the CLI."""
    calls: list[tuple[InstanceSettings, int]] = []
    reloaders.clear()

    def run(settings: InstanceSettings, *, verbosity: int, **kw: Any) -> int:
        calls.append((settings, verbosity))
        reloaders.append(kw["reloader"])
        return 0

    monkeypatch.setattr(daemon, "run", run)
    monkeypatch.setattr(instancelock, "acquire", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(logsetup, "configure", lambda *a: None)
    return calls


# --- pymmproxy --instance NAME ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["-allowed-subnets", "allow.txt"], "-allowed-subnets"),
        (["--allowed-subnets=allow.txt"], "-allowed-subnets"),
        (["--allow-any"], "--allow-any"),
        (["-l", "0.0.0.0:1"], "-l"),
        (["-4", "127.0.0.1:1"], "-4"),
        (["-6", "none"], "-6"),
        (["-mark", "5"], "-mark"),
        (["-p", "udp"], "-p"),
        (["-p", "tcp"], "-p"),  # the default value, given explicitly, is refused too
        (["-mark", "0"], "-mark"),
    ],
)
def test_instance_refuses_flags_that_instances_tsv_sets(
    config: Path,
    runs: list[tuple[InstanceSettings, int]],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    flag: str,
) -> None:
    code = cli.main(["--instance", "vps01-ssh", "--config-dir", str(config), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"pymmproxy: {flag} is not allowed with --instance: instances.tsv sets it\n"
    assert runs == []


def test_an_empty_instance_name_is_refused_not_flags_mode(
    config: Path, runs: list[tuple[InstanceSettings, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    """An unset ``$NAME`` in a wrapper gives ``--instance ""``: not a daemon on the flags."""
    code = cli.main(["--instance", "", "--config-dir", str(config), "--allow-any"])
    assert code == 2
    assert capsys.readouterr().err.startswith("pymmproxy: --allow-any is not allowed with")
    assert cli.main(["--instance", "", "--config-dir", str(config)]) == 2
    assert "no instance ''" in capsys.readouterr().err
    assert runs == []


def test_instance_accepts_its_own_flags(
    config: Path, runs: list[tuple[InstanceSettings, int]]
) -> None:
    argv = [
        "--instance", "vps01-ssh", "--config-dir", str(config), "-v", "2", "-listeners", "2",
        "-close-after", "9", "--udp-max-clients", "8", "--header-timeout", "1.5",
        "--connect-timeout", "2", "--drain-timeout", "3", "--max-connections", "4",
        "--max-pending-headers", "5", "--idle-timeout", "6", "--allow-any-source",
        "--metrics", "127.0.0.1:9100", "--log-format", "json",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    [(settings, verbosity)] = runs
    assert verbosity == 2
    assert (settings.name, settings.listen, settings.mark) == (
        "vps01-ssh",
        Endpoint("100.101.102.123", 2222),
        123,
    )
    assert settings.listeners == 2
    assert settings.metrics == Endpoint("127.0.0.1", 9100)
    limits = settings.limits
    assert (limits.udp_close_after, limits.udp_max_clients, limits.header_timeout) == (9, 8, 1.5)
    assert (limits.max_connections, limits.max_pending_headers, limits.idle_timeout) == (4, 5, 6)
    assert limits.allow_any_source


# --- pymmproxy instances ----------------------------------------------------------------------


def test_instances_table_running_column(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pids = {"vps01-ssh": 4242, "vps01-web": 0, "vps01-wg": None}  # 0: held, pid unreadable
    monkeypatch.setattr(instancelock, "holder_pid", pids.__getitem__)
    monkeypatch.setattr(instances, "_status", lambda config, mark: "ok")
    assert instances.main(["--config-dir", str(config)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    column = header.index("RUNNING")
    running = {row.split()[0]: row[column:].rstrip() for row in rows}
    assert running == {"vps01-ssh": "pid 4242", "vps01-web": "yes (pid unknown)", "vps01-wg": "no"}


def test_sighup_reloads_the_allow_list_and_names_what_needs_a_restart(
    config: Path, runs: list[tuple[InstanceSettings, int]]
) -> None:
    assert cli.main(["--instance", "vps01-ssh", "--config-dir", str(config)]) == 0
    (reloader,) = reloaders
    same = reloader()
    assert same.restart_needed == ()
    assert same.allow.describe() == "1 network: 192.0.2.0/24"
    (config / "allow.txt").write_text("198.51.100.0/24\n")
    changed = SSH.replace("123\t100.101.102.123:2222", "124\t100.101.102.123:2223")
    (config / "pathways.conf").write_text("123\n124\n")
    (config / "instances.tsv").write_text(changed.replace("\t22\t", "\t2222\t") + WEB)
    fresh = reloader()
    assert fresh.allow.describe() == "1 network: 198.51.100.0/24"
    assert fresh.restart_needed == ("mark", "listen", "target4", "target6")  # one port for both


def test_another_instances_bad_line_does_not_stop_this_one(
    config: Path, runs: list[tuple[InstanceSettings, int]]
) -> None:
    """``pymmproxy@ssh`` starts (with a warning naming the line) while ``web``'s line is
    broken; ``web`` itself, and serve, refuse the file."""
    import structlog  # noqa: PLC0415

    tsv = config / "instances.tsv"
    tsv.write_text(SSH + WEB.replace("\t443\t-", "\t443") + WG)
    with structlog.testing.capture_logs() as logs:
        assert cli.main(["--instance", "vps01-ssh", "--config-dir", str(config)]) == 0
    assert len(runs) == 1
    (warning,) = [e for e in logs if e["event"] == "instance.other_line_skipped"]
    assert warning["error"].startswith(f"{tsv}:2: expected <name>")
    tsv.write_text(SSH + WEB + WG.replace("\t51820", "\t0"))  # web mended, wg broken: SIGHUP
    (reloader,) = reloaders
    with structlog.testing.capture_logs() as logs:
        assert reloader().restart_needed == ()
    (warning,) = [e for e in logs if e["event"] == "instance.other_line_skipped"]
    assert warning["error"].startswith(f"{tsv}:3: bad target_port '0'")
    tsv.write_text(SSH + WEB.replace("\t443\t-", "\t443") + WG)
    assert cli.main(["--instance", "vps01-web", "--config-dir", str(config)]) == 2
    assert cli.main(["serve", "--config-dir", str(config)]) == 2
    assert len(runs) == 1
