"""The I/O half of ``pymmproxy doctor``: look at this process, this namespace, the sockets.

Every probe returns a plain value for :mod:`.checks`; none raises for what it finds (an
error is a finding), none changes anything except sockets bound and closed at once.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from pymmproxy import instancelock
from pymmproxy.conffiles import Instance, load_allow_list
from pymmproxy.doctor.facts import (
    BackendFacts,
    InstanceFacts,
    MarkFacts,
    Outcome,
    Privileges,
    TargetFacts,
)
from pymmproxy.errors import ConfigError, PymmproxyError
from pymmproxy.net.sockets import listen_family
from pymmproxy.pathway import status as pathway_status
from pymmproxy.pathway.firewall import resolve_backend_name
from pymmproxy.pathway.firewall.base import BackendName
from pymmproxy.pathway.firewall.detect import (
    KernelTables,
    detect_backend,
    read_kernel_tables,
)
from pymmproxy.pathway.firewall.nft import NftBackend
from pymmproxy.pathway.ipv6 import Ipv6State
from pymmproxy.pathway.ipv6 import probe as probe_ipv6
from pymmproxy.settings import Endpoint, Transport

PROC_STATUS = Path("/proc/self/status")


def privileges(status_file: Path = PROC_STATUS) -> Privileges:
    """Effective uid and the CapEff mask of this process."""
    cap_eff: int | None = None
    try:
        for line in status_file.read_text(encoding="ascii").splitlines():
            if line.startswith("CapEff:"):
                cap_eff = int(line.split()[1], 16)
                break
    except (OSError, ValueError, IndexError):
        cap_eff = None
    return Privileges(os.geteuid(), cap_eff)


def other_marks(name: BackendName, kernel: KernelTables) -> tuple[int, ...]:
    """The marks of our entries in the backend other than ``name`` (empty: none, unread)."""
    if name == "nft":
        return kernel.legacy_marks  # read once, with the kernel's tables
    if name == "legacy" and kernel.ours_nft:
        try:
            nft = NftBackend()
            with nft:
                return nft.marks()
        except (PymmproxyError, OSError):
            return ()
    return ()


def backend(requested: str) -> BackendFacts:
    """The firewall backend ``pathway`` would use, and why; where our entries are."""
    kernel = read_kernel_tables()
    if requested != "auto":
        name, reason = resolve_backend_name(requested), "requested"
    else:
        found = detect_backend(kernel=kernel)
        name, reason = found.backend, f"auto: {found.reason}"
    return BackendFacts(
        name, reason, kernel.legacy, nft_table=kernel.ours_nft,
        legacy_entries=kernel.ours_legacy, other_marks=other_marks(name, kernel),
    )  # fmt: skip


def ipv6() -> Ipv6State:
    """Whether IPv6 is off in this namespace (then pathways are IPv4 only)."""
    return probe_ipv6()


def mark(
    mark: int, requested: str, udp_instances: tuple[str, ...] = (), ipv6: Ipv6State | None = None
) -> MarkFacts:
    """``pathway.status`` of one mark; a failure to read it is a finding."""
    try:
        st = pathway_status(mark, backend=requested, ipv6=ipv6)
    except PymmproxyError as exc:
        return MarkFacts(mark, None, str(exc), udp_instances)
    return MarkFacts(mark, st, "", udp_instances)


def _outcome(exc: OSError) -> Outcome:
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return Outcome(errno.ETIMEDOUT, "timed out")
    code = exc.errno or errno.EIO
    return Outcome(code, exc.strerror or os.strerror(code))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind(endpoint: Endpoint, transport: Transport) -> Outcome:
    """Bind the listen address as the daemon would, then let go of it.

    TCP sets SO_REUSEADDR (TIME_WAIT leftovers do not count as "in use", a listener
    does); UDP does not, since two UDP sockets with SO_REUSEADDR may share a port.
    """
    kind = socket.SOCK_DGRAM if transport is Transport.UDP else socket.SOCK_STREAM
    try:
        sock, host = listen_family(endpoint, kind)
        with sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, endpoint.port))
    except OSError as exc:
        return _outcome(exc)
    return Outcome()


def connect(endpoint: Endpoint, timeout: float) -> Outcome:
    """A plain TCP connect (from our own address) with a short timeout."""
    try:
        with socket.socket(_family(endpoint.host), socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((endpoint.host, endpoint.port))
    except OSError as exc:
        return _outcome(exc)
    return Outcome()


def local_address(host: str) -> Outcome:
    """Whether ``host`` is an address of this namespace (a UDP bind to port 0 works)."""
    try:
        with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
            sock.bind((host, 0))
    except OSError as exc:
        return _outcome(exc)
    return Outcome()


def _allow(path: Path) -> tuple[int | None, str]:
    try:
        return len(load_allow_list(path)), ""
    except ConfigError as exc:
        return None, str(exc)


def instance(
    inst: Instance, instances_file: Path, allow_path: Path, timeout: float
) -> InstanceFacts:
    """Everything :func:`~pymmproxy.doctor.checks.check_instance` needs for one instance."""
    targets: list[TargetFacts] = []
    for column, ep in (("target_ipv4", inst.target4), ("target_ipv6", inst.target6)):
        if ep is None:
            continue
        if inst.transport is Transport.UDP:
            outcome = local_address(ep.host)
        else:
            outcome = connect(ep, timeout)
        targets.append(TargetFacts(column, ep, outcome))
    count, error = _allow(allow_path)
    return InstanceFacts(
        inst=inst,
        where=f"{instances_file}:{inst.line}",
        bind=bind(inst.listen, inst.transport),
        holder_pid=instancelock.holder_pid(inst.name),
        targets=tuple(targets),
        allow_path=allow_path,
        allow_count=count,
        allow_error=error,
        timeout=timeout,
    )
