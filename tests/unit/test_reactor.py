"""The reactor, the relay channels and the acceptor, over AF_UNIX socket pairs (no network).

``Reactor.dispatch`` is called by hand, so every step is deterministic; the event loop
only runs for ``call_soon``/``call_later`` work (the deferred ``connection_lost``, the
accept retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
import uvloop

from pymmproxy.errors import UpstreamError
from pymmproxy.net import acceptor as acceptor_mod
from pymmproxy.net import channel as channel_mod
from pymmproxy.net import sockets
from pymmproxy.net.acceptor import Acceptor
from pymmproxy.net.channel import HIGH_WATER, Channel, ClientSide
from pymmproxy.net.reactor import IN, Reactor
from pymmproxy.net.upstream import Upstream
from pymmproxy.server import tcp


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def reactor(loop: asyncio.AbstractEventLoop) -> Iterator[Reactor]:
    reactor = Reactor(loop)
    yield reactor
    reactor.close()


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def pair(pairs: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    b.settimeout(2)
    pairs.append((a, b))
    return a, b


def spin(loop: asyncio.AbstractEventLoop) -> None:
    """Run the callbacks the loop has queued (``call_soon``)."""
    loop.run_until_complete(asyncio.sleep(0))


class Recorder(asyncio.Protocol):
    """An asyncio protocol that writes down what its transport tells it."""

    def __init__(self, *, keep_open: bool = True) -> None:
        self.events: list[tuple[str, Any]] = []
        self.keep_open = keep_open
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.events.append(("made", transport.get_extra_info("peername")))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def eof_received(self) -> bool:
        self.events.append(("eof", None))
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))


class Boom:
    """A handler whose ``on_event`` raises."""

    def __init__(self) -> None:
        self.fatal_with: Exception | None = None

    def on_event(self, mask: int) -> None:
        raise RuntimeError(f"bug on mask {mask}")

    def fatal(self, exc: Exception) -> None:
        self.fatal_with = exc

    def abort(self) -> None:
        pass


def test_a_raising_handler_does_not_stop_the_others(
    reactor: Reactor, loop: asyncio.AbstractEventLoop, pairs: list[Any]
) -> None:
    loop.set_exception_handler(lambda _loop, _ctx: None)
    bad_a, bad_b = pair(pairs)
    good_a, good_b = pair(pairs)
    boom = Boom()
    reactor.add(bad_a.fileno(), IN, boom)
    proto = Recorder()
    good = ClientSide(good_a, reactor, proto)
    good.start(("lb", 1))
    bad_b.send(b"x")
    good_b.send(b"hello")
    reactor.dispatch()
    assert isinstance(boom.fatal_with, RuntimeError)
    assert ("data", b"hello") in proto.events


def started(
    reactor: Reactor,
    pairs: list[Any],
    *,
    keep_open: bool = True,
    addr: Any = ("lb", 1),
    proto: Recorder | None = None,
) -> tuple[ClientSide, Recorder, socket.socket]:
    """A started ClientSide with a Recorder protocol, and the socket at its other end."""
    ours, theirs = pair(pairs)
    proto = proto or Recorder(keep_open=keep_open)
    chan = ClientSide(ours, reactor, proto)
    chan.start(addr)
    return chan, proto, theirs


class Plain(Channel):
    """A service-side channel that reports to no one (these tests watch the sockets)."""

    __slots__ = ()

    def _got_data(self, data: bytes) -> None:
        pass

    def _got_eof(self) -> None:
        pass

    def _lost(self, exc: Exception | None) -> None:
        pass


def relay(reactor: Reactor, pairs: list[Any]) -> tuple[ClientSide, Channel, Any, Any]:
    """A relaying pair of channels, and the load balancer's and the service's ends."""
    lb_ours, lb = pair(pairs)
    svc_ours, svc = pair(pairs)
    client = ClientSide(lb_ours, reactor, Recorder())
    client.start(("lb", 1))
    upstream = Plain(svc_ours, reactor, None)
    upstream.reading = True
    upstream.register()
    client.peer, upstream.peer = upstream, client
    return client, upstream, lb, svc


def test_peers_relay_straight_through_and_count(reactor: Reactor, pairs: list[Any]) -> None:
    client, upstream, lb, svc = relay(reactor, pairs)
    lb.send(b"GET / HTTP/1.1\r\n\r\n")
    reactor.dispatch()
    assert svc.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
    svc.send(b"HTTP/1.1 200 OK\r\n\r\n")
    reactor.dispatch()
    assert lb.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert (client.count, upstream.count) == (18, 19)
    assert [e for e, _ in client.owner.events] == ["made"]  # no protocol call while relaying


def test_a_full_buffer_pauses_the_sending_side_until_it_drains(
    reactor: Reactor, pairs: list[Any]
) -> None:
    client, upstream, lb, svc = relay(reactor, pairs)
    lb.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    for _ in range(200):  # the service reads nothing: our upstream buffer grows
        with contextlib.suppress(BlockingIOError):
            sent += lb.send(chunk)
        reactor.dispatch()
        if not client.reading:
            break
    assert not client.reading
    assert len(upstream.out) > HIGH_WATER
    got = 0
    svc.setblocking(False)
    for _ in range(2000):  # the service catches up: reading resumes, nothing is lost
        try:
            got += len(svc.recv(1 << 20))
        except BlockingIOError:
            reactor.dispatch()
        if client.reading and not upstream.out:
            break
    assert client.reading
    lb.close()
    for _ in range(2000):
        reactor.dispatch()
        try:
            data = svc.recv(1 << 20)
        except BlockingIOError:
            continue
        got += len(data)
        if got == sent:
            break
    assert got == sent


def test_a_hang_up_while_watching_nothing_is_parked_not_spun(
    reactor: Reactor, loop: asyncio.AbstractEventLoop, pairs: list[Any]
) -> None:
    chan, proto, theirs = started(reactor, pairs)
    chan.pause_reading()
    theirs.send(b"last words")
    theirs.close()
    reactor.dispatch()
    assert chan.parked
    assert reactor.ep.poll(0) == []  # out of the set: no level-triggered storm
    chan.resume_reading()
    reactor.dispatch()
    reactor.dispatch()
    assert [e for e in proto.events if e[0] != "made"] == [("data", b"last words"), ("eof", None)]


def test_bytes_and_a_fin_that_arrive_together_are_both_read(
    reactor: Reactor, pairs: list[Any]
) -> None:
    """Edge-triggered: the FIN behind the bytes announces no new event of its own."""
    chan, proto, theirs = started(reactor, pairs)
    theirs.send(b"last words")
    theirs.shutdown(socket.SHUT_WR)
    for _ in range(3):
        reactor.dispatch()
    assert [e for e in proto.events if e[0] != "made"] == [("data", b"last words"), ("eof", None)]
    assert not chan.reading


def test_more_than_one_read_size_queued_is_relayed_from_one_event(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edge-triggered: a full read may leave bytes behind that no new event announces."""
    monkeypatch.setattr(channel_mod, "READ_SIZE", 4)
    client, _upstream, lb, svc = relay(reactor, pairs)
    lb.send(b"0123456789")
    for _ in range(3):
        reactor.dispatch()
    assert svc.recv(100) == b"0123456789"
    assert client.count == 10


def test_bytes_that_arrive_while_paused_are_read_on_resume(
    reactor: Reactor, pairs: list[Any]
) -> None:
    chan, proto, theirs = started(reactor, pairs)
    chan.pause_reading()
    theirs.send(b"held")
    reactor.dispatch()
    assert [e for e in proto.events if e[0] != "made"] == []
    chan.resume_reading()  # re-arms the socket: what is queued is reported
    reactor.dispatch()
    assert [e for e in proto.events if e[0] != "made"] == [("data", b"held")]


def pump(
    reactor: Reactor, src: socket.socket, dst: socket.socket, payload: bytes, sent: int = 0
) -> bytes:
    """Send ``payload[sent:]`` into ``src`` while dispatching; collect what leaves ``dst``."""
    src.setblocking(False)
    dst.setblocking(False)
    got = bytearray()
    for _ in range(100_000):
        if sent < len(payload):
            with contextlib.suppress(BlockingIOError):
                sent += src.send(payload[sent : sent + 65536])
        reactor.dispatch()
        with contextlib.suppress(BlockingIOError):
            got += dst.recv(1 << 20)
        if len(got) == len(payload):
            break
    return bytes(got)


def send_until(
    reactor: Reactor, src: socket.socket, payload: bytes, done: Callable[[], bool]
) -> int:
    """Send ``payload`` into ``src`` while dispatching, until ``done()``; bytes sent."""
    src.setblocking(False)
    sent = 0
    for _ in range(500):
        with contextlib.suppress(BlockingIOError):
            sent += src.send(payload[sent : sent + 65536])
        reactor.dispatch()
        if done():
            break
    return sent


def test_a_bulk_flow_is_spliced_and_arrives_intact(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_mod, "READ_SIZE", 512)  # a full read marks a bulk flow
    client, upstream, lb, svc = relay(reactor, pairs)
    payload = os.urandom(3 << 20)
    assert pump(reactor, lb, svc, payload) == payload
    assert client.splicing
    assert upstream.pipe is not None
    assert client.count == len(payload)
    assert not upstream.splicing  # the other direction only splices once it fills a read


def test_a_spliced_flow_pauses_while_the_pipe_is_full_and_resumes(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_mod, "READ_SIZE", 512)
    client, upstream, lb, svc = relay(reactor, pairs)
    payload = os.urandom(8 << 20)
    # the service reads nothing: the pipe fills, the client pauses
    sent = send_until(reactor, lb, payload, lambda: not client.reading)
    assert client.splicing
    assert not client.reading
    assert upstream.piped > 0
    assert upstream.writing
    # the service catches up: nothing lost or reordered
    assert pump(reactor, lb, svc, payload, sent) == payload
    assert client.reading


def test_writes_eof_and_close_wait_for_the_pipe(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_mod, "READ_SIZE", 512)
    client, upstream, lb, svc = relay(reactor, pairs)
    payload = os.urandom(8 << 20)
    send_until(reactor, lb, payload, lambda: upstream.piped > 0)
    assert upstream.piped
    svc.setblocking(False)
    got = bytearray(svc.recv(1 << 20))  # room in the socket, but the pipe's bytes come first
    upstream.write(b"TAIL")
    upstream.write_eof()
    upstream.close()
    assert upstream.eof_pending
    assert upstream.closing
    assert not upstream.closed
    pipe = upstream.pipe
    assert pipe is not None
    for _ in range(100_000):
        reactor.dispatch()
        try:
            chunk = svc.recv(1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            break
        got += chunk
    assert upstream.closed
    assert bytes(got) == payload[: client.count] + b"TAIL"  # all of it, in order
    with pytest.raises(OSError):  # the pipe went with the socket
        os.fstat(pipe[0])


def relay_in_mode(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch, *, splicing: bool
) -> tuple[ClientSide, socket.socket, socket.socket]:
    """A relaying pair whose client side splices (after one full read) or only copies."""
    monkeypatch.setattr(channel_mod, "READ_SIZE", 512)
    client, _upstream, lb, svc = relay(reactor, pairs)
    if splicing:
        assert pump(reactor, lb, svc, b"s" * 4096) == b"s" * 4096
    else:  # full reads would switch it to splicing
        monkeypatch.setattr(ClientSide, "_begin_splice", lambda *_: None)
    assert client.splicing == splicing
    return client, lb, svc


@pytest.mark.parametrize("splicing", [False, True], ids=["recv", "splice"])
def test_bytes_behind_an_urgent_mark_are_relayed(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch, splicing: bool
) -> None:
    """A read stops short at an urgent (MSG_OOB) mark: not the end of what is queued."""
    _client, lb, svc = relay_in_mode(reactor, pairs, monkeypatch, splicing=splicing)
    svc.setblocking(False)
    lb.send(b"hello")
    lb.send(b"!", socket.MSG_OOB)
    lb.send(b"world")
    got = bytearray()
    for _ in range(5):
        reactor.dispatch()
        with contextlib.suppress(BlockingIOError):
            got += svc.recv(100)
    assert bytes(got) == b"helloworld"  # the urgent byte itself is not relayed


def test_closing_the_reactor_aborts_an_orphaned_flushing_channel(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream still flushing to a target that stopped reading, its client side gone."""
    monkeypatch.setattr(channel_mod, "READ_SIZE", 512)
    client, upstream, lb, _svc = relay(reactor, pairs)
    send_until(reactor, lb, os.urandom(8 << 20), lambda: upstream.piped > 0)
    pipe = upstream.pipe
    assert pipe is not None
    client.abort()
    upstream.close()
    assert upstream.closing
    assert not upstream.closed
    reactor.close()
    assert upstream.closed
    for fd in pipe:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_early_bytes_that_fill_the_upstream_keep_the_client_paused(
    reactor: Reactor, loop: asyncio.AbstractEventLoop, pairs: list[Any]
) -> None:
    """More than MAX_EARLY_BYTES came while connecting, and the target is slow to read."""
    lb_ours, lb = pair(pairs)
    svc_ours, svc = pair(pairs)
    stats = SimpleNamespace(relayed=0, connect_time=None)
    proto = tcp.ClientProtocol(cast("Any", SimpleNamespace(loop=loop, stats=stats)))
    client = ClientSide(lb_ours, reactor, proto)
    proto.transport = client
    client.reading = True
    client.register()
    early = os.urandom(tcp.MAX_EARLY_BYTES + (1 << 20))
    proto.state, proto.buf, proto.paused = tcp._CONNECTING, early, True
    client.pause_reading()
    upstream = Upstream(svc_ours, reactor, proto)
    upstream.start(connected=True)  # upstream_made: the early bytes overflow its buffer
    assert upstream.paused_peer
    assert not client.reading  # stays paused until the upstream drains
    more = os.urandom(1 << 20)
    assert pump(reactor, lb, svc, more) == early + more
    assert client.reading


@pytest.mark.parametrize("splicing", [False, True], ids=["recv", "splice"])
def test_one_event_reads_a_bounded_share_and_comes_again(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch, splicing: bool
) -> None:
    """A flow that always has more cannot hog a dispatch; edge-triggered, it is re-armed."""
    client, lb, svc = relay_in_mode(reactor, pairs, monkeypatch, splicing=splicing)
    monkeypatch.setattr(channel_mod, "READ_SIZE", 4)
    monkeypatch.setattr(channel_mod, "SPLICE_SIZE", 4)
    before = client.count
    payload = os.urandom(1000)
    lb.send(payload)
    client.on_event(IN)
    assert client.count - before == channel_mod.READ_ROUNDS * 4  # its share, then it yields
    svc.setblocking(False)
    got = bytearray()
    for _ in range(20):
        reactor.dispatch()
        with contextlib.suppress(BlockingIOError):
            got += svc.recv(4096)
    assert bytes(got) == payload
    exact = os.urandom(channel_mod.READ_ROUNDS * 4)  # the share ends with the socket empty
    lb.send(exact)
    client.on_event(IN)
    for _ in range(5):
        reactor.dispatch()
    assert svc.recv(4096) == exact


def test_connection_lost_is_deferred_once_and_drops_the_protocol(
    reactor: Reactor, loop: asyncio.AbstractEventLoop, pairs: list[Any]
) -> None:
    chan, proto, _theirs = started(reactor, pairs, addr=("192.0.2.1", 5))
    chan.abort()
    chan.abort()
    assert proto.events == [("made", ("192.0.2.1", 5))]
    spin(loop)
    assert proto.events[-1] == ("lost", None)
    assert len(proto.events) == 2
    assert chan.get_protocol() is None
    assert chan.is_closing()


def test_eof_received_false_closes_after_the_queued_bytes(
    reactor: Reactor, loop: asyncio.AbstractEventLoop, pairs: list[Any]
) -> None:
    chan, proto, theirs = started(reactor, pairs, keep_open=False)
    chan.write(b"bye")
    theirs.shutdown(socket.SHUT_WR)
    reactor.dispatch()
    spin(loop)
    assert theirs.recv(10) == b"bye"
    assert theirs.recv(10) == b""
    assert [e for e, _ in proto.events] == ["made", "eof", "lost"]


def test_write_eof_waits_for_the_buffer(reactor: Reactor, pairs: list[Any]) -> None:
    chan, _proto, theirs = started(reactor, pairs)
    chan.out = bytearray(b"queued")  # as if the kernel had refused it
    chan.writing = True
    chan._watch()
    chan.write_eof()
    assert chan.eof_pending
    reactor.dispatch()
    assert theirs.recv(10) == b"queued"
    assert theirs.recv(10) == b""  # the FIN came after the bytes


class Owner:
    """Stands in for ClientProtocol on the upstream side."""

    def __init__(self) -> None:
        self.made: list[Upstream] = []
        self.lost: list[Exception | None] = []

    def upstream_made(self, upstream: Upstream) -> None:
        self.made.append(upstream)

    def upstream_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


def test_upstream_waits_for_writability_when_connect_is_pending(
    reactor: Reactor, pairs: list[Any]
) -> None:
    ours, _theirs = pair(pairs)
    owner = Owner()
    upstream = Upstream(ours, reactor, owner)
    upstream.start(connected=False)
    assert owner.made == []
    reactor.dispatch()
    assert owner.made == [upstream]
    assert upstream.reading
    assert not upstream.writing
    assert not upstream.connecting


def test_acceptor_serves_and_reads_the_first_bytes_at_once(
    reactor: Reactor, loop: asyncio.AbstractEventLoop, tmp_path: Any
) -> None:
    path = str(tmp_path / "s")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen()
    protos: list[Recorder] = []

    def factory() -> Recorder:
        protos.append(Recorder())
        return protos[-1]

    acc = Acceptor(lsock, reactor, factory)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.send(b"PROXY ...")
    reactor.dispatch()  # one dispatch: accept, connection_made, and the first read
    assert [e for e, _ in protos[0].events] == ["made", "data"]
    protos[0].transport.abort()
    acc.close()
    acc.close()
    assert lsock.fileno() == -1
    client.close()


def test_a_closed_acceptor_on_a_dup_leaves_the_epoll_set(
    reactor: Reactor, loop: asyncio.AbstractEventLoop, tmp_path: Any
) -> None:
    """``serve`` gives each listener a dup of the bound socket and keeps the original, so
    closing the dup alone would leave it registered: the old reactor would keep waking for
    connections that the new listener takes."""
    path = str(tmp_path / "s")
    original = socket.socket(socket.AF_UNIX)
    original.bind(path)
    original.listen()
    acc = Acceptor(original.dup(), reactor, Recorder)
    acc.close()
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)  # the original still listens: the connection waits in its backlog
    assert reactor.ep.poll(0) == []
    client.close()
    original.close()


class OutOfFiles:
    """A listening socket that has hit the descriptor limit."""

    family = socket.AF_UNIX

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.calls = 0

    def _accept(self) -> tuple[int, Any]:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")

    def fileno(self) -> int:
        return self.real.fileno()

    def setblocking(self, flag: bool) -> None:
        self.real.setblocking(flag)

    def close(self) -> None:
        self.real.close()


def test_acceptor_pauses_on_emfile_instead_of_spinning(
    reactor: Reactor,
    loop: asyncio.AbstractEventLoop,
    pairs: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(acceptor_mod, "RETRY_DELAY", 0.05)
    ready, other = pair(pairs)
    other.send(b"!")  # keeps `ready` readable, like a listener with a full backlog
    listener = OutOfFiles(ready)
    acc = Acceptor(listener, reactor, Recorder)  # type: ignore[arg-type]
    logged: list[tuple[str, dict[str, Any]]] = []
    acc.log = SimpleNamespace(warning=lambda event, **kw: logged.append((event, kw)))  # type: ignore[assignment]
    before = loop.time()
    for _ in range(5):  # the listener stays readable: a spinning acceptor would retry
        reactor.dispatch()
    assert listener.calls == 1  # parked after the first EMFILE
    first = acc.paused
    assert first is not None
    assert first.when() >= before + 0.05 - 0.002  # for RETRY_DELAY (uvloop: 1 ms steps)
    deadline = time.monotonic() + 10  # a hang guard, not a speed claim
    while listener.calls < 2:  # the loop dispatches the reactor itself
        assert time.monotonic() < deadline, "never retried after the pause"
        loop.run_until_complete(asyncio.sleep(0.01))
    assert acc.paused is not None  # retried once the pause ended, and parked again
    assert acc.paused is not first
    retried = listener.calls
    for _ in range(5):
        reactor.dispatch()
    assert listener.calls == retried  # not spun on while parked
    paused = ("daemon.accept_paused", {"error": "Too many open files", "seconds": 0.05})
    assert logged == [paused] * retried  # every try ended in a pause
    acc.close()


def test_a_named_instance_logs_accept_pauses_under_its_name(tmp_path: Any) -> None:
    """``serve`` runs several instances in one process: the acceptor's warnings carry the
    instance's name, like every other line of that instance."""
    from pymmproxy.server.listener import Listener  # noqa: PLC0415
    from pymmproxy.settings import Endpoint, InstanceSettings  # noqa: PLC0415

    settings = InstanceSettings(
        Endpoint("0.0.0.0", 8443), Endpoint("127.0.0.1", 443), None, name="vps01-ssh"
    )
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(tmp_path / "s"))
    lsock.listen()

    async def main() -> None:
        listener = Listener(settings)
        listener.log = SimpleNamespace(info=lambda *a, **k: None)  # type: ignore[assignment]
        await listener.start(lsock)
        assert isinstance(listener._server, Acceptor)
        assert listener._server.log is listener.log
        listener.close()
        await listener.drain(0)

    asyncio.run(main())


class Broken(Recorder):
    """A protocol with a bug in data_received."""

    def data_received(self, data: bytes) -> None:
        raise ValueError(f"cannot handle {data!r}")


def test_a_protocol_failing_on_the_first_read_drops_only_its_connection(
    reactor: Reactor, loop: asyncio.AbstractEventLoop, tmp_path: Any
) -> None:
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    path = str(tmp_path / "s")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen()
    protos: list[Recorder] = []
    acc = Acceptor(lsock, reactor, lambda: protos.append(Broken()) or protos[-1])
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(path)
    bad.send(b"boom")
    reactor.dispatch()
    spin(loop)
    assert isinstance(reported[0]["exception"], ValueError)
    assert protos[0].events[-1] == ("lost", reported[0]["exception"])
    good = socket.socket(socket.AF_UNIX)  # the acceptor goes on serving
    good.connect(path)
    reactor.dispatch()
    assert len(protos) == 2
    bad.settimeout(2)
    assert bad.recv(10) == b""
    protos[1].transport.abort()
    acc.close()
    bad.close()
    good.close()


class Forwarder:
    """On readiness, reads and sends the bytes on through ``out``."""

    def __init__(self, sock: socket.socket, out: socket.socket) -> None:
        self.sock, self.out, self.seen = sock, out, 0

    def on_event(self, mask: int) -> None:
        del mask
        data = self.sock.recv(100)
        self.seen += 1
        self.out.send(data)

    def fatal(self, exc: Exception) -> None:
        raise exc

    def abort(self) -> None:
        pass


def test_what_becomes_ready_during_a_dispatch_is_handled_in_it(
    reactor: Reactor, pairs: list[Any]
) -> None:
    a_in, a_feed = pair(pairs)
    b_in, b_feed = pair(pairs)
    sink, drain = pair(pairs)
    first = Forwarder(a_in, b_feed)  # its output makes `second` ready
    second = Forwarder(b_in, sink)
    reactor.add(a_in.fileno(), IN, first)
    reactor.add(b_in.fileno(), IN, second)
    a_feed.send(b"ping")
    reactor.dispatch()
    assert (first.seen, second.seen) == (1, 1)
    assert drain.recv(10) == b"ping"


class Greeter(Recorder):
    """Writes more in connection_made than the socket takes at once."""

    GREETING = b"g" * (4 << 20)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.write(self.GREETING)


def test_a_protocol_may_write_before_the_channel_is_registered(
    reactor: Reactor, pairs: list[Any]
) -> None:
    chan, _proto, theirs = started(reactor, pairs, proto=Greeter())
    assert chan.out  # the kernel took only part of it: the rest waits for writability
    theirs.setblocking(False)
    got = 0
    for _ in range(10000):
        reactor.dispatch()
        with contextlib.suppress(BlockingIOError):
            got += len(theirs.recv(1 << 20))
        if got == len(Greeter.GREETING):
            break
    assert got == len(Greeter.GREETING)
    assert not chan.writing
    chan.abort()


def test_each_channel_class_has_its_own_copy_of_the_relay_methods() -> None:
    """CPython specializes per code object for one class: ``ClientSide`` and ``Upstream``
    must not share ``Channel``'s functions (see ``Channel.__init_subclass__``)."""
    for name in ("on_event", "write", "_teardown", "__init__"):
        base = getattr(Channel, name).__code__
        client, upstream = getattr(ClientSide, name).__code__, getattr(Upstream, name).__code__
        assert len({id(base), id(client), id(upstream)}) == 3, name
        assert client.co_code == base.co_code == upstream.co_code, name
    assert Upstream._on_writable is not Channel._on_writable  # its own override
    assert ClientSide.on_event.__qualname__ == "Channel.on_event"

    class Further(ClientSide):  # a subclass of a subclass keeps its parent's versions
        __slots__ = ()

    for name in ("_got_data", "get_extra_info", "on_event"):
        assert getattr(Further, name) is getattr(ClientSide, name), name


def test_relay_micro_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import relay_micro  # noqa: PLC0415

    assert relay_micro.main(["1"]) == 0
    out = capsys.readouterr().out
    assert "own copies (shipped)" in out
    assert "shared functions" in out
    assert "shipped / shared:" in out


def test_splicing_waits_while_the_writer_has_bytes_queued(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes a read queued (e.g. past an urgent mark) must leave before spliced ones."""
    monkeypatch.setattr(channel_mod, "READ_SIZE", 512)
    client, upstream, lb, svc = relay(reactor, pairs)
    payload = os.urandom(1 << 20)
    assert pump(reactor, lb, svc, payload) == payload
    assert client.splicing
    upstream.out = bytearray(b"B")  # queued by a read: the socket had no room then
    upstream.writing = True
    lb.send(b"C")
    client.on_event(IN)
    assert (bytes(upstream.out), upstream.piped) == (b"BC", 0)  # C queued behind B
    upstream.on_event(channel_mod.OUT)
    assert svc.recv(10) == b"BC"


def test_a_close_that_cannot_flush_gives_up_without_progress(
    reactor: Reactor, pairs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that stops reading cannot hold a closing channel (and its buffer) forever."""
    monkeypatch.setattr(channel_mod, "FLUSH_TIMEOUT", 0.05)
    checks: list[int] = []
    real_check = Plain._check_flush
    monkeypatch.setattr(
        Plain, "_check_flush", lambda self, left: (checks.append(left), real_check(self, left))
    )
    _lb_ours, _lb = pair(pairs)
    ours, svc = pair(pairs)
    side = Plain(ours, reactor, None)
    side.register()
    side.write(os.urandom(4 << 20))  # far more than the socket takes: the rest is queued
    queued = side.unsent()
    assert queued > 0
    side.close()
    assert side.closing
    assert not side.closed
    svc.setblocking(False)
    svc.recv(65536)  # some progress: the deadline starts again
    side.on_event(channel_mod.OUT)
    assert 0 < side.unsent() < queued
    aborted: list[bool] = []
    real_abort = Plain.abort
    monkeypatch.setattr(Plain, "abort", lambda self: (aborted.append(True), real_abort(self)))
    until_checked(reactor.loop, checks, 1)
    assert not side.closed  # it moved within the first period: checked again later
    assert not aborted
    until_checked(reactor.loop, checks, 2)
    assert side.closed  # no progress in the second period:
    assert aborted  # aborted (a reset: a FIN would pass the cut-off stream off as complete)


def until_checked(loop: asyncio.AbstractEventLoop, checks: list[int], count: int) -> None:
    """Run ``loop`` until ``_check_flush`` has run ``count`` times (a 10 s hang guard)."""
    deadline = time.monotonic() + 10
    while len(checks) < count:
        assert time.monotonic() < deadline, f"{len(checks)} flush checks, not {count}"
        loop.run_until_complete(asyncio.sleep(0.01))
    assert len(checks) == count


def test_no_descriptor_for_the_upstream_is_an_upstream_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EMFILE at socket() fails that connection with a reason, not a traceback."""

    def out_of_fds(*_args: object) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(sockets, "RawSocket", out_of_fds)
    with pytest.raises(UpstreamError) as info:
        sockets.connect_upstream(socket.AF_INET, ("127.0.0.1", 9), ("192.0.2.1", 1), 0)
    assert info.value.reason == "out_of_resources"
    assert "Too many open files" in str(info.value)


def test_the_soft_descriptor_limit_is_lifted_to_the_hard_one() -> None:
    """As Go programs (go-mmproxy) do at start; run in a child to leave ours alone."""
    code = (
        "import resource; from pymmproxy.net.sockets import raise_nofile_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "raise_nofile_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("mark", [1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
def test_every_32_bit_mark_can_be_set(mark: int) -> None:
    """``setsockopt`` takes a C int: marks of 2^31 and more go as the same 32 bits."""
    assert sockets.c_int(mark) & 0xFFFFFFFF == mark
    sockets.check_spoofing([mark])  # root here: no error, and no TypeError either
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, sockets.SO_MARK, sockets.c_int(mark))
        assert sock.getsockopt(socket.SOL_SOCKET, sockets.SO_MARK) & 0xFFFFFFFF == mark


def test_a_listening_socket_has_keepalive_before_it_listens() -> None:
    """Set before ``listen()``: a connection the kernel accepts into the backlog before the
    daemon's loop is up inherits it too."""
    from pymmproxy.settings import Endpoint  # noqa: PLC0415

    sock = sockets.listen_socket(Endpoint("127.0.0.1", 0), keepalive=15)
    sock.setblocking(True)
    with sock, socket.create_connection(sock.getsockname()) as _client:
        accepted, _ = sock.accept()
        with accepted:
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
    with sockets.listen_socket(Endpoint("127.0.0.1", 0)) as plain:
        assert plain.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_an_abort_resets_a_side_still_flushing_after_a_graceful_close(
    reactor: Reactor, loop: asyncio.AbstractEventLoop, pairs: list[Any]
) -> None:
    """A second stop signal (``ClientProtocol.abort``) must not wait for a slow LB: a side
    still sending what it holds after ``close()`` is reset too. A failure's abort (not
    forced) still lets such a side finish, as a graceful close promised."""
    for forced in (True, False):
        lb_ours, lb = pair(pairs)
        svc_ours, _svc = pair(pairs)
        stats = SimpleNamespace(relayed=0, connect_time=None)
        ctx = SimpleNamespace(loop=loop, stats=stats, conns=set())
        proto = tcp.ClientProtocol(cast("Any", ctx))
        client = ClientSide(lb_ours, reactor, proto)
        proto.transport = client
        client.register()
        upstream = Upstream(svc_ours, reactor, proto)
        upstream.start(connected=True)
        client.write(os.urandom(8 << 20))  # more than the LB's socket takes: queued
        proto._close()  # graceful: the client side flushes first
        assert client.closing
        assert not client.closed
        if forced:
            proto.abort()
        else:
            proto._close(abort=True)
        assert client.closed is forced
        assert upstream.closed
        lb.close()
