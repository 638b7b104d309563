"""``ports=FIRST-LAST`` in instances.tsv: the port range of a TPROXY instance (pure checks).

An instance with ``ports=`` listens once, on ``listen_addr``, with ``IP_TRANSPARENT``; a
TPROXY rule (:mod:`pymmproxy.pathway.tproxy`) sends it every TCP connection for a port of
the range on the listen host (any local address when the host is ``0.0.0.0`` / ``::``).
Port ``p`` is relayed to ``target_port + (p - FIRST)`` (see :mod:`pymmproxy.server.tproxy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pymmproxy.errors import ConfigError
from pymmproxy.settings import Endpoint, Transport

PortRange = tuple[int, int]
_WILDCARD = frozenset({"0.0.0.0", "::"})


class _Listens(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def listen(self) -> Endpoint: ...
    @property
    def transport(self) -> Transport: ...
    @property
    def ports(self) -> PortRange | None: ...
    @property
    def line(self) -> int: ...


def parse_ports(
    text: str, transport: Transport, target_port: int, err: Callable[[str], ConfigError]
) -> PortRange:
    """``FIRST-LAST`` (or one port); TCP only; the shifted target ports must stay valid."""
    first_text, _, last_text = text.partition("-")
    last_text = last_text or first_text
    numbers = (first_text, last_text)
    if not all(t.isascii() and t.isdigit() and len(t) <= 5 for t in numbers):
        raise err(f"bad ports {text!r}: expected FIRST-LAST, e.g. 8000-8099")
    first, last = int(first_text), int(last_text)
    if not 0 < first <= last < 65536:
        raise err(f"bad ports {text!r}: need 1 <= FIRST <= LAST <= 65535")
    if transport is not Transport.TCP:
        raise err("ports= (TPROXY mode) is TCP only")
    if target_port + last - first > 65535:
        raise err(f"target_port {target_port} + {last - first} (ports={text}) exceeds 65535")
    return first, last


def hosts_overlap(a: Endpoint, b: Endpoint) -> bool:
    """Whether two listen hosts can receive the same packets (a wildcard takes its family;
    ``::`` takes both)."""
    if a.host == b.host or "::" in (a.host, b.host):
        return True
    return (a.host in _WILDCARD or b.host in _WILDCARD) and a.is_v6 == b.is_v6


def _inside(port: int, ports: PortRange) -> bool:
    return ports[0] <= port <= ports[1]


def clash(new: _Listens, old: _Listens) -> str | None:
    """Why ``new`` cannot run next to ``old`` because of a TPROXY range, else None."""
    if not (new.ports or old.ports) or not hosts_overlap(new.listen, old.listen):
        return None
    where = f"instance {old.name!r} on line {old.line}"
    if new.ports and old.ports and new.ports[0] <= old.ports[1] and old.ports[0] <= new.ports[1]:
        return f"ports={new.ports[0]}-{new.ports[1]} overlaps the ports of {where}"
    if new.ports and old.transport is Transport.TCP and _inside(old.listen.port, new.ports):
        return f"ports={new.ports[0]}-{new.ports[1]} covers the listen_addr of {where}"
    if old.ports and new.transport is Transport.TCP and _inside(new.listen.port, old.ports):
        return f"listen_addr {new.listen} is inside the ports of TPROXY {where}"
    return None


def check_ranges(new: _Listens, old: _Listens, err: Callable[[str], ConfigError]) -> None:
    """Raise ``err(why)`` if :func:`clash` finds a problem."""
    why = clash(new, old)
    if why is not None:
        raise err(why)
