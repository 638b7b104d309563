"""One side of a relayed TCP connection: a non-blocking socket in the instance's reactor.

:class:`Channel` holds what both sides share: read on readiness and hand the bytes on, a
write buffer that exists only while the kernel refuses data, backpressure (past
``HIGH_WATER`` unsent bytes the *other* side stops reading, below ``LOW_WATER`` it
resumes), half-close (``write_eof`` = ``shutdown(SHUT_WR)`` once the buffer is empty) and
closing (after a flush, or at once with ``abort``). It offers the part of the
``asyncio.Transport`` API the relay uses, so the client protocol reads like any asyncio
protocol. Subclasses say where the events go:

- :class:`ClientSide`: the load balancer's connection, reporting to an
  ``asyncio.Protocol`` (``data_received``, ``eof_received``, ``pause_writing`` ...; the
  final ``connection_lost`` is deferred with ``call_soon``, as asyncio does);
- :class:`pymmproxy.net.upstream.Upstream`: the transparent socket to the target.

Errors and hang-ups are acted on from what ``recv``/``send``/``SO_ERROR`` return, never
from the event bits alone, so a stale event for a reused descriptor does no harm.

The sockets are edge-triggered (``EPOLLET``): an event comes when something *new* happens
(bytes or a FIN arrive, send space frees up, ``epoll_ctl`` re-arms a changed mask), so a
read must leave nothing behind that no new event will announce. Hence the read loop in
:meth:`Channel.on_event`: it reads again after a full ``READ_SIZE`` read, and when the
event says the peer has shut down (``EPOLLRDHUP``/``EPOLLHUP``/``EPOLLERR``, reported as
of the moment of the poll) or sent urgent data (``EPOLLPRI``: a read stops short at the
urgent mark) until ``recv`` says ``EAGAIN``, returns the EOF or fails. Anything arriving after
the poll is a new event. Pausing reading drops ``IN`` from the mask and resuming adds it
back; that ``EPOLL_CTL_MOD`` reports bytes that came in between.

Bulk flows are spliced: once a read fills ``READ_SIZE`` (and the other side has nothing
queued), that direction moves its bytes with ``splice(2)`` into a pipe held by the writing
side and from there into its socket, without copying them through user space. The pipe is
that side's send buffer: while it holds bytes, the reading side is paused, and the EOF,
``close`` and ``write_eof`` wait for it like they wait for queued bytes. Connections that
never fill a read (requests and answers of a few KB) never get a pipe. Either way one event
reads at most ``READ_ROUNDS`` times; a flow with more to come is re-armed (``EPOLL_CTL_MOD``
reports it again) and waits for its next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import resource
import select
import socket
import struct
import types
from _socket import socket as RawSocket  # noqa: N812 - the C socket: no Python-level __init__/close
from typing import Any, cast

from pymmproxy.net.reactor import ERR_HUP, ET, IN, OUT, RDHUP, Reactor

READ_SIZE = 256 * 1024
# recv(READ_SIZE) allocates READ_SIZE bytes and shrinks them to what came. glibc serves
# blocks above its mmap threshold (128 KiB at start) with mmap/mremap/munmap, and raises
# the threshold once such a block is freed: freeing one larger block here keeps every later
# recv on the heap (measured on a fresh interpreter: 20 µs -> 3.5 µs per small recv).
bytearray(2 * READ_SIZE)
# Every recv/send says MSG_DONTWAIT, so an accepted socket needs no O_NONBLOCK (Python's
# accept() cannot ask for it, and setting it is one more syscall per connection).
DONTWAIT = socket.MSG_DONTWAIT
HIGH_WATER = 256 * 1024  # pause the other side's reading above this much unsent data
LOW_WATER = 64 * 1024
PIPE_SIZE = 1 << 20  # iperf3 probes against recv/send: 64 KiB pipe 0.94x, 1 MiB 1.04-1.06x
SPLICE_SIZE = 1 << 20  # per splice(2) call; the pipe's capacity bounds it
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
FLUSH_TIMEOUT = 30.0  # s: a close still sending gives up (abort) after this long without progress
READ_ROUNDS = 16  # reads (or splices) per event at most, so one bulk flow cannot hog a dispatch
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
NO_SPLICE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}  # this socket type cannot splice
PRI = select.EPOLLPRI  # urgent (out-of-band) data came: reads stop short at its mark
READ = IN | RDHUP | PRI  # what a reading channel watches for (with ET, and OUT while writing)
DRAIN = RDHUP | ERR_HUP | PRI  # in an event: a short read is not the end, read to EAGAIN
PIPE_SHARE = 4  # splice pipes may hold at most 1/PIPE_SHARE of the process's descriptors


class PipeBudget:
    """Descriptors held by splice pipes in this process, against their share of the limit.

    A pipe lives as long as its connection (making one per burst would cost four syscalls
    each time), so long-lived connections that once carried bulk keep theirs. Past the
    share, bulk directions copy instead, and sockets for new connections stay available.
    """

    __slots__ = ("held", "limit")

    def __init__(self) -> None:
        self.held = 0
        self.limit = -1  # read from RLIMIT_NOFILE on first use (after the daemon raised it)

    def allows(self, fds: int) -> bool:
        if self.limit < 0:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self.limit = (1 << 30) if soft == resource.RLIM_INFINITY else soft // PIPE_SHARE
        return self.held + fds <= self.limit


PIPES = PipeBudget()


def _own_code(func: types.FunctionType) -> types.FunctionType:
    """``func`` with a fresh code object (its own specialization caches)."""
    copy = types.FunctionType(
        func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
        func.__closure__,
    )  # fmt: skip
    copy.__qualname__, copy.__doc__ = func.__qualname__, func.__doc__
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


class Channel:
    """A socket of a relayed connection (see the module docstring)."""

    __slots__ = (
        "sock", "reactor", "owner", "peer", "count", "out", "mask", "reading", "writing",
        "paused_peer", "eof", "eof_pending", "connecting", "closing", "closed", "parked",
        "splicing", "pipe", "piped",
    )  # fmt: skip

    def __init__(self, sock: RawSocket, reactor: Reactor, owner: Any) -> None:  # noqa: ANN401
        self.sock = sock
        self.reactor = reactor
        self.owner = owner  # who hears of data/EOF/loss (the subclass says how)
        self.peer: Channel | None = None  # while relaying: where our bytes go, unwrapped
        self.count = 0  # bytes handed to the peer
        self.out: bytes | bytearray = b""  # a bytearray only while data is queued
        self.mask = -1  # what the reactor watches for now (-1: not registered yet)
        self.reading = False
        self.writing = False
        self.paused_peer = False  # we paused the other side's reading (our buffer is full)
        self.eof = False  # the peer sent EOF
        self.eof_pending = False  # write_eof() asked for while data is still queued
        self.connecting = False
        self.closing = False
        self.closed = False
        self.parked = False  # hung up while we watched nothing: out of the epoll set
        self.splicing = False  # our reads go to the peer's pipe with splice(2)
        self.pipe: tuple[int, int] | None = None  # (read end, write end) of our pipe buffer
        self.piped = 0  # bytes in that pipe, not yet sent on our socket

    def __init_subclass__(cls, **kwargs: Any) -> None:  # noqa: ANN401
        """Give the subclass its own copy of every method it inherits from here.

        CPython (3.11+) specializes attribute access per code object, for one class: the
        relay's methods, called alternately on a :class:`ClientSide` and an ``Upstream``,
        would keep missing that cache and take the generic path (``python -m
        benchmarks.relay_micro``: 0.73x the interpreter time per relayed read with copies).
        """
        super().__init_subclass__(**kwargs)
        for name, value in vars(Channel).items():
            # what the class inherits from Channel itself (not its own or a parent's version)
            inherited = name not in vars(cls) and getattr(cls, name) is value
            if isinstance(value, types.FunctionType) and inherited:
                setattr(cls, name, _own_code(value))

    # -- hooks for the subclasses -------------------------------------------------------
    def _got_data(self, data: bytes) -> None:
        raise NotImplementedError

    def _got_eof(self) -> None:
        raise NotImplementedError

    def _lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def _pause_peer(self) -> None:
        """Stop the side that sends us bytes from reading (see :meth:`_hold_peer`)."""
        if self.peer is not None:
            self.peer.pause_reading()

    def _resume_peer(self) -> None:
        peer = self.peer
        if peer is not None and not peer.is_closing():
            peer.resume_reading()

    # -- events ---------------------------------------------------------------------------
    def register(self) -> None:
        """Enter the reactor, watching for what ``reading``/``writing`` say."""
        self.mask = (READ if self.reading else 0) | (OUT if self.writing else 0)
        self.reactor.add(self.sock.fileno(), self.mask | ET, self)

    def on_event(self, mask: int) -> None:
        """The reactor's callback: act on readiness (the bits are a hint, see above).

        The relay's hot path: while relaying, received bytes go straight to the peer's
        ``write`` (no protocol call in between). Reads until nothing is left that no later
        event would announce (see the module docstring).
        """
        rounds = 0
        while mask & (IN | DRAIN) and self.reading:
            rounds += 1
            if rounds > READ_ROUNDS:  # a bulk flow had its share: the others' turn
                self._rearm()
                break
            if self.splicing and self._spliced(mask):
                break
            try:
                data = self.sock.recv(READ_SIZE, DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._teardown(exc)
                return
            if data:
                peer = self.peer
                if peer is not None:
                    self.count += len(data)
                    peer.write(data)
                    if len(data) == READ_SIZE:
                        self._begin_splice(peer)
                else:
                    self._got_data(data)
                if len(data) < READ_SIZE and not mask & DRAIN:
                    break  # the queue was empty: what comes next is a new event
            else:
                self._end_of_stream()
        if mask & OUT and self.writing and not self.closed:
            self._on_writable()
        if mask & ERR_HUP and not self.closed and not (self.reading or self.writing):
            self._hung_up()

    def _rearm(self) -> None:
        """Have the reactor report this socket again (edge-triggered, nothing new would)."""
        self.reactor.modify(self.sock.fileno(), self.mask | ET)

    def _hold_peer(self) -> None:
        """Our unsent bytes (queued past ``HIGH_WATER``, or in a pipe our socket will not
        take) are too many: the side that sends them stops reading until they drain."""
        if not self.paused_peer:
            self.paused_peer = True
            self._pause_peer()

    def _end_of_stream(self) -> None:
        self.eof = True
        self.reading = False
        self._got_eof()
        if not self.closed:  # the usual second EOF closes: no epoll_ctl for it
            self._watch()

    # -- splicing (see the module docstring) ----------------------------------------------
    def _begin_splice(self, peer: Channel) -> None:
        """A full read: a bulk flow. Splice it from now on, if ``peer`` has nothing queued."""
        if self.splicing or peer.out or peer.closing or peer.closed:
            return
        if peer.pipe is None:
            if not PIPES.allows(2):  # pipes hold their share of descriptors: copy
                return
            try:
                pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # out of descriptors: stay with recv/send
                return
            try:
                fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:  # over the user's pipe quota: a small pipe is slower than copying
                os.close(pipe[0])
                os.close(pipe[1])
                return
            peer.pipe = pipe
            PIPES.held += 2
            self.sock.setblocking(False)  # splice(2) has no MSG_DONTWAIT for the sockets
            peer.sock.setblocking(False)
        self.splicing = True

    def _spliced(self, mask: int) -> bool:
        """Splice what the socket holds into the peer's pipe and on to the peer's socket.

        False if the caller should read with recv: this direction cannot splice (any
        more), or splicing stopped at an urgent mark (``PRI``), which only a read steps over
        (the urgent byte the kernel holds out of band is dropped, as by any read without
        ``MSG_OOB``; one that a newer urgent byte displaced arrives inline).
        """
        peer = self.peer
        if peer is None or peer.pipe is None or peer.closing:  # recv/write say what happens
            self.splicing = False
            return False
        if peer.out:  # bytes a read queued (past an urgent mark) go before any spliced ones
            return False
        pipe_in, fd = peer.pipe[1], self.sock.fileno()
        if peer.piped and not peer._drain_pipe():  # resumed before it drained: it goes first
            if not peer.closed:
                peer._hold_peer()
            return True
        for _ in range(READ_ROUNDS):
            if not self.reading:
                return True
            try:
                n = os.splice(fd, pipe_in, SPLICE_SIZE, flags=SPLICE_FLAGS)
            except BlockingIOError:  # nothing left to read (the pipe is empty here)
                return not mask & PRI
            except OSError as exc:
                if exc.errno in NO_SPLICE:  # the pipe is empty here: nothing to reorder
                    self.splicing = False
                    return False
                self._teardown(exc)
                return True
            if not n:
                if mask & PRI:  # maybe only the urgent mark, with the FIN behind it
                    return False
                self._end_of_stream()
                return True
            self.count += n
            peer.piped += n
            if not peer._drain_pipe():  # its socket is full: we wait until the pipe drains
                if not peer.closed:
                    peer._hold_peer()
                return True
        if self.reading:  # its share is used up: re-armed, it comes again
            self._rearm()
        return True

    def _drain_pipe(self) -> bool:
        """Splice our pipe into our socket; True once it is empty (else watch for OUT)."""
        pipe_out, fd = cast("tuple[int, int]", self.pipe)[0], self.sock.fileno()
        while self.piped:
            try:
                n = os.splice(pipe_out, fd, self.piped, flags=SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                self._teardown(exc)
                return False
            self.piped -= n
        if not self.piped:
            return True
        if not self.writing:
            self.writing = True
            self._watch()
        return False

    def fatal(self, exc: Exception) -> None:
        """A callback raised: report it to the loop and drop this connection."""
        self.reactor.loop.call_exception_handler(
            {"message": "error in a relayed connection", "exception": exc, "transport": self}
        )
        self._teardown(exc)

    def _hung_up(self) -> None:
        """Error or hang-up while we watch nothing: fail on an error, else stop watching."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._teardown(os_error(err))
        else:  # a hang-up comes with every later wake-up; resume_reading() re-registers
            self.parked = True
            self.reactor.park(self.sock.fileno())

    def _watch(self) -> None:
        if self.mask < 0:  # not in the reactor yet: register() will read the flags
            return
        mask = (READ if self.reading else 0) | (OUT if self.writing else 0)
        if mask != self.mask and not self.closed:
            self.mask = mask
            if self.parked:
                if mask:
                    self.parked = False
                    self.reactor.unpark(self.sock.fileno(), mask | ET)
            else:
                self.reactor.modify(self.sock.fileno(), mask | ET)

    # -- reading ----------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self._watch()

    def resume_reading(self) -> None:
        if not self.reading and not self.eof and not self.closing and not self.closed:
            self.reading = True
            self._watch()

    # -- writing ----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed or self.closing:
            return
        out = self.out
        if out:
            out += data  # a bytearray: in place
        elif self.piped:  # what the pipe holds goes first
            self.out = out = bytearray(data)
        else:
            try:
                sent = self.sock.send(data, DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._teardown(exc)
                return
            if sent == len(data):
                return
            self.out = out = bytearray(memoryview(data)[sent:])
            self.writing = True
            self._watch()
        if len(out) > HIGH_WATER:
            self._hold_peer()

    def _on_writable(self) -> None:
        if self.piped and not self._drain_pipe():
            return
        out = self.out  # a bytearray whenever it is not empty
        if out:
            try:
                sent = self.sock.send(out, DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._teardown(exc)
                return
            del cast("bytearray", out)[:sent]
        if self.paused_peer and len(out) <= LOW_WATER:
            self.paused_peer = False
            self._resume_peer()
        if out or self.closed:
            return
        self.out = b""  # drop the buffer: idle connections keep none
        self.writing = False
        if self.closing:
            self._teardown(None)
            return
        self._watch()
        if self.eof_pending:
            self.eof_pending = False
            self._shutdown_write()

    def write_eof(self) -> None:
        """``shutdown(SHUT_WR)`` once the queued bytes are sent."""
        if self.closed or self.closing:
            return
        if self.out or self.piped:
            self.eof_pending = True
        else:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._teardown(exc)

    def unsent(self) -> int:
        """Bytes queued here (buffer and pipe) that the socket has not taken yet."""
        return len(self.out) + self.piped

    # -- closing ----------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self.closing or self.closed

    def close(self) -> None:
        """Close after the queued bytes are sent (like ``Transport.close``), or abort if the
        peer takes none of them for ``FLUSH_TIMEOUT`` (it stopped reading, or vanished)."""
        if self.closed or self.closing:
            return
        self.pause_reading()
        if self.out or self.piped:
            self.closing = True
            self.reactor.loop.call_later(FLUSH_TIMEOUT, self._check_flush, self.unsent())
        else:
            self._teardown(None)

    def _check_flush(self, left: int) -> None:
        if self.closed:
            return
        now = self.unsent()  # nothing is added while closing: less means progress
        if now < left:
            self.reactor.loop.call_later(FLUSH_TIMEOUT, self._check_flush, now)
        else:
            self.abort()  # a reset: a FIN would pass the cut-off stream off as complete

    def abort(self) -> None:
        """Close now with a reset (RST), dropping anything queued."""
        if not self.closed:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self._teardown(None)

    def _teardown(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.reading = self.writing = False
        self.out = b""
        peer, self.peer = self.peer, None
        if peer is not None and peer.peer is self:
            peer.peer = None  # its bytes go through its owner again (who is told below)
        sock = self.sock
        self.reactor.forget(sock.fileno())
        sock.close()  # also takes it out of the epoll set
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe, self.piped = None, 0
            PIPES.held -= 2
        self._lost(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ANN401
        if name == "socket":
            return self.sock
        if name in ("peername", "sockname") and not self.closed:
            try:
                return self.sock.getpeername() if name == "peername" else self.sock.getsockname()
            except OSError:
                return default
        return default


class ClientSide(Channel):
    """The load balancer's connection, driving an ``asyncio.Protocol`` (its ``owner``)."""

    __slots__ = ("addr",)

    def start(self, addr: Any) -> None:  # noqa: ANN401 - the sockaddr accept() returned
        """Tell the protocol, then read: at once, since the PROXY header usually came with
        the handshake (``EAGAIN`` otherwise, and the reactor calls again when it comes)."""
        self.addr = addr  # kept: logs name the load balancer even after a reset
        self.owner.connection_made(self)
        if not self.closed and not self.closing:
            self.reading = True
            self.register()
            try:
                self.on_event(IN)
            except Exception as exc:  # noqa: BLE001 - as if the reactor had called us
                self.fatal(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ANN401
        if name == "peername":
            return self.addr
        return Channel.get_extra_info(self, name, default)

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return cast("asyncio.BaseProtocol | None", self.owner)

    def _got_data(self, data: bytes) -> None:
        self.owner.data_received(data)

    def _got_eof(self) -> None:
        if not self.owner.eof_received():
            self.close()

    def _pause_peer(self) -> None:
        if self.peer is None:
            self.owner.pause_writing()
        else:
            self.peer.pause_reading()

    def _resume_peer(self) -> None:
        if self.peer is None:
            self.owner.resume_writing()
        else:
            Channel._resume_peer(self)

    def _lost(self, exc: Exception | None) -> None:
        self.reactor.loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        protocol, self.owner = self.owner, None  # the protocol keeps us: no cycle left
        if protocol is not None:
            protocol.connection_lost(exc)


def os_error(err: int) -> OSError:
    """The ``OSError`` subclass Python raises for ``err`` (ConnectionRefusedError, ...)."""
    return OSError(err, os.strerror(err))
