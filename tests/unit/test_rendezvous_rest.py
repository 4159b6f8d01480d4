"""Idle agents rest on UDP: their connection closes, they stay online (found by lookups,
reached by relayed datagrams over UDP), and they connect again when they need the server,
when a letter waits for them, or when UDP stops answering."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerpath.identity import Identity
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.ratelimit import TokenBucket
from peerpath.rendezvous import client as client_module
from peerpath.rendezvous import server as server_module
from peerpath.rendezvous.letters import make_letter
from peerpath.rendezvous.limits import ServerLimits
from peerpath.rendezvous.presence import RESTING, Agent
from peerpath.rendezvous.resting import silent_too_long
from peerpath.rendezvous.server import RendezvousServer
from peerpath.rendezvous.udp_relay import UdpRelay
from peerpath.session.connection import Connection
from peerpath.wire import rendezvous as rv

from .conftest import eventually
from .test_rendezvous import raw_connect, register_frame


async def start_node(tmp_path: Path, server: RendezvousServer, name: str, rest_after: float | None = 0.2) -> Node:
    """A node registered with ``server``, on the relay only, resting after ``rest_after`` idle."""
    node = await Node.start(
        identity=Identity.generate(),
        trust=TrustStore(tmp_path / f"{name}.json"),
        host="127.0.0.1",
        rendezvous=server.url(),
        direct=False,
    )
    assert node.rendezvous is not None
    node.rendezvous.rest_after = rest_after
    return node


@pytest.fixture
async def resting(
    tmp_path: Path, server: RendezvousServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[Node]]:
    """Nodes registered with ``server`` whose clients ask to rest after 0.2 s idle (and check
    every 0.1 s); the server sends its wakes again every 0.2 s. Closed after the test."""
    monkeypatch.setattr(client_module, "KEEPALIVE", 0.1)
    monkeypatch.setattr(server_module, "STATUS_INTERVAL", 0.2)
    nodes: list[Node] = []

    async def start(name: str) -> Node:
        node = await start_node(tmp_path, server, name)
        nodes.append(node)
        assert node.rendezvous is not None
        await node.rendezvous.wait_registered(5)
        return node

    # The server's ping loop started before the patch: restart it on the short interval.
    server._pinger.cancel()  # type: ignore[union-attr]
    server._pinger = asyncio.get_running_loop().create_task(server._ping_loop())
    yield start  # type: ignore[misc]
    for node in nodes:
        await node.close()


async def rests(server: RendezvousServer, node: Node) -> None:
    """Wait until ``node`` rests on UDP, at both ends."""
    client = node.rendezvous
    assert client is not None
    await eventually(lambda: client.resting and server.agents[node.address.digest].rests)


async def echo(conn: Connection, data: bytes) -> bytes:
    return b"re:" + data


async def test_an_idle_agent_rests_and_stays_reachable_over_the_udp_relay(resting, server) -> None:
    a, b = await resting("a"), await resting("b")
    a.trust.add(b.address)
    b.trust.add(a.address)
    b.on_message(echo)
    open_before = len(server._links)
    await rests(server, b)
    assert len(server._links) < open_before  # its TLS connection is gone
    assert server.status()["agents_resting"] >= 1
    assert b.rendezvous is not None and b.rendezvous.status()["connection"] == "resting on udp"
    registrations = b.rendezvous.registrations

    conn = await a.connect(b.address)  # the lookup finds it; the relay reaches it over UDP
    assert await conn.request(b"hello") == b"re:hello"
    assert b.rendezvous.resting and b.rendezvous.registrations == registrations
    assert server.counters["wakes"] == 0


async def test_a_letter_wakes_a_resting_agent(resting, server) -> None:
    a, b = await resting("a"), await resting("b")
    got: list[rv.Letter] = []
    b.on_letter("sealed", got.append)
    await rests(server, b)
    assert a.rendezvous is not None and b.rendezvous is not None
    registrations = b.rendezvous.registrations

    await a.rendezvous.post(make_letter(a.identity, "sealed", b.address, sealed=b"wake up"))
    await eventually(lambda: got)
    assert got[0].sealed == b"wake up"
    assert server.counters["wakes"] >= 1
    assert b.rendezvous.registrations == registrations + 1
    await eventually(lambda: server.mailbox is not None and not server.mailbox.waiting_for(b.address.digest, 10))


async def test_a_lost_wake_is_sent_again(resting, server) -> None:
    a, b = await resting("a"), await resting("b")
    got: list[rv.Letter] = []
    b.on_letter("sealed", got.append)
    await rests(server, b)
    assert a.rendezvous is not None and b.rendezvous is not None
    client = b.rendezvous
    heard = client.udp_received
    lost = []

    def lose_the_first_wake(data: bytes, addr: tuple[str, int]) -> None:
        if data[0] == rv.UDP_WAKE and not lost:
            lost.append(data)
            return
        heard(data, addr)

    client.udp_received = lose_the_first_wake  # type: ignore[method-assign]
    await a.rendezvous.post(make_letter(a.identity, "sealed", b.address, sealed=b"again"))
    await eventually(lambda: got)
    assert lost and server.counters["wakes"] >= 2


async def test_a_request_brings_a_resting_agent_back(resting, server) -> None:
    a, b = await resting("a"), await resting("b")
    await rests(server, b)
    assert b.rendezvous is not None
    registrations = b.rendezvous.registrations
    found = await b.rendezvous.lookup(a.address)
    assert found.online
    assert not b.rendezvous.resting and b.rendezvous.registrations == registrations + 1


async def test_a_forged_wake_is_dropped(resting, server) -> None:
    b = await resting("b")
    await rests(server, b)
    client = b.rendezvous
    assert client is not None and client.udp_endpoint is not None
    dropped = client.counters["udp_dropped"]
    client.udp_received(rv.encode_udp_wake(server.agents[b.address.digest].token, bytes(32)), client.udp_endpoint)
    assert client.counters["udp_dropped"] == dropped + 1
    assert client.resting


async def test_a_resting_agent_silent_on_udp_goes_offline(resting, server) -> None:
    b = await resting("b")
    await rests(server, b)
    server._ping_silent(time.monotonic() + 60)
    assert b.address.digest not in server.agents


async def test_an_agent_that_goes_on_talking_is_not_left_resting(server) -> None:
    """Rest is refused without a confirmed UDP path; and a "yes" is called off by whatever the
    agent sends next on its connection."""
    reader, writer, challenge = await raw_connect(server)
    try:
        identity = Identity.generate()
        writer.write(register_frame(identity, identity, challenge.nonce, server))
        registered = await read_control(reader)
        assert isinstance(registered, rv.Registered) and registered.rest
        writer.write(rv.encode_control(rv.Rest(7)))
        answer = await read_control(reader)
        assert isinstance(answer, rv.Outcome) and answer.id == 7 and not answer.ok
        assert "UDP" in answer.error and server.counters["rests_refused"] == 1

        agent = server.agents[identity.address.digest]
        agent.resting = True  # as if it had been told yes
        writer.write(rv.encode_control(rv.Lookup(8, str(identity.address))))
        assert isinstance(await read_control(reader), rv.LookupResult)
        assert not agent.resting
    finally:
        writer.close()


async def read_control(reader: asyncio.StreamReader) -> rv.Message:
    decoder = rv.FrameDecoder()
    while True:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "the server closed the connection"
        for message, datagram in decoder.feed(data):
            if datagram is None:
                return message  # type: ignore[return-value]


# -- what an agent may not do with a rest ---------------------------------------------------------


async def test_resting_agents_count_against_their_address(tmp_path: Path, monkeypatch) -> None:
    """One address holds as many registrations as it may hold connections, resting or not."""
    monkeypatch.setattr(client_module, "KEEPALIVE", 0.1)
    server = RendezvousServer(Identity.generate(), tmp_path / "server", limits=ServerLimits(max_connections_per_ip=2))
    await server.start(["127.0.0.1"], 0)
    nodes: list[Node] = []
    try:
        for name in ("a", "b"):
            node = await start_node(tmp_path, server, name)
            nodes.append(node)
            assert node.rendezvous is not None
            await node.rendezvous.wait_registered(5)
            await rests(server, node)
        third = await start_node(tmp_path, server, "c")
        nodes.append(third)
        assert third.rendezvous is not None
        await eventually(lambda: "too many agents registered" in (third.rendezvous.last_error or ""))
        assert len(server.agents) == 2
    finally:
        for node in nodes:
            await node.close()
        await server.close()


class Sock:
    """A UDP relay socket of the server that keeps what it sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> bool:
        self.sent.append(data)
        return True


def resting_on(relay: UdpRelay) -> tuple[Agent, Sock, tuple[str, int]]:
    """An agent resting at ``relay``, its UDP endpoint confirmed: it, its socket, the endpoint."""
    agent = Agent(
        Identity.generate().address,
        RESTING,
        "192.0.2.1:4000",
        connected=0.0,
        relay_quota=TokenBucket(1, 1, 0.0),
        control_quota=TokenBucket(1, 1, 0.0),
        last_seen=0.0,
    )
    sock, endpoint = Sock(), ("192.0.2.1", 4000)
    agent.udp_endpoint, agent.udp_socket = endpoint, sock
    relay.tokens[agent.token] = agent
    return agent, sock, endpoint


def test_a_replayed_hello_keeps_no_resting_agent_alive() -> None:
    counters: dict[str, int] = {"udp_frames": 0, "udp_unauthentic": 0, "udp_unknown_token": 0, "udp_malformed": 0}
    relay = UdpRelay(counters, lambda *args: None, lambda agent, exc: None)
    agent, sock, endpoint = resting_on(relay)
    sent = sock.sent
    hello = rv.encode_udp_hello(agent.token, agent.udp_key, 7)
    relay.received(hello, endpoint, sock, 10.0)
    assert agent.hello_seen == 10.0 and len(sent) == 1  # acknowledged
    relay.received(hello, endpoint, sock, 50.0)  # a copy, later
    assert agent.hello_seen == 10.0 and len(sent) == 1 and counters["udp_replayed"] == 1
    assert silent_too_long(agent, 60.0)
    relay.received(rv.encode_udp_hello(agent.token, agent.udp_key, 8), endpoint, sock, 55.0)
    assert agent.hello_seen == 55.0 and not silent_too_long(agent, 60.0)
    # A copy that beats the agent's own hello from elsewhere draws a challenge there, and
    # takes nothing from the real one.
    ninth = rv.encode_udp_hello(agent.token, agent.udp_key, 9)
    relay.received(ninth, ("198.51.100.9", 5000), sock, 56.0)
    assert rv.parse_udp_relay(sent[-1]).kind == rv.UDP_CHALLENGE
    relay.received(ninth, endpoint, sock, 57.0)
    assert agent.hello_seen == 57.0 and rv.parse_udp_relay(sent[-1]).kind == rv.UDP_HELLO_ACK


async def told_yes(
    server: RendezvousServer,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Identity, socket.socket]:
    """A raw agent registered, its UDP endpoint taken as confirmed, told yes to a rest."""
    reader, writer, challenge = await raw_connect(server)
    identity = Identity.generate()
    writer.write(register_frame(identity, identity, challenge.nonce, server))
    assert isinstance(await read_control(reader), rv.Registered)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    agent = server.agents[identity.address.digest]
    agent.udp_ready, agent.udp_endpoint, agent.udp_socket = True, udp.getsockname(), server._udp[0]
    agent.udp_seen = agent.hello_seen = server.clock()
    writer.write(rv.encode_control(rv.Rest(4)))  # its hellos are not numbered yet
    refused = await read_control(reader)
    assert isinstance(refused, rv.Outcome) and not refused.ok and "numbered" in refused.error
    agent.hello_sequence = 1
    writer.write(rv.encode_control(rv.Rest(5)))
    answer = await read_control(reader)
    assert isinstance(answer, rv.Outcome) and answer.ok
    return reader, writer, identity, udp


async def post_to(server: RendezvousServer, recipient: Identity) -> None:
    reader, writer, challenge = await raw_connect(server)
    sender = Identity.generate()
    writer.write(register_frame(sender, sender, challenge.nonce, server))
    assert isinstance(await read_control(reader), rv.Registered)
    writer.write(rv.encode_control(rv.Post(1, make_letter(sender, "sealed", recipient.address, sealed=b"x"))))
    result = await read_control(reader)
    assert isinstance(result, rv.PostResult) and result.ok
    writer.close()


async def test_a_letter_between_the_yes_and_the_rest_is_not_lost(server) -> None:
    """Stay: the agent changed its mind, and gets the letter on its connection. Rest: the wake
    goes as soon as its connection is over."""
    loop = asyncio.get_running_loop()
    reader, writer, identity, udp = await told_yes(server)
    try:
        await post_to(server, identity)
        wake = await asyncio.wait_for(loop.sock_recv(udp, 2048), 5)
        assert wake[0] == rv.UDP_WAKE
        writer.write(rv.encode_control(rv.Stay(5)))
        delivered = await read_control(reader)
        assert isinstance(delivered, rv.Deliver)
        assert not server.agents[identity.address.digest].resting
    finally:
        writer.close()
        udp.close()

    reader, writer, identity, udp = await told_yes(server)
    try:
        await post_to(server, identity)
        await asyncio.wait_for(loop.sock_recv(udp, 2048), 5)  # the wake while still connected
        writer.close()
        await eventually(lambda: server.agents[identity.address.digest].rests)
        wake = await asyncio.wait_for(loop.sock_recv(udp, 2048), 5)  # again, once it rests
        assert wake[0] == rv.UDP_WAKE
    finally:
        udp.close()


async def test_an_agent_cut_off_after_its_yes_goes_offline(server) -> None:
    _, writer, identity, udp = await told_yes(server)
    try:
        writer.write(b"\xff\x00\x00\x01x")  # no frame has that type
        await eventually(lambda: identity.address.digest not in server.agents)
    finally:
        writer.close()
        udp.close()


async def test_a_resting_agent_that_closes_is_offline_at_once(resting, server) -> None:
    a, b = await resting("a"), await resting("b")
    await rests(server, b)
    await b.close()  # its goodbye over UDP: no 45 s of "online" for a peer to dial in vain
    await eventually(lambda: b.address.digest not in server.agents, timeout=2)
    assert a.rendezvous is not None and not (await a.rendezvous.lookup(b.address)).online


def test_a_goodbye_counts_only_from_a_resting_agents_endpoint() -> None:
    counters = {"udp_frames": 0, "udp_unauthentic": 0, "udp_unknown_token": 0, "udp_malformed": 0}
    relay = UdpRelay(counters, lambda *args: None, lambda agent, exc: None)
    gone: list[Agent] = []
    relay.on_goodbye = gone.append
    agent, sock, endpoint = resting_on(relay)
    goodbye = rv.encode_udp_goodbye(agent.token, agent.udp_key)
    relay.received(goodbye, ("198.51.100.9", 4000), sock, 1.0)  # a copy from elsewhere
    relay.received(rv.encode_udp_goodbye(agent.token, bytes(32)), endpoint, sock, 1.0)  # forged
    assert not gone
    agent.link = object()  # type: ignore[assignment]  (any link but RESTING: a connected agent)
    relay.received(goodbye, endpoint, sock, 1.0)
    assert not gone
    agent.link = RESTING
    relay.received(goodbye, endpoint, sock, 1.0)
    assert gone == [agent]
