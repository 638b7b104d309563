"""The config files, UTF-8 text with ``#`` comments and tab- or space-separated columns.

- ``allow.txt``: one IP or CIDR per line (a bare IP is a /32 or /128; host bits must be 0).
- ``pathways.conf``: one fwmark per line (decimal or ``0x`` hex), each once.
- ``instances.tsv``: see ``_COLUMNS``, then optional ``proto=tcp|udp``, ``allow=FILE`` (a per-
  instance allow list, relative to the config dir), ``ports=FIRST-LAST``; ``-`` means no target.

Every problem is a :class:`ConfigError` naming the file and line, raised before anything starts.
"""

from __future__ import annotations

import codecs
import ipaddress
import os
import re
import string
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pymmproxy.errors import ConfigError, UsageError
from pymmproxy.portrange import PortRange, check_ranges, parse_ports
from pymmproxy.settings import (
    MAX_MARK_TEXT,
    Endpoint,
    InstanceSettings,
    Limits,
    Network,
    Transport,
    target_problem,
    validate_mark,
)

SYSTEM_CONFIG_DIR = Path("/etc/pymmproxy")
CONFIG_DIR_ENV = "PYMMPROXY_CONFIG_DIR"
ALLOW_LIST_ENV = "ALLOW_LIST_PATH"
PATHWAYS_FILE = "pathways.conf"
INSTANCES_FILE = "instances.tsv"
ALLOW_FILE = "allow.txt"
MAX_NAME_LEN = 200  # keeps pymmproxy@NAME.service and NAME.lock under 255 bytes

_NAME_RE = re.compile(r"[A-Za-z0-9_.@-]+")
_FIELD_SEP = re.compile(r"[ \t\r\f\v]+")
_COLUMNS = "<name> <fwmark> <listen_addr> <target_ipv4> <target_port> <target_ipv6>"
_OPTIONS = ("allow", "proto", "ports")
_DEC, _HEX = frozenset(string.digits), frozenset(string.hexdigits)
_MAX_TOKEN = 100  # longer than any address; also keeps int() away from huge digit strings
_Err = Callable[[str], ConfigError]  # builds the error for one file:line


@dataclass(frozen=True, slots=True)
class Instance:
    """One line of instances.tsv."""

    name: str
    mark: int
    listen: Endpoint
    target4: Endpoint | None
    target6: Endpoint | None
    transport: Transport = Transport.TCP
    allow_file: Path | None = None
    line: int = 0
    ports: PortRange | None = None  # TPROXY mode: the port range it receives


def resolve_config_dir(
    cli_value: str | None,
    env: Mapping[str, str] = os.environ,
    *,
    system_dir: Path = SYSTEM_CONFIG_DIR,
) -> Path:
    """The config directory: ``--config-dir``, else ``$PYMMPROXY_CONFIG_DIR``, else
    ``/etc/pymmproxy`` if it is a directory, else ``./config``. Empty values count as unset."""
    if cli_value:
        return _expand(cli_value, "--config-dir ")
    if env.get(CONFIG_DIR_ENV):
        return _expand(env[CONFIG_DIR_ENV], f"${CONFIG_DIR_ENV} ")
    if system_dir.is_dir():
        return system_dir
    return Path("config")


def allow_list_path(config_dir: str | Path, env: Mapping[str, str] = os.environ) -> Path:
    """``$ALLOW_LIST_PATH`` (as the old start script honoured), else ``config_dir/allow.txt``."""
    if env.get(ALLOW_LIST_ENV):
        return _expand(env[ALLOW_LIST_ENV], f"${ALLOW_LIST_ENV} ")
    return Path(config_dir) / ALLOW_FILE


def _expand(text: str, what: str, error: Callable[[str], Exception] = UsageError) -> Path:
    """``~`` / ``~user`` expanded; an unknown user is ``error`` naming ``what`` + ``text``."""
    try:
        return Path(text).expanduser()
    except RuntimeError as exc:  # "Could not determine home directory"
        raise error(f"{what}{text}: {exc}") from None


def valid_instance_name(name: str) -> bool:
    """Letters, digits and ``_.@-``, not starting with ``-`` or ``.`` (a systemd instance)."""
    ok = len(name) <= MAX_NAME_LEN and _NAME_RE.fullmatch(name) is not None
    return ok and name[0] not in "-."


def _reason(e: OSError | ValueError) -> str:
    """Why a file could not be read, e.g. ``Permission denied``."""
    return (e.strerror if isinstance(e, OSError) else None) or str(e)


def _read(path: str | Path) -> bytes:
    """The bytes of a config file (ConfigError naming it if it cannot be read)."""
    try:
        return Path(path).read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the file name
        reason = _reason(e)
        folder = Path(path).parent
        config = Path(path).name in (PATHWAYS_FILE, INSTANCES_FILE)
        if config and isinstance(e, FileNotFoundError) and not folder.is_dir():
            reason += (
                f" (no directory {folder}: the config directory is --config-dir, else "
                f"${CONFIG_DIR_ENV}, else {SYSTEM_CONFIG_DIR} if it exists, else ./config)"
            )
        raise ConfigError(path, None, f"cannot read: {reason}") from None


def _lines(path: str | Path, data: bytes) -> Iterator[tuple[int, list[str], _Err]]:
    """Yield ``(line number, columns, error maker)`` for each line with more than comments."""
    data = data.removeprefix(codecs.BOM_UTF8)  # so error offsets count from the first line
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, data[: e.start].count(b"\n") + 1, "not UTF-8 text") from None
    for number, line in enumerate(text.split("\n"), 1):
        fields = [f for f in _FIELD_SEP.split(line.split("#", 1)[0]) if f]
        if fields:
            yield number, fields, partial(ConfigError, path, number)


def _network(text: str, err: _Err) -> Network:
    if "%" in text:
        raise err(f"bad network {text!r}: scope ids are not allowed")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise err(f"bad network {text!r}: not an IP or CIDR") from None
    if iface.ip != iface.network.network_address:
        raise err(f"{text} has host bits set: did you mean {iface.network}?")
    return iface.network


def load_allow_list(path: str | Path, data: bytes | None = None) -> tuple[Network, ...]:
    """Read an allow list (also go-mmproxy's ``-allowed-subnets`` file). Empty = deny all.

    ``data``: the file's bytes when the caller has already read them.
    """
    networks: list[Network] = []
    for _, fields, err in _lines(path, _read(path) if data is None else data):
        if len(fields) != 1:
            raise err(f"expected one IP or CIDR, got {len(fields)} fields")
        networks.append(_network(fields[0], err))
    return tuple(networks)


def _mark(text: str, err: _Err) -> int:
    digits, base = (text[2:], 16) if text[:2] in ("0x", "0X") else (text, 10)
    if not (
        digits and len(text) <= MAX_MARK_TEXT and set(digits) <= (_HEX if base == 16 else _DEC)
    ):
        raise err(f"bad fwmark {text!r}: expected a number")
    try:
        return validate_mark(int(digits, base), what="fwmark")
    except UsageError as e:
        raise err(str(e)) from None


def load_pathways(path: str | Path) -> tuple[int, ...]:
    """Read pathways.conf: the fwmarks (one policy-routing pathway each), in file order."""
    seen: dict[int, int] = {}
    for number, fields, err in _lines(path, _read(path)):
        if len(fields) != 1:
            raise err(f"expected one fwmark, got {len(fields)} fields")
        mark = _mark(fields[0], err)
        if mark in seen:
            raise err(f"duplicate fwmark {mark} (first on line {seen[mark]})")
        seen[mark] = number
    return tuple(seen)


def _listen(text: str, err: _Err) -> Endpoint:
    if not text.isascii() or len(text) > _MAX_TOKEN:
        raise err(f"bad listen_addr {text!r}: not an address")
    try:
        return Endpoint.parse_listen(text, what="listen_addr")
    except UsageError as e:
        raise err(str(e)) from None


def _port(text: str, err: _Err) -> int:
    if not (set(text) <= _DEC and len(text) <= 5 and 0 < int(text) < 65536):
        raise err(f"bad target_port {text!r}: must be 1..65535")
    return int(text)


def _target(text: str, version: int, port: int, err: _Err) -> Endpoint | None:
    if text == "-":
        return None
    column = f"target_ipv{version}"
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise err(f"bad {column} {text!r}: not an IP address") from None
    if addr.version != version:
        raise err(f"bad {column} {text!r}: not an IPv{version} address")
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise err(f"bad {column} {text!r}: scope ids (%IFACE) are not supported")
    if problem := target_problem(addr.compressed):
        raise err(f"bad {column} {text!r}: {problem}")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise err(
            f"bad {column} {text!r}: an IPv4-mapped address; IPv6 clients need an IPv6 target"
        )
    return Endpoint(addr.compressed, port)


def _options(tokens: list[str], err: _Err) -> dict[str, str]:
    options: dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not (sep and value):
            raise err(f"unexpected column {token!r}: expected key=value")
        if key not in _OPTIONS:
            raise err(f"unknown option {key!r} (known: allow, proto) (TPROXY: ports)")
        if key in options:
            raise err(f"option {key!r} given twice")
        options[key] = value
    return options


def _instance(
    fields: list[str], number: int, err: _Err, base: Path, pathways: Collection[int] | None
) -> Instance:
    if len(fields) < 6:
        raise err(f"expected {_COLUMNS}, got {len(fields)} columns")
    name, mark_text, listen_text, t4_text, port_text, t6_text = fields[:6]
    if not valid_instance_name(name):
        raise err(f"bad instance name {name!r}: use letters, digits, _ . @ - (not first)")
    mark = _mark(mark_text, err)
    if pathways is not None and mark not in pathways:
        known = ", ".join(map(str, sorted(pathways))) or "none"
        raise err(f"fwmark {mark} is not listed in {PATHWAYS_FILE} (known: {known})")
    listen = _listen(listen_text, err)
    port = _port(port_text, err)
    target4 = _target(t4_text, 4, port, err)
    target6 = _target(t6_text, 6, port, err)
    if target4 is None and target6 is None:
        raise err("target_ipv4 and target_ipv6 are both '-'")
    options = _options(fields[6:], err)
    if options.get("proto", "tcp") not in ("tcp", "udp"):
        raise err(f"bad proto {options['proto']!r}: expected tcp or udp")
    transport = Transport(options.get("proto", "tcp"))
    allow = base / _expand(options["allow"], "allow=", err) if "allow" in options else None
    ports = parse_ports(options["ports"], transport, port, err) if "ports" in options else None
    return Instance(name, mark, listen, target4, target6, transport, allow, number, ports)


def _clash(a: Endpoint, b: Endpoint) -> bool:
    """Whether two listen endpoints cannot both be bound (``::`` also takes IPv4 on Linux)."""
    if a.port != b.port:
        return False
    hosts = {a.host, b.host}
    return len(hosts) == 1 or "::" in hosts or ("0.0.0.0" in hosts and not (a.is_v6 or b.is_v6))


def _clash_note(a: Endpoint, b: Endpoint) -> str:
    """Why a clash may surprise: a written ``0.0.0.0`` against an IPv6 address."""
    pair = (a, b)
    if any(e.written for e in pair) and any(e.is_v6 and not e.written for e in pair):
        return " (0.0.0.0 takes IPv6 too, as in go-mmproxy)"
    return ""


def load_instances(
    path: str | Path,
    pathways: Collection[int] | None,
    *,
    only: str | None = None,
    skipped: list[ConfigError] | None = None,
) -> dict[str, Instance]:
    """Read instances.tsv; with ``pathways`` every fwmark must be one of them.

    With ``only`` (``--instance NAME``) a bad line that is not ``only``'s own (a clash is the
    later line's) is appended to ``skipped`` instead of raised, so one unit's typo cannot
    stop the others; if ``only`` has no good line while some line is bad, that line's error
    is raised (it may be the one meant).
    """
    path = Path(path)
    instances: dict[str, Instance] = {}
    bad: list[ConfigError] = []
    for number, fields, err in _lines(path, _read(path)):
        try:
            inst = _instance(fields, number, err, path.parent, pathways)
            if (first := instances.get(inst.name)) is not None:
                raise err(f"duplicate instance name {inst.name!r} (first on line {first.line})")
            for other in instances.values():
                if other.transport is inst.transport and _clash(other.listen, inst.listen):
                    where = f"instance {other.name!r} on line {other.line}"
                    why = _clash_note(inst.listen, other.listen)
                    raise err(
                        f"{inst.transport} listen_addr {inst.listen} clashes with {where}{why}"
                    )
                check_ranges(inst, other, err)  # TPROXY ports= ranges (pymmproxy.portrange)
        except ConfigError as exc:
            if only is None or fields[0] == only:  # a clash is the later line's: first wins
                raise
            bad.append(exc)
            continue
        instances[inst.name] = inst
    if only is not None:
        if only not in instances and bad:
            raise bad[0]
        if skipped is not None:
            skipped.extend(bad)
    return instances


def instance_settings(
    inst: Instance, allowed: tuple[Network, ...] | None, limits: Limits
) -> InstanceSettings:
    """What the daemon runs for ``inst`` (``allowed=None`` allows any peer)."""
    return InstanceSettings(
        inst.listen, inst.target4, inst.target6, inst.mark, inst.transport, allowed, inst.name,
        limits=limits,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated config directory."""

    directory: Path
    pathways: tuple[int, ...]
    instances: dict[str, Instance]
    allow_path: Path
    default_allow: tuple[Network, ...] | None  # None: allow_path does not exist
    instance_allow: dict[Path, tuple[Network, ...]]  # the allow=FILE lists

    def instance(self, name: str) -> Instance:
        """The instance called ``name`` (UsageError if there is none)."""
        if name not in self.instances:
            known = ", ".join(self.instances) or "none"
            where = self.directory / INSTANCES_FILE
            raise UsageError(f"no instance {name!r} in {where} (known: {known})")
        return self.instances[name]

    def allowed_for(self, inst: Instance) -> tuple[Network, ...]:
        """``inst``'s ``allow=FILE`` list, else the default one, which must then exist
        (a missing file never means "allow any")."""
        if inst.allow_file is not None:
            return self.instance_allow[inst.allow_file]
        if self.default_allow is None:
            hint = f"create {self.allow_path} or add allow=FILE"
            msg = f"instance {inst.name!r} has no allow list: {hint}"
            raise ConfigError(self.directory / INSTANCES_FILE, inst.line, msg)
        return self.default_allow


def load_config(
    config_dir: str | Path,
    env: Mapping[str, str] = os.environ,
    *,
    only: str | None = None,
    skipped: list[ConfigError] | None = None,
) -> Config:
    """Load pathways.conf, instances.tsv and every allow list they use.

    The default allow list may be absent unless ``$ALLOW_LIST_PATH`` names it explicitly.
    With ``only`` (``--instance NAME``): the other instances' bad lines go to ``skipped``
    (see :func:`load_instances`) and only ``only``'s allow list is read.
    """
    directory = Path(config_dir)
    pathways = load_pathways(directory / PATHWAYS_FILE)
    tsv = directory / INSTANCES_FILE
    instances = load_instances(tsv, pathways, only=only, skipped=skipped)
    allow_path = allow_list_path(directory, env)
    uses_default = only is None or (only in instances and instances[only].allow_file is None)
    default = (
        _default_allow(allow_path, explicit=bool(env.get(ALLOW_LIST_ENV))) if uses_default else None
    )
    per_instance: dict[Path, tuple[Network, ...]] = {}
    for inst in instances.values():
        if only is not None and inst.name != only:
            continue
        if inst.allow_file is not None and inst.allow_file not in per_instance:
            data = _read_allow_file(inst.allow_file, tsv, inst.line)
            per_instance[inst.allow_file] = load_allow_list(inst.allow_file, data)
    return Config(directory, pathways, instances, allow_path, default, per_instance)


def _default_allow(path: Path, *, explicit: bool) -> tuple[Network, ...] | None:
    """The default allow list; None if it does not exist and was not named explicitly."""
    try:
        data = path.read_bytes()
    except OSError as e:
        if isinstance(e, FileNotFoundError) and not explicit:
            return None
        raise ConfigError(path, None, f"cannot read: {_reason(e)}") from None
    return load_allow_list(path, data)


def _read_allow_file(path: Path, tsv: Path, line: int) -> bytes:
    """The bytes of an ``allow=FILE``; errors name the instances.tsv line that uses it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(tsv, line, f"allow list {path} not found") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the file name
        raise ConfigError(tsv, line, f"cannot read allow list {path}: {_reason(e)}") from None
