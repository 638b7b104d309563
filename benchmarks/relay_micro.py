"""The relay's Python cost per event, without the kernel: ``python -m benchmarks.relay_micro``.

Drives :meth:`Channel.on_event` of a relaying :class:`ClientSide` / ``Upstream`` pair whose
sockets are stand-ins made of C builtins (``recv`` = ``dict.get`` returning 100 bytes,
``send`` = ``operator.length_hint`` returning the length), so what is timed is the
interpreter's work per relayed read: the part a faster datapath in Python can change.

It times the classes as shipped (each subclass with its own copy of the inherited methods,
see ``Channel.__init_subclass__``) against subclasses that share ``Channel``'s functions,
interleaved in one process, best of several rounds.
"""

from __future__ import annotations

import operator
import sys
import time
import types
from types import SimpleNamespace
from typing import Any

from pymmproxy.net.channel import READ_SIZE, Channel, ClientSide
from pymmproxy.net.reactor import IN
from pymmproxy.net.upstream import Upstream

PAYLOAD = b"x" * 100


def _shared(cls: type) -> type:
    """``cls`` with ``Channel``'s own function objects where it has copies of them (what
    plain inheritance gives); its overrides stay."""
    names = {
        n: v
        for n, v in vars(Channel).items()
        if isinstance(v, types.FunctionType) and getattr(cls, n).__qualname__ == v.__qualname__
    }
    return type(f"Shared{cls.__name__}", (cls,), {"__slots__": (), **names})


def _pair(client_cls: type, upstream_cls: type) -> tuple[Any, Any]:
    def sock() -> SimpleNamespace:
        return SimpleNamespace(recv={READ_SIZE: PAYLOAD}.get, send=operator.length_hint)

    client, upstream = client_cls(sock(), None, None), upstream_cls(sock(), None, None)
    for side in (client, upstream):
        side.reading, side.mask = True, IN
    client.peer, upstream.peer = upstream, client
    return client, upstream


def ns_per_event(client: Any, upstream: Any, events: int) -> float:  # noqa: ANN401
    """Nanoseconds per ``on_event`` (alternating sides, as a request/response does)."""
    start = time.perf_counter()
    for _ in range(events // 2):
        client.on_event(IN)
        upstream.on_event(IN)
    return (time.perf_counter() - start) / events * 1e9


def main(argv: list[str] | None = None) -> int:
    rounds = int((argv or sys.argv[1:] or ["7"])[0])
    variants = {
        "own copies (shipped)": _pair(ClientSide, Upstream),
        "shared functions": _pair(_shared(ClientSide), _shared(Upstream)),
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, (client, upstream) in variants.items():
            best[name] = min(best[name], ns_per_event(client, upstream, 400_000))
    for name, ns in best.items():
        print(f"{name:22s} {ns:6.0f} ns per relayed read")
    shipped, shared = best.values()
    print(f"shipped / shared: {shipped / shared:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
