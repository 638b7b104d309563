"""Client side of lab requests: ``python -m pymmproxy.lab.client`` (run inside the client ns).

Reads a JSON list of jobs on stdin, runs them one after another, prints a JSON list of
results. A job binds ``src`` (and ``sport``, 0 = any) and connects to ``dst``:``port``::

    {"src": "192.0.2.10", "sport": 40001, "dst": "192.0.2.1", "port": 80,
     "send": "GET / HTTP/1.0\\r\\n\\r\\n",    # text to send, or
     "send_random": [10485760, 7],           # n bytes of pattern(n, seed)
     "shutdown": true,                       # shutdown(SHUT_WR) after sending
     "recv_first": false,                    # read to EOF before sending
     "recv_bytes": 0,                        # >0: stop reading after that many bytes
     "timeout": 10}

A result has ``connected``, ``error``, ``received`` (bytes), ``sha256``, ``text`` (first 4 KiB),
``end`` (``eof`` | ``limit`` | ``reset`` | ``timeout``), ``sport`` and ``elapsed``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from typing import Any

from pymmproxy.lab.services import pattern

KEEP_TEXT = 4096


def _sender(sock: socket.socket, data: bytes, shutdown: bool, errors: list[str]) -> None:
    try:
        sock.sendall(data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        errors.append(f"send: {type(exc).__name__}: {exc}")


def _receive(sock: socket.socket, res: dict[str, Any], limit: int = 0) -> None:
    digest, count, head = hashlib.sha256(), 0, b""
    end = "eof"
    try:
        while data := sock.recv(1 << 16):
            digest.update(data)
            count += len(data)
            if len(head) < KEEP_TEXT:
                head += data[: KEEP_TEXT - len(head)]
            if limit and count >= limit:
                end = "limit"
                break
    except TimeoutError:
        end = "timeout"
    except OSError as exc:
        end = "reset"
        res["error"] = res["error"] or f"recv: {type(exc).__name__}: {exc}"
    res.update(
        received=count, sha256=digest.hexdigest(), text=head.decode(errors="replace"), end=end
    )


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one connection described by ``job`` (see the module docstring)."""
    family = socket.AF_INET6 if ":" in job["dst"] else socket.AF_INET
    res: dict[str, Any] = {
        "connected": False,
        "error": None,
        "received": 0,
        "sha256": "",
        "text": "",
        "end": "",
        "sport": 0,
    }
    start = time.monotonic()
    if "send_random" in job:
        data = pattern(*job["send_random"])
    else:
        data = str(job.get("send", "")).encode()
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(float(job.get("timeout", 10)))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((job.get("src", ""), int(job.get("sport", 0))))
            sock.connect((job["dst"], int(job["port"])))
        except OSError as exc:
            res["error"] = f"connect: {type(exc).__name__}: {exc}"
            res["elapsed"] = time.monotonic() - start
            return res
        res["connected"], res["sport"] = True, sock.getsockname()[1]
        errors: list[str] = []
        if job.get("recv_first"):
            _receive(sock, res, int(job.get("recv_bytes", 0)))
            _sender(sock, data, bool(job.get("shutdown", True)), errors)
        else:
            sender = threading.Thread(
                target=_sender, args=(sock, data, bool(job.get("shutdown")), errors)
            )
            sender.start()
            _receive(sock, res, int(job.get("recv_bytes", 0)))
            sender.join(float(job.get("timeout", 10)))
        if errors and not res["error"]:
            res["error"] = errors[0]
    res["elapsed"] = round(time.monotonic() - start, 4)
    return res


def main() -> int:
    jobs = json.load(sys.stdin)
    print(json.dumps([run_job(job) for job in jobs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
