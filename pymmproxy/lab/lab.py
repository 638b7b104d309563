"""``Lab``: the namespaces plus HAProxy, proxies, services and clients, torn down as one."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from pymmproxy.lab.haproxy import (
    DEFAULT_FRONTENDS,
    INSTALL_HINT,
    Frontend,
    render_config,
    server_status,
)
from pymmproxy.lab.nsexec import LabError, Ns, Proc
from pymmproxy.lab.topology import Topology

PYTHON = sys.executable
PYMMPROXY: tuple[str, ...] = (PYTHON, "-m", "pymmproxy")
GO_MMPROXY: tuple[str, ...] = ("go-mmproxy",)
HTTP_GET = "GET / HTTP/1.0\r\nHost: lab\r\n\r\n"
_PKG_ROOT = str(Path(__file__).resolve().parents[2])


def mmproxy_argv(
    program: Sequence[str],
    listen: str,
    *,
    v4: str = "127.0.0.1:8080",
    v6: str = "[::1]:8080",
    mark: int = 123,
    allowed_subnets: Path | None = None,
    verbose: int = 2,
    extra: Sequence[str] = (),
) -> list[str]:
    """A proxy command line in go-mmproxy's flag spelling (for go-mmproxy or pymmproxy)."""
    argv = [*program, "-l", listen, "-4", v4, "-6", v6, "-mark", str(mark), "-v", str(verbose)]
    if allowed_subnets is not None:
        argv += ["-allowed-subnets", str(allowed_subnets)]
    return argv + list(extra)


def _port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


class Lab:
    """Three namespaces (client, lb, workload) with HAProxy in lb; use as a context manager.

    Every process is started through :meth:`spawn` and stopped by :meth:`close`, which
    also kills leftovers in the namespaces and removes them, even after a failure.
    """

    def __init__(
        self, frontends: Sequence[Frontend] = DEFAULT_FRONTENDS, *, haproxy: bool = True
    ) -> None:
        self.frontends = tuple(frontends)
        self.want_haproxy = haproxy
        self.topo = Topology()
        self.workdir = Path(tempfile.mkdtemp(prefix="pmxlab-"))
        self.procs: list[Proc] = []
        self.haproxy: Proc | None = None
        self.env = {**os.environ, "PYTHONPATH": _pkg_path()}
        self._closed = False

    # lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        atexit.register(self.close)
        try:
            self.topo.build()
            if self.want_haproxy:
                self.start_haproxy()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process, remove the namespaces and the work directory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self.procs):
            proc.stop(grace=2)
        self.topo.destroy()
        shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.close)

    @property
    def client(self) -> Ns:
        return self.topo.client

    @property
    def lb(self) -> Ns:
        return self.topo.lb

    @property
    def workload(self) -> Ns:
        return self.topo.workload

    # processes -------------------------------------------------------------------------
    def run_in(
        self,
        ns: Ns,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = True,
        input: str | None = None,  # noqa: A002
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``ns`` (with this package importable)."""
        return ns.run(argv, timeout=timeout, check=check, input=input, env=self.env)

    def spawn(
        self,
        ns: Ns,
        name: str,
        argv: Sequence[str],
        *,
        port: int | None = None,
        timeout: float = 20,
    ) -> Proc:
        """Start a long-running process in ``ns``; if ``port`` is given, wait until it listens."""
        log = self.workdir / f"{name}-{len(self.procs)}.log"
        proc = Proc(name, ns, argv, log, self.env)
        self.procs.append(proc)
        if port is not None:
            proc.wait_listening(port, timeout)
        return proc

    def stop(self, proc: Proc) -> int | None:
        code = proc.stop()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)
        return code

    def start_haproxy(self, frontends: Sequence[Frontend] | None = None) -> Proc:
        """(Re)start HAProxy in the lb namespace with ``frontends`` (default: the lab's)."""
        if shutil.which("haproxy") is None:
            raise LabError(f"haproxy not found: {INSTALL_HINT}")
        if frontends is not None:
            self.frontends = tuple(frontends)
        if self.haproxy is not None:
            self.stop(self.haproxy)
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(render_config(self.frontends, self.stats_socket))
        self.haproxy = self.spawn(self.lb, "haproxy", ["haproxy", "-db", "-f", str(cfg)])
        for fe in self.frontends:
            self.haproxy.wait_listening(fe.port)
        return self.haproxy

    @property
    def stats_socket(self) -> Path:
        return self.workdir / "haproxy.sock"

    def haproxy_status(self, frontend: Frontend) -> str:
        return server_status(self.stats_socket, frontend)

    def start_proxy(self, argv: Sequence[str], *, name: str = "proxy") -> Proc:
        """Start a proxy daemon (go-mmproxy flags) in the workload ns; wait for its ``-l`` port."""
        listen = argv[list(argv).index("-l") + 1]
        return self.spawn(self.workload, name, argv, port=_port_of(listen))

    def start_service(self, kind: str, *listen: str, extra: Sequence[str] = ()) -> Proc:
        """Start ``pymmproxy.lab.services KIND`` in the workload ns on each ``listen``."""
        args = [a for addr in listen for a in ("--listen", addr)]
        argv = [PYTHON, "-m", "pymmproxy.lab.services", kind, *args, *extra]
        return self.spawn(self.workload, kind, argv, port=_port_of(listen[0]))

    def install_pathway(self, mark: int = 123) -> None:
        """``python -m pymmproxy.pathway add MARK`` inside the workload namespace."""
        res = self.run_in(
            self.workload, [PYTHON, "-m", "pymmproxy.pathway", "add", str(mark)], check=False
        )
        if res.returncode != 0:
            raise LabError(f"pathway add {mark} failed: {(res.stderr or res.stdout).strip()}")

    def allowed_subnets(self, *subnets: str) -> Path:
        """Write an ``-allowed-subnets`` file into the work directory and return its path."""
        path = self.workdir / f"allowed-{len(list(self.workdir.glob('allowed-*')))}.txt"
        path.write_text("".join(f"{s}\n" for s in subnets))
        return path

    # clients ---------------------------------------------------------------------------
    def clients(self, jobs: Sequence[dict[str, Any]], timeout: float = 60) -> list[dict[str, Any]]:
        """Run client jobs (see :mod:`pymmproxy.lab.client`) in the client namespace."""
        return self.clients_in(self.client, jobs, timeout)

    def clients_in(
        self, ns: Ns, jobs: Sequence[dict[str, Any]], timeout: float = 60
    ) -> list[dict[str, Any]]:
        res = self.run_in(
            ns,
            [PYTHON, "-m", "pymmproxy.lab.client"],
            timeout=timeout,
            input=json.dumps(list(jobs)),
            check=False,
        )
        if res.returncode != 0:
            raise LabError(f"client failed: {res.stderr.strip()[-500:]}")
        out: list[dict[str, Any]] = json.loads(res.stdout)
        return out

    def connect_from_client(
        self, src_ip: str, dst: str, port: int, payload: str = HTTP_GET, **job: object
    ) -> dict[str, Any]:
        """One connection from ``src_ip`` in the client ns to ``dst``:``port``; its result."""
        return self.clients([{"src": src_ip, "dst": dst, "port": port, "send": payload, **job}])[0]


def _pkg_path() -> str:
    old = os.environ.get("PYTHONPATH")
    return f"{_PKG_ROOT}{os.pathsep}{old}" if old else _PKG_ROOT


@contextmanager
def build_lab(
    frontends: Sequence[Frontend] = DEFAULT_FRONTENDS, *, haproxy: bool = True
) -> Iterator[Lab]:
    """``with build_lab() as lab:`` — the same as ``with Lab(...) as lab:``."""
    with Lab(frontends, haproxy=haproxy) as lab:
        yield lab
