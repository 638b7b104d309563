"""The service sees the real client address and port (v1/v2, IPv4/IPv6), for both proxies."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pymmproxy.lab import (
    CLIENT_V4,
    CLIENT_V6,
    HTTP_GET,
    LB_FRONT_V4,
    LB_FRONT_V6,
    Frontend,
    Lab,
)
from tests.e2e.helpers import available, body, module_lab, need, next_sport, start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

# lb frontend port per (implementation, PROXY version); the proxy listens on 8000 + that
PORTS = {("go", 2): 80, ("go", 1): 81, ("py", 2): 90, ("py", 1): 91}
WK = "198.51.100.2"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    frontends = [Frontend(p, f"{WK}:{8000 + p}", v) for (_, v), p in PORTS.items()]
    with module_lab(frontends) as lab:
        lab.start_service("whoami", "127.0.0.1:8080", "[::1]:8080")
        yield lab


@pytest.fixture(scope="module")
def proxies(lab: Lab) -> dict[str, bool]:
    """Start every available implementation once per module (missing ones stay absent)."""
    started = {}
    for impl in available():
        for (i, _), port in PORTS.items():
            if i == impl:
                start_proxy(lab, impl, f"{WK}:{8000 + port}", 8080)
        started[impl] = True
    return started


def request(lab: Lab, src: str, port: int) -> tuple[int, dict[str, object]]:
    sport = next_sport()
    dst = LB_FRONT_V6 if ":" in src else LB_FRONT_V4
    return sport, lab.connect_from_client(src, dst, port, sport=sport, timeout=5)


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("src", [CLIENT_V4[0], CLIENT_V4[3], CLIENT_V6[0], CLIENT_V6[2]])
def test_service_sees_client_ip_and_port(
    lab: Lab, proxies: dict[str, bool], impl: str, version: int, src: str
) -> None:
    need(impl, proxies)
    sport, res = request(lab, src, PORTS[impl, version])
    assert res["error"] is None, res
    assert body(res) == f"{src} {sport}", res


def test_side_by_side_same_observed_addresses(lab: Lab, proxies: dict[str, bool]) -> None:
    """go-mmproxy and pymmproxy behind the same HAProxy see the same client addresses."""
    need("go", proxies)
    need("py", proxies)
    cases = [(impl, version, src) for impl in ("go", "py") for version in (2, 1)
             for src in (*CLIENT_V4, *CLIENT_V6)]  # fmt: skip
    jobs = [
        {
            "src": src,
            "sport": next_sport(),
            "dst": LB_FRONT_V6 if ":" in src else LB_FRONT_V4,
            "port": PORTS[impl, version],
            "send": HTTP_GET,
            "timeout": 5,
        }
        for impl, version, src in cases
    ]
    seen: dict[str, list[str]] = {"go": [], "py": []}
    for (impl, version, src), j, res in zip(cases, jobs, lab.clients(jobs), strict=True):
        assert body(res) == f"{src} {j['sport']}", res
        seen[impl].append(f"v{version} {body(res).rsplit(' ', 1)[0]}")
    assert seen["go"] == seen["py"]
    assert len(seen["go"]) == 16
