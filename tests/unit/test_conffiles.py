"""pymmproxy.conffiles: pathways.conf, instances.tsv, allow.txt and the config directory."""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymmproxy.conffiles import (
    Config,
    Instance,
    allow_list_path,
    instance_settings,
    load_allow_list,
    load_config,
    load_instances,
    load_pathways,
    resolve_config_dir,
    valid_instance_name,
)
from pymmproxy.errors import ConfigError, UsageError
from pymmproxy.settings import Endpoint, Limits, Transport

EXAMPLES = Path(__file__).resolve().parents[2] / "config"
PATHWAYS = (123, 124)
SSH = "vps01-ssh 123 100.101.102.123:2222 127.0.0.1 22 ::1"


def write(tmp_path: Path, text: str, name: str = "file") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def fails(loader: Callable[[Path], object], path: Path, line: int | None, fragment: str) -> None:
    """``loader(path)`` raises a ConfigError rendered ``path:line: ...fragment...``."""
    with pytest.raises(ConfigError) as info:
        loader(path)
    where = f"{path}:{line}" if line is not None else str(path)
    assert str(info.value).startswith(f"{where}: "), str(info.value)
    assert fragment in info.value.message, info.value.message
    assert info.value.line == line


def instances(path: Path) -> dict[str, Instance]:
    return load_instances(path, PATHWAYS)


# --- config directory and allow list location ---------------------------------------------


def test_resolve_config_dir_order(tmp_path: Path) -> None:
    system = tmp_path / "etc"
    env = {"PYMMPROXY_CONFIG_DIR": "/from/env"}
    assert resolve_config_dir("/from/cli", env, system_dir=system) == Path("/from/cli")
    assert resolve_config_dir(None, env, system_dir=system) == Path("/from/env")
    assert resolve_config_dir("", env, system_dir=system) == Path("/from/env")
    assert resolve_config_dir(None, {}, system_dir=system) == Path("config")
    system.mkdir()
    assert resolve_config_dir(None, {"PYMMPROXY_CONFIG_DIR": ""}, system_dir=system) == system
    assert resolve_config_dir(None, env, system_dir=system) == Path("/from/env")
    assert resolve_config_dir("~/c", {}, system_dir=system) == Path("~/c").expanduser()


def test_allow_list_path() -> None:
    assert allow_list_path("/etc/x", {}) == Path("/etc/x/allow.txt")
    assert allow_list_path("/etc/x", {"ALLOW_LIST_PATH": ""}) == Path("/etc/x/allow.txt")
    assert allow_list_path("/etc/x", {"ALLOW_LIST_PATH": "/opt/a.txt"}) == Path("/opt/a.txt")


# --- reading files ---------------------------------------------------------------------------


@pytest.mark.parametrize("loader", [load_allow_list, load_pathways, instances])
def test_unreadable_files(tmp_path: Path, loader: Callable[[Path], object]) -> None:
    fails(loader, tmp_path / "missing", None, "cannot read: No such file or directory")
    fails(loader, tmp_path, None, "cannot read: Is a directory")


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    path.write_bytes(b"192.0.2.0/24\n# caf\xe9\n")
    fails(load_allow_list, path, 2, "not UTF-8 text")


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_not_utf8_line_number_with_and_without_bom(tmp_path: Path, bom: bytes) -> None:
    path = tmp_path / "allow.txt"
    path.write_bytes(bom + b"192.0.2.0/24\n# ok\n\xe9 # first byte of line 3\n")
    fails(load_allow_list, path, 3, "not UTF-8 text")


def test_bom_crlf_and_blank_files(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_bytes(b"\xef\xbb\xbf123\r\n\r\n  0x7c \t# router01\r\n")
    assert load_pathways(path) == (123, 124)
    assert load_pathways(write(tmp_path, "\n# nothing\n   \n")) == ()
    assert load_allow_list(write(tmp_path, "")) == ()


# --- allow lists -----------------------------------------------------------------------------


def test_allow_list_good(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# proxies\n100.64.0.0/10\n\n  fd7a:115c:a1e0::/48   # tailnet v6\n"
        "192.0.2.7\n2001:db8::1\t\n10.0.0.0/255.0.0.0\n",
    )
    assert load_allow_list(path) == tuple(
        ipaddress.ip_network(n)
        for n in (
            "100.64.0.0/10",
            "fd7a:115c:a1e0::/48",
            "192.0.2.7/32",
            "2001:db8::1/128",
            "10.0.0.0/8",
        )
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("192.0.2.1/24", "192.0.2.1/24 has host bits set: did you mean 192.0.2.0/24?"),
        ("2001:db8::1/32", "has host bits set: did you mean 2001:db8::/32?"),
        ("192.0.2.0/33", "bad network '192.0.2.0/33': not an IP or CIDR"),
        ("example.com", "not an IP or CIDR"),
        ("010.0.0.1", "not an IP or CIDR"),
        ("fe80::%eth0/64", "scope ids are not allowed"),
        ("192.0.2.0/24 198.51.100.0/24", "expected one IP or CIDR, got 2 fields"),
    ],
)
def test_allow_list_errors(tmp_path: Path, text: str, fragment: str) -> None:
    fails(
        load_allow_list, write(tmp_path, f"# header\n100.64.0.0/10\n{text}  # why\n"), 3, fragment
    )


# --- pathways --------------------------------------------------------------------------------


def test_pathways_good(tmp_path: Path) -> None:
    path = write(tmp_path, "123  # vps01\n\t124\n0x7D\n4294967295\n")
    assert load_pathways(path) == (123, 124, 125, 2**32 - 1)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("abc", "bad fwmark 'abc': expected a number"),
        ("0x", "bad fwmark '0x'"),
        ("0xg1", "bad fwmark '0xg1'"),
        ("-5", "bad fwmark '-5'"),
        ("1_000", "bad fwmark '1_000'"),
        ("\u0661\u0662\u0663", "expected a number"),  # Arabic-Indic digits
        ("9" * 21, "expected a number"),
        ("0", "bad fwmark 0: must be 1..4294967295"),
        ("4294967296", "must be 1..4294967295"),
        ("254", "bad fwmark 254: 254 is a reserved routing table id"),
        ("0xfd", "253 is a reserved routing table id"),
        ("123 124", "expected one fwmark, got 2 fields"),
        ("0x7b", "duplicate fwmark 123 (first on line 1)"),
    ],
)
def test_pathways_errors(tmp_path: Path, text: str, fragment: str) -> None:
    fails(load_pathways, write(tmp_path, f"123\n\n{text}\n"), 3, fragment)


# --- instances -------------------------------------------------------------------------------


def test_instances_tabs_spaces_dashes_and_options(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# name\tmark\tlisten\tv4\tport\tv6\n"
        "vps01-ssh\t123\t100.101.102.123:2222\t127.0.0.1\t22\t::1\n"
        "router01-ssh   124  100.101.102.123:2223   127.0.0.1 22 -   # v4 only\n"
        "vps01-web 0x7b [fd7a:115c:a1e0::7]:8443 - 443 0:0::1 proto=tcp\n"
        "vps01-dns 123 100.101.102.123:53 127.0.0.53 53 - proto=udp allow=dns.txt\n"
        "vps01_a.b@c 123 :2224 127.0.0.1 22 - allow=/abs/list\n",
    )
    got = instances(path)
    assert list(got) == ["vps01-ssh", "router01-ssh", "vps01-web", "vps01-dns", "vps01_a.b@c"]
    assert got["vps01-ssh"] == Instance(
        "vps01-ssh",
        123,
        Endpoint("100.101.102.123", 2222),
        Endpoint("127.0.0.1", 22),
        Endpoint("::1", 22),
        Transport.TCP,
        None,
        2,
    )
    assert got["router01-ssh"].target6 is None
    assert got["router01-ssh"].line == 3
    web = got["vps01-web"]
    assert (web.mark, web.listen, web.target4, web.target6) == (
        123,
        Endpoint("fd7a:115c:a1e0::7", 8443),
        None,
        Endpoint("::1", 443),
    )
    dns = got["vps01-dns"]
    assert dns.transport is Transport.UDP
    assert dns.allow_file == tmp_path / "dns.txt"
    assert got["vps01_a.b@c"].allow_file == Path("/abs/list")
    assert got["vps01_a.b@c"].listen == Endpoint("::", 2224)  # both families, as in Go


def test_instances_without_pathways_check(tmp_path: Path) -> None:
    path = write(tmp_path, "x 999 127.0.0.1:1 127.0.0.1 2 -\n")
    assert load_instances(path, None)["x"].mark == 999


COLUMNS = "expected <name> <fwmark> <listen_addr> <target_ipv4> <target_port> <target_ipv6>"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("vps01-ssh 123 100.101.102.123:2222 127.0.0.1 22", f"{COLUMNS}, got 5 columns"),
        ("vps01-ssh", "got 1 columns"),
        ("vps01/ssh 123 1.2.3.4:5 127.0.0.1 22 -", "bad instance name 'vps01/ssh'"),
        ("-ssh 123 1.2.3.4:5 127.0.0.1 22 -", "bad instance name '-ssh'"),
        (".ssh 123 1.2.3.4:5 127.0.0.1 22 -", "bad instance name '.ssh'"),
        ("s\u00e9 123 1.2.3.4:5 127.0.0.1 22 -", "bad instance name"),
        ("x" * 201 + " 123 1.2.3.4:5 127.0.0.1 22 -", "bad instance name"),
        ("a 12x 1.2.3.4:5 127.0.0.1 22 -", "bad fwmark '12x': expected a number"),
        ("a 255 1.2.3.4:5 127.0.0.1 22 -", "255 is a reserved routing table id"),
        (
            "a 125 1.2.3.4:5 127.0.0.1 22 -",
            "fwmark 125 is not listed in pathways.conf (known: 123, 124)",
        ),
        ("a 123 1.2.3.4 127.0.0.1 22 -", "bad listen_addr '1.2.3.4': expected ADDR:PORT"),
        ("a 123 ::1:5 127.0.0.1 22 -", "put IPv6 addresses in brackets"),
        ("a 123 [::1:5 127.0.0.1 22 -", "expected [IPv6]:PORT"),
        ("a 123 host:5 127.0.0.1 22 -", "'host' is not an IP address"),
        ("a 123 [fe80::1%eth0]:5 127.0.0.1 22 -", "scope ids (%IFACE) are not supported"),
        ("a 123 1.2.3.4:5 - 22 fe80::1%eth0", "bad target_ipv6 'fe80::1%eth0': scope ids"),
        ("a 123 1.2.3.4:5 0.0.0.0 22 -", "bad target_ipv4 '0.0.0.0': 0.0.0.0 is not an address"),
        ("a 123 1.2.3.4:5 - 22 ::", "bad target_ipv6 '::': :: is not an address to connect to"),
        ("a 123 1.2.3.4:5 224.0.0.1 22 -", "'224.0.0.1': 224.0.0.1 is not a unicast address"),
        ("a 123 1.2.3.4:0 127.0.0.1 22 -", "port must be 1..65535"),
        ("a 123 1.2.3.4:\u00b2 127.0.0.1 22 -", "bad listen_addr '1.2.3.4:\u00b2': not an address"),
        ("a 123 1.2.3.4:" + "9" * 200 + " 127.0.0.1 22 -", "not an address"),
        ("a 123 1.2.3.4:5 127.0.0.1 0 -", "bad target_port '0': must be 1..65535"),
        ("a 123 1.2.3.4:5 127.0.0.1 65536 -", "bad target_port '65536'"),
        ("a 123 1.2.3.4:5 127.0.0.1 0x16 -", "bad target_port '0x16'"),
        ("a 123 1.2.3.4:5 127.0.0.1 - -", "bad target_port '-'"),
        ("a 123 1.2.3.4:5 127.0.0.1 " + "9" * 9999 + " -", "bad target_port"),
        ("a 123 1.2.3.4:5 localhost 22 -", "bad target_ipv4 'localhost': not an IP address"),
        ("a 123 1.2.3.4:5 ::1 22 -", "bad target_ipv4 '::1': not an IPv4 address"),
        ("a 123 1.2.3.4:5 - 22 127.0.0.1", "bad target_ipv6 '127.0.0.1': not an IPv6 address"),
        ("a 123 1.2.3.4:5 - 22 [::1]", "bad target_ipv6 '[::1]': not an IP address"),
        ("a 123 1.2.3.4:5 - 22 -", "target_ipv4 and target_ipv6 are both '-'"),
        ("a 123 1.2.3.4:5 127.0.0.1 22 - extra", "unexpected column 'extra': expected key=value"),
        ("a 123 1.2.3.4:5 127.0.0.1 22 - proto=", "unexpected column 'proto='"),
        ("a 123 1.2.3.4:5 127.0.0.1 22 - mark=5", "unknown option 'mark' (known: allow, proto)"),
        ("a 123 1.2.3.4:5 127.0.0.1 22 - =x", "unknown option ''"),
        ("a 123 1.2.3.4:5 127.0.0.1 22 - proto=udp proto=udp", "option 'proto' given twice"),
        ("a 123 1.2.3.4:5 127.0.0.1 22 - proto=sctp", "bad proto 'sctp': expected tcp or udp"),
        ("a 123 1.2.3.4:5 127.0.0.1 22 - proto=TCP", "bad proto 'TCP'"),
        (
            "vps01-ssh 124 1.2.3.4:5 127.0.0.1 22 -",
            "duplicate instance name 'vps01-ssh' (first on line 2)",
        ),
        (
            "a 124 100.101.102.123:2222 127.0.0.1 22 -",
            "tcp listen_addr 100.101.102.123:2222 clashes with instance 'vps01-ssh' on line 2",
        ),
        ("a 124 0.0.0.0:2222 127.0.0.1 22 -", "clashes with instance 'vps01-ssh'"),
        ("a 124 [::]:2222 127.0.0.1 22 -", "tcp listen_addr [::]:2222 clashes"),
        (  # an IPv4-mapped address is the IPv4 one (as Go reads it): the same socket address
            "a 124 [::ffff:100.101.102.123]:2222 127.0.0.1 22 -",
            "tcp listen_addr 100.101.102.123:2222 clashes with instance 'vps01-ssh' on line 2",
        ),
        (
            "a 123 1.2.3.4:5 - 22 ::ffff:127.0.0.1",
            "bad target_ipv6 '::ffff:127.0.0.1': an IPv4-mapped address",
        ),
    ],
)
def test_instance_errors(tmp_path: Path, line: str, fragment: str) -> None:
    path = write(tmp_path, f"# instances\n{SSH}\n{line}\n")
    fails(instances, path, 3, fragment)


def test_pathways_known_none(tmp_path: Path) -> None:
    path = write(tmp_path, SSH)
    fails(lambda p: load_instances(p, ()), path, 1, "(known: none)")


@pytest.mark.parametrize(
    "line",
    [
        "a 124 100.101.102.123:2222 127.0.0.1 22 - proto=udp",  # other transport
        "a 124 100.101.102.124:2222 127.0.0.1 22 -",  # other address
        "a 124 100.101.102.123:2223 127.0.0.1 22 -",  # other port
        "a 124 [::1]:2222 127.0.0.1 22 -",  # v6 address vs v4 address
    ],
)
def test_listen_addresses_that_do_not_clash(tmp_path: Path, line: str) -> None:
    assert len(instances(write(tmp_path, f"{SSH}\n{line}\n"))) == 2


def test_the_v4_wildcard_takes_ipv6_too(tmp_path: Path) -> None:
    """``0.0.0.0`` listens on both families (as go-mmproxy did on that line): an IPv6 listen
    address on the same port clashes; on another port it does not."""
    path = write(tmp_path, "a 123 0.0.0.0:22 127.0.0.1 22 -\nb 123 [::1]:22 127.0.0.1 22 -\n")
    with pytest.raises(
        ConfigError,
        match=r"file:2: tcp listen_addr \[::1\]:22 clashes with instance 'a' on line 1 "
        r"\(0.0.0.0 takes IPv6 too, as in go-mmproxy\)$",
    ):
        instances(path)
    path = write(tmp_path, "a 123 0.0.0.0:22 127.0.0.1 22 -\nb 123 [::1]:23 127.0.0.1 22 -\n")
    assert len(instances(path)) == 2
    path = write(tmp_path, "a 123 0.0.0.0:22 127.0.0.1 22 -\nb 123 127.0.0.1:22 127.0.0.1 1 -\n")
    with pytest.raises(ConfigError) as info:  # an IPv4 clash: no word about IPv6
        instances(path)
    assert str(info.value).endswith("clashes with instance 'a' on line 1")


def test_valid_instance_name() -> None:
    assert valid_instance_name("vps01-ssh")
    assert valid_instance_name("a" * 200)
    assert not valid_instance_name("a" * 201)
    assert not valid_instance_name("")
    assert not valid_instance_name("a b")
    assert not valid_instance_name("a\n")


def test_instance_settings() -> None:
    inst = Instance("n", 123, Endpoint("1.2.3.4", 5), Endpoint("127.0.0.1", 22), None)
    limits = Limits(header_timeout=1.0)
    allowed = (ipaddress.ip_network("192.0.2.0/24"),)
    got = instance_settings(inst, allowed, limits)
    assert (got.name, got.mark, got.listen, got.target4, got.target6) == (
        "n",
        123,
        inst.listen,
        inst.target4,
        None,
    )
    assert (got.transport, got.allowed, got.limits, got.listeners) == (
        Transport.TCP,
        allowed,
        limits,
        1,
    )
    assert instance_settings(inst, None, limits).allowed is None


# --- whole config directory ------------------------------------------------------------------


def config_dir(tmp_path: Path, instances_text: str, allow: str | None = "100.64.0.0/10\n") -> Path:
    write(tmp_path, "123\n124\n", "pathways.conf")
    write(tmp_path, instances_text, "instances.tsv")
    if allow is not None:
        write(tmp_path, allow, "allow.txt")
    return tmp_path


def test_examples_parse_cleanly(tmp_path: Path) -> None:
    for name in ("pathways.conf", "instances.tsv", "allow.txt"):
        shutil.copy(EXAMPLES / f"{name}.example", tmp_path / name)
    config = load_config(tmp_path, {})
    assert config.pathways == (123, 124)
    assert list(config.instances) == ["vps01-ssh", "router01-ssh", "vps01-web", "vps01-wg"]
    web = config.instance("vps01-web")
    assert (web.mark, str(web.listen), str(web.target4), str(web.target6)) == (
        123,
        "100.101.102.123:8443",
        "127.0.0.1:443",
        "[::1]:443",
    )
    assert config.instance("vps01-wg").transport is Transport.UDP
    assert config.allowed_for(web) == (
        ipaddress.ip_network("100.64.0.0/10"),
        ipaddress.ip_network("fd7a:115c:a1e0::/48"),
    )


def test_load_config_with_per_instance_allow_lists(tmp_path: Path) -> None:
    write(tmp_path, "192.0.2.0/24\n", "router.txt")
    config = config_dir(
        tmp_path,
        f"{SSH}\nr1 124 0.0.0.0:1 127.0.0.1 2 - allow=router.txt\n"
        "r2 124 0.0.0.0:3 127.0.0.1 4 - allow=router.txt\n",
    )
    loaded = load_config(config, {})
    assert isinstance(loaded, Config)
    assert loaded.allow_path == tmp_path / "allow.txt"
    assert loaded.allowed_for(loaded.instance("vps01-ssh")) == (
        ipaddress.ip_network("100.64.0.0/10"),
    )
    router = (ipaddress.ip_network("192.0.2.0/24"),)
    assert loaded.allowed_for(loaded.instance("r1")) == router
    assert loaded.allowed_for(loaded.instance("r2")) == router
    assert list(loaded.instance_allow) == [tmp_path / "router.txt"]


def test_load_config_without_default_allow_list(tmp_path: Path) -> None:
    loaded = load_config(config_dir(tmp_path, f"# x\n{SSH}\n", allow=None), {})
    assert loaded.default_allow is None
    with pytest.raises(ConfigError) as info:
        loaded.allowed_for(loaded.instance("vps01-ssh"))
    assert str(info.value) == (
        f"{tmp_path}/instances.tsv:2: instance 'vps01-ssh' has no allow list:"
        f" create {tmp_path}/allow.txt or add allow=FILE"
    )


def test_load_config_allow_list_path_env(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, SSH, allow=None)
    other = write(tmp_path, "2001:db8::/32\n", "elsewhere.txt")
    loaded = load_config(directory, {"ALLOW_LIST_PATH": str(other)})
    assert loaded.default_allow == (ipaddress.ip_network("2001:db8::/32"),)
    assert loaded.allow_path == other


def test_load_config_explicit_missing_allow_list_is_an_error(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, SSH, allow=None)
    missing = tmp_path / "missing.txt"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(directory, {"ALLOW_LIST_PATH": str(missing)})
    assert info.value.path == str(missing)


def test_load_config_errors(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, f"{SSH}\nr 124 0.0.0.0:1 127.0.0.1 2 - allow=nope.txt\n")
    with pytest.raises(ConfigError) as info:
        load_config(directory, {})
    assert (
        str(info.value) == f"{tmp_path}/instances.tsv:2: allow list {tmp_path}/nope.txt not found"
    )
    write(tmp_path, "192.0.2.1/24\n", "nope.txt")
    with pytest.raises(ConfigError, match=r"nope.txt:1: 192.0.2.1/24 has host bits set"):
        load_config(directory, {})
    write(tmp_path, "123\n123\n", "pathways.conf")
    with pytest.raises(ConfigError, match=r"pathways.conf:2: duplicate fwmark"):
        load_config(directory, {})
    with pytest.raises(ConfigError, match=r"pathways.conf: cannot read"):
        load_config(tmp_path / "absent", {})


@pytest.mark.parametrize(
    ("allow", "reason"),
    [
        ("a" * 300, "File name too long"),
        ("sub", "Is a directory"),
        ("a\x00b", "embedded null byte"),
    ],
)
def test_load_config_unreadable_instance_allow_list(
    tmp_path: Path, allow: str, reason: str
) -> None:
    (tmp_path / "sub").mkdir()
    directory = config_dir(tmp_path, f"{SSH}\nr 124 0.0.0.0:1 127.0.0.1 2 - allow={allow}\n")
    with pytest.raises(ConfigError) as info:
        load_config(directory, {})
    assert str(info.value) == (
        f"{tmp_path}/instances.tsv:2: cannot read allow list {tmp_path / allow}: {reason}"
    )


def test_load_config_unreadable_default_allow_list(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, SSH, allow=None)
    (tmp_path / "allow.txt").mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(directory, {})
    assert str(info.value) == f"{tmp_path}/allow.txt: cannot read: Is a directory"
    long = tmp_path / ("a" * 300)
    with pytest.raises(ConfigError) as info:
        load_config(directory, {"ALLOW_LIST_PATH": str(long)})
    assert str(info.value) == f"{long}: cannot read: File name too long"


def test_unknown_instance(tmp_path: Path) -> None:
    loaded = load_config(config_dir(tmp_path, SSH), {})
    with pytest.raises(
        UsageError, match=r"no instance 'x' in .*instances.tsv \(known: vps01-ssh\)"
    ):
        loaded.instance("x")
    empty = load_config(config_dir(tmp_path, "# none\n"), {})
    with pytest.raises(UsageError, match=r"\(known: none\)"):
        empty.instance("x")


# --- fuzzing ---------------------------------------------------------------------------------

TOKENS = st.sampled_from(
    [
        "#", "-", "=", "123", "124", "0x7b", "proto=udp", "allow=a.txt", "mark=1", "1.2.3.4:5",
        "[::1]:5", "127.0.0.1", "::1", "22", "192.0.2.0/24", "192.0.2.1/24", "::ffff:0:0/96",
        "\t", " ", "\u00b2", "%", "[", "]", ":", "/", "\x00", "\r", "\u2028",
    ]
)  # fmt: skip
LINE = st.one_of(
    st.text(max_size=40), st.lists(st.one_of(TOKENS, st.text(max_size=8))).map(" ".join)
)


@pytest.mark.fuzz
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(LINE, max_size=6), raw=st.binary(max_size=20))
def test_loaders_raise_only_config_error(tmp_path: Path, lines: list[str], raw: bytes) -> None:
    path = tmp_path / "fuzz"
    loaders: list[Callable[[Path], object]] = [load_allow_list, load_pathways, instances]
    errors: list[ConfigError] = []
    for data in ("\n".join(lines).encode("utf-8", "surrogatepass"), raw):
        path.write_bytes(data)
        for loader in loaders:
            try:
                loader(path)
            except ConfigError as e:  # anything else fails the test
                errors.append(e)
    assert all(e.path == str(path) and e.line != 0 for e in errors)
    assert not any("\n" in e.message for e in errors)


def test_unknown_home_directory_is_one_line(tmp_path: Path) -> None:
    """``~nosuchuser`` cannot be expanded: a message naming where it came from, no traceback."""
    nobody = "~pymmproxy-no-such-user-7f3a"
    with pytest.raises(UsageError, match=f"^--config-dir {nobody}/etc: Could not determine"):
        resolve_config_dir(f"{nobody}/etc", {})
    with pytest.raises(UsageError, match=r"^\$PYMMPROXY_CONFIG_DIR "):
        resolve_config_dir(None, {"PYMMPROXY_CONFIG_DIR": nobody})
    with pytest.raises(UsageError, match=r"^\$ALLOW_LIST_PATH "):
        allow_list_path(tmp_path, {"ALLOW_LIST_PATH": nobody})
    line = f"web 123 0.0.0.0:8443 127.0.0.1 443 - allow={nobody}/a.txt\n"
    with pytest.raises(ConfigError, match=r"instances.tsv:1: allow=~pymmproxy-no-such-user"):
        load_config(config_dir(tmp_path, line), {})


# --- one instance's view (--instance NAME): the others' typos are theirs -------------------


def only_dir(tmp_path: Path, lines: str) -> Path:
    (tmp_path / "pathways.conf").write_text("123\n124\n")
    (tmp_path / "instances.tsv").write_text(lines)
    (tmp_path / "allow.txt").write_text("192.0.2.0/24\n")
    return tmp_path


WEB = "web 124 100.101.102.123:8443 127.0.0.1 443 -"


@pytest.mark.parametrize(
    ("other", "fragment"),
    [
        ("broken 124 1.2.3.4:5 127.0.0.1", "got 4 columns"),
        ("web2 124 1.2.3.4:5 127.0.0.1 22 - allow=missing.txt", None),  # never read
        ("ssh2 124 100.101.102.123:2222 127.0.0.1 22 -", "clashes with instance 'vps01-ssh'"),
        ("vps01-ssh 124 1.2.3.4:6 127.0.0.1 22 -", "duplicate instance name 'vps01-ssh'"),
    ],
)
def test_only_skips_the_other_lines_errors(tmp_path: Path, other: str, fragment: str) -> None:
    cfg = only_dir(tmp_path, f"{SSH}\n{other}\n{WEB}\n")
    skipped: list[ConfigError] = []
    config = load_config(cfg, {}, only="web", skipped=skipped)
    assert config.allowed_for(config.instance("web"))[0] == ipaddress.ip_network("192.0.2.0/24")
    if fragment is None:
        assert skipped == []
    else:
        assert [(e.path, e.line) for e in skipped] == [(str(cfg / "instances.tsv"), 2)]
        assert fragment in skipped[0].message
    with pytest.raises(ConfigError):  # the whole file, as serve and `instances` read it
        load_config(cfg, {})


def test_only_fails_on_its_own_line_and_when_it_may_be_the_bad_one(tmp_path: Path) -> None:
    cfg = only_dir(tmp_path, f"{SSH}\nweb 124 1.2.3.4:5 127.0.0.1\n")
    fails(lambda _: load_config(cfg, {}, only="web"), cfg / "instances.tsv", 2, "got 4 columns")
    cfg = only_dir(tmp_path, f"{SSH}\nwbe 124 1.2.3.4:5 127.0.0.1\n")  # a typo in the name
    fails(lambda _: load_config(cfg, {}, only="web"), cfg / "instances.tsv", 2, "got 4 columns")
    # the later of two clashing lines is the one in the wrong
    cfg = only_dir(tmp_path, f"{SSH}\nweb 124 100.101.102.123:2222 127.0.0.1 22 -\n")
    fails(lambda _: load_config(cfg, {}, only="web"), cfg / "instances.tsv", 2, "clashes with")
    cfg = only_dir(tmp_path, f"{SSH}\n{WEB} allow=gone.txt\n")
    fails(
        lambda _: load_config(cfg, {}, only="web"), cfg / "instances.tsv", 2, "gone.txt not found"
    )
    with pytest.raises(UsageError, match="no instance 'nope'"):
        load_config(only_dir(tmp_path, f"{SSH}\n"), {}, only="nope").instance("nope")


def test_a_missing_config_directory_says_where_it_is_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nowhere")
    assert str(info.value) == (
        f"{tmp_path / 'nowhere' / 'pathways.conf'}: cannot read: No such file or directory "
        f"(no directory {tmp_path / 'nowhere'}: the config directory is --config-dir, else "
        "$PYMMPROXY_CONFIG_DIR, else /etc/pymmproxy if it exists, else ./config)"
    )
    (tmp_path / "here").mkdir()
    with pytest.raises(ConfigError) as info:  # the directory exists: the file is missing
        load_config(tmp_path / "here")
    assert str(info.value).endswith("pathways.conf: cannot read: No such file or directory")
