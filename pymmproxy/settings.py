"""Frozen, validated settings for one proxy instance (what the daemon runs)."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field, replace

from pymmproxy.errors import UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_MARK = 2**32 - 1
MAX_MARK_TEXT = 20  # longest written mark accepted: keeps int() off huge digit strings
RESERVED_TABLES = frozenset({0, 253, 254, 255})
DEFAULT_MAX_PENDING_HEADERS = 4096


class Transport(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IP address and port; ``str()`` gives ``1.2.3.4:5`` or ``[::1]:5``, or ``written``.

    ``written`` keeps an operator's ``0.0.0.0:PORT`` for what is ``[::]:PORT`` to the kernel
    (see :meth:`parse_listen`), so logs, metrics labels and errors say what the config says,
    as go-mmproxy's do. It takes no part in comparisons.
    """

    host: str
    port: int
    written: str = field(default="", compare=False)

    @property
    def is_v6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        if self.written:
            return self.written
        return f"[{self.host}]:{self.port}" if self.is_v6 else f"{self.host}:{self.port}"

    def at_port(self, port: int) -> Endpoint:
        """The same address (and spelling) on ``port``: a worker's own metrics port."""
        written = f"{self.written.rpartition(':')[0]}:{port}" if self.written else ""
        return Endpoint(self.host, port, written)

    @classmethod
    def parse(cls, text: str, *, what: str = "address") -> Endpoint:
        """Parse ``ADDR:PORT`` / ``[V6]:PORT`` (an empty host means all addresses, v4)."""
        text = text.strip()
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise UsageError(f"bad {what} {text!r}: expected [IPv6]:PORT")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise UsageError(f"bad {what} {text!r}: expected ADDR:PORT")
            if ":" in host:
                raise UsageError(f"bad {what} {text!r}: put IPv6 addresses in brackets")
        if host in {"", "*"}:
            host = "0.0.0.0"
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"bad {what} {text!r}: {host!r} is not an IP address") from None
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
            raise UsageError(f"bad {what} {text!r}: scope ids (%IFACE) are not supported")
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # what it means (as in Go): clashes are then seen as such
        digits = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
        if not digits or not 0 < int(port_text) < 65536:
            raise UsageError(f"bad {what} {text!r}: port must be 1..65535")
        return cls(addr.compressed, int(port_text))

    @classmethod
    def parse_listen(cls, text: str, *, what: str = "listen address") -> Endpoint:
        """A listen address: as :meth:`parse`, but the IPv4 wildcard (``0.0.0.0``, ``*`` or no
        host) means both families, ``[::]``, as in Go and so in go-mmproxy (its default
        ``-l 0.0.0.0:8443`` takes IPv6 load balancers too). A host without IPv6 listens on
        IPv4 alone (:func:`pymmproxy.net.sockets.listen_socket`)."""
        endpoint = cls.parse(text, what=what)
        if endpoint.host != "0.0.0.0":
            return endpoint
        return cls("::", endpoint.port, f"0.0.0.0:{endpoint.port}")


def target_problem(host: str) -> str | None:
    """Why ``host`` cannot be a target (one connects to one service), or None.

    A connect() to the unspecified address reaches this host only by accident, and from a
    spoofed source it went nowhere (timed out) in a namespace test: say 127.0.0.1.
    """
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        return f"{host} is not an address to connect to (127.0.0.1 or ::1 is this host)"
    if addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
        return f"{host} is not a unicast address"
    return None


def validate_mark(value: int, *, what: str = "mark") -> int:
    """A fwmark doubles as a routing table id: 1..2^32-1 and not 253/254/255."""
    if not 0 < value <= MAX_MARK:
        raise UsageError(f"bad {what} {value}: must be 1..{MAX_MARK}")
    if value in RESERVED_TABLES:
        raise UsageError(f"bad {what} {value}: {value} is a reserved routing table id")
    return value


DEFAULT_MAX_HEADER_SIZE = 16384  # HAProxy reads a header into one 16 KB buffer, too
MIN_MAX_HEADER_SIZE = 16 + 216  # room for a v2 UNIX address block
MAX_MAX_HEADER_SIZE = 16 + 0xFFFF


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float = 5.0
    connect_timeout: float = 10.0
    idle_timeout: float = 0.0  # 0 = off, like go-mmproxy
    keepalive: int = 15  # TCP keepalive idle/interval seconds on both sides (Go's); 0 = off
    max_connections: int = 0  # 0 = unlimited
    drain_timeout: float = 30.0
    udp_close_after: float = 60.0
    udp_max_clients: int = 4096
    max_pending_headers: int = (
        DEFAULT_MAX_PENDING_HEADERS  # connections still waiting for their header; 0 = unlimited
    )
    allow_any_source: bool = False  # spoof loopback/multicast/own addresses too (unsafe)
    #: the largest v2 header accepted (16 + its length field; the spec allows 16 + 65535):
    #: what an allowed peer can make the parser read and hold per pending connection
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE

    def share(self, workers: int) -> Limits:
        """One of ``workers`` processes' part of the connection limits, rounded up: the
        flags bound the instance, not each worker. Not ``udp_max_clients``: the kernel
        picks a worker by the sender's address, and a load balancer that sends every
        client's datagrams from one socket sends them all to one worker."""
        if workers <= 1:
            return self

        def part(limit: int) -> int:
            return -(-limit // workers)  # 0 (no limit) stays 0

        return replace(
            self,
            max_connections=part(self.max_connections),
            max_pending_headers=part(self.max_pending_headers),
        )


@dataclass(frozen=True, slots=True)
class InstanceSettings:
    """Everything one listener needs; built by the CLI or from instances.tsv."""

    listen: Endpoint
    target4: Endpoint | None
    target6: Endpoint | None
    mark: int = 0
    transport: Transport = Transport.TCP
    allowed: tuple[Network, ...] | None = None  # None = allow any (explicit opt-in)
    name: str = ""
    listeners: int = 1
    limits: Limits = field(default_factory=Limits)
    metrics: Endpoint | None = None  # Prometheus endpoint (off by default)
