"""Direct TCP paths on loopback: a relayed session moves to a TCP link proved by checks, keeps
its streams when the link dies, and comes back; strangers on the TCP port get nowhere."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerpath.identity import Identity
from peerpath.net import KernelNet
from peerpath.node import tcp
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.server import RendezvousServer
from peerpath.session.connection import Connection
from peerpath.session.pathset import PathKind
from peerpath.wire import punch

from .conftest import eventually


class TcpAgents:
    """Registered nodes whose direct paths may only use TCP (as if UDP were blocked)."""

    def __init__(self, tmp_path: Path, server: RendezvousServer) -> None:
        self.tmp_path, self.server, self.nodes = tmp_path, server, []

    async def __call__(self, name: str) -> Node:
        node = await Node.start(
            identity=Identity.generate(),
            trust=TrustStore(self.tmp_path / f"{name}.json"),
            host="127.0.0.1",
            rendezvous=self.server.url(),
        )
        node.direct.transports = {"tcp"}
        self.nodes.append(node)
        assert node.rendezvous is not None
        await node.rendezvous.wait_registered(5)
        return node


@pytest.fixture
async def agents(tmp_path: Path, server: RendezvousServer) -> AsyncIterator[TcpAgents]:
    made = TcpAgents(tmp_path, server)
    try:
        yield made
    finally:
        for node in made.nodes:
            await node.close()


async def pair(agents: TcpAgents) -> tuple[Node, Node, Connection]:
    a, b = await agents("a"), await agents("b")
    a.trust.add(b.address)
    b.trust.add(a.address)

    async def digest(conn: Connection, data: bytes) -> bytes:
        return data[::-1]

    b.on_message(digest)
    conn = await a.connect(b.address, timeout=5)
    return a, b, conn


async def test_a_relayed_session_moves_to_a_direct_tcp_path(agents) -> None:
    a, b, conn = await pair(agents)
    assert conn.path is not None and conn.path.kind is PathKind.RELAY  # first byte never waits
    await eventually(lambda: conn.path is not None and conn.path.kind is PathKind.DIRECT_TCP)
    assert conn.path is not None and conn.path.remote.endswith(f":{b.tcp.port}")
    blob = os.urandom(300_000)
    assert await conn.request(blob, timeout=10) == blob[::-1]
    assert conn.path.kind is PathKind.DIRECT_TCP and conn.path.bytes_sent > 300_000
    # The responder carries its side over the same link.
    back = b.connection_to(a.address)
    assert back is not None
    await eventually(lambda: back.path is not None and back.path.kind is PathKind.DIRECT_TCP)
    assert a.direct.counters["tcp_paths"] >= 1
    # Probes keep the link measured.
    await eventually(lambda: conn.path is not None and conn.path.probes_answered >= 1, timeout=5)
    assert conn.describe()["paths"]


async def test_a_dead_tcp_link_hands_the_session_to_the_relay_and_a_new_link_takes_it_back(agents) -> None:
    a, _, conn = await pair(agents)
    await eventually(lambda: conn.path is not None and conn.path.kind is PathKind.DIRECT_TCP)
    replies = []

    async def talk() -> None:
        for i in range(60):
            payload = f"message {i}".encode() * 100
            replies.append(await conn.request(payload, timeout=10) == payload[::-1])
            await asyncio.sleep(0.02)

    talker = asyncio.ensure_future(talk())
    await asyncio.sleep(0.2)
    for link in list(a.tcp.links):
        link.close()
    await eventually(lambda: conn.path is not None and conn.path.kind is PathKind.RELAY, timeout=5)
    await eventually(lambda: conn.path is not None and conn.path.kind is PathKind.DIRECT_TCP, timeout=10)
    await talker
    assert len(replies) == 60 and all(replies)


async def _raw(node: Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert node.tcp.port is not None
    return await asyncio.open_connection("127.0.0.1", node.tcp.port)


async def hung_up(reader: asyncio.StreamReader) -> bool:
    """Whether the node closed the connection (links close with a reset)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def test_strangers_on_the_tcp_port_are_closed_and_the_node_carries_on(agents, monkeypatch) -> None:
    _, b, conn = await pair(agents)
    # A frame that is not a check: closed at once.
    reader, writer = await _raw(b)
    writer.write(struct.pack("!H", 5) + b"\xc0hell")
    assert await hung_up(reader)
    writer.close()
    # A check made with a key nobody uses: closed.
    reader, writer = await _raw(b)
    check = punch.encode_check(os.urandom(32), os.urandom(12))
    writer.write(struct.pack("!H", len(check)) + check)
    assert await hung_up(reader)
    writer.close()
    # Silence: closed after the identification timeout.
    monkeypatch.setattr(tcp, "IDENTIFY_TIMEOUT", 0.2)
    reader, writer = await _raw(b)
    assert await hung_up(reader)
    writer.close()
    # A half frame then a hang-up, and bytes of garbage: nothing breaks.
    reader, writer = await _raw(b)
    writer.write(b"\x05\x00garbage")
    writer.close()
    await eventually(lambda: conn.path is not None and conn.path.kind is PathKind.DIRECT_TCP)
    assert await conn.request(b"still here", timeout=5) == b"ereh llits"
    assert b.counters["datagrams_failed"] == 0


def test_frames_split_anywhere_are_reassembled() -> None:
    got: list[bytes] = []
    links = tcp.TcpLinks(KernelNet(), lambda link, frame: got.append(frame), lambda link: None)
    link = tcp.TcpLink(links, inbound=False)
    frames = [os.urandom(n) for n in (1, 1350, 0, 70, 65535)]
    stream = b"".join(struct.pack("!H", len(f)) + f for f in frames)
    for i in range(0, len(stream), 7):
        link.data_received(stream[i : i + 7])
    assert got == [f for f in frames if f]  # empty frames carry nothing


async def test_a_new_session_proves_the_released_link_again_instead_of_reconnecting(agents) -> None:
    a, b, conn = await pair(agents)
    await eventually(lambda: conn.path is not None and conn.path.kind is PathKind.DIRECT_TCP)
    links = set(a.tcp.links)
    opened = a.tcp.counters["connected"] + b.tcp.counters["connected"]
    await conn.close()
    await eventually(lambda: all(link.conn is None for link in a.tcp.links | b.tcp.links))
    again = await a.connect(b.address, timeout=5)
    assert again is not conn
    await eventually(lambda: again.path is not None and again.path.kind is PathKind.DIRECT_TCP)
    assert a.tcp.links == links and a.tcp.counters["connected"] + b.tcp.counters["connected"] == opened
    assert await again.request(b"hello", timeout=5) == b"olleh"


async def test_birthday_rounds_beyond_the_limit_punch_normally(make_node, monkeypatch) -> None:
    from types import SimpleNamespace

    from peerpath.nat import traversal
    from peerpath.node.direct import Watched

    node = await make_node("a")
    opened = []
    monkeypatch.setattr(node.udp, "extra", lambda: opened.append(1) or node.udp.main)
    monkeypatch.setattr(traversal, "SPRAY_SOCKETS", 3)
    monkeypatch.setattr(traversal, "LINGER", 0.01)
    conn = SimpleNamespace(closed=asyncio.get_running_loop().create_future(), peer=None)
    session = Watched(conn, traversal.Traversal(initiator=True))  # type: ignore[arg-type]
    plan = traversal.RoundPlan(os.urandom(32), node.clock() - 10, traversal.Mode.SPRAY, [], ("127.0.0.1", 9), [], [])
    node.direct._birthdays = traversal.MAX_BIRTHDAY_ROUNDS
    await node.direct._punch(session, plan, None)
    assert opened == [] and node.direct._birthdays == traversal.MAX_BIRTHDAY_ROUNDS
    node.direct._birthdays = 0
    await node.direct._punch(session, plan, None)
    assert len(opened) == 3 and node.direct._birthdays == 0
