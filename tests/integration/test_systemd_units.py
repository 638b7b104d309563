"""systemd/*.service: `systemd-analyze verify` clean, hardened, and wired together right.

`verify` insists that every Exec*= binary exists, so the units are verified as copies whose
``/usr/local/bin/pymmproxy`` points at this venv's console script; nothing else is changed.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nsutil import require

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "systemd"
INSTALLED_BIN = "/usr/local/bin/pymmproxy"
DAEMON_UNITS = ("pymmproxy@.service", "pymmproxy.service")
ALL_UNITS = ("pymmproxy-pathways.service", *DAEMON_UNITS)
# systemd-analyze security's 0..10 exposure score (x10 for --threshold): "OK" is below 4.0
MAX_DAEMON_EXPOSURE = 2.5
HARDENING = re.compile(
    r"^(Ambient|Capability|NoNewPrivileges|Protect|Private|Restrict|LockPersonality|"
    r"MemoryDenyWriteExecute|SystemCall|RemoveIPC)"
)


def _systemd_analyze() -> str:
    """The tool (the README's test command installs the systemd package)."""
    tool = shutil.which("systemd-analyze")
    require(tool is not None, "needs systemd-analyze (apt-get install systemd)")
    assert tool is not None
    return tool


def _pymmproxy_script() -> Path:
    script = Path(sys.executable).parent / "pymmproxy"
    require(script.is_file(), f"needs the pymmproxy console script at {script} (pip install -e .)")
    return script


def _units(path: Path) -> dict[str, list[tuple[str, str]]]:
    """``{section: [(key, value), ...]}``, keeping repeated keys (configparser would not)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in path.read_text().splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            current.append((key, value))
    return sections


def _get(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


@pytest.fixture(scope="module")
def unit_copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = _pymmproxy_script()
    dest = tmp_path_factory.mktemp("units")
    for name in ALL_UNITS:
        text = (UNIT_DIR / name).read_text()
        assert INSTALLED_BIN in text, f"{name} does not run {INSTALLED_BIN}"
        (dest / name).write_text(text.replace(INSTALLED_BIN, str(script)))
    return dest


def _analyze(*argv: str, unit_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_systemd_analyze(), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # our directory first, then the built-in search path (the trailing ':')
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_COLOR": "0"},
    )


def test_verify_is_clean(unit_copies: Path) -> None:
    require(Path("/bin/kill").is_file(), "needs /bin/kill (procps), the ExecReload= command")
    # a template can only be verified through an instance of it
    targets = [unit_copies / n.replace("@.", "@example.") for n in ALL_UNITS]
    result = _analyze("verify", *map(str, targets), unit_dir=unit_copies)
    output = result.stdout + result.stderr
    ours = [
        line
        for line in output.splitlines()
        if "pymmproxy" in line or str(unit_copies) in line or "example" in line
    ]
    assert result.returncode == 0, output
    assert ours == [], output


@pytest.mark.parametrize("name", DAEMON_UNITS)
def test_daemon_exposure_stays_low(unit_copies: Path, name: str) -> None:
    target = unit_copies / name.replace("@.", "@example.")
    result = _analyze(
        "security",
        "--offline=yes",
        f"--threshold={int(MAX_DAEMON_EXPOSURE * 10)}",
        "--no-pager",
        str(target),
        unit_dir=unit_copies,
    )
    summary = result.stdout.strip().splitlines()[-1:] if result.stdout else result.stderr
    assert result.returncode == 0, f"{name}: {summary} (max {MAX_DAEMON_EXPOSURE})"


@pytest.mark.parametrize("name", DAEMON_UNITS)
def test_daemon_units(name: str) -> None:
    unit = _units(UNIT_DIR / name)
    svc, head = unit["Service"], unit["Unit"]
    assert _get(svc, "Type") == ["notify"]
    assert _get(head, "Requires") == ["pymmproxy-pathways.service"]
    assert "pymmproxy-pathways.service" in _get(head, "After")[0].split()
    assert _get(svc, "User") == ["pymmproxy"]
    assert _get(svc, "Group") == ["pymmproxy"]
    assert _get(svc, "RuntimeDirectory") == ["pymmproxy"]
    assert _get(svc, "RuntimeDirectoryPreserve") == ["yes"]
    assert _get(svc, "Environment") == ["PYMMPROXY_CONFIG_DIR=/etc/pymmproxy"]
    assert _get(svc, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert set(_get(svc, "AmbientCapabilities")[0].split()) == caps
    assert set(_get(svc, "CapabilityBoundingSet")[0].split()) == caps
    expected_start = f"{INSTALLED_BIN} --instance %i" if "@" in name else f"{INSTALLED_BIN} serve"
    assert _get(svc, "ExecStart") == [expected_start]
    assert _get(unit["Install"], "WantedBy") == ["multi-user.target"]


def test_pathways_unit() -> None:
    unit = _units(UNIT_DIR / "pymmproxy-pathways.service")
    svc = unit["Service"]
    assert _get(svc, "Type") == ["oneshot"]
    assert _get(svc, "RemainAfterExit") == ["yes"]
    assert _get(svc, "ExecStart") == [f"{INSTALLED_BIN} pathway add-all"]
    # add-all is idempotent: reload installs marks new in pathways.conf, instances keep running
    assert _get(svc, "ExecReload") == [f"{INSTALLED_BIN} pathway add-all"]
    assert _get(svc, "ExecStop") == [f"{INSTALLED_BIN} pathway del-all"]
    header = (UNIT_DIR / "pymmproxy-pathways.service").read_text().split("\n[Unit]")[0]
    assert "/etc/pymmproxy/pathways.conf" in header  # where add-all reads its marks
    assert "instances.tsv" not in header
    assert _get(svc, "User") == []  # root: it edits rules
    assert "Before" in dict(unit["Unit"])
    assert "network-online.target" in _get(unit["Unit"], "Before")[0].split()
    assert _get(unit["Install"], "WantedBy") == ["multi-user.target"]


@pytest.mark.parametrize("name", ALL_UNITS)
def test_every_hardening_line_is_commented(name: str) -> None:
    lines = (UNIT_DIR / name).read_text().splitlines()
    bare = [
        line
        for prev, line in itertools.pairwise(lines)
        if HARDENING.match(line) and not prev.startswith("#")
    ]
    assert bare == []


def test_sysusers_snippet_creates_the_service_user() -> None:
    rows = [
        line.split()
        for line in (UNIT_DIR / "sysusers.d-pymmproxy.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [row[:2] for row in rows] == [["u", "pymmproxy"]]


def test_sysusers_snippet_parses(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    require(tool is not None, "needs systemd-sysusers")
    assert tool is not None
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = subprocess.run(
        [tool, f"--root={root}", str(UNIT_DIR / "sysusers.d-pymmproxy.conf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    passwd = (root / "etc/passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("pymmproxy:"))
    uid = int(entry.split(":")[2])
    assert 0 < uid < 1000, entry  # a system user
    assert "nologin" in entry
