"""Fixtures for the real-network lab (root only; skipped with the reason elsewhere)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from peerpath.identity import Address, Identity
from peerpath.node.trust import TrustStore
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


def identity_of(state: Path) -> str:
    """The address of ``state``'s identity, created on first use: what ``peerpath address
    --state-dir STATE`` prints. Done in this process, for setup: the key file is the same
    wherever it is written from (a namespace shares the file system), and no interpreter
    has to start for it."""
    return str(Identity.load_or_create(state).address)


def trust_in(state: Path, address: str, name: str = "") -> None:
    """What ``peerpath trust add ADDRESS [--note NAME]`` writes to ``state``'s trust store (a
    note that is a name is pinned to the peer), done in this process, for setup. A node
    already running there reads the change as it does the command's."""
    store = TrustStore.in_state_dir(state)
    peer = Address.parse(address)
    store.add(peer, name)
    if name:
        store.pin(name, peer)


AGENT = str(Path(__file__).with_name("agent.py"))


class Mesh:
    """Mesh agents (``agent.py mesh``) on lab hosts, registered with ``url`` and trusting
    each other. ``exercise``/``soak`` drive one of them toward others and return its results."""

    def __init__(self, tmp_path: Path, url: str, hosts: dict[str, Node], env: dict[str, str] | None = None) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}
        for name, host in hosts.items():
            command = [sys.executable, AGENT, "mesh", str(tmp_path / name), url]
            self.procs[name] = host.popen(command, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.addresses: dict[str, Address] = {}
        for name in self.procs:
            line = self._out(name).readline()
            assert line.startswith("ready "), f"{name}: {line!r}"
            self.addresses[name] = Address.parse(line.split()[1])
        for name in hosts:
            store = TrustStore.in_state_dir(tmp_path / name)
            for other, address in self.addresses.items():
                if other != name:
                    store.add(address)
        self.names = {str(a): n for n, a in self.addresses.items()}

    def _out(self, name: str) -> IO[str]:
        stream = self.procs[name].stdout
        assert stream is not None
        return stream

    def send(self, name: str, line: str) -> None:
        """One command line to agent ``name``."""
        stdin = self.procs[name].stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def start_exercise(self, name: str, *targets: str) -> None:
        """Let ``name`` exercise ``targets`` (by name) without waiting; see :meth:`results`."""
        self.send(name, "exercise " + " ".join(str(self.addresses[t]) for t in targets))

    def results(self, name: str) -> dict[str, dict[str, object]]:
        """What an exercise of ``name`` found, keyed by target name."""
        out = {}
        while (line := self._out(name).readline().strip()) != "done":
            assert line, f"{name} stopped: no more output"
            result = json.loads(line)
            out[self.names[result["peer"]]] = result
        return out

    def exercise(self, name: str, target: str) -> dict[str, object]:
        """``name`` connects to ``target`` by address and moves data both ways."""
        self.start_exercise(name, target)
        return self.results(name)[target]

    def counters(self, name: str) -> dict[str, int]:
        """Agent ``name``'s direct-path counters (rounds, checks, predicted paths...)."""
        self.send(name, "counters")
        result: dict[str, int] = json.loads(self._out(name).readline())
        return result

    def soak(self, name: str, target: str, seconds: float) -> dict[str, object]:
        """Back-to-back requests from ``name`` to ``target`` for ``seconds``."""
        self.send(name, f"soak {self.addresses[target]} {seconds}")
        result: dict[str, object] = json.loads(self._out(name).readline())
        return result
