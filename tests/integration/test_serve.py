"""``pymmproxy serve``: several instances in one process, each with its own mark and allow list.

Driven with hand-made PROXY headers in the workload namespace (see test_daemon.py); the
fwmarks each instance uses are counted by an nft ``output`` table of the test namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pymmproxy import instancelock
from pymmproxy.lab import CLIENT_V4, CLIENT_V6, LB_FRONT_V4, LB_FRONT_V6, Frontend, Lab
from pymmproxy.proxyproto import Command, Family, Header, Transport, encode_v2
from tests.e2e.helpers import body, next_sport, require_lab
from tests.integration.conftest import (
    LB_V4,
    LB_V6,
    PY,
    Workload,
    ns_connect,
    wait_port,
)
from tests.integration.test_limits import stable_fds
from tests.integration.test_metrics import scrape, value
from tests.nsutil import recv_all

pytestmark = [pytest.mark.netns]

WHOAMI, ECHO = 8280, 8281
METRICS = 9280
MARKS = (123, 124, 125)
SFX = secrets.token_hex(3)  # instance names are also lock names: unique per run
# name, mark, port, allow list: all allow the v4 LB; only "b" allows the v6 one
INSTANCES = (
    (f"a{SFX}", 123, 8201, f"{LB_V4}/32\n"),
    (f"b{SFX}", 124, 8202, "198.51.100.0/24\n2001:db8:2::/64\n"),
    (f"c{SFX}", 125, 8203, "198.51.100.0/25\n"),
)
ADDED = (f"d{SFX}", 124, 8204, "198.51.100.0/24\n")


def line(name: str, mark: int, port: int, target: int = WHOAMI) -> str:
    return f"{name} {mark} [::]:{port} 127.0.0.1 {target} ::1 allow=allow-{name}.txt\n"


def write_config(cfg: Path, instances: tuple[tuple[str, int, int, str], ...]) -> None:
    cfg.mkdir(exist_ok=True)
    (cfg / "pathways.conf").write_text("".join(f"{m}\n" for m in MARKS))
    text = ""
    for name, mark, port, allow in instances:
        (cfg / f"allow-{name}.txt").write_text(allow)
        text += line(name, mark, port, ECHO if name.startswith("a") else WHOAMI)
    (cfg / "instances.tsv").write_text(text)


def header(src: str, sport: int) -> bytes:
    fam, dst = (Family.INET6, LB_V6) if ":" in src else (Family.INET, LB_V4)
    return encode_v2(Header(2, Command.PROXY, fam, Transport.STREAM, src, sport, dst, 443))


def connect(wl: Workload, port: int, lb: str = LB_V4, timeout: float = 5.0) -> socket.socket:
    return ns_connect(wl.ns, lb, port, timeout)


def whoami(wl: Workload, port: int, src: str, sport: int, lb: str = LB_V4) -> str:
    """What the service saw, or "" if the proxy refused (a reset may come at once)."""
    try:
        with connect(wl, port, lb) as s:
            s.sendall(header(src, sport) + b"GET / HTTP/1.0\r\n\r\n")
            return recv_all(s, reset_is_eof=True).decode().rpartition("\r\n\r\n")[2].strip()
    except (ConnectionResetError, BrokenPipeError):
        return ""


def mark_counters(wl: Workload) -> dict[int, int]:
    out = wl.ns.run(["nft", "-j", "list", "table", "inet", "pmtest"]).stdout
    counts = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule:
            mark = rule["expr"][0]["match"]["right"]
            counts[mark] = rule["expr"][1]["counter"]["packets"]
    return counts


@dataclass
class Served:
    wl: Workload
    cfg: Path
    proc: subprocess.Popen[bytes]
    log: str = "daemon-serve.log"

    def text(self) -> str:
        return self.wl.log(self.log)

    def events(self, name: str) -> list[dict[str, object]]:
        found = []
        for raw in self.text().splitlines():
            if raw.startswith("{") and f'"{name}"' in raw:
                found.append(json.loads(raw))
        return [e for e in found if e.get("event") == name]

    def wait_event(self, name: str, count: int, timeout: float = 5.0) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while len(got := self.events(name)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(got) >= count, self.text()[-3000:]
        return got


@pytest.fixture(scope="module")
def served(workload: Workload) -> Iterator[Served]:
    wl = workload
    for mark in MARKS[1:]:
        wl.ns.run([PY, "-m", "pymmproxy", "pathway", "add", str(mark)])
    rules = "".join(f"meta mark {m} counter\n" for m in MARKS)
    chain = f"chain out {{\ntype filter hook output priority 0; policy accept;\n{rules}}}\n"
    wl.ns.run(["nft", "-f", "-"], input=f"table inet pmtest {{\n{chain}}}\n")
    wl.service("whoami", WHOAMI)
    wl.service("echo", ECHO)
    cfg = wl.tmp / "serve-config"
    write_config(cfg, INSTANCES)
    argv = [PY, "-m", "pymmproxy", "serve", "--config-dir", str(cfg), "-v", "2",
            "-listeners", "1", "--metrics", f"127.0.0.1:{METRICS}"]  # fmt: skip
    proc = wl.spawn([*argv, "--log-format", "json", "--drain-timeout", "20"], "daemon-serve.log")
    for _, _, port, _ in INSTANCES:
        wait_port(wl.ns, LB_V4, port)
    yield Served(wl, cfg, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(25) == 0


def test_three_instances_each_with_its_mark(served: Served) -> None:
    for i, (name, mark, port, _) in enumerate(INSTANCES):
        before = mark_counters(served.wl)
        if name.startswith("a"):  # "a" targets the echo service
            with connect(served.wl, port) as s:
                s.sendall(header(f"192.0.2.{20 + i}", 41000 + i) + b"ping")
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s) == b"ping"
        else:
            assert whoami(served.wl, port, f"192.0.2.{20 + i}", 41000 + i) == (
                f"192.0.2.{20 + i} {41000 + i}"
            )
        after = mark_counters(served.wl)
        grew = {m for m in MARKS if after[m] > before[m]}
        assert grew == {mark}, (name, before, after)
    listening = {str(e["instance"]): e["mark"] for e in served.events("daemon.listening")}
    assert {n: listening[n] for n, *_ in INSTANCES} == {n: m for n, m, *_ in INSTANCES}
    for raw in served.text().splitlines():
        event = json.loads(raw)
        if (
            str(event["event"]).startswith(("conn.", "daemon."))
            and event["event"] != "daemon.signal"
        ):
            assert event.get("instance"), raw


def test_metrics_endpoint_reports_every_instance(served: Served) -> None:
    """``serve --metrics``: one endpoint, a ``proxy=`` label per instance."""
    before = scrape(served.wl, METRICS)
    for i, (_, _, port, _) in enumerate(INSTANCES):
        with connect(served.wl, port) as s:
            s.sendall(header(f"192.0.2.{30 + i}", 41200 + i) + b"GET / HTTP/1.0\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            recv_all(s, reset_is_eof=True)  # the answer (or the close): it was handled
    after = scrape(served.wl, METRICS)
    for name, *_ in INSTANCES:
        grew = [
            value(x, "pymmproxy_connections_accepted_total", proxy=name) for x in (before, after)
        ]
        assert grew[1] == grew[0] + 1, (name, grew)


def test_allow_lists_are_per_instance(served: Served) -> None:
    b_port, c_port = INSTANCES[1][2], INSTANCES[2][2]
    assert whoami(served.wl, b_port, "2001:db8:1::7", 41100, lb=LB_V6) == "2001:db8:1::7 41100"
    assert whoami(served.wl, c_port, "2001:db8:1::7", 41101, lb=LB_V6) == ""
    refused = [e for e in served.events("conn.rejected") if e["reason"] == "not_allowed"]
    assert refused
    assert {e["instance"] for e in refused} == {INSTANCES[2][0]}


def test_sighup_rereads_the_hosts_addresses_for_kept_instances(served: Served) -> None:
    """An address added to the host is refused as a spoofed source after SIGHUP, also by
    instances whose config did not change."""
    wl, port, added = served.wl, INSTANCES[0][2], "203.0.113.77"

    def echoed(sport: int) -> bool:  # "a" targets the echo service
        try:
            with connect(wl, port) as s:
                s.sendall(header(added, sport) + b"ping")
                s.shutdown(socket.SHUT_WR)  # ENOTCONN if the refusal's reset came first
                return recv_all(s) == b"ping"
        except OSError:  # reset at connect, send, shutdown or read: refused
            return False

    assert echoed(41300)
    wl.ns.run(["ip", "addr", "add", f"{added}/32", "dev", "lo"])
    try:
        reloads = len(served.events("serve.reload"))
        served.proc.send_signal(signal.SIGHUP)
        assert served.wait_event("serve.reload", reloads + 1)[-1]["added"] == []
        assert not echoed(41301)
    finally:
        wl.ns.run(["ip", "addr", "del", f"{added}/32", "dev", "lo"])
    refused = [e for e in served.events("conn.failed") if e.get("kind") == "own_address"]
    assert refused
    assert {e["instance"] for e in refused} == {INSTANCES[0][0]}


def test_sighup_adds_and_removes_while_a_transfer_runs(served: Served) -> None:
    wl, (a_name, _, a_port, _) = served.wl, INSTANCES[0]
    payload = os.urandom(24 * 1024 * 1024)
    received = bytearray()
    with connect(wl, a_port, timeout=30) as s:
        s.sendall(header("192.0.2.40", 41200))

        def reader() -> None:
            while chunk := s.recv(1 << 20):
                received.extend(chunk)

        thread = threading.Thread(target=reader)
        thread.start()
        s.sendall(payload[: 8 << 20])
        # 1: a broken config is rejected as a whole, with file:line
        (served.cfg / "instances.tsv").write_text(
            line(*INSTANCES[0][:3]) + line(*ADDED[:3]) + "broken 124 [::]:1 127.0.0.1\n"
        )
        fails, reloads = (
            len(served.events("serve.reload_failed")),
            len(served.events("serve.reload")),
        )
        served.proc.send_signal(signal.SIGHUP)
        failed = served.wait_event("serve.reload_failed", fails + 1)[-1]
        assert "instances.tsv:3: expected <name>" in str(failed["error"])
        s.sendall(payload[8 << 20 : 16 << 20])
        # 2: drop b and c, add d: a keeps its connection
        write_config(served.cfg, (INSTANCES[0], ADDED))
        served.proc.send_signal(signal.SIGHUP)
        done = served.wait_event("serve.reload", reloads + 1)[-1]
        assert done["added"] == [ADDED[0]]
        assert sorted(done["removed"]) == [INSTANCES[1][0], INSTANCES[2][0]]  # type: ignore[call-overload]
        assert done["restarted"] == []
        s.sendall(payload[16 << 20 :])
        s.shutdown(socket.SHUT_WR)
        thread.join(30)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert whoami(wl, ADDED[2], "192.0.2.41", 41201) == "192.0.2.41 41201"
    for _, _, port, _ in INSTANCES[1:]:
        with pytest.raises(ConnectionRefusedError):
            connect(wl, port).close()
    stopped = {e["instance"] for e in served.events("daemon.stopped")}
    assert stopped == {INSTANCES[1][0], INSTANCES[2][0]}
    assert a_name not in stopped


def test_three_instances_through_haproxy(tmp_path: Path) -> None:
    """The real thing: client -> HAProxy (v2, v1, v2) -> serve with three instances."""
    require_lab()
    wk = "198.51.100.2"
    specs = [(f"h{i}{SFX}", mark, 8300 + i, 90 + i, 2 - i % 2) for i, mark in enumerate(MARKS)]
    with Lab([Frontend(fe, f"{wk}:{port}", version) for _, _, port, fe, version in specs]) as lab:
        for mark in MARKS:
            lab.install_pathway(mark)
        lab.start_service("whoami", "127.0.0.1:8380", "[::1]:8380")
        cfg = tmp_path / "cfg"
        allows = ("198.51.100.1/32\n2001:db8:2::1/128\n", "198.51.100.0/24\n2001:db8:2::/64\n",
                  "198.51.100.0/30\n2001:db8:2::/120\n")  # fmt: skip
        write_config(
            cfg, tuple((n, m, p, a) for (n, m, p, _, _), a in zip(specs, allows, strict=True))
        )
        tsv = (cfg / "instances.tsv").read_text().replace(f" {ECHO} ", " 8380 ")
        (cfg / "instances.tsv").write_text(tsv.replace(f" {WHOAMI} ", " 8380 "))
        argv = [PY, "-m", "pymmproxy", "serve", "--config-dir", str(cfg), "-v", "1"]
        proc = lab.spawn(lab.workload, "serve", argv, port=specs[-1][2])
        for _, _, port, _, _ in specs:
            proc.wait_listening(port)
        for i, (name, _, _, fe, _) in enumerate(specs):
            for src, dst in ((CLIENT_V4[i], LB_FRONT_V4), (CLIENT_V6[i], LB_FRONT_V6)):
                sport = next_sport()
                res = lab.connect_from_client(src, dst, fe, sport=sport, timeout=5)
                assert res["error"] is None, (name, res)
                assert body(res) == f"{src} {sport}", (name, res)
        assert "Traceback" not in proc.log()


def own_serve(
    wl: Workload, cfg: Path, instances: tuple[tuple[str, int, int, str], ...], log: str,
    *, listeners: int,
) -> Served:  # fmt: skip
    """A serve of the test's own on ``instances`` (config written to ``cfg``), JSON logs."""
    write_config(cfg, instances)
    argv = [PY, "-m", "pymmproxy", "serve", "--config-dir", str(cfg), "-v", "1",
            "-listeners", str(listeners), "--log-format", "json"]  # fmt: skip
    return Served(wl, cfg, wl.spawn(argv, log), log)


def test_workers_keep_a_reload_that_adds_an_instance_running_elsewhere(
    served: Served, tmp_path: Path
) -> None:
    """``serve -listeners 2``: the parent locks what SIGHUP adds before telling the workers;
    an instance locked by another process (a ``pymmproxy@NAME`` unit) stops the reload, and
    once it is free the next SIGHUP starts it in every worker."""
    wl = served.wl
    first = (f"e{SFX}", 123, 8205, f"{LB_V4}/32\n")
    second = (f"f{SFX}", 124, 8206, f"{LB_V4}/32\n")
    cfg = tmp_path / "cfg-workers"
    run = own_serve(wl, cfg, (first,), "serve-workers.log", listeners=2)
    proc = run.proc
    try:
        wait_port(wl.ns, LB_V4, first[2])
        elsewhere = instancelock.acquire(second[0])
        assert elsewhere is not None
        try:
            write_config(cfg, (first, second))
            proc.send_signal(signal.SIGHUP)
            (failed,) = run.wait_event("serve.reload_failed", 1)
            assert f"instance {second[0]} is already running" in str(failed["error"])
            time.sleep(0.5)  # had a worker been told, it would be listening by now
            with pytest.raises(OSError):
                connect(wl, second[2], timeout=1).close()
        finally:
            elsewhere.release()
        proc.send_signal(signal.SIGHUP)
        wait_port(wl.ns, LB_V4, second[2])
        assert len(run.wait_event("serve.reload", 2)) == 2  # both workers applied it
        assert instancelock.acquire(second[0]) is None  # serve holds it now
        # The workers inherited the start-time lock of `first`: removing it frees it anyway,
        # and adding it back takes it again.
        write_config(cfg, (second,))
        proc.send_signal(signal.SIGHUP)
        run.wait_event("serve.reload", 4)
        freed = instancelock.acquire(first[0])
        assert freed is not None, "a removed instance's lock is still held"
        freed.release()
        write_config(cfg, (first, second))
        proc.send_signal(signal.SIGHUP)
        run.wait_event("serve.reload", 6)
        wait_port(wl.ns, LB_V4, first[2])
        assert instancelock.acquire(first[0]) is None
        assert not run.events("serve.reload_failed")[1:]  # only the refused one above
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_instance_that_cannot_start_on_reload_is_reported_and_retried(
    served: Served, tmp_path: Path
) -> None:
    """An added instance that fails to start (here: out of descriptors) is named in the
    reload's ``failed``, holds no socket, and the next SIGHUP starts it."""
    wl = served.wl
    kept = (f"g{SFX}", 123, 8207, f"{LB_V4}/32\n")
    added = (f"h{SFX}", 124, 8208, f"{LB_V4}/32\n")
    cfg = tmp_path / "cfg-fail"
    run = own_serve(wl, cfg, (kept,), "serve-fail.log", listeners=1)
    proc = run.proc
    try:
        wait_port(wl.ns, LB_V4, kept[2])
        stable_fds(proc.pid)  # the probe's accepted socket is closed again
        # The reload opens the new lock file and binds the new socket (the two lowest free
        # descriptors), then dup()s the socket for the listener: the limit refuses that one.
        used = {int(fd) for fd in os.listdir(f"/proc/{proc.pid}/fd")}
        third_free = [fd for fd in range(len(used) + 3) if fd not in used][2]
        soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (third_free, hard))
        write_config(cfg, (kept, added))
        proc.send_signal(signal.SIGHUP)
        (done,) = run.wait_event("serve.reload", 1)
        assert done["added"] == [added[0]]
        assert list(done["failed"]) == [added[0]], done  # type: ignore[call-overload]
        assert "Too many open files" in str(done["failed"][added[0]])  # type: ignore[index]
        assert done["level"] == "error"
        with pytest.raises(ConnectionRefusedError):
            connect(wl, added[2], timeout=2).close()
        assert instancelock.holder_pid(added[0]) == proc.pid  # kept, as with workers
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (soft, hard))  # descriptors back
        assert whoami(wl, kept[2], "192.0.2.60", 41400) == "192.0.2.60 41400"  # undisturbed
        proc.send_signal(signal.SIGHUP)
        again = run.wait_event("serve.reload", 2)[-1]
        assert again["added"] == [added[0]]
        assert again["failed"] == {}
        assert whoami(wl, added[2], "192.0.2.61", 41401) == "192.0.2.61 41401"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
