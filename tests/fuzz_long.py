"""Long fuzz of the whole per-connection header path (not collected by pytest).

    .venv/bin/python -m tests.fuzz_long [COUNT] [SEED]

Feeds COUNT (default 1,000,000) generated inputs -- random bytes, mutated v1/v2 headers
(from ``tests.unit.proxyproto.fuzz_long``) and valid headers with sources the proxy must not
spoof -- into a real :class:`ClientProtocol` with fake transports, split at random points,
sometimes followed by EOF. Checks: no exception escapes the protocol, every connection ends
with the pending-header count and the open-connection set back to zero, and (for a sample)
the outcome does not depend on how the bytes were split. The only sockets are fakes: the
upstream socket and its driver are stubbed (no packet is ever sent). Exit status 1 if
anything failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import sys
import time
from collections import Counter

import structlog

from pymmproxy.proxyproto import encode_v1, encode_v2
from pymmproxy.server import tcp
from pymmproxy.server.context import InstanceContext
from pymmproxy.settings import Endpoint, InstanceSettings
from tests.unit.proxyproto.fuzz_long import generate, random_header

UNSAFE = ("127.0.0.1", "0.0.0.0", "224.0.0.5", "169.254.1.1", "255.255.255.255", "192.0.2.9",
          "::1", "::", "ff02::1", "fe80::1", "::ffff:127.0.0.1", "2001:db8::9")  # fmt: skip


class FakeTimer:
    def cancel(self) -> None:
        return None


class FakeLoop:
    """Just what the header path touches: timers (and a count of upstream connects)."""

    def __init__(self) -> None:
        self.connects = 0

    def call_later(self, _delay: float, _cb: object, *_args: object) -> FakeTimer:
        return FakeTimer()


class FakeUpstream:
    """Stands in for :class:`pymmproxy.net.upstream.Upstream`: stays "connecting"."""

    def __init__(self, _sock: object, reactor: FakeLoop, _client: object) -> None:
        reactor.connects += 1
        self.closed = False

    def start(self, *, connected: bool) -> None:
        del connected

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True

    close = abort


class FakeTransport:
    def __init__(self) -> None:
        self.closing = False
        self.closed = False  # (a Channel's: set at teardown; an abort here only marks closing)
        self.count = 0  # bytes its channel would have relayed

    def get_extra_info(self, name: str) -> object:
        return ("198.51.100.2", 40000) if name == "peername" else None

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    close = abort

    def pause_reading(self) -> None:
        return None

    resume_reading = pause_reading


def unsafe_header(rng: random.Random) -> bytes:
    src = rng.choice(UNSAFE)
    v6 = ":" in src
    base = random_header(rng)
    from pymmproxy.proxyproto import Family  # noqa: PLC0415

    header = dataclasses.replace(
        base, command=1, family=Family.INET6 if v6 else Family.INET, transport=1,
        src_addr=src, src_port=rng.randrange(65536),
        dst_addr="2001:db8::1" if v6 else "192.0.2.1", dst_port=443,
    )  # fmt: skip
    if rng.random() < 0.3:
        return encode_v1(dataclasses.replace(header, version=1, tlvs=()))
    return encode_v2(header)


def run_one(ctx: InstanceContext, data: bytes, cuts: list[int], eof: bool) -> tuple[str, int]:
    loop: FakeLoop = ctx.loop  # type: ignore[assignment]
    before = loop.connects
    proto = tcp.ClientProtocol(ctx)
    proto.connection_made(FakeTransport())  # type: ignore[arg-type]
    start = 0
    for cut in [*cuts, len(data)]:
        if proto.state == 3 or start >= len(data):  # closed, or nothing left
            break
        if cut > start:
            proto.data_received(data[start:cut])
            start = cut
    if eof and proto.state != 3:
        proto.eof_received()
    outcome = proto.reason if proto.state == 3 else proto.state_name
    proto.connection_lost(None)
    if ctx.stats.pending_headers != 0 or ctx.conns:
        raise AssertionError("pending header count or connection set leaked")
    return outcome, loop.connects - before


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 20240607
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    tcp.connect_upstream = lambda *_a, **_k: (object(), False)  # type: ignore[assignment]
    tcp.Upstream = FakeUpstream  # type: ignore[assignment, misc]
    settings = InstanceSettings(Endpoint("192.0.2.9", 8443), Endpoint("127.0.0.1", 80),
                                Endpoint("::1", 80), mark=1)  # fmt: skip
    loop = asyncio.new_event_loop()
    ctx = InstanceContext(settings, loop)
    ctx.loop = FakeLoop()  # type: ignore[assignment]
    ctx._reactor = ctx.loop  # type: ignore[assignment]  # FakeUpstream counts connects on it
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    failures = 0
    start = time.perf_counter()
    for i in range(count):
        data = unsafe_header(rng) if rng.random() < 0.1 else generate(rng)
        cuts = sorted(rng.sample(range(1, len(data)), max(0, min(len(data) - 1, rng.randrange(4)))))
        eof = rng.random() < 0.5
        try:
            outcome, connects = run_one(ctx, data, cuts, eof)
            outcomes[outcome.partition(":")[0] if connects == 0 else "relay"] += 1
            if i % 20 == 0 and run_one(ctx, data, [], eof) != (outcome, connects):
                failures += 1
                print(f"SPLIT-DEPENDENT #{i}: {outcome} vs whole: {data!r} cuts {cuts}")
        except Exception as exc:  # noqa: BLE001 - reporting them is the point
            failures += 1
            print(f"FAIL #{i}: {type(exc).__name__}: {exc}: {data!r} cuts {cuts} eof {eof}")
            ctx.stats.pending_headers = 0
            ctx.conns.clear()
    elapsed = time.perf_counter() - start
    loop.close()
    print(f"{count} inputs through ClientProtocol in {elapsed:.1f} s "
          f"({count / elapsed:,.0f}/s), seed {seed}")  # fmt: skip
    print("outcomes:", dict(outcomes.most_common()))
    print("header errors by kind:", dict(ctx.stats.header_errors.most_common()))
    print("sources refused:", dict(ctx.stats.sources_refused.most_common()))
    print(f"exceptions, leaks or split-dependent outcomes: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
