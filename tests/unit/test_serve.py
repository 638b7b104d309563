"""``pymmproxy serve`` without sockets: arguments, config to specs, ports=, TPROXY rule text."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pymmproxy import instancelock, serve
from pymmproxy.conffiles import load_instances
from pymmproxy.errors import ConfigError, PymmproxyError, UpstreamError, UsageError
from pymmproxy.pathway import tproxy
from pymmproxy.pathway.plan import Family
from pymmproxy.serve import ParentGate, auto_workers, load_specs, parse_args, selected
from pymmproxy.server.registry import Spec
from pymmproxy.server.tproxy import pick_port
from pymmproxy.settings import Endpoint, InstanceSettings, Limits, Transport

ROWS = (
    "web 123 [::]:7999 127.0.0.1 9000 ::1 ports=8000-8099\n"
    "ssh 124 0.0.0.0:2222 127.0.0.1 22 - allow=ssh.txt\n"
)


def config(tmp_path: Path, rows: str = ROWS) -> Path:
    (tmp_path / "pathways.conf").write_text("123\n124\n")
    (tmp_path / "allow.txt").write_text("198.51.100.0/24\n")
    (tmp_path / "ssh.txt").write_text("203.0.113.7\n")
    (tmp_path / "instances.tsv").write_text(rows)
    return tmp_path


def test_parse_args_keeps_limits_and_refuses_single_proxy_flags() -> None:
    args = parse_args(["--instances", "a,b", "--drain-timeout", "3", "-listeners", "2"])
    assert (args.instances, args.drain_timeout, args.listeners) == ("a,b", 3.0, 2)
    refused = (["-l", "0.0.0.0:1"], ["-mark", "5"], ["--instance", "x"], ["--allow-any"],
               ["-p", "tcp"], ["-mark=0"])  # fmt: skip
    for flag in refused:
        with pytest.raises(UsageError, match=f"{flag[0].partition('=')[0]} is not allowed"):
            parse_args(flag)


def test_selected() -> None:
    assert selected(None) is None
    assert selected("a, b,a,") == ["a", "b"]
    with pytest.raises(UsageError):
        selected(" , ")


def test_load_specs(tmp_path: Path) -> None:
    specs = load_specs(config(tmp_path), None, Limits(drain_timeout=3), 1)
    assert list(specs) == ["web", "ssh"]
    web, ssh = specs["web"], specs["ssh"]
    assert web.ports == (8000, 8099)
    assert ssh.ports is None
    assert (web.settings.mark, ssh.settings.mark) == (123, 124)
    assert [str(n) for n in ssh.settings.allowed or ()] == ["203.0.113.7/32"]
    assert web.settings.limits.drain_timeout == 3
    assert load_specs(tmp_path, ["ssh"], Limits(), 2)["ssh"].settings.listeners == 2
    with pytest.raises(UsageError, match=r"instance web is a TPROXY port range.*-listeners 1"):
        load_specs(tmp_path, None, Limits(), 2)
    assert list(load_specs(tmp_path, ["ssh"], Limits(), 1)) == ["ssh"]
    with pytest.raises(UsageError, match="no instance 'nope'"):
        load_specs(tmp_path, ["nope"], Limits(), 1)


def test_auto_workers_one_per_cpu_but_one_process_for_tproxy(tmp_path: Path) -> None:
    """``serve`` without ``-listeners``: a TPROXY instance (its rule belongs to one process)
    keeps everything in one process; otherwise one worker per CPU."""
    specs = load_specs(config(tmp_path), None, Limits(), 1)
    assert auto_workers(specs, 4) == 1
    assert auto_workers({"ssh": specs["ssh"]}, 4) == 4
    dns = Spec(dataclasses.replace(specs["ssh"].settings, transport=Transport.UDP))
    assert auto_workers({"dns": dns}, 4) == 1  # only worker 0 would run UDP instances
    assert auto_workers({"dns": dns, "ssh": specs["ssh"]}, 4) == 4
    assert parse_args([]).listeners is None
    assert parse_args(["-listeners", "auto"]).listeners is None


def test_load_specs_shares_count_limits_among_workers(tmp_path: Path) -> None:
    """Connection limits bound the instance: each of N workers gets its part, rounded up;
    the UDP flow cap stays per worker (one LB socket's datagrams all reach one worker)."""
    limits = Limits(max_connections=1000, max_pending_headers=5, udp_max_clients=10)
    got = load_specs(config(tmp_path), ["ssh"], limits, 3)["ssh"].settings.limits
    assert (got.max_connections, got.max_pending_headers, got.udp_max_clients) == (334, 2, 10)
    assert load_specs(tmp_path, ["ssh"], limits, 1)["ssh"].settings.limits == limits


def test_load_specs_gives_every_instance_the_metrics_endpoint(tmp_path: Path) -> None:
    """``serve --metrics ADDR``: one endpoint, every instance labelled on it."""
    endpoint = Endpoint("127.0.0.1", 9100)
    specs = load_specs(config(tmp_path), None, Limits(), 1, endpoint)
    assert {s.settings.metrics for s in specs.values()} == {endpoint}
    assert {s.settings.metrics for s in load_specs(tmp_path, None, Limits(), 1).values()} == {None}


def test_a_transparent_listener_without_the_capability_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ports=`` needs IP_TRANSPARENT on the listening socket: EPERM is a one-line error,
    and the sockets and locks made so far are released."""
    from pymmproxy.server import registry as registry_mod  # noqa: PLC0415

    closed: list[bool] = []

    class Unprivileged:
        family = socket.AF_INET6

        def setsockopt(self, *args: object) -> None:
            raise PermissionError(1, "Operation not permitted")

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr(registry_mod, "bind", lambda *a, **k: Unprivileged())
    specs = load_specs(config(tmp_path), ["web"], Limits(), 1)
    reg = registry_mod.Registry(locks=False, manage_rules=False)
    with pytest.raises(PymmproxyError) as info:
        reg._prepare(specs, ["web"], ["web"])
    assert str(info.value) == (
        "instance web: cannot make [::]:7999 transparent for ports=: "
        "Operation not permitted (need CAP_NET_ADMIN, or root)"
    )
    assert closed == [True]


def test_spec_change_kinds(tmp_path: Path) -> None:
    spec = load_specs(config(tmp_path), None, Limits(), 1)["ssh"]
    allow_only = Spec(dataclasses.replace(spec.settings, allowed=()))
    assert allow_only.same_but_allow(spec)
    assert allow_only != spec
    moved = Spec(dataclasses.replace(spec.settings, mark=123))
    assert not moved.same_but_allow(spec)
    assert not Spec(spec.settings, (1, 2)).same_but_allow(spec)


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ("ports=9-8", "need 1 <= FIRST <= LAST <= 65535"),
        ("ports=a-b", "bad ports 'a-b'"),
        ("ports=0-5", "need 1 <= FIRST"),
        ("ports=1-2 proto=udp", "TCP only"),
        ("ports=1000-65535", "exceeds 65535"),
    ],
)
def test_ports_errors(tmp_path: Path, row: str, fragment: str) -> None:
    path = tmp_path / "instances.tsv"
    path.write_text(f"# x\nt 123 [::]:7999 127.0.0.1 9000 - {row}\n")
    with pytest.raises(ConfigError, match=rf"instances.tsv:2: .*{fragment}"):
        load_instances(path, None)


@pytest.mark.parametrize(
    ("second", "fragment"),
    [
        ("u 123 127.0.0.1:8050 127.0.0.1 1 -", "listen_addr 127.0.0.1:8050 is inside the ports"),
        (
            "u 123 [::]:7000 127.0.0.1 1 - ports=8099-8100",
            "ports=8099-8100 overlaps the ports of instance 't'",
        ),
        (
            "u 123 [::]:7000 127.0.0.1 1 - ports=7999-7999",
            "ports=7999-7999 covers the listen_addr of instance",
        ),
    ],
)
def test_ports_clashes(tmp_path: Path, second: str, fragment: str) -> None:
    path = tmp_path / "instances.tsv"
    path.write_text(f"t 123 [::]:7999 127.0.0.1 9000 - ports=8000-8099\n{second}\n")
    with pytest.raises(ConfigError, match=rf"instances.tsv:2: {fragment}"):
        load_instances(path, None)


def test_ports_without_clash(tmp_path: Path) -> None:
    path = tmp_path / "instances.tsv"
    path.write_text(
        "t 123 198.51.100.2:7999 127.0.0.1 9000 - ports=8000-8099\n"
        "u 123 198.51.100.3:8050 127.0.0.1 1 -\n"  # another host
        "v 123 0.0.0.0:8050 127.0.0.1 1 - proto=udp\n"  # TPROXY is TCP only
        "w 123 198.51.100.4:7000 127.0.0.1 9000 - ports=8000-8099\n"
    )
    assert load_instances(path, None)["w"].ports == (8000, 8099)


def test_pick_port() -> None:
    assert pick_port(8005, 8001, (8000, 8099)) == 8005
    assert pick_port(443, 8001, (8000, 8099)) == 8001
    assert pick_port(None, 8099, (8000, 8099)) == 8099
    with pytest.raises(UpstreamError, match="443 is outside ports=8000-8099"):
        pick_port(443, 7999, (8000, 8099))


def test_tproxy_rule_text() -> None:
    v4, v6 = tproxy.rules_for("web", Endpoint("::", 7999), (8000, 8099))
    assert (v4.family, v6.family) == (Family.V4, Family.V6)
    assert v4.nft_text().startswith(
        "meta nfproto ipv4 fib daddr type local tcp dport 8000-8099 tproxy ip to :7999 accept"
    )
    assert "tproxy ip6 to :7999" in v6.nft_text()
    assert v4.comment.startswith("pymmproxy tproxy web ")
    assert v4.comment != v6.comment
    (one,) = tproxy.rules_for("x", Endpoint("2001:db8::1", 7), (8, 9))
    assert "ip6 daddr 2001:db8::1 tcp dport 8-9 tproxy ip6 to [2001:db8::1]:7" in one.nft_text()
    assert one.iptables_text().startswith("ip6tables -t mangle -A PREROUTING -p tcp -d 2001:db8::1")
    assert one.iptables_text().endswith("-j TPROXY --on-port 7 --on-ip 2001:db8::1")
    (only4,) = tproxy.rules_for("y", Endpoint("0.0.0.0", 7), (8, 9))
    assert "-m addrtype --dst-type LOCAL --dport 8:9" in only4.iptables_text()
    assert len(tproxy.key("n" * 200)) < 128 - 9


def test_serve_with_a_taken_metrics_port_fails_at_once(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    own_netns: Any,
) -> None:
    """Not an instance started without its listener, while READY says all is well."""
    import socket  # noqa: PLC0415

    from pymmproxy import cli, serve  # noqa: PLC0415

    def started(*args: object) -> int:
        raise AssertionError("serve started despite the taken metrics port")

    monkeypatch.setattr(serve, "run_app", started)
    cfg = config(tmp_path, "ssh 124 127.0.0.1:2222 127.0.0.1 22 -\n")

    def taken() -> tuple[int, int]:
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            argv = ["serve", "--config-dir", str(cfg), "--metrics", f"127.0.0.1:{port}"]
            return port, cli.main(argv)

    port, code = own_netns(taken)
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pymmproxy: cannot listen on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


class _Log:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, event: str, **fields: object) -> None:
        self.errors.append(f"{event} {fields}")


def test_parent_gate_keeps_a_reload_the_workers_would_refuse_from_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With workers the parent locks instances a reload adds and test-binds new addresses
    before telling the workers: one running elsewhere, or a taken address, stops the
    reload (and leaves no lock behind); removed ones are let go."""
    run = tmp_path / "run"
    monkeypatch.setattr(instancelock, "lock_dirs", lambda: [run])
    taken: set[Endpoint] = set()

    class _Bound:
        def close(self) -> None:
            pass

    def fake_bind(settings: InstanceSettings, *, reuse_port: bool) -> _Bound:
        assert not reuse_port  # a plain bind: a port served with SO_REUSEPORT is refused
        if settings.listen in taken:
            raise PymmproxyError(f"cannot listen on {settings.listen}: Address in use")
        return _Bound()

    monkeypatch.setattr(serve, "bind", fake_bind)
    current: dict[str, Spec] = {}

    def load() -> dict[str, Spec]:
        if "broken" in current:
            raise ConfigError(Path("instances.tsv"), 3, "bad line")
        return dict(current)

    def spec(port: int) -> Spec:
        return Spec(dataclasses.replace(_settings(), listen=Endpoint("127.0.0.1", port)))

    log = _Log()
    current.update(a=spec(1001))
    gate = ParentGate(load, log)  # type: ignore[arg-type]
    gate.admit(dict(current))
    elsewhere = instancelock.acquire("b", dirs=[run])  # `pymmproxy@b` runs
    assert elsewhere is not None
    current.update(b=spec(1002))
    assert gate.before_reload() is False
    assert set(gate.held) == {"a"}
    assert "instance b is already running" in log.errors[-1]
    assert "kept the running config" in log.errors[-1]
    elsewhere.release()
    taken.add(Endpoint("127.0.0.1", 1002))  # another program has b's port
    assert gate.before_reload() is False
    assert "cannot listen on 127.0.0.1:1002" in log.errors[-1]
    assert set(gate.held) == {"a"}  # b's lock was let go again
    taken.clear()
    assert gate.before_reload() is True
    assert set(gate.held) == {"a", "b"}
    assert instancelock.acquire("b", dirs=[run]) is None  # now ours
    taken.add(Endpoint("127.0.0.1", 1002))  # b's own workers listen there now: not re-checked
    del current["a"]
    assert gate.before_reload() is True
    assert set(gate.held) == {"b"}
    freed = instancelock.acquire("a", dirs=[run])
    assert freed is not None
    freed.release()
    current["broken"] = spec(1003)  # not passed on: the workers would re-read the files
    assert gate.before_reload() is False
    assert "instances.tsv:3: bad line; kept the running config" in log.errors[-1]
    assert set(gate.held) == {"b"}
    gate.release_all()
    assert gate.held == {}
    again = instancelock.acquire("b", dirs=[run])
    assert again is not None
    again.release()


def _settings() -> InstanceSettings:
    return InstanceSettings(Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2), None)


def test_an_instance_that_cannot_start_at_start_stops_serve_with_one_line() -> None:
    """Nothing starts half: the instances that did start are closed and drained, and the
    error names the one that could not."""
    import asyncio  # noqa: PLC0415

    from pymmproxy.serve import Serve  # noqa: PLC0415
    from pymmproxy.server.registry import Changes  # noqa: PLC0415

    calls: list[str] = []

    class FailingRegistry:
        async def apply(self, desired: object) -> Changes:
            return Changes(added=["ok", "web"], failed={"web": "[Errno 24] Too many open files"})

        def close(self) -> None:
            calls.append("close")

        async def drain(self) -> None:
            calls.append("drain")

    app = Serve(dict, {}, FailingRegistry())  # type: ignore[arg-type]
    with pytest.raises(PymmproxyError) as info:
        asyncio.run(app.start())
    assert str(info.value) == "instance web: cannot start: [Errno 24] Too many open files"
    assert calls == ["close", "drain"]


def test_only_the_first_worker_runs_udp_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    """A UDP flow table is one process's: with workers, worker 0 alone serves UDP instances
    (the others would each open their own flow for a client, from a random port)."""
    import asyncio  # noqa: PLC0415

    from pymmproxy.server import registry as registry_mod  # noqa: PLC0415
    from pymmproxy.settings import Transport  # noqa: PLC0415

    def no_bind(*args: object, **kwargs: object) -> None:
        raise AssertionError("a worker other than the first bound a UDP instance")

    monkeypatch.setattr(registry_mod, "bind", no_bind)
    udp = Spec(dataclasses.replace(_settings(), transport=Transport.UDP, name="dns"))
    reg = registry_mod.Registry(locks=False, manage_rules=False, udp=False)
    changes = asyncio.run(reg.apply({"dns": udp}))
    assert changes.added == []
    assert reg.running == {}


def test_a_worker_forked_again_serves_what_it_can() -> None:
    """The first start stops on a failed instance; a worker forked again (its siblings kept
    serving, with that instance failed) starts without it instead of stopping the daemon."""
    import asyncio  # noqa: PLC0415

    from pymmproxy.serve import Serve  # noqa: PLC0415
    from pymmproxy.server.registry import Changes  # noqa: PLC0415

    class FailingRegistry:
        async def apply(self, desired: object) -> Changes:
            return Changes(added=["ok", "web"], failed={"web": "[Errno 24] Too many open files"})

    app = Serve(dict, {}, FailingRegistry())  # type: ignore[arg-type]
    app.respawned = True
    asyncio.run(app.start())  # no PymmproxyError


def test_a_listener_that_fails_to_start_closes_its_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What ``start`` made before the failure (timers, metrics, the epoll set) is closed, and
    so is the socket it was handed."""
    import asyncio  # noqa: PLC0415
    import socket  # noqa: PLC0415

    from pymmproxy.server import listener as listener_mod  # noqa: PLC0415
    from pymmproxy.server.context import InstanceContext  # noqa: PLC0415

    closed: list[InstanceContext] = []
    real_close = InstanceContext.close

    def close(ctx: InstanceContext) -> None:
        closed.append(ctx)
        real_close(ctx)

    def no_acceptor(*args: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(InstanceContext, "close", close)
    monkeypatch.setattr(listener_mod, "Acceptor", no_acceptor)
    listener = listener_mod.Listener(_settings())
    sock, other = socket.socketpair()

    async def start() -> None:
        with pytest.raises(OSError, match="Too many open files"):
            await listener.start(sock)

    asyncio.run(start())
    other.close()
    assert len(closed) == 1
    assert listener.ctx is None
    assert sock.fileno() == -1


def test_a_failed_start_keeps_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio  # noqa: PLC0415

    from pymmproxy.server import registry as registry_mod  # noqa: PLC0415

    closed: list[str] = []

    class BrokenListener:
        def __init__(self, settings: InstanceSettings, **kwargs: object) -> None:
            self.log = _Log()

        async def start(self, sock: object) -> None:
            raise OSError(24, "Too many open files")

    class Sock:
        def dup(self) -> Sock:
            return self

        def close(self) -> None:
            closed.append("socket")

    monkeypatch.setattr(registry_mod, "Listener", BrokenListener)
    monkeypatch.setattr(registry_mod, "bind", lambda *a, **k: Sock())
    run = tmp_path / "run"
    monkeypatch.setattr(instancelock, "lock_dirs", lambda: [run])
    reg = registry_mod.Registry(manage_rules=False)
    spec = Spec(dataclasses.replace(_settings(), name="web"))
    changes = asyncio.run(reg.apply({"web": spec}))
    assert changes.failed == {"web": "[Errno 24] Too many open files"}
    assert reg.running == {}
    assert closed == ["socket"]  # the registry's own: nothing else holds the address now
    assert instancelock.acquire("web", dirs=[run]) is None  # still held by the registry
    changes = asyncio.run(reg.apply({}))  # dropped from the config: let go
    freed = instancelock.acquire("web", dirs=[run])
    assert freed is not None
    freed.release()


def test_the_gate_commits_nothing_the_workers_were_not_handed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pymmproxy.handoff import Handoff  # noqa: PLC0415

    run = tmp_path / "run"
    monkeypatch.setattr(instancelock, "lock_dirs", lambda: [run])
    monkeypatch.setattr(serve, "bind", lambda *a, **k: SimpleNamespace(close=lambda: None))
    current = {"a": Spec(_settings())}
    handoff = Handoff()
    gate = ParentGate(lambda: dict(current), _Log(), handoff)  # type: ignore[arg-type]
    gate.admit(dict(current))
    current["b"] = Spec(dataclasses.replace(_settings(), listen=Endpoint("127.0.0.1", 7)))

    def full(self: Handoff, value: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(Handoff, "publish", full)
    assert gate.before_reload() is False
    assert set(gate.specs) == {"a"}
    assert set(gate.held) == {"a"}  # b's lock let go again
    assert "cannot hand it to the workers" in gate.log.errors[-1]  # type: ignore[attr-defined]
    gate.release_all()
    handoff.close()
