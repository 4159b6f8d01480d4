"""Interop: the Debian `stun` client (RFC 3489) from behind each router kind classifies the NAT
the same way against our server as against coturn (`turnserver --stun-only`) on the same addresses."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from peerpath.testing.netlab import Lab, Node, every_router_kind

from .conftest import SERVER_IPS, start_peerpath_server

pytestmark = [
    pytest.mark.skipif(shutil.which("stun") is None, reason="needs the Debian stun-client package"),
    pytest.mark.skipif(shutil.which("turnserver") is None, reason="needs the Debian coturn package"),
]


@pytest.fixture(scope="module")
def world(lab: Lab) -> Iterator[tuple[Node, dict[str, Node]]]:
    server = lab.public_host("server", SERVER_IPS)
    yield server, every_router_kind(lab)


def classify(host: Node) -> str:
    """The `stun` client's one-line verdict ("Primary: ..."), without the hairpin clause.

    RFC 3489's hairpin check depends on timing between the client's own sockets, not on
    the server, so it is left out of the comparison.
    """
    proc = host.run_proc(["stun", SERVER_IPS[0]], timeout=60)
    lines = [line.strip() for line in proc.stdout.splitlines() if line.startswith("Primary:")]
    assert lines, f"stun printed no verdict: {proc.stdout!r} {proc.stderr!r}"
    return ", ".join(part.strip() for part in lines[0].split(",") if "hairpin" not in part)


def classify_all(hosts: dict[str, Node]) -> dict[str, str]:
    """:func:`classify` for every host, side by side, not one after another (each verdict
    mostly waits out the client's timeouts). Hosts behind different routers cannot touch
    each other's exchange: each asks from its own namespace, through a NAT of its own. The
    two behind one router (``same-nat-1`` and ``same-nat-2``, every_router_kind's shared
    one) share its mappings and port choices, so they still take turns."""

    def group(name: str) -> str:
        return "same-nat" if name.startswith("same-nat-") else name

    groups: dict[str, list[str]] = {}
    for name in hosts:
        groups.setdefault(group(name), []).append(name)
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        verdicts = pool.map(lambda names: [(n, classify(hosts[n])) for n in names], groups.values())
        return {name: verdict for turns in verdicts for name, verdict in turns}


def run_coturn(lab: Lab, server: Node, workdir: Path) -> subprocess.Popen[str]:
    listen = [a for ip in SERVER_IPS for a in ("--listening-ip", ip)]
    return server.start(
        [
            "turnserver",
            "-n",
            "--stun-only",
            *listen,
            "--listening-port",
            "3478",
            "--alt-listening-port",
            "3479",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--log-file",
            "stdout",
            "--simple-log",
            "--userdb",
            str(workdir / "turndb"),
            "--pidfile",
            str(workdir / "turnserver.pid"),
        ],
        ready="Total General servers",
    )


def test_stun_client_agrees_between_peerpath_and_coturn(
    lab: Lab, world: tuple[Node, dict[str, Node]], tmp_path: Path
) -> None:
    server, hosts = world
    start_peerpath_server(server)
    ours = classify_all(hosts)
    # Same addresses, other server: stop ours first.
    for proc in list(lab._processes):
        lab.stop(proc)
    coturn = run_coturn(lab, server, tmp_path)
    reference = classify_all(hosts)
    lab.stop(coturn)
    assert ours == reference
    # And the verdicts are the ones these routers should produce.
    assert ours["public"] == "Primary: Open"
    assert ours["full-cone"].startswith("Primary: Independent Mapping, Independent Filter")
    assert ours["address-restricted"].startswith("Primary: Independent Mapping, Address Dependent Filter")
    assert ours["port-restricted"].startswith("Primary: Independent Mapping, Port Dependent Filter")
    assert ours["symmetric"].startswith("Primary: Dependent Mapping")
    assert ours["cgnat"].startswith("Primary: Independent Mapping, Port Dependent Filter")
    assert ours["udp-blocked"].startswith("Primary: Blocked")
