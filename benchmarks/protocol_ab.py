"""``benchmarks.run`` with two more candidates: :mod:`benchmarks.protocol_relay` in one
process (``protocol-1``) and with two workers (``protocol-2``), the design measured in
``PERFORMANCE.md`` against pymmproxy's own reactor, in the same alternating rounds.

    python -m benchmarks.protocol_ab --no-udp --out /tmp/ab

Every flag is ``benchmarks.run``'s; without ``--only`` all candidates run.
"""

from __future__ import annotations

import sys

from benchmarks import candidates, run

EXTRA = (
    candidates.Candidate("protocol-1", "protocol", 5, listeners=1),
    candidates.Candidate("protocol-2", "protocol", 6, listeners=2),
)


def _argv(bench: candidates.Bench, cand: candidates.Candidate, port: int, target: int) -> list[str]:
    if cand.kind != "protocol":
        return _proxy_argv(bench, cand, port, target)
    listen = f"{candidates.WORKLOAD_IP}:{port}"
    return [
        sys.executable, "-m", "benchmarks.protocol_relay", "-l", listen,
        "-4", f"127.0.0.1:{target}", "-mark", str(candidates.MARK),
        "-listeners", str(cand.listeners),
    ]  # fmt: skip


_proxy_argv = candidates.Bench.argv


def main(argv: list[str] | None = None) -> int:
    everything = candidates.CANDIDATES + EXTRA
    run.CANDIDATES = everything  # type: ignore[misc]
    run.NAMES = tuple(c.name for c in everything)  # type: ignore[misc]
    candidates.Bench.argv = _argv  # type: ignore[method-assign]
    return run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
