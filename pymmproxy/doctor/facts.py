"""What the probes of ``pymmproxy doctor`` found: plain values, no I/O, no verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pymmproxy.conffiles import Instance
from pymmproxy.pathway import PathwayStatus
from pymmproxy.pathway.firewall.base import BackendName
from pymmproxy.pathway.ipv6 import Ipv6State
from pymmproxy.settings import Endpoint


@dataclass(frozen=True, slots=True)
class Privileges:
    """Who doctor runs as."""

    euid: int
    cap_eff: int | None  # None: /proc/self/status unreadable


@dataclass(frozen=True, slots=True)
class BackendFacts:
    """The firewall backend a pathway command would use here."""

    name: BackendName
    reason: str  # "requested" or "auto: ..."
    legacy_tables: tuple[str, ...] | None = ()  # e.g. "mangle (IPv4)"; None: unreadable
    nft_table: bool = False  # table inet pymmproxy exists
    legacy_entries: bool = False  # legacy mangle holds CONNMARK entries of ours
    #: the marks of our entries in the backend not chosen (empty: unknown or none)
    other_marks: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MarkFacts:
    """``pathway.status`` of one mark, and who depends on it."""

    mark: int
    status: PathwayStatus | None  # None: could not be read, see error
    error: str = ""
    udp_instances: tuple[str, ...] = ()  # instances using this mark over UDP


@dataclass(frozen=True, slots=True)
class Outcome:
    """One socket probe: ``code`` 0 on success, else the errno."""

    code: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass(frozen=True, slots=True)
class TargetFacts:
    """One target of an instance and how the probe went."""

    column: str  # target_ipv4 / target_ipv6
    endpoint: Endpoint
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class InstanceFacts:
    """Probe results for one instance of instances.tsv."""

    inst: Instance
    where: str  # "instances.tsv:LINE", for fixes
    bind: Outcome
    holder_pid: int | None  # instance lock holder (0: held, pid unreadable)
    targets: tuple[TargetFacts, ...]
    allow_path: Path
    allow_count: int | None  # None: not loaded, see allow_error
    allow_error: str = ""
    timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything one doctor run found."""

    privileges: Privileges
    backend: BackendFacts
    marks: tuple[MarkFacts, ...] = ()
    instances: tuple[InstanceFacts, ...] = ()
    ipv6: Ipv6State = field(default_factory=Ipv6State)  # off: pathways are IPv4 only
