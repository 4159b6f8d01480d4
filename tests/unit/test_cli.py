"""The `peerpath` command: help everywhere, exit code 2 for usage errors, 1 for failures, JSON out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PEERPATH = [sys.executable, "-m", "peerpath"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PEERPATH, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_every_command_has_help() -> None:
    """Every command and subcommand answers --help with a usage line and a description."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from peerpath.cli import app

    def walk(group, path: list[str]):  # type: ignore[no-untyped-def]
        yield path, group
        for name, command in getattr(group, "commands", {}).items():
            yield from walk(command, [*path, name])

    commands = list(walk(get_command(app), []))
    assert {"expose", "forward", "connect", "gateway", "trust", "up"} <= {p[0] for p, _ in commands if p}
    for path, command in commands:
        assert command.help, path  # a description in the help
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, (path, result.output)


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("peerpath ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["netcheck"], "--stun"),
        (["netcheck", "--stun", "x", "--timeout", "0"], "--timeout"),
        (["server", "--public-ip", "not-an-ip"], "not an IP address"),
        (["server", "--public-ip", "127.0.0.1", "--public-ip", "127.0.0.1"], "must differ"),
        (["server", "--public-ip", "1.1.1.1", "--public-ip", "2.2.2.2", "--public-ip", "3.3.3.3"], "at most two"),
        (["server", "--public-ip", "127.0.0.1", "--stun-port", "70000"], "--stun-port"),
        (["frobnicate"], "No such command"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_failures_exit_1_with_one_line(tmp_path) -> None:
    proc = run("netcheck", "--stun", "host:99999")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "peerpath: bad port '99999' in 'host:99999' (expected 1-65535)"
    proc = run("server", "--public-ip", "192.0.2.77", "--state-dir", str(tmp_path))  # not an address of this host
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("peerpath: cannot listen:")
    assert "Traceback" not in proc.stderr


def test_server_and_netcheck_json_on_loopback(tmp_path) -> None:
    ips = ["--public-ip", "127.0.0.1", "--public-ip", "127.0.0.2"]
    server = subprocess.Popen(
        [
            *PEERPATH,
            "server",
            *ips,
            "--stun-port",
            "23478",
            "--port",
            "0",
            "--wss-port",
            "0",
            "--state-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        url = server.stdout.readline().strip()
        assert url.startswith("pp://pp1") and url == (tmp_path / "rendezvous.url").read_text().strip()
        lines = [server.stderr.readline(), server.stderr.readline()]
        assert "rendezvous and relay on tls+udp 127.0.0.1:" in lines[0]
        assert "listening on udp 127.0.0.1:23478" in lines[1]
        proc = run("netcheck", "--stun", "127.0.0.1:23478", "--json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["udp"] is True and result["nat"] is False
        assert result["mapping"] == result["filtering"] == "endpoint-independent"
        human = run("netcheck", "--stun", "127.0.0.1:23478")
        assert "no NAT" in human.stdout
    finally:
        server.terminate()
        server.wait(10)
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()


def test_relay_and_server_with_relay(tmp_path) -> None:
    ports = ["--port", "0", "--wss-port", "0"]
    relay = subprocess.Popen(
        [*PEERPATH, "relay", "--public-ip", "127.0.0.2", *ports, "--state-dir", str(tmp_path / "relay")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert relay.stdout is not None
        relay_url = relay.stdout.readline().strip()
        assert relay_url.startswith("pp://pp1") and "@127.0.0.2:" in relay_url and "?wss=" in relay_url
        bad = run("server", "--public-ip", "127.0.0.1", "--relay", "pp://nonsense", "--state-dir", str(tmp_path))
        assert (bad.returncode == 2 and "--rendezvous" not in bad.stderr) or "names no server address" in bad.stderr
    finally:
        relay.terminate()
        relay.wait(10)
        if relay.stdout is not None:
            relay.stdout.close()


def test_netcheck_without_answer_reports_udp_false() -> None:
    proc = run("netcheck", "--stun", "127.0.0.1:9", "--json", "--timeout", "0.3")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["udp"] is False
