"""TPROXY instances: one ``IP_TRANSPARENT`` listener serves a whole port range.

The TPROXY rule (:mod:`pymmproxy.pathway.tproxy`) hands connections for any port of the
instance's range ``first-last`` to this one listener without NAT, so an accepted socket's
local address is the original destination. The target port of a connection is chosen as:

1. the PROXY header's destination port, if it lies in the range;
2. else the original destination port (the accepted socket's local port), if in the range;
3. else the connection fails (``upstream_error``: port outside the range).

Port ``p`` then goes to ``target_port + (p - first)`` on the instance's target address
(``target_port == first`` keeps ports unchanged). Everything else is plain TCP handling.
"""

from __future__ import annotations

from typing import Any

from pymmproxy.errors import UpstreamError
from pymmproxy.server.context import InstanceContext
from pymmproxy.server.tcp import ClientProtocol


def _shifted(target: tuple[str, int] | None, shift: int) -> tuple[str, int] | None:
    return None if target is None else (target[0], target[1] + shift)


def pick_port(header_port: int | None, local_port: int | None, ports: tuple[int, int]) -> int:
    """The destination port a connection is for (see the module docstring)."""
    first, last = ports
    for port in (header_port, local_port):
        if port is not None and first <= port <= last:
            return port
    raise UpstreamError(
        f"destination port {header_port or local_port} is outside ports={first}-{last}"
    )


class TproxyProtocol(ClientProtocol):
    """A client connection of a TPROXY instance: targets follow the destination port."""

    __slots__ = ("ports",)

    def __init__(self, ctx: InstanceContext, ports: tuple[int, int]) -> None:
        super().__init__(ctx)
        self.ports = ports

    def targets(self, header: Any) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:  # noqa: ANN401
        """The instance's targets shifted to the connection's destination port."""
        local = self.transport.get_extra_info("sockname")
        port = pick_port(header.dst_port, local[1] if local else None, self.ports)
        shift = port - self.ports[0]
        return _shifted(self.ctx.target4, shift), _shifted(self.ctx.target6, shift)
