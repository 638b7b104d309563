"""UDP test tools: PROXY v2 DGRAM datagrams, an echo target that reports who it saw, a load
generator. Usable in-process (sockets made by the caller, e.g. inside a namespace) or as
``python -m tests.integration.udp_tools echo|load ...`` for benchmarks.

The echo answers ``b"SEEN <ip> <port>|" + payload`` (``--raw``: the payload unchanged), so a
test can check the source address the target saw from the reply alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import socket
import struct
import sys
import threading
import time
from array import array
from collections.abc import Callable, Sequence

from pymmproxy.proxyproto import Command, Family, Header, Transport, encode_v2

SEEN = b"SEEN "
_PROBE = struct.Struct("!Qd")  # sequence number, send time (load generator payload)


def dgram(src: str, sport: int, payload: bytes, dst: str = "192.0.2.1", dport: int = 9) -> bytes:
    """``payload`` behind a PROXY v2 PROXY/DGRAM header for client ``src:sport``."""
    v6 = ":" in src
    if v6 and ":" not in dst:
        dst = "2001:db8::1"
    fam = Family.INET6 if v6 else Family.INET
    return (
        encode_v2(Header(2, Command.PROXY, fam, Transport.DGRAM, src, sport, dst, dport)) + payload
    )


def local_dgram(payload: bytes) -> bytes:
    """``payload`` behind a PROXY v2 LOCAL header."""
    hdr = Header(2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, None, None, None, None)
    return encode_v2(hdr) + payload


def parse_seen(reply: bytes) -> tuple[str, int, bytes]:
    """``(ip, port, payload)`` from a tagged echo reply."""
    assert reply.startswith(SEEN), reply[:40]
    head, _, payload = reply.partition(b"|")
    ip, port = head[len(SEEN) :].decode().rsplit(" ", 1)
    return ip, int(port), payload


class UdpEcho:
    """Echo on the given bound sockets in a daemon thread; records every source it saw."""

    def __init__(self, socks: Sequence[socket.socket], *, raw: bool = False) -> None:
        self.socks = list(socks)
        self.raw = raw
        self.seen: list[tuple[str, int, bytes]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> UdpEcho:
        for s in self.socks:
            s.setblocking(False)
        self._thread.start()
        return self

    def sources(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(ip, port) for ip, port, _ in self.seen}

    def send_to(self, client: tuple[str, int], payload: bytes) -> None:
        """An unsolicited datagram from the target to ``client`` (tests the reply path)."""
        v6 = ":" in client[0]
        for s in self.socks:
            if (s.family == socket.AF_INET6) == v6:
                s.sendto(payload, client)
                return
        raise AssertionError(f"no echo socket of the family of {client}")

    def stop(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        for s in self.socks:
            s.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for s in self.socks:
            sel.register(s, selectors.EVENT_READ)
        while not self._stop:
            for key, _ in sel.select(timeout=0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                serve_ready(sock, raw=self.raw, record=self._record)
        sel.close()

    def _record(self, ip: str, port: int, payload: bytes) -> None:
        with self._lock:
            self.seen.append((ip, port, payload))


def serve_ready(
    sock: socket.socket, *, raw: bool, record: Callable[[str, int, bytes], None] | None = None
) -> None:
    """Answer every datagram queued on the non-blocking ``sock``."""
    while True:
        try:
            data, addr = sock.recvfrom(65535)
        except BlockingIOError:
            return
        except OSError:  # ICMP errors from earlier unsolicited sends
            continue
        if record is not None:
            record(addr[0], addr[1], data)
        reply = data if raw else b"%s%s %d|%s" % (SEEN, addr[0].encode(), addr[1], data)
        with contextlib.suppress(OSError):
            sock.sendto(reply, addr)


def bind_udp(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind((host, port))
    return s


def run_load(
    proxy: tuple[str, int],
    bind: str,
    *,
    clients: int,
    window: int,
    duration: float,
    client_base: str = "203.0.113.",
    sport: int = 20000,
    payload_size: int = 64,
    warmup: float = 0.0,
) -> dict[str, float]:
    """Closed-loop load: ``window`` datagrams in flight from ``clients`` spoofed clients.

    Returns replies per second and RTT percentiles (ms), counted after ``warmup`` seconds of
    the same traffic on the same socket (go-mmproxy answers the LB address that opened a
    flow, so a flow must not outlive the LB socket that created it). A datagram lost in a
    full queue is replaced after 50 ms of silence, so loss lowers throughput, not stalls it.
    """
    sock = bind_udp(bind, 0)
    sock.settimeout(0.05)
    v6 = ":" in bind
    heads = []
    for i in range(clients):
        src = f"2001:db8:1::{i + 1:x}" if v6 else f"{client_base}{i % 250 + 1}"
        heads.append(dgram(src, sport + i // 250, b""))
    pad = b"x" * max(0, payload_size - _PROBE.size)
    rtts = array("d")
    seq = received = lost = total = 0
    send, recv, now = sock.sendto, sock.recv, time.perf_counter

    def fire() -> None:
        nonlocal seq
        send(heads[seq % clients] + _PROBE.pack(seq, now()) + pad, proxy)
        seq += 1

    for _ in range(window):
        fire()
    start = now()
    if warmup > 0:
        start += warmup
        rtts = array("d")  # replaced below once the warm-up is over
    end = start + duration
    measuring = warmup <= 0
    while True:
        try:
            data = recv(65535)
        except TimeoutError:
            lost += window  # refill the window
            for _ in range(window):
                fire()
            if now() >= end:
                break
            continue
        t = now()
        if not measuring and t >= start:
            measuring = True
            rtts, received, lost = array("d"), 0, 0
        rtts.append(t - _PROBE.unpack_from(data)[1])
        received += 1
        total += 1
        if t >= end:
            break
        fire()
    elapsed = now() - start
    sock.close()
    ordered = sorted(rtts)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else 0.0

    return {
        "received": received,
        "total_replies": total,  # warm-up included
        "timeouts": lost,
        "elapsed": elapsed,
        "dgrams_per_s": received / elapsed if elapsed else 0.0,
        "rtt_p50_ms": pct(0.50),
        "rtt_p99_ms": pct(0.99),
    }


def wait_relaying(proxy: tuple[str, int], bind: str, timeout: float) -> bool:
    """Send probes from fresh spoofed clients until one is answered (True) or time is up."""
    with bind_udp(bind, 0) as sock:
        sock.settimeout(0.2)
        deadline = time.monotonic() + timeout
        port = 60000
        while time.monotonic() < deadline:
            src = "2001:db8:1::fe" if ":" in bind else "192.0.2.254"
            sock.sendto(dgram(src, port, b"probe"), proxy)
            port += 1
            try:
                sock.recv(65535)
            except TimeoutError:
                continue
            return True
    return False


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="udp_tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    echo = sub.add_parser("echo")
    echo.add_argument("--listen", action="append", required=True, metavar="HOST:PORT")
    echo.add_argument("--raw", action="store_true")
    load = sub.add_parser("load")
    load.add_argument("--proxy", required=True, metavar="HOST:PORT")
    load.add_argument("--bind", required=True)
    load.add_argument("--clients", type=int, default=64)
    load.add_argument("--window", type=int, default=32)
    load.add_argument("--duration", type=float, default=3.0)
    load.add_argument("--sport", type=int, default=20000, help="first client source port")
    load.add_argument("--warmup", type=float, default=0.0, metavar="SECONDS")
    probe = sub.add_parser("probe", help="wait until the proxy relays a datagram")
    probe.add_argument("--proxy", required=True, metavar="HOST:PORT")
    probe.add_argument("--bind", required=True)
    probe.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.cmd == "probe":
        return 0 if wait_relaying(_hostport(args.proxy), args.bind, args.timeout) else 1
    if args.cmd == "echo":
        socks = [bind_udp(*_hostport(text)) for text in args.listen]
        for s in socks:
            s.setblocking(False)
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        print("ready", flush=True)
        while True:
            for key, _ in sel.select():
                serve_ready(key.fileobj, raw=args.raw)  # type: ignore[arg-type]
    result = run_load(
        _hostport(args.proxy),
        args.bind,
        clients=args.clients,
        window=args.window,
        duration=args.duration,
        sport=args.sport,
        warmup=args.warmup,
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
