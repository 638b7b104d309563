"""Which firewall backend this network namespace uses: the kernel's state first, then the tools.

1. Where pymmproxy's own entries already are: ``table inet pymmproxy`` in the nf_tables
   ruleset means nft; else CONNMARK rules of ours in a legacy ``mangle`` table mean legacy
   (read only when ``mangle`` is listed in ``/proc/net/ip*_tables_names``, so that the read
   creates nothing). ``status`` and ``del`` thus find what ``add`` made.
2. The kernel (what is really in use here, also from inside a container): legacy xtables
   tables are listed in ``/proc/net/ip_tables_names`` / ``ip6_tables_names``, and count
   only when they hold a rule (any legacy tool, even ``iptables-legacy -L``, leaves an empty
   table behind); iptables-nft keeps its tables in the nf_tables ruleset as ``ip`` / ``ip6``
   tables named ``filter``, ``nat``, ``mangle``, ``raw`` or ``security``. Only one kind
   present decides.
3. Otherwise (neither or both kinds, or not readable: both need CAP_NET_ADMIN / root) the
   installed ``iptables`` (``/usr/sbin/iptables``, else the one on ``PATH``), followed through
   its symlinks (Debian: ``/etc/alternatives``): ``xtables-nft-multi`` / ``iptables-nft`` is
   nf_tables, ``xtables-legacy-multi`` / ``iptables-legacy`` legacy, and an iptables older
   than 1.8 (``xtables-multi``, or a plain executable), which has no nft variant, legacy.
4. Without any ``iptables``: nft when libnftables can be loaded, legacy otherwise.

No tool is run. :func:`decide` is the pure decision; :func:`detect_backend` gathers its input.
"""

from __future__ import annotations

import ctypes
import shutil
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymmproxy.errors import PathwayError
from pymmproxy.pathway.firewall.base import BackendName, has_net_admin
from pymmproxy.pathway.firewall.libnftables import Nftables, libnftables_available

DEFAULT_IPTABLES = Path("/usr/sbin/iptables")
LEGACY_TABLE_FILES = (
    (Path("/proc/net/ip_tables_names"), "IPv4"),
    (Path("/proc/net/ip6_tables_names"), "IPv6"),
)
#: The tables iptables-nft creates in the nf_tables ruleset (families ip and ip6).
XT_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
XT_FAMILIES = frozenset({"ip", "ip6"})
#: Multi-call binaries of iptables < 1.8, which only knew legacy xtables.
OLD_MULTI = frozenset({"xtables-multi", "iptables-multi", "ip6tables-multi"})
MULTI: dict[str, BackendName] = {"xtables-nft-multi": "nft", "xtables-legacy-multi": "legacy"}
ELF_MAGIC = b"\x7fELF"
OUR_NFT_TABLE = ("inet", "pymmproxy")
#: ``IPT_SO_GET_INFO`` / ``IP6T_SO_GET_INFO`` and ``struct ipt_getinfo``: name[32],
#: valid_hooks, hook_entry[5], underflow[5], num_entries, size.
SO_GET_INFO = 64
GETINFO_FORMAT = "=32sI5I5III"
GETINFO_SIZE = struct.calcsize(GETINFO_FORMAT)


@dataclass(frozen=True, slots=True)
class Detection:
    """The chosen backend and a one-line reason for status output."""

    backend: BackendName
    reason: str


@dataclass(frozen=True, slots=True)
class KernelTables:
    """Firewall tables found in this namespace; None: could not be read."""

    legacy: tuple[str, ...] | None  # e.g. "mangle (IPv4)"
    xt_nft: tuple[str, ...] | None  # e.g. "ip filter"
    legacy_with_rules: tuple[str, ...] | None = None  # None: unknown, all of legacy count
    ours_nft: bool = False  # table inet pymmproxy exists
    legacy_marks: tuple[int, ...] = ()  # marks with CONNMARK rules of ours in legacy mangle

    @property
    def ours_legacy(self) -> bool:
        """A legacy mangle table holds CONNMARK rules of ours."""
        return bool(self.legacy_marks)


@dataclass(frozen=True, slots=True)
class Binary:
    """What the installed iptables is: its variant (None: unknown) and how it resolved."""

    variant: BackendName | None
    text: str  # e.g. "/usr/sbin/iptables -> xtables-nft-multi"


# -- the decision (pure) -------------------------------------------------------------------


def classify(binary: Path) -> BackendName | None:
    """``nft`` / ``legacy`` from the name an iptables binary resolves to, else None."""
    name = binary.name
    if "nft" in name:
        return "nft"
    if "legacy" in name or name in OLD_MULTI:
        return "legacy"
    return None


def xt_nft_tables(listing: Iterable[dict[str, Any]]) -> tuple[str, ...]:
    """The iptables-nft tables in a libnftables ``list tables`` JSON listing."""
    found: list[str] = []
    for item in listing:
        table = item.get("table")
        if not isinstance(table, dict):
            continue
        family, name = table.get("family"), table.get("name")
        if family in XT_FAMILIES and name in XT_TABLES:
            found.append(f"{family} {name}")
    return tuple(found)


def _listed(what: str, found: tuple[str, ...] | None) -> str:
    if found is None:
        return f"{what} unreadable"
    return f"{what} [{', '.join(found)}]" if found else f"no {what}"


def _legacy_text(kernel: KernelTables) -> tuple[tuple[str, ...] | None, str]:
    """The legacy tables in use (holding rules) and how to say what was found."""
    if kernel.legacy is None or kernel.legacy_with_rules is None:
        return kernel.legacy, _listed("legacy tables", kernel.legacy)
    used = tuple(t for t in kernel.legacy if t in kernel.legacy_with_rules)
    empty = tuple(t for t in kernel.legacy if t not in used)
    parts = [f"legacy tables with rules [{', '.join(used)}]"] if used else []
    parts += [f"empty legacy tables [{', '.join(empty)}]"] if empty else []
    return used, ", ".join(parts) or "no legacy tables"


def decide(kernel: KernelTables, binary: Binary | None, libnftables: bool) -> Detection:
    """Where our entries are, else the kernel's tables in use, else the iptables binary,
    else libnftables."""
    if kernel.ours_nft:
        return Detection("nft", "kernel: our table inet pymmproxy exists")
    if kernel.ours_legacy:
        return Detection("legacy", "kernel: our CONNMARK rules are in the legacy mangle table")
    used, legacy = _legacy_text(kernel)
    xt_nft = _listed("iptables-nft tables", kernel.xt_nft)
    if used and not kernel.xt_nft:
        return Detection("legacy", f"kernel: {legacy}, {xt_nft}")
    if kernel.xt_nft and not used:
        return Detection("nft", f"kernel: {xt_nft}, {legacy}")
    seen = f"kernel: {legacy}, {xt_nft}"
    if binary is not None and binary.variant is not None:
        return Detection(binary.variant, f"{seen}; {binary.text}")
    tool = "no iptables found" if binary is None else f"{binary.text} (variant unknown)"
    if libnftables:
        return Detection("nft", f"{seen}; {tool}; libnftables available")
    return Detection("legacy", f"{seen}; {tool}; libnftables missing")


# -- gathering the input -------------------------------------------------------------------


def read_legacy_tables(
    files: Iterable[tuple[Path, str]] = LEGACY_TABLE_FILES,
) -> tuple[str, ...] | None:
    """The legacy xtables tables of this namespace, e.g. ``mangle (IPv4)``; None if the
    lists are unreadable (they are root-only)."""
    found: list[str] = []
    for path, family in files:
        try:
            names = path.read_text(encoding="ascii").split()
        except PermissionError:
            return None
        except OSError:  # ip(6)_tables not loaded: no legacy tables of this family
            continue
        found += [f"{name} ({family})" for name in names]
    return tuple(found)


def has_our_table(listing: Iterable[dict[str, Any]]) -> bool:
    """Whether a ``list tables`` JSON listing holds ``table inet pymmproxy``."""
    return any(
        isinstance(t := item.get("table"), dict)
        and (t.get("family"), t.get("name")) == OUR_NFT_TABLE
        for item in listing
    )


def read_nft_tables() -> list[dict[str, Any]] | None:
    """This namespace's ``list tables`` JSON listing; None if it cannot be read."""
    if not libnftables_available() or not has_net_admin():  # libnftables would print to stderr
        return None
    try:
        with Nftables() as nft:
            return nft.run([{"list": {"tables": {}}}])
    except (PathwayError, OSError, ValueError):
        return None


def rule_count(num_entries: int, valid_hooks: int) -> int:
    """Rules in an xtables table: its entries less one policy per built-in chain and the
    closing error entry (a user chain adds two, so it counts as holding rules)."""
    return max(0, num_entries - bin(valid_hooks).count("1") - 1)


def _legacy_rule_count(table: str, family: str) -> int | None:
    """Rules in one existing legacy table (``IPT_SO_GET_INFO``); None if unreadable.

    Asked on a UDP socket: the kernel wants CAP_NET_ADMIN for the request, and a UDP
    socket, unlike a raw one, needs no CAP_NET_RAW. Only call it for a listed table:
    asking for a missing one would instantiate it.
    """
    af, level = (socket.AF_INET, 0) if family == "IPv4" else (socket.AF_INET6, 41)
    buf = ctypes.create_string_buffer(table.encode("ascii"), GETINFO_SIZE)
    size = ctypes.c_uint32(GETINFO_SIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        with socket.socket(af, socket.SOCK_DGRAM) as sock:
            rc = libc.getsockopt(sock.fileno(), level, SO_GET_INFO, buf, ctypes.byref(size))
    except OSError:
        return None
    if rc != 0:
        return None
    fields = struct.unpack_from(GETINFO_FORMAT, buf.raw)
    return rule_count(fields[-2], fields[1])


def read_legacy_with_rules(legacy: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Those of the listed legacy tables (``mangle (IPv4)``) that hold rules; None: unknown."""
    if legacy is None:
        return None
    used: list[str] = []
    for entry in legacy:
        name, _, family = entry.partition(" (")
        count = _legacy_rule_count(name, family.rstrip(")"))
        if count is None:
            return None
        if count:
            used.append(entry)
    return tuple(used)


def read_kernel_tables() -> KernelTables:
    """Everything :func:`decide` needs from this namespace (reads only, creates nothing)."""
    from pymmproxy.pathway.firewall.legacy import our_marks  # noqa: PLC0415 - cycle

    legacy = read_legacy_tables()
    listing = read_nft_tables()
    return KernelTables(
        legacy=legacy,
        xt_nft=None if listing is None else xt_nft_tables(listing),
        legacy_with_rules=read_legacy_with_rules(legacy),
        ours_nft=listing is not None and has_our_table(listing),
        legacy_marks=our_marks() or (),  # None (unreadable) counts as none found
    )


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def inspect_binary(binary: Path) -> Binary:
    """The variant of one existing iptables binary (symlinks, hard links, old builds)."""
    target = binary.resolve()
    text = f"{binary} -> {target.name}" if target != binary else str(binary)
    variant = classify(target)
    if variant is not None:
        suffix = " (iptables < 1.8: legacy only)" if target.name in OLD_MULTI else ""
        return Binary(variant, text + suffix)
    for multi, kind in MULTI.items():  # a hard link to a multi-call binary
        sibling = target.with_name(multi)
        if sibling.exists() and sibling.samefile(target):
            return Binary(kind, f"{text} (= {multi})")
    if _is_elf(target):  # a program of its own, not a wrapper script: iptables < 1.8
        return Binary("legacy", f"{text} (iptables < 1.8: legacy only)")
    return Binary(None, text)


def find_binary(candidates: Sequence[Path] | None = None) -> Binary | None:
    """The first of ``candidates`` (default: /usr/sbin/iptables, PATH) whose variant is
    known, else the first that exists, else None."""
    if candidates is None:
        on_path = shutil.which("iptables")
        candidates = [DEFAULT_IPTABLES, *([Path(on_path)] if on_path else [])]
    found = [inspect_binary(b) for b in candidates if b.exists()]
    known = [b for b in found if b.variant is not None]
    return next(iter(known or found), None)


def detect_backend(
    candidates: Sequence[Path] | None = None, kernel: KernelTables | None = None
) -> Detection:
    """Pick the backend for this namespace (see the module docstring)."""
    if kernel is None:
        kernel = read_kernel_tables()
    return decide(kernel, find_binary(candidates), libnftables_available())
