"""Shared fixtures for unit tests: pairs of nodes on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from peerpath.identity import Identity
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.server import RendezvousServer
from peerpath.services.agent import AgentNode
from peerpath.session.connection import SessionConfig


@pytest.fixture(autouse=True)
def _no_port_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests run on the host: never ask its real router for port mappings."""
    monkeypatch.setenv("PEERPATH_PORT_MAPPING", "0")


class NodeFactory:
    """Makes started nodes on 127.0.0.1 and closes them at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.nodes: list[Node] = []

    async def __call__(self, name: str, config: SessionConfig | None = None, identity: Identity | None = None) -> Node:
        trust = TrustStore(self.tmp_path / f"{name}-trust.json")
        node = await Node.start(identity=identity or Identity.generate(), trust=trust, host="127.0.0.1", config=config)
        self.nodes.append(node)
        return node


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    factory = NodeFactory(tmp_path)
    try:
        yield factory
    finally:
        for node in factory.nodes:
            await node.close()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RendezvousServer]:
    """A rendezvous server on 127.0.0.1 (any port), closed after the test."""
    srv = RendezvousServer(Identity.generate(), tmp_path / "server")
    await srv.start(["127.0.0.1"], 0)
    try:
        yield srv
    finally:
        await srv.close()


async def eventually(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` is true; fail, naming the predicate's line, after ``timeout``
    seconds (the one way these tests wait for something to happen, instead of sleeping)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        line = getattr(getattr(predicate, "__code__", None), "co_firstlineno", "?")
        assert loop.time() < deadline, f"condition of line {line} not reached in {timeout:g} s"
        await asyncio.sleep(0.02)


def trust_each_other(a: Node, b: Node) -> None:
    """Make ``a`` and ``b`` trust each other."""
    a.trust.add(b.address)
    b.trust.add(a.address)


class Agents:
    """Agent nodes with state directories of their own, on one rendezvous server; an agent
    can be stopped and started again on the same state."""

    def __init__(self, tmp_path: Path, server: RendezvousServer) -> None:
        self.tmp_path, self.server = tmp_path, server
        self.identities: dict[str, Identity] = {}
        self.running: dict[str, AgentNode] = {}

    async def start(self, name: str) -> AgentNode:
        state = self.tmp_path / name
        state.mkdir(exist_ok=True)
        identity = self.identities.setdefault(name, Identity.generate())
        node = await AgentNode.start(
            identity=identity,
            trust=TrustStore(state / "trust.json"),
            host="127.0.0.1",
            rendezvous=self.server.url(),
            direct=False,
        )
        assert node.rendezvous is not None
        await node.rendezvous.wait_registered(5)
        self.running[name] = node
        return node

    async def stop(self, name: str) -> None:
        await self.running.pop(name).close()

    async def pair(self) -> tuple[AgentNode, AgentNode]:
        alice, bob = await self.start("alice"), await self.start("bob")
        alice.trust.add(bob.address, "bob")
        bob.trust.add(alice.address, "alice")
        return alice, bob


@pytest.fixture
async def agents(tmp_path: Path, server: RendezvousServer) -> AsyncIterator[Agents]:
    made = Agents(tmp_path, server)
    try:
        yield made
    finally:
        for node in list(made.running.values()):
            await node.close()
