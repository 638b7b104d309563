"""Policy rules and routes of a pathway, over rtnetlink (pyroute2 ``IPRoute``).

Reads (:meth:`Routing.has_rule`, :meth:`Routing.has_route`) dump and compare exactly: all
attributes we set, and no selector we never set (iif, src, metric, another protocol...).
An add that gets ``EEXIST`` was already done. A delete first dumps the candidates and asks
the kernel to remove only an exact match, with enough attributes to pin it: the kernel
matches a delete loosely (it ignores iif/src when the request leaves them out, the protocol
when it is 0, an IPv6 metric when none is given), so a bare request could hit a foreign
rule or route. Our rules carry the private protocol :data:`RULE_PROTOCOL` (112) for that
reason, pinning a delete against foreign entries (``ip rule`` adds protocol 0, and
systemd-networkd ``static``, 4, which is therefore foreign); rules of earlier versions
(protocol 0) are still ours. A rule is ours only if it carries nothing but the attributes
ours may carry (a whitelist: realms, DSCP, flow labels, attributes pyroute2 cannot name...
make it foreign). Before a delete the dump is walked in the kernel's order: if the first
entry the kernel would take for our request is not exactly ours, the delete is refused
(:meth:`Routing.rule_refusal`, :meth:`Routing.route_refusal`) instead of removing it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pymmproxy.errors import PathwayError
from pymmproxy.pathway.plan import RULE_PROTOCOL, Family, RouteSpec, RuleSpec

FR_ACT_TO_TBL = 1
RTN_LOCAL = 2
RTPROT_BOOT = 3  # what ``ip route add`` uses
#: Protocols of rules that are ours: ours, and none (earlier versions added rules without one).
#: ``static`` (4) is foreign, whoever added the rule.
_OUR_RULE_PROTOS = frozenset({0, RULE_PROTOCOL})
#: The metric of our routes: v4 none (0), v6 the kernel's default for user routes.
ROUTE_METRIC = {Family.V4: 0, Family.V6: 1024}
RT_SCOPE_HOST = 254
FULL_MASK = 0xFFFFFFFF
_ABSENT = frozenset({errno.ENOENT, errno.ESRCH})
#: The attributes a rule of ours may carry (as the kernel dumps them): what we set, and what
#: the kernel reports for every rule. Any other one (realms FRA_FLOW, FRA_DST, FRA_GOTO,
#: DSCP, flow label, masks, ``UNKNOWN`` ones pyroute2 cannot name...) makes a rule foreign.
_OUR_RULE_ATTRS = frozenset({
    "FRA_TABLE", "FRA_PRIORITY", "FRA_PROTOCOL", "FRA_FWMARK", "FRA_FWMASK", "FRA_SRC",
    "FRA_IIFNAME", "FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP",
})  # fmt: skip
#: Of those, the ones the kernel dumps with -1 (0xffffffff) when unset; any other value is
#: a selector we never set.
_UNSET = 0xFFFFFFFF
_UNSET_RULE_ATTRS = ("FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP")
# Route attributes ours never has.
_FOREIGN_ROUTE_ATTRS = (
    "RTA_GATEWAY", "RTA_PREFSRC", "RTA_MULTIPATH", "RTA_VIA", "RTA_SRC", "RTA_FLOW",
    "RTA_NH_ID", "RTA_ENCAP", "RTA_ENCAP_TYPE", "RTA_METRICS", "RTA_EXPIRES",
)  # fmt: skip
#: ``ip route`` type names, for error messages.
_ROUTE_TYPES = {
    1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
    7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat",
}  # fmt: skip
FIB_RULE_INVERT = 0x2
TCP_FWMARK_ACCEPT = Path("/proc/sys/net/ipv4/tcp_fwmark_accept")


_HINTS = {errno.ENETDOWN: "is lo up?"}
_V6_HINTS = {
    errno.EAFNOSUPPORT: "the kernel has no IPv6 (ipv6.disable=1?)",
    errno.EACCES: "IPv6 is off on lo (net.ipv6.conf.lo.disable_ipv6=1?)",
}


def _fail(exc: NetlinkError, what: str, family: Family = Family.V4) -> Exception:
    """``what`` (the equivalent ``ip`` command) and the kernel's reason, as one line.

    Only EPERM means missing privileges (a PermissionError). Any other code is a
    PathwayError naming the errno and, when the kernel sent one, its extended-ack text:
    EACCES on an IPv6 route is IPv6 being off on the device, not a privilege problem.
    """
    code = int(exc.code)
    if code == errno.EPERM:
        return PermissionError(code, what)
    name = errno.errorcode.get(code, f"errno {code}")
    kernel = str(exc.args[1]) if len(exc.args) > 1 and exc.args[1] else ""
    text = kernel if kernel and kernel != os.strerror(code) else os.strerror(code)
    if code == errno.EACCES and text == os.strerror(code):
        text = "refused by the kernel"
    hints = _V6_HINTS if family is Family.V6 else {}
    hint = hints.get(code) or _HINTS.get(code)
    return PathwayError(f"{what}: {text} ({name}){f'; {hint}' if hint else ''}")


@dataclass(frozen=True, slots=True)
class _RuleView:
    """The fields of an FRA rule message that matter for matching."""

    action: int
    table: int
    priority: int
    flags: int
    dst_len: int
    src_len: int
    src: str | None
    fwmark: int | None
    fwmask: int | None
    iifname: str | None
    proto: int
    tos: int
    extra: tuple[str, ...]  # selectors pymmproxy never sets (oif, ip_proto, realms ...)

    @property
    def foreign(self) -> bool:
        """Carries a selector pymmproxy never sets."""
        return bool(self.extra)


@dataclass(frozen=True, slots=True)
class _RouteView:
    type: int
    table: int
    dst_len: int
    dst: str | None
    oif: int | None
    metric: int
    proto: int
    src_len: int
    tos: int
    foreign: bool  # carries an attribute pymmproxy never sets
    scope: int = 0
    prefsrc: str | None = None
    gateway: str | None = None
    multipath: bool = False


def _opt_int(value: object) -> int | None:
    return None if value is None else int(str(value))


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _header(m: Any, key: str) -> int:  # noqa: ANN401 - a pyroute2 message
    try:
        return int(m[key] or 0)
    except KeyError:
        return 0


def _attr_names(m: Any) -> list[str]:  # noqa: ANN401 - a pyroute2 message
    """The names of a message's attributes (``UNKNOWN`` for those pyroute2 cannot name)."""
    return [str(attr[0]) for attr in m["attrs"]]


def _foreign_rule_attrs(m: Any) -> tuple[str, ...]:  # noqa: ANN401 - a pyroute2 message
    """The attributes and header fields of a rule that ours never has (for messages)."""
    extra = [name.removeprefix("FRA_").lower() for name in _attr_names(m)
             if name not in _OUR_RULE_ATTRS]  # fmt: skip
    extra += [name.removeprefix("FRA_").lower() for name in _UNSET_RULE_ATTRS
              if m.get_attr(name) not in (None, _UNSET)]  # fmt: skip
    extra += [key for key in ("dst_len", "tos", "flags", "res1", "res2") if _header(m, key)]
    return tuple(dict.fromkeys(extra))


def _rule_view(msg: object) -> _RuleView:
    m = cast(Any, msg)
    get = m.get_attr
    return _RuleView(
        action=int(m["action"]),
        table=int(get("FRA_TABLE") or m["table"]),
        priority=int(get("FRA_PRIORITY") or 0),
        flags=int(m["flags"]),
        dst_len=int(m["dst_len"]),
        src_len=int(m["src_len"]),
        src=_opt_str(get("FRA_SRC")),
        fwmark=_opt_int(get("FRA_FWMARK")),
        fwmask=_opt_int(get("FRA_FWMASK")),
        iifname=_opt_str(get("FRA_IIFNAME")),
        proto=int(get("FRA_PROTOCOL") or 0),
        tos=_header(m, "tos"),
        extra=_foreign_rule_attrs(m),
    )


def _route_view(msg: object) -> _RouteView:
    m = cast(Any, msg)
    get = m.get_attr
    return _RouteView(
        type=int(m["type"]),
        table=int(get("RTA_TABLE") or m["table"]),
        dst_len=int(m["dst_len"]),
        dst=_opt_str(get("RTA_DST")),
        oif=_opt_int(get("RTA_OIF")),
        metric=int(get("RTA_PRIORITY") or 0),
        proto=_header(m, "proto"),
        src_len=_header(m, "src_len"),
        tos=_header(m, "tos"),
        foreign=any(get(name) is not None for name in _FOREIGN_ROUTE_ATTRS),
        scope=_header(m, "scope"),
        prefsrc=_opt_str(get("RTA_PREFSRC")),
        gateway=_opt_str(get("RTA_GATEWAY")),
        multipath=get("RTA_MULTIPATH") is not None or get("RTA_NH_ID") is not None,
    )


def _route_text(r: _RouteView, family: Family, lo: int) -> str:
    """A dumped route the way ``ip route`` shows it (near enough for an error message)."""
    kind = _ROUTE_TYPES.get(r.type, f"type {r.type}")
    dst = f"{r.dst or family.any_net.split('/')[0]}/{r.dst_len}"
    parts = [kind, dst]
    if r.tos:
        parts.append(f"tos {r.tos:#x}")
    if r.gateway:
        parts.append(f"via {r.gateway}")
    if r.multipath:
        parts.append("nexthop ...")
    if r.oif is not None:
        parts.append("dev lo" if r.oif == lo else f"oif {r.oif}")
    parts += [f"table {r.table}", f"proto {r.proto}"]
    if r.prefsrc:
        parts.append(f"src {r.prefsrc}")
    if r.metric:
        parts.append(f"metric {r.metric}")
    if r.foreign and not (r.gateway or r.prefsrc or r.multipath):
        parts.append("...")
    return " ".join(parts)


class Routing:
    """A netlink session in the current network namespace (use as a context manager)."""

    def __init__(self) -> None:
        try:
            self._ipr: Any = IPRoute(ext_ack=True)  # the kernel's own reason for a refusal
        except OSError as exc:
            raise PathwayError(f"cannot open rtnetlink socket: {exc}") from exc
        self._lo_index: int | None = None

    def __enter__(self) -> Routing:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._ipr.close()

    def _ifindex(self, name: str) -> int:
        if name == "lo" and self._lo_index is not None:
            return self._lo_index
        try:
            found = self._ipr.link_lookup(ifname=name)
        except NetlinkError as exc:
            raise _fail(exc, f"ip link show {name}") from exc
        if not found:
            raise PathwayError(f"no interface {name!r}")
        index = int(found[0])
        if name == "lo":
            self._lo_index = index
        return index

    # -- rules ---------------------------------------------------------------------------

    @staticmethod
    def _rule_args(spec: RuleSpec, proto: int = RULE_PROTOCOL) -> dict[str, Any]:
        args: dict[str, Any] = {
            "family": spec.family.af,
            "table": spec.table,
            "priority": spec.priority,
            "action": FR_ACT_TO_TBL,
        }
        if proto:
            args["protocol"] = proto
        if spec.fwmark is not None:
            args.update(fwmark=spec.fwmark, fwmask=FULL_MASK)
        if spec.src is not None:
            net = ipaddress.ip_network(spec.src)
            args.update(src=str(net.network_address), src_len=net.prefixlen)
        if spec.iif is not None:
            args["iifname"] = spec.iif
        return args

    def _rules(self, spec: RuleSpec) -> list[_RuleView]:
        """The rules of ``spec``'s family, in the kernel's order."""
        try:
            dump = self._ipr.get_rules(family=spec.family.af)
        except NetlinkError as exc:
            raise _fail(exc, f"{spec.family.ip_cmd} rule show", spec.family) from exc
        return [_rule_view(msg) for msg in dump]

    def add_rule(self, spec: RuleSpec) -> bool:
        """Create the rule; False if it already existed (also one of an earlier version)."""
        if any(self._view_matches(r, spec) for r in self._rules(spec)):
            return False
        try:
            self._ipr.rule("add", **self._rule_args(spec))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _fail(exc, spec.command("add"), spec.family) from exc
            if self.has_rule(spec):
                return False
            # the kernel's duplicate check skips selectors we leave unset (src, tos ...)
            raise PathwayError(
                f"{spec.command('add')}: refused, the kernel holds a look-alike rule at pref "
                f"{spec.priority} that is not ours; delete it or use another mark"
            ) from exc
        return True

    def _rule_target(self, spec: RuleSpec) -> tuple[_RuleView | None, str]:
        """Our rule and, if the kernel would take another one first, why we refuse."""
        rules = self._rules(spec)
        ours = next((r for r in rules if self._view_matches(r, spec)), None)
        if ours is None:
            return None, ""
        picked = next(r for r in rules if self._kernel_picks(r, spec, ours.proto))
        if self._view_matches(picked, spec):
            return ours, ""
        return ours, (
            f"{spec.command('del')}: refused, the kernel would delete a foreign rule listed "
            f"before ours (pref {picked.priority}, iif {picked.iifname or 'any'}, proto "
            f"{picked.proto}{', also ' + ', '.join(picked.extra) if picked.extra else ''}); "
            "delete that one first"
        )

    def rule_refusal(self, spec: RuleSpec) -> str:
        """Why :meth:`del_rule` would refuse (one line), or ``""``."""
        return self._rule_target(spec)[1]

    def del_rule(self, spec: RuleSpec) -> bool:
        """Delete exactly our rule; False if there was none.

        The request carries the protocol of our rule; should the kernel still pick another
        rule first (one with extra selectors listed before ours, or, for a protocol 0 rule of
        an earlier version, any look-alike listed before it), this refuses instead of
        deleting somebody else's rule.
        """
        ours, refusal = self._rule_target(spec)
        if ours is None:
            return False
        if refusal:
            raise PathwayError(refusal)
        try:
            self._ipr.rule("del", **self._rule_args(spec, ours.proto))
        except NetlinkError as exc:
            if exc.code in _ABSENT:
                return False
            raise _fail(exc, spec.command("del"), spec.family) from exc
        return True

    def has_rule(self, spec: RuleSpec) -> bool:
        """Whether exactly this rule is in the rule list."""
        return any(self._view_matches(r, spec) for r in self._rules(spec))

    @staticmethod
    def _kernel_picks(r: _RuleView, spec: RuleSpec, proto: int) -> bool:
        """Whether the kernel's delete lookup would take ``r`` for our request (it skips
        only on the attributes the request sets)."""
        if r.action != FR_ACT_TO_TBL or r.table != spec.table or r.priority != spec.priority:
            return False
        if spec.iif is not None and r.iifname != spec.iif:
            return False
        if spec.fwmark is not None and (r.fwmark != spec.fwmark or r.fwmask != FULL_MASK):
            return False
        if proto and r.proto != proto:
            return False
        if spec.src is None:
            return True
        net = ipaddress.ip_network(spec.src)
        if r.src_len != net.prefixlen or r.src is None:
            return False
        return ipaddress.ip_address(r.src) == net.network_address

    @staticmethod
    def _rule_matches(msg: object, spec: RuleSpec) -> bool:
        return Routing._view_matches(_rule_view(msg), spec)

    @staticmethod
    def _view_matches(r: _RuleView, spec: RuleSpec) -> bool:
        if r.action != FR_ACT_TO_TBL or r.table != spec.table or r.priority != spec.priority:
            return False
        if r.flags & FIB_RULE_INVERT or r.dst_len or r.foreign or r.iifname != spec.iif:
            return False
        if r.proto not in _OUR_RULE_PROTOS or r.tos:
            return False
        if spec.fwmark is None:
            if r.fwmark is not None or r.fwmask is not None:  # `fwmark 0/0xffffffff` too
                return False
        elif r.fwmark != spec.fwmark or r.fwmask != FULL_MASK:
            return False
        if spec.src is None:
            return r.src_len == 0
        net = ipaddress.ip_network(spec.src)
        if r.src_len != net.prefixlen or r.src is None:
            return False
        return ipaddress.ip_address(r.src) == net.network_address

    # -- routes --------------------------------------------------------------------------

    def _route_args(self, spec: RouteSpec) -> dict[str, Any]:
        args: dict[str, Any] = {
            "family": spec.family.af,
            "dst": spec.dst,
            "type": RTN_LOCAL,
            "table": spec.table,
            "oif": self._ifindex(spec.dev),
            "scope": RT_SCOPE_HOST,
            "proto": RTPROT_BOOT,
        }
        if ROUTE_METRIC[spec.family]:
            args["priority"] = ROUTE_METRIC[spec.family]
        return args

    def add_route(self, spec: RouteSpec) -> bool:
        """Create the route; False if ours already existed. ``EEXIST`` for another route in
        our place (a blackhole, a route with a preferred source...) is a one-line error."""
        try:
            self._ipr.route("add", **self._route_args(spec))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _fail(exc, spec.command("add"), spec.family) from exc
            if self.has_route(spec):
                return False
            raise PathwayError(
                f"{spec.command('add')}: refused, table {spec.table} already holds another "
                f"route for {spec.dst} ({self._conflict(spec)}); delete it or use another mark"
            ) from exc
        return True

    def _routes(self, spec: RouteSpec) -> list[_RouteView]:
        """The routes of table ``spec.table`` for ``spec.dst`` itself (no source, tos 0), in
        the kernel's order."""
        net = ipaddress.ip_network(spec.dst)
        try:
            dump = self._ipr.get_routes(family=spec.family.af, table=spec.table)
        except NetlinkError as exc:
            what = f"{spec.family.ip_cmd} route show table {spec.table}"
            raise _fail(exc, what, spec.family) from exc
        views = [_route_view(msg) for msg in dump]
        return [
            r
            for r in views
            if r.table == spec.table
            and r.dst_len == net.prefixlen
            and not r.src_len
            and not r.tos
            and (r.dst is None or ipaddress.ip_address(r.dst) == net.network_address)
        ]

    def _conflict(self, spec: RouteSpec) -> str:
        """The route that keeps ours out (same prefix and metric), as ``ip route`` shows it."""
        lo = self._ifindex(spec.dev)
        metric = ROUTE_METRIC[spec.family]
        found = [r for r in self._routes(spec) if r.metric == metric]
        if not found:
            return "a route of the same prefix and metric"
        return _route_text(found[0], spec.family, lo)

    def _is_ours(self, r: _RouteView, spec: RouteSpec, oif: int) -> bool:
        """Whether a route of :meth:`_routes` is exactly ``local DST dev DEV`` of ours."""
        return (
            r.type == RTN_LOCAL
            and r.oif == oif
            and r.metric == ROUTE_METRIC[spec.family]
            and r.proto == RTPROT_BOOT
            and not r.foreign
        )

    @staticmethod
    def _kernel_takes(r: _RouteView, spec: RouteSpec, oif: int) -> bool:
        """Whether the kernel's delete could take ``r`` for our request (type, scope, protocol,
        device; IPv6 also the metric; IPv4 ignores metric 0, a preferred source, a gateway).
        Erring towards yes only makes a delete refuse."""
        if r.proto != RTPROT_BOOT or (r.oif is not None and r.oif != oif):
            return False
        if spec.family is Family.V6:
            return r.metric == ROUTE_METRIC[Family.V6]
        return r.type == RTN_LOCAL and r.scope == RT_SCOPE_HOST

    def _route_target(self, spec: RouteSpec) -> tuple[bool, str]:
        """Whether our route is there and, if the kernel would take another first, why we
        refuse."""
        oif = self._ifindex(spec.dev)
        routes = self._routes(spec)
        if not any(self._is_ours(r, spec, oif) for r in routes):
            return False, ""
        picked = next((r for r in routes if self._kernel_takes(r, spec, oif)), None)
        if picked is None or self._is_ours(picked, spec, oif):
            return True, ""
        return True, (
            f"{spec.command('del')}: refused, the kernel would delete a foreign route listed "
            f"before ours ({_route_text(picked, spec.family, oif)}); delete that one first"
        )

    def route_refusal(self, spec: RouteSpec) -> str:
        """Why :meth:`del_route` would refuse (one line), or ``""``."""
        return self._route_target(spec)[1]

    def del_route(self, spec: RouteSpec) -> bool:
        """Delete exactly our route; False if there was none (v4 says ESRCH, v6 ENOENT).

        The request pins type, scope, device, protocol and (IPv6) metric; the kernel takes the
        first route of the prefix that fits, and IPv4 cannot exclude a preferred source or a
        gateway, so the dump is walked in the kernel's order first: if the first route that
        fits is not exactly ours (``ip route prepend ... src 127.0.0.1``), this refuses.
        """
        present, refusal = self._route_target(spec)
        if not present:
            return False
        if refusal:
            raise PathwayError(refusal)
        try:
            self._ipr.route("del", **self._route_args(spec))
        except NetlinkError as exc:
            if exc.code in _ABSENT:
                return False
            raise _fail(exc, spec.command("del"), spec.family) from exc
        return True

    def has_route(self, spec: RouteSpec) -> bool:
        """Whether table ``spec.table`` holds exactly ``local DST dev DEV`` (our metric and
        protocol, no gateway, source or preferred source)."""
        oif = self._ifindex(spec.dev)
        return any(self._is_ours(r, spec, oif) for r in self._routes(spec))


def read_tcp_fwmark_accept() -> int | None:
    """``net.ipv4.tcp_fwmark_accept`` of this namespace (None if unreadable); never written."""
    try:
        return int(TCP_FWMARK_ACCEPT.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
