"""The command line: go-mmproxy spellings, long names, one-line errors with exit 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pymmproxy import __version__, cli
from pymmproxy.cli import build_parser, main, settings_from_args
from pymmproxy.errors import UsageError
from pymmproxy.settings import Endpoint, Transport


@pytest.fixture
def allow(tmp_path: Path) -> Path:
    path = tmp_path / "allow.txt"
    path.write_text("# LBs\n198.51.100.0/24\n2001:db8::/32\n")
    return path


def settings(*argv: str):
    return settings_from_args(build_parser().parse_args(list(argv)))


def test_go_mmproxy_spellings(allow: Path) -> None:
    s = settings(
        "-l", "0.0.0.0:2222", "-4", "127.0.0.1:22", "-6", "[::1]:22", "-mark", "123",
        "-allowed-subnets", str(allow), "-v", "2", "-listeners", "2", "-close-after", "30",
        "-p", "tcp",
    )  # fmt: skip
    assert s.listen == Endpoint("::", 2222)  # go-mmproxy (Go) listens on both families
    assert s.target4 == Endpoint("127.0.0.1", 22)
    assert s.target6 == Endpoint("::1", 22)
    assert s.mark == 123
    assert s.listeners == 2
    assert s.limits.udp_close_after == 30
    assert s.transport is Transport.TCP
    assert s.allowed is not None
    assert len(s.allowed) == 2


@pytest.mark.parametrize(
    ("text", "host"),
    [("0.0.0.0:1", "::"), (":1", "::"), ("*:1", "::"), ("[::]:1", "::"),
     ("198.51.100.2:1", "198.51.100.2"), ("[::ffff:0.0.0.0]:1", "::"),
     ("[2001:db8::1]:1", "2001:db8::1"), ("127.0.0.1:1", "127.0.0.1")],
)  # fmt: skip
def test_the_ipv4_wildcard_listens_on_both_families_as_go_does(text: str, host: str) -> None:
    assert Endpoint.parse_listen(text) == Endpoint(host, 1)


def test_an_ipv4_peer_of_a_dual_stack_socket_is_logged_as_ipv4() -> None:
    from pymmproxy.net.relay import endpoint  # noqa: PLC0415

    assert endpoint(("::ffff:192.0.2.1", 4000, 0, 0)) == "192.0.2.1:4000"
    assert endpoint(("::ffff:2001:db8::1", 4000, 0, 0)) == "[::ffff:2001:db8::1]:4000"
    assert endpoint(("2001:db8::1", 1, 0, 0)) == "[2001:db8::1]:1"
    assert endpoint(("192.0.2.1", 1)) == "192.0.2.1:1"


def test_the_metrics_wildcard_means_both_families_and_keeps_its_spelling() -> None:
    metrics = settings("-4", "127.0.0.1:22", "--allow-any", "--metrics", ":9100").metrics
    assert metrics == Endpoint("::", 9100)
    assert str(metrics) == "0.0.0.0:9100"
    assert str(metrics.at_port(9101)) == "0.0.0.0:9101"  # a second worker's port
    assert metrics.at_port(9101) == Endpoint("::", 9101)
    local = settings("-4", "127.0.0.1:22", "--allow-any", "--metrics", "127.0.0.1:9100").metrics
    assert local == Endpoint("127.0.0.1", 9100)
    assert str(local.at_port(9101)) == "127.0.0.1:9101"


def test_parse_keeps_the_ipv4_wildcard() -> None:
    assert Endpoint.parse("0.0.0.0:1") == Endpoint("0.0.0.0", 1)


def test_equals_forms_and_long_names(allow: Path) -> None:
    s = settings("-mark=77", "--listen=[::]:8443", f"--allowed-subnets={allow}",
                 "--target4", "127.0.0.1:80", "--header-timeout", "2.5")  # fmt: skip
    assert s.mark == 77
    assert s.listen == Endpoint("::", 8443)
    assert s.limits.header_timeout == 2.5


def test_go_mmproxy_defaults(allow: Path) -> None:
    s = settings("-allowed-subnets", str(allow))
    assert s.listen == Endpoint("::", 8443)  # go-mmproxy's 0.0.0.0:8443: both families, as Go
    assert str(s.listen) == "0.0.0.0:8443"  # in logs and labels as written (and as go-mmproxy)
    assert str(s.target4) == "127.0.0.1:443"
    assert str(s.target6) == "[::1]:443"
    assert s.mark == 0


def test_listeners_default_to_one_worker_per_usable_cpu(
    allow: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-listeners auto`` (the default) counts the CPUs we may use (pymmproxy.cpus)."""
    monkeypatch.setattr(cli, "usable_cpus", lambda: 3)
    assert settings("-allowed-subnets", str(allow)).listeners == 3
    assert settings("-allowed-subnets", str(allow), "-listeners", "auto").listeners == 3
    assert settings("-allowed-subnets", str(allow), "-listeners=AUTO").listeners == 3
    assert settings("-allowed-subnets", str(allow), "-listeners", "1").listeners == 1


def test_target_none_disables_a_family(allow: Path) -> None:
    s = settings("-allowed-subnets", str(allow), "-6", "none")
    assert s.target6 is None
    with pytest.raises(UsageError, match="no target"):
        settings("-allowed-subnets", str(allow), "-6", "none", "-4", "none")


def test_default_deny_without_allow_list() -> None:
    with pytest.raises(UsageError, match="no allow list"):
        settings()
    assert settings("--allow-any").allowed is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-mark", "abc"], "not an integer"),
        (["-mark", "0x1_0000_0000"], "must be 1..4294967295"),
        (["-mark", "09"], "not an integer"),  # a leading 0 is octal, as in Go
        (["-mark", "4294967296"], "must be 1..4294967295"),
        (["-mark=-1"], "bad mark -1: must be 1..4294967295"),
        (["-mark", "-1"], "bad mark -1: must be 1..4294967295"),  # a value, as in Go
        (["-close-after", "-1"], "-close-after must be >= 1"),
        (["-v", "-1"], "must be >= 0"),
        (["-mark", "-4", "127.0.0.1:80"], "argument -mark/--mark: expected one argument"),
        (["-l", "[fe80::1%eth0]:80"], "scope ids (%IFACE) are not supported"),
        (["-6", "[fe80::1%eth0]:80"], "scope ids (%IFACE) are not supported"),
        (["-4", "0.0.0.0:22"], "0.0.0.0 is not an address to connect to (127.0.0.1 or ::1"),
        (["-6", "[::]:22"], "bad -6 target [::]:22: :: is not an address to connect to"),
        (["-4", "224.0.0.1:22"], "224.0.0.1 is not a unicast address"),
        (["-4", "255.255.255.255:22"], "255.255.255.255 is not a unicast address"),
        (["-6", "[ff02::1]:22"], "ff02::1 is not a unicast address"),
        (["-l", "1.2.3.4"], "expected ADDR:PORT"),
        (["-l", "1.2.3.4:0"], "port must be 1..65535"),
        (["-l", "::1:80"], "brackets"),
        (["-4", "[::1]:80"], "expected an IPv4 address"),
        (["-6", "127.0.0.1:80"], "expected an IPv6 address"),
        (["-4", "localhost:80"], "not an IP address"),
        (["-v=-1"], "must be >= 0"),
        (["--keepalive", "40000"], "must be 0..32767"),
        (["--max-header-size", "231"], "--max-header-size must be 232..65551 (bytes)"),
        (["--max-header-size", "65552"], "--max-header-size must be 232..65551 (bytes)"),
        (["-p", "sctp"], "invalid choice"),
        (["-listeners", "0"], "-listeners must be >= 1"),
        (["--header-timeout", "0"], "must be > 0"),
        (["--bogus"], "unrecognized arguments"),
        (["-allowed-subnets", "/nonexistent/allow.txt"], "/nonexistent/allow.txt"),
    ],
)
def test_bad_values_are_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = [] if "-allowed-subnets" in argv else ["--allow-any"]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pymmproxy: ")
    assert err.count("\n") == 1
    assert message in err


def test_go_mmproxy_spellings_parse_as_go_does() -> None:
    """Go's flag package: one or two dashes, ``-flag=value``, Go integer literals, any
    ``-v`` >= 0 (2 and above log everything), a mark only range-checked (SO_MARK alone)."""
    parser = build_parser()
    go = parser.parse_args(
        ["--l", "192.0.2.1:8443", "--4", "127.0.0.1:22", "--6", "none", "--p", "udp", "--v",
         "5", "--mark=0x7b", "--listeners", "1", "--close-after", "0o17", "--allow-any"]
    )  # fmt: skip
    ours = parser.parse_args(
        ["-l", "192.0.2.1:8443", "-4", "127.0.0.1:22", "-6", "none", "-p", "udp", "-v", "2",
         "-mark", "123", "-listeners", "1", "-close-after", "15", "--allow-any"]
    )  # fmt: skip
    assert vars(go) == vars(ours)
    assert settings_from_args(parser.parse_args(["-mark", "254", "--allow-any"])).mark == 254


def test_version_and_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pymmproxy", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"pymmproxy {__version__}"
    helptext = subprocess.run(
        [sys.executable, "-m", "pymmproxy", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("-allowed-subnets", "-mark", "-listeners", "-close-after", "--header-timeout"):
        assert flag in helptext


def test_listen_address_in_use_is_one_line(
    allow: Path, capsys: pytest.CaptureFixture[str], own_netns: Any
) -> None:
    def taken() -> tuple[int, int]:
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            return port, main(["-l", f"127.0.0.1:{port}", "-allowed-subnets", str(allow)])

    port, code = own_netns(taken)
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pymmproxy: cannot listen on 127.0.0.1:{port}:")


def test_listen_family_unsupported_is_one_line(
    allow: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host with IPv6 disabled refuses the socket itself (EAFNOSUPPORT), before bind."""
    from pymmproxy.net import sockets  # noqa: PLC0415

    real = socket.socket

    def no_v6(family: int = socket.AF_INET, *args: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sockets.socket, "socket", no_v6)
    code = main(["-l", "[2001:db8::1]:8443", "-allowed-subnets", str(allow)])
    assert code == 1
    assert capsys.readouterr().err == (
        "pymmproxy: cannot listen on [2001:db8::1]:8443: Address family not supported by protocol\n"
    )
    # the wildcard listens on IPv4 alone there, as Go does
    sock, host = sockets.listen_family(Endpoint("::", 8443), socket.SOCK_STREAM)
    with sock:
        assert (sock.family, host) == (socket.AF_INET, "0.0.0.0")


def test_an_unforeseen_os_error_is_one_line(
    allow: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pymmproxy import cli  # noqa: PLC0415

    def denied(args: object, argv: object) -> int:
        raise PermissionError(13, "Permission denied", "/etc/pymmproxy/allow.txt")

    monkeypatch.setattr(cli, "_run_proxy", denied)
    assert main(["-l", "0.0.0.0:8443", "-allowed-subnets", str(allow)]) == 1
    err = capsys.readouterr().err
    assert err == "pymmproxy: [Errno 13] Permission denied: '/etc/pymmproxy/allow.txt'\n"


@pytest.mark.parametrize("command", [[], ["doctor"], ["instances"], ["pathway"], ["serve"]])
@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_help_in_go_and_gnu_spellings_exits_0(
    flag: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main([*command, flag])
    except SystemExit as exc:  # (argparse's own exit; some commands return it instead)
        code = exc.code  # type: ignore[assignment]
    assert code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(['pymmproxy', *command])} ")
