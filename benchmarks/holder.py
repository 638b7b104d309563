"""Hold N idle proxied connections: ``python -m benchmarks.holder HOST PORT N``.

Opens N connections (in batches), sends one keep-alive HTTP request on each and reads the
whole response (so every hop has carried data), then prints ``{"open": n, "failed": k}``
and keeps them open, idle, until stdin closes. Runs inside the client namespace.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
BATCH = 200


def _complete(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def pending_sock(obj: object) -> socket.socket:
    assert isinstance(obj, socket.socket)
    return obj


def open_batch(
    host: str, port: int, n: int, timeout: float, why: dict[str, int]
) -> tuple[list[socket.socket], int]:
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, bytes] = {}
    for _ in range(n):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, port))
        pending[sock] = b""
        sel.register(sock, selectors.EVENT_WRITE)
    done: list[socket.socket] = []
    failed = 0
    sent: set[socket.socket] = set()
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ev in sel.select(0.2):
            sock = pending_sock(key.fileobj)
            try:
                if sock not in sent:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, "connect")  # noqa: TRY301 - one handler per socket
                    sock.send(REQUEST)
                    sent.add(sock)
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                chunk = sock.recv(65536)
                if not chunk:
                    raise EOFError("closed before the response")  # noqa: TRY301
                pending[sock] += chunk
                if _complete(pending[sock]):
                    sel.unregister(sock)
                    del pending[sock]
                    done.append(sock)
            except (OSError, EOFError) as exc:
                key_ = type(exc).__name__ + (
                    f" errno {exc.errno}" if isinstance(exc, OSError) else ""
                )
                why[key_] = why.get(key_, 0) + 1
                sel.unregister(sock)
                del pending[sock]
                sock.close()
                failed += 1
    for sock in pending:
        sock.close()
        failed += 1
        why["timeout"] = why.get("timeout", 0) + 1
    sel.close()
    return done, failed


def main(argv: list[str]) -> int:
    host, port, count = argv[0], int(argv[1]), int(argv[2])
    conns: list[socket.socket] = []
    failed = 0
    why: dict[str, int] = {}
    while len(conns) + failed < count:
        got, bad = open_batch(host, port, min(BATCH, count - len(conns) - failed), 20, why)
        conns += got
        failed += bad
    sys.stdout.write(json.dumps({"open": len(conns), "failed": failed, "why": why}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the runner closes our stdin
    for sock in conns:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
