"""Long-running fuzz of :func:`parse_header` (not collected by pytest).

    .venv/bin/python -m tests.unit.proxyproto.fuzz_long [COUNT] [SEED]

Feeds COUNT (default 1,000,000) inputs: a third plain random bytes (some behind a valid v1/v2
prefix), two thirds random mutations of valid v1/v2 encodings (with TLVs, CRC32C, LOCAL,
UNIX...). Any exception other than ProtocolError is printed with its input; for a sample of
inputs, whole and byte-by-byte parsing must also agree. Exit status 1 if anything failed.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections import Counter
from socket import AF_INET, AF_INET6, inet_ntop

from pymmproxy.errors import ProtocolError
from pymmproxy.proxyproto import (
    NEED_DATA,
    SIGNATURE,
    TLV,
    Command,
    Family,
    Header,
    HeaderParser,
    Transport,
    encode_v1,
    encode_v2,
    parse_header,
)

PREFIXES = (b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN ", SIGNATURE)


def random_tlv(rng: random.Random) -> TLV:
    kind = rng.randrange(6)
    if kind == 0:
        return TLV(0x01, rng.randbytes(rng.randrange(8)))
    if kind == 1:
        return TLV(0x02, b"host.example")
    if kind == 2:
        return TLV(0x05, rng.randbytes(rng.randrange(129)))
    if kind == 3:
        subs = b"\x21\x00\x07TLSv1.3\x22\x00\x02cn"
        return TLV(0x20, bytes([rng.randrange(8)]) + rng.randbytes(4) + subs)
    if kind == 4:
        return TLV(0x30, b"ns0")
    return TLV(rng.choice((0x04, 0xE0, 0xF0, 0xFF)), rng.randbytes(rng.randrange(20)))


def random_header(rng: random.Random) -> Header:
    command = Command(rng.random() < 0.85)
    family = Family(rng.choice((1, 1, 1, 2, 2, 0, 3)))
    transport = Transport(rng.choice((1, 1, 1, 2, 0)))
    src = dst = sport = dport = None
    if command == Command.PROXY and family in (Family.INET, Family.INET6):
        af, size = (AF_INET, 4) if family == Family.INET else (AF_INET6, 16)
        src, dst = inet_ntop(af, rng.randbytes(size)), inet_ntop(af, rng.randbytes(size))
        sport, dport = rng.randrange(65536), rng.randrange(65536)
    tlvs = tuple(random_tlv(rng) for _ in range(rng.choice((0, 0, 1, 2, 4))))
    return Header(2, command, family, transport, src, sport, dst, dport, tlvs)


def valid_encoding(rng: random.Random) -> bytes:
    header = random_header(rng)
    if rng.random() < 0.4:
        return encode_v1(dataclasses.replace(header, version=1, tlvs=()))
    return encode_v2(header, with_crc32c=rng.random() < 0.3)


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        op = rng.randrange(5)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and at < len(buf):
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1 and at < len(buf):
            buf[at] = rng.randrange(256)
        elif op == 2:
            buf[at:at] = rng.randbytes(rng.randrange(1, 4))
        elif op == 3:
            del buf[at : at + rng.randrange(1, 4)]
        else:
            buf = buf[:at]
    return bytes(buf)


def generate(rng: random.Random) -> bytes:
    if rng.random() < 1 / 3:
        return rng.choice(PREFIXES) + rng.randbytes(rng.randrange(120))
    return mutate(rng, valid_encoding(rng)) + rng.randbytes(rng.randrange(4))


def stepwise(data: bytes) -> tuple[object, ...]:
    parser = HeaderParser()
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        try:
            event = parser.next_event()
        except ProtocolError as exc:
            return ("error", exc.kind)
        if event is not NEED_DATA:
            parser.feed(data[i + 1 :])
            return ("header", event, parser.trailing)
    return ("need",)


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 20240601
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    failures = 0
    start = time.perf_counter()
    for i in range(count):
        data = generate(rng)
        try:
            result = parse_header(data)
        except ProtocolError as exc:
            outcomes[exc.kind] += 1
            whole: tuple[object, ...] = ("error", exc.kind)
        except Exception as exc:  # noqa: BLE001 (reporting them is the point)
            failures += 1
            print(f"FAIL #{i}: {type(exc).__name__}: {exc}: {data!r}")
            continue
        else:
            outcomes["ok" if result else "need_data"] += 1
            whole = ("need",) if result is None else ("header", result[0], data[result[1] :])
        if i % 50 == 0 and stepwise(data) != whole:
            failures += 1
            print(f"MISMATCH #{i}: whole {whole!r} vs stepwise {stepwise(data)!r}: {data!r}")
    elapsed = time.perf_counter() - start
    print(f"{count} inputs in {elapsed:.1f} s ({count / elapsed:,.0f}/s), seed {seed}")
    print("outcomes:", dict(outcomes.most_common()))
    print(f"non-ProtocolError exceptions or mismatches: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
