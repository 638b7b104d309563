"""The container image: `.ci/build-image` builds and smoke-tests it; then check its config.

A first run debootstraps the base image (~45 s here) and builds from scratch (~55 s); with
buildah's storage warm the whole script takes ~20 s, so it runs as part of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.nsutil import require

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / ".ci" / "build-image"
IMAGE = "localhost/pymmproxy:test"  # .ci/build-image's default tag

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def image() -> str:
    require(os.geteuid() == 0, "needs root (buildah storage, debootstrap)")
    require(
        shutil.which("buildah") is not None or shutil.which("apt-get") is not None,
        "needs buildah, or apt-get to install it",
    )
    result = subprocess.run(
        ["bash", str(BUILD)],
        env={**os.environ, "IMAGE": IMAGE},
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-60:])
    assert result.returncode == 0, f".ci/build-image failed:\n{tail}"
    print(result.stdout[-400:])  # the timings table, shown with -s / on failure
    return IMAGE


def _config(image: str) -> dict[str, Any]:
    out = subprocess.run(
        ["buildah", "inspect", "--type", "image", image],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    config: dict[str, Any] = json.loads(out)["OCIv1"]["config"]
    return config


def test_image_config(image: str) -> None:
    config = _config(image)
    assert config["User"] == "pymmproxy"
    assert config["Entrypoint"] == ["pymmproxy"]
    assert config["Cmd"] == ["--help"]
    assert "/etc/pymmproxy" in config["Volumes"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PYMMPROXY_CONFIG_DIR"] == "/etc/pymmproxy"
    assert env["PATH"].startswith("/opt/pymmproxy/bin:")
    assert "DEBIAN_FRONTEND" not in env  # a build-time setting only
    assert config["Labels"]["org.opencontainers.image.title"] == "pymmproxy"


def run_in(image: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a throw-away container of ``image`` (buildah, chroot isolation)."""
    ctr = subprocess.run(
        ["buildah", "from", "--pull-never", "--quiet", image],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    try:
        return subprocess.run(
            ["buildah", "run", "--isolation", "chroot", "--runtime", "runc", ctr, "--", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False, timeout=120)


def test_image_is_lean(image: str) -> None:
    """The final stage carries the venv, not the toolchain that built python-iptables."""
    probe = run_in(
        image, "sh", "-c", "command -v gcc cc python3-config; ls /usr/include/python3.11"
    )
    assert probe.stdout.strip() == "", probe.stdout


def test_image_has_both_firewall_backends(image: str) -> None:
    """Debian 12's iptables is the nft variant, so backend detection picks nft in the image:
    libnftables must be there (iptables only recommends it), and python-iptables must load."""
    code = (
        "from pymmproxy.pathway.firewall import libnftables, legacy; "
        "assert libnftables._load() is not None, 'no libnftables'; "
        "legacy._Iptc(); print('ok')"
    )
    probe = run_in(image, "/opt/pymmproxy/bin/python", "-c", code)
    assert probe.stdout.strip() == "ok", probe.stdout + probe.stderr
