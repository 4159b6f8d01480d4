"""Fixtures for the real-network lab (root only; skipped with the reason elsewhere)."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerpath.testing import netlab
from peerpath.testing.netlab import Lab, Node

PEERPATH = [sys.executable, "-m", "peerpath"]
SERVER_IPS = ["203.0.113.10", "203.0.113.11"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = netlab.available()
    for item in items:
        if "tests/lab/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.lab)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_namespaces() -> None:
    if netlab.available() is None:
        netlab.sweep_stale()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A fresh lab per test module, always torn down."""
    with Lab() as the_lab:
        yield the_lab


def start_peerpath_server(server: Node, *extra: str, state: str | None = None) -> str:
    """Start ``peerpath server`` on the server host's two addresses; wait until it listens.

    Returns the rendezvous URL it printed. Its state lives in ``state`` (default: a fresh
    temporary directory).
    """
    args = [a for ip in SERVER_IPS for a in ("--public-ip", ip)]
    state = state or tempfile.mkdtemp(prefix="pp-server-")
    proc = server.start([*PEERPATH, "server", "--state-dir", state, *args, *extra], ready="STUN server")
    url = (Path(state) / "rendezvous.url").read_text().strip()
    assert proc.poll() is None
    return url


def run_netcheck(host: Node, *extra: str) -> dict[str, object]:
    """``peerpath netcheck --json`` from ``host``; the parsed object."""
    proc = host.run_proc([*PEERPATH, "netcheck", "--stun", SERVER_IPS[0], "--json", *extra], timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result
