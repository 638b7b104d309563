"""Small shared helpers of the TCP relay: log formatting of endpoints, failure reasons.

The relay itself is :class:`pymmproxy.server.tcp.ClientProtocol` (the PROXY header and
the connection's life) over two :class:`pymmproxy.net.channel.Channel` objects, the load
balancer's socket and the transparent upstream socket, both in the instance's
:class:`pymmproxy.net.reactor.Reactor`. Once connected, each channel hands what it reads
straight to the other. Backpressure: a side whose unsent bytes pass its high-water mark
pauses the other side's reading. Half-close: EOF on one side becomes ``shutdown(SHUT_WR)``
on the other; when both directions are done the pair closes (``close()`` sends the last
FIN itself), or at once (abort) when either side fails.
"""

from __future__ import annotations

from typing import Any


def endpoint(addr: Any) -> str | None:  # noqa: ANN401 - a sockaddr tuple, or None
    """``host:port`` / ``[v6]:port`` for logs (``None`` stays ``None``); an IPv4 peer of a
    dual-stack socket (``::ffff:192.0.2.1``) is written as the IPv4 address it is."""
    if not addr:
        return None
    if not isinstance(addr, tuple) or len(addr) < 2:
        return str(addr)
    host, port = addr[0], addr[1]
    if ":" not in host:
        return f"{host}:{port}"
    if host.startswith("::ffff:") and "." in host:
        return f"{host[7:]}:{port}"
    return f"[{host}]:{port}"


def os_reason(exc: Exception, *, before_data: bool) -> str:
    """The ``reason`` of a connection that ended with ``exc`` from the kernel."""
    if isinstance(exc, ConnectionRefusedError):
        return "target_refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "target_error" if before_data else "io_error"
