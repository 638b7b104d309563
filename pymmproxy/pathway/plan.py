"""The exact kernel state that makes up the pathway of one fwmark (pure, no I/O).

For fwmark ``M`` (which doubles as routing table ``M``) a pathway is, per address family::

    ip rule add fwmark M lookup M pref 100 protocol 112   # marked packets use table M
    ip rule add from 127.0.0.0/8 iif lo lookup M pref 101 protocol 112  # loopback replies
    ip route add local 0.0.0.0/0 dev lo table M              # table M delivers everything locally
    iptables -t mangle -A PREROUTING -m mark --mark M -j CONNMARK --save-mark
    iptables -t mangle -A OUTPUT -m connmark --mark M -j CONNMARK --restore-mark

and the same with ``ip -6`` / ``ip6tables``, ``::/0`` and ``from ::1/128``. The loopback
rule is what routes a local service's reply (source 127.0.0.1 / ::1, unmarked) back to the
spoofed client instead of out of the default route; it also covers UDP, unlike the sysctl
``net.ipv4.tcp_fwmark_accept=1``, which pymmproxy only reads. ``protocol 112``
(:data:`RULE_PROTOCOL`) marks the rules as pymmproxy's, so a delete can name them exactly
(rules without a protocol, as earlier versions added them, count as ours too). With the
nft backend the two firewall entries live in ``table inet pymmproxy`` instead (see
:mod:`.firewall.nft`). A plan may leave out a family (IPv6 on a host where it is off,
see :mod:`.ipv6`).
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from pymmproxy.settings import validate_mark

#: ``ip rule`` priority of the ``fwmark M lookup M`` rules (before ``main`` at 32766).
FWMARK_RULE_PRIORITY = 100
#: ``ip rule`` priority of the ``from <loopback> iif lo lookup M`` reply rules.
LOOPBACK_RULE_PRIORITY = 101
#: The protocol pymmproxy's rules carry (``ip rule ... protocol 112``, shown as ``proto 112``):
#: a private number that iproute2's rt_protos and the routing daemons leave unused, so a
#: rule with it is ours. Not ``static`` (4): systemd-networkd gives its RoutingPolicyRule
#: entries that by default. Rules with protocol 0 (earlier versions) are ours too.
RULE_PROTOCOL = 112


class Family(enum.Enum):
    """An address family, with the spellings each tool uses for it."""

    V4 = 4
    V6 = 6

    @property
    def af(self) -> int:
        return socket.AF_INET if self is Family.V4 else socket.AF_INET6

    @property
    def ip_cmd(self) -> str:
        return "ip" if self is Family.V4 else "ip -6"

    @property
    def iptables_cmd(self) -> str:
        return "iptables" if self is Family.V4 else "ip6tables"

    @property
    def nfproto(self) -> str:
        return "ipv4" if self is Family.V4 else "ipv6"

    @property
    def any_net(self) -> str:
        return "0.0.0.0/0" if self is Family.V4 else "::/0"

    @property
    def loopback_net(self) -> str:
        return "127.0.0.0/8" if self is Family.V4 else "::1/128"


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One ``ip rule``: ``[fwmark F] [from SRC iif IIF] lookup TABLE pref PRIORITY``
    (added with ``protocol 112``, :data:`RULE_PROTOCOL`)."""

    item: str
    family: Family
    priority: int
    table: int
    fwmark: int | None = None
    src: str | None = None
    iif: str | None = None

    def command(self, verb: str = "add") -> str:
        """The equivalent iproute2 command, e.g. ``ip rule add fwmark 7 lookup 7 pref 100``."""
        parts = [self.family.ip_cmd, "rule", verb]
        if self.fwmark is not None:
            parts += ["fwmark", str(self.fwmark)]
        if self.src is not None:
            parts += ["from", self.src]
        if self.iif is not None:
            parts += ["iif", self.iif]
        parts += ["lookup", str(self.table), "pref", str(self.priority)]
        if verb == "add":
            parts += ["protocol", str(RULE_PROTOCOL)]
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route: ``ip route add local DST dev DEV table TABLE``."""

    item: str
    family: Family
    table: int
    dst: str
    dev: str = "lo"

    def command(self, verb: str = "add") -> str:
        """The equivalent iproute2 command."""
        return (
            f"{self.family.ip_cmd} route {verb} local {self.dst} dev {self.dev} table {self.table}"
        )


class FwAction(enum.Enum):
    """Which half of the CONNMARK recipe an entry is."""

    SAVE = "save-mark"  # PREROUTING: packet mark -> conntrack mark
    RESTORE = "restore-mark"  # OUTPUT: conntrack mark -> packet mark


@dataclass(frozen=True, slots=True)
class FirewallSpec:
    """One mangle-table entry; :meth:`command` and :meth:`nft_command` show both spellings."""

    item: str
    family: Family
    mark: int
    action: FwAction

    @property
    def chain(self) -> str:
        """The iptables chain (``PREROUTING`` or ``OUTPUT``)."""
        return "PREROUTING" if self.action is FwAction.SAVE else "OUTPUT"

    @property
    def match(self) -> str:
        """The iptables match module (``mark`` or ``connmark``)."""
        return "mark" if self.action is FwAction.SAVE else "connmark"

    def command(self, verb: str = "add") -> str:
        """The equivalent ``iptables -t mangle -A|-D ...`` command."""
        flag = "-A" if verb == "add" else "-D"
        return (
            f"{self.family.iptables_cmd} -t mangle {flag} {self.chain} -m {self.match}"
            f" --mark {self.mark} -j CONNMARK --{self.action.value}"
        )

    def nft_rule(self) -> str:
        """The nft backend's rule body, e.g. ``meta nfproto ipv4 meta mark 0x7b ct mark ...``."""
        if self.action is FwAction.SAVE:
            body = f"meta mark {self.mark:#x} ct mark set meta mark"
        else:
            body = f"ct mark {self.mark:#x} meta mark set ct mark"
        return f"meta nfproto {self.family.nfproto} {body}"

    def nft_command(self) -> str:
        """The equivalent rule of the nft backend (``nft add rule inet pymmproxy ...``)."""
        return f"nft add rule inet pymmproxy {self.chain.lower()} {self.nft_rule()}"


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything ``pathway add M`` creates and ``pathway del M`` removes, in apply order."""

    mark: int
    rules: tuple[RuleSpec, ...]
    routes: tuple[RouteSpec, ...]
    firewall: tuple[FirewallSpec, ...]

    def commands(self, verb: str = "add") -> list[str]:
        """The whole plan as equivalent ``ip`` / ``iptables`` commands."""
        return [
            *(r.command(verb) for r in self.routes),
            *(r.command(verb) for r in self.rules),
            *(f.command(verb) for f in self.firewall),
        ]


ITEM_FWMARK_RULE = "rule fwmark"
ITEM_LOOPBACK_RULE = "rule loopback reply"
ITEM_LOCAL_ROUTE = "route local"
ITEM_SAVE_MARK = "mangle save-mark"
ITEM_RESTORE_MARK = "mangle restore-mark"
#: Status rows in display order.
ITEMS = (ITEM_FWMARK_RULE, ITEM_LOOPBACK_RULE, ITEM_LOCAL_ROUTE, ITEM_SAVE_MARK, ITEM_RESTORE_MARK)


#: Both address families, in apply order.
BOTH = (Family.V4, Family.V6)


def plan(mark: int, families: Sequence[Family] = BOTH) -> Plan:
    """The pathway of ``mark`` (validated with :func:`validate_mark`) for ``families``."""
    mark = validate_mark(mark)
    families = [fam for fam in BOTH if fam in families]
    rules = tuple(
        spec
        for fam in families
        for spec in (
            RuleSpec(ITEM_FWMARK_RULE, fam, FWMARK_RULE_PRIORITY, mark, fwmark=mark),
            RuleSpec(
                ITEM_LOOPBACK_RULE,
                fam,
                LOOPBACK_RULE_PRIORITY,
                mark,
                src=fam.loopback_net,
                iif="lo",
            ),
        )
    )
    routes = tuple(RouteSpec(ITEM_LOCAL_ROUTE, fam, mark, fam.any_net) for fam in families)
    firewall = tuple(
        FirewallSpec(item, fam, mark, action)
        for fam in families
        for item, action in ((ITEM_SAVE_MARK, FwAction.SAVE), (ITEM_RESTORE_MARK, FwAction.RESTORE))
    )
    return Plan(mark, rules, routes, firewall)
