"""Path quality end to end on loopback: probes measure every path, the relay's included; a
direct path that loses most of what it carries hands the session to the relay, which
keeps it until the direct path is good again."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerpath.identity import Identity
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.server import RendezvousServer
from peerpath.session.connection import Connection, SessionConfig
from peerpath.session.pathset import PathKind

from .conftest import eventually, trust_each_other


async def start_pair(
    tmp_path: Path, server: RendezvousServer, nodes: list[Node], transports: set[str], config: SessionConfig
) -> tuple[Node, Node]:
    """Two registered nodes that trust each other and punch only with ``transports``;
    appended to ``nodes`` as they start, for the caller to close."""
    for name in ("a", "b"):
        node = await Node.start(
            identity=Identity.generate(),
            trust=TrustStore(tmp_path / f"{name}.json"),
            host="127.0.0.1",
            rendezvous=server.url(),
            config=config,
        )
        node.direct.transports = transports
        nodes.append(node)
        assert node.rendezvous is not None
        await node.rendezvous.wait_registered(5)
    a, b = nodes
    trust_each_other(a, b)
    return a, b


@pytest.fixture
async def session(tmp_path: Path, server: RendezvousServer) -> AsyncIterator[tuple[Node, Node, Connection]]:
    nodes: list[Node] = []
    try:
        # The choice under test: direct UDP or the relay.
        a, b = await start_pair(tmp_path, server, nodes, {"udp"}, SessionConfig(path_hold_down=4.0))

        async def echo(conn: Connection, data: bytes) -> bytes:
            return data

        b.on_message(echo)
        conn = await a.connect(b.address, timeout=5)
        await eventually(lambda: conn.path is not None and conn.path.kind is PathKind.DIRECT_UDP)
        yield a, b, conn
    finally:
        for node in nodes:
            await node.close()


async def test_probes_measure_the_direct_path_and_the_relay(session) -> None:
    _, _, conn = session
    relay = next(p for p in conn.paths.paths.values() if p.kind is PathKind.RELAY)
    await eventually(lambda: relay.srtt is not None and conn.path is not None and conn.path.srtt is not None, timeout=5)
    quality = {q["path"]: q for q in conn.describe()["paths"]}
    assert quality[relay.describe()]["rtt_ms"] > 0
    assert quality[conn.path.describe()]["loss"] == 0.0


async def test_a_lossy_direct_path_hands_over_to_the_relay_and_comes_back_when_good(session) -> None:
    _, _, conn = session
    direct = conn.path
    assert direct is not None
    send = direct.send_datagram
    rng = random.Random(7)
    lossy = True

    def sometimes(datagram: bytes) -> None:  # 75 % of what we send over the direct path is lost
        if not lossy or rng.random() >= 0.75:
            send(datagram)

    direct.send_datagram = sometimes
    await eventually(lambda: direct.degraded is not None, timeout=30)
    assert "lost" in str(direct.degraded)
    assert conn.path is not None and conn.path.kind is PathKind.RELAY
    # Requests keep working meanwhile, over the relay, and the session stays there.
    for i in range(10):
        assert await conn.request(b"ping %d" % i, timeout=5) == b"ping %d" % i
        assert conn.path is not None and conn.path.kind is PathKind.RELAY
        await asyncio.sleep(0.2)
    lossy = False
    await eventually(lambda: conn.path is direct, timeout=30)
    assert direct.degraded is None
    assert await conn.request(b"back", timeout=5) == b"back"


async def test_a_session_that_stays_on_the_relay_still_measures_it(tmp_path: Path, server: RendezvousServer) -> None:
    """No direct path is possible (no transports to punch with): the relay path is probed
    all the same, so its RTT and loss show in status."""
    nodes: list[Node] = []
    try:
        a, b = await start_pair(tmp_path, server, nodes, set(), SessionConfig())
        conn = await a.connect(b.address, timeout=5)
        relay = conn.path
        assert relay is not None and relay.kind is PathKind.RELAY
        await eventually(lambda: relay.srtt is not None and relay.probes_answered >= 3, timeout=10)
        quality = conn.describe()["paths"][0]
        assert quality["rtt_ms"] > 0 and quality["loss"] == 0.0
        assert conn.path is relay and len(conn.paths.paths) == 1
    finally:
        for node in nodes:
            await node.close()
