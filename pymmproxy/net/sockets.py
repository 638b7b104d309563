"""Listening sockets and the transparent upstream socket.

The upstream socket is what makes the service see the real client: ``IP_TRANSPARENT``
(``IPV6_TRANSPARENT``) lets it bind an address this host does not own, ``SO_MARK`` tags its
packets so the pathway's ``ip rule fwmark M lookup M`` routes the replies back to us.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import socket
from _socket import socket as RawSocket  # noqa: N812 - the C type: no Python-level __init__/close
from collections.abc import Iterable

from pymmproxy.errors import PymmproxyError, UpstreamError
from pymmproxy.settings import Endpoint

SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = socket.IPPROTO_IPV6
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
SO_MARK = getattr(socket, "SO_MARK", 36)
_CONNECT_OK = frozenset({0, errno.EINPROGRESS})


def c_int(value: int) -> int:
    """``value`` (0..2^32-1, e.g. a fwmark) as the C ``int`` that ``setsockopt`` passes: the
    kernel reads the same 32 bits as unsigned."""
    return value - (1 << 32) if value >= 1 << 31 else value


def raise_nofile_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard one, as Go programs do at start: a relayed
    TCP connection holds two descriptors (four more while splicing), a UDP client one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):  # e.g. an unlimited hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def check_spoofing(marks: Iterable[int]) -> None:
    """Fail at start, with one line, if this process may not bind client addresses
    (``IP_TRANSPARENT``) or set ``marks`` (``SO_MARK``), instead of failing every connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            for mark in set(marks) - {0}:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, c_int(mark))
        except PermissionError:
            raise PymmproxyError(
                "cannot spoof client addresses: IP_TRANSPARENT and SO_MARK need CAP_NET_ADMIN "
                "(run as root, or grant it: the systemd units do; docker run --cap-add NET_ADMIN)"
            ) from None


def listen_family(endpoint: Endpoint, kind: socket.SocketKind) -> tuple[socket.socket, str]:
    """An unbound socket for ``endpoint`` and the host to bind: ``[::]`` falls back to
    ``0.0.0.0`` where the kernel has no IPv6 (``EAFNOSUPPORT``); other errors raise."""
    family = socket.AF_INET6 if endpoint.is_v6 else socket.AF_INET
    try:
        return socket.socket(family, kind), endpoint.host
    except OSError as exc:
        if endpoint.host != "::" or exc.errno != errno.EAFNOSUPPORT:
            raise
    return socket.socket(socket.AF_INET, kind), "0.0.0.0"


def listen_socket(
    endpoint: Endpoint,
    *,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    reuse_port: bool = False,
    transparent: bool = False,
    backlog: int = 4096,
    keepalive: int = 0,
) -> socket.socket:
    """Bind (and for TCP, listen on) ``endpoint``; ``[::]`` is dual-stack, and IPv4 alone
    on a host without IPv6 (as Go listens on a wildcard).

    Raises :class:`PymmproxyError` with a one-line reason (address in use, not local, ...).
    """
    try:
        sock, host = listen_family(endpoint, kind)
    except OSError as exc:
        raise PymmproxyError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None
    family = sock.family
    try:
        if kind == socket.SOCK_STREAM:  # past TIME_WAIT; for UDP it would let a second
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # socket share the port
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 0)
        if transparent:
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, endpoint.port))
        if kind == socket.SOCK_STREAM:
            if keepalive:  # before listen(): the first accepted sockets inherit it too
                keep_alive(sock, keepalive)
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise PymmproxyError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None
    return sock


def upstream_socket(
    family: socket.AddressFamily,
    target: tuple[str, int],
    source: tuple[str, int] | None,
    mark: int,
    kind: socket.SocketKind = socket.SOCK_STREAM,
) -> RawSocket:
    """:func:`connect_upstream` without the connect state (UDP connects at once)."""
    return connect_upstream(family, target, source, mark, kind=kind)[0]


def keep_alive(sock: socket.socket | RawSocket, seconds: int) -> None:
    """TCP keepalive: a probe after ``seconds`` without traffic, then every ``seconds``
    (the kernel's count, 9 by default, ends the connection); on a listening socket the
    accepted ones inherit it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, seconds)


def connect_upstream(
    family: socket.AddressFamily,
    target: tuple[str, int],
    source: tuple[str, int] | None,
    mark: int,
    *,
    keepalive: int = 0,
    kind: socket.SocketKind = socket.SOCK_STREAM,
) -> tuple[RawSocket, bool]:
    """A non-blocking socket bound to ``source`` (spoofed), connecting to ``target``.

    Returns the socket and whether ``connect()`` already completed (on loopback the
    handshake usually finishes inside the call); otherwise it is in progress
    (``EINPROGRESS``) and the caller waits for writability. ``source=None`` means no
    spoofing (health checks): the kernel picks our own address. If the client's port is
    taken, the bind falls back to port 0 (any port, same address). Raises
    :class:`UpstreamError` with a one-line reason.
    """
    try:
        sock = RawSocket(family, kind | socket.SOCK_NONBLOCK)  # EMFILE, ENOBUFS ...
    except OSError as exc:
        raise UpstreamError(*_describe(exc, source, target)) from None
    try:
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, c_int(mark))
        if kind == socket.SOCK_STREAM:  # like the client side (uvloop) and go-mmproxy: no Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if keepalive:
                keep_alive(sock, keepalive)
        if source is not None:
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            try:
                sock.bind(source)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                sock.bind((source[0], 0))
        err = sock.connect_ex(target)
        if err not in _CONNECT_OK:
            raise OSError(err, _strerror(err))  # noqa: TRY301 - one handler for all set-up errors
        if err:
            # To a nearby target the handshake has usually finished by the time connect()
            # returns (the SYN-ACK waits in the socket's backlog until the call releases
            # it), yet a non-blocking connect() reports EINPROGRESS anyway. Asking again
            # costs one syscall and returns 0 if so, which saves waiting for writability
            # (an event-loop round trip and several epoll_ctl calls). EALREADY: still
            # connecting, left to that normal path. An error (e.g. ECONNREFUSED) is
            # consumed by this call, so it is raised here.
            err = sock.connect_ex(target)
            if err and err != errno.EALREADY:
                raise OSError(err, _strerror(err))  # noqa: TRY301
    except OSError as exc:
        sock.close()
        raise UpstreamError(*_describe(exc, source, target)) from None
    return sock, err == 0


def _strerror(err: int) -> str:
    import os  # noqa: PLC0415 - only on the error path

    return os.strerror(err)


def _describe(
    exc: OSError, source: tuple[str, int] | None, target: tuple[str, int]
) -> tuple[str, str]:
    """A one-line message and a stable reason for a failed upstream set-up."""
    if exc.errno == errno.EPERM and source is not None:
        return (
            f"cannot spoof {source[0]}: {exc.strerror} "
            "(need CAP_NET_ADMIN for IP_TRANSPARENT/SO_MARK, or root)"
        ), "spoof_denied"
    if exc.errno in {errno.EADDRNOTAVAIL, errno.EINVAL} and source is not None:
        return f"cannot bind {source[0]}:{source[1]}: {exc.strerror}", "bind_failed"
    if exc.errno in {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}:
        return f"no socket for the target: {exc.strerror}", "out_of_resources"
    reason = "target_refused" if exc.errno == errno.ECONNREFUSED else "upstream_error"
    return f"connect to {target[0]}:{target[1]} failed: {exc.strerror or exc}", reason
