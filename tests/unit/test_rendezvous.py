"""Rendezvous and relay on loopback: reach a peer by address alone; the server refuses what it
must refuse and survives it; agents re-register after an outage."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from peerpath import errors
from peerpath.certs import tls_client_context
from peerpath.identity import Identity
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.client import RendezvousClient
from peerpath.rendezvous.limits import ServerLimits
from peerpath.rendezvous.server import RendezvousServer
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.session.connection import Connection
from peerpath.wire import rendezvous as rv

from .conftest import eventually


class Agents:
    """Nodes registered with a rendezvous; relay only (direct paths have their own tests)."""

    def __init__(self, tmp_path: Path, url: RendezvousUrl, direct: bool = False) -> None:
        self.tmp_path, self.url, self.nodes, self.direct = tmp_path, url, [], direct

    async def __call__(self, name: str) -> Node:
        node = await Node.start(
            identity=Identity.generate(),
            trust=TrustStore(self.tmp_path / f"{name}.json"),
            host="127.0.0.1",
            rendezvous=self.url,
            direct=self.direct,
        )
        self.nodes.append(node)
        assert node.rendezvous is not None
        await node.rendezvous.wait_registered(5)
        return node


@pytest.fixture
async def agents(tmp_path: Path, server: RendezvousServer) -> AsyncIterator[Agents]:
    made = Agents(tmp_path, server.url())
    try:
        yield made
    finally:
        for node in made.nodes:
            await node.close()


def befriend(a: Node, b: Node) -> None:
    a.trust.add(b.address)
    b.trust.add(a.address)


async def answer(conn: Connection, data: bytes) -> bytes:
    return b"re:" + data


async def test_connect_by_address_alone_goes_over_the_relay(agents, server) -> None:
    a, b = await agents("a"), await agents("b")
    befriend(a, b)
    a.on_message(answer)
    b.on_message(answer)
    conn = await a.connect(b.address)
    assert conn.path is not None and conn.path.describe() == f"relay {server.url().endpoint}"
    assert await conn.request(b"hello") == b"re:hello"
    back = b.connection_to(a.address)
    assert back is not None and await back.request(b"back") == b"re:back"
    big = os.urandom(3 * 1024 * 1024)
    assert await conn.request(big, timeout=60) == b"re:" + big
    assert server.counters["relay_bytes"] > len(big)
    assert server.counters["lookups"] == 1


async def test_lookup_tells_presence_and_the_relay_only(agents, server) -> None:
    a, b = await agents("a"), await agents("b")
    assert a.rendezvous is not None
    found = await a.rendezvous.lookup(b.address)
    assert found.online and found.relay == str(server.url())
    # Where b is and what NAT it is behind travel only inside b's sessions, to peers it trusts.
    assert set(msgspec.structs.asdict(found)) == {"id", "address", "online", "relay"}
    stranger = Identity.generate().address
    assert not (await a.rendezvous.lookup(stranger)).online
    a.trust.add(stranger)
    with pytest.raises(errors.NetworkError, match="is not online"):
        await a.connect(stranger)


async def test_without_endpoint_or_rendezvous_connect_says_what_to_give(tmp_path: Path) -> None:
    async with Node.start(identity=Identity.generate(), trust=TrustStore(tmp_path / "t.json"), host="127.0.0.1") as a:
        peer = Identity.generate().address
        a.trust.add(peer)
        with pytest.raises(errors.LocalError, match="ADDR@HOST:PORT"):
            await a.connect(peer)


async def test_client_refuses_an_impostor_server(tmp_path: Path, server: RendezvousServer) -> None:
    wrong = RendezvousUrl(Identity.generate().address, "127.0.0.1", server.port)
    client = RendezvousClient(Identity.generate(), wrong, on_relay=lambda a, d: None, backoff=(0.05, 0.1))
    await client.start()
    try:
        with pytest.raises(errors.NetworkError, match=f"is {server.address}, not {wrong.address}"):
            await client.wait_registered(1.0)
    finally:
        await client.close()
    assert server.counters["registered"] == 0


async def raw_connect(server: RendezvousServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, rv.Challenge]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=tls_client_context())
    decoder = rv.FrameDecoder()
    frames: list = []
    while not frames:
        frames = decoder.feed(await reader.read(65536))
    challenge = frames[0][0]
    assert isinstance(challenge, rv.Challenge)
    return reader, writer, challenge


async def read_refusal(reader: asyncio.StreamReader) -> str:
    decoder = rv.FrameDecoder()
    reasons = []
    while data := await asyncio.wait_for(reader.read(65536), 5):
        reasons += [m.reason for m, d in decoder.feed(data) if isinstance(m, rv.Refused)]
    assert reasons, "the server closed without saying why"
    return reasons[0]


def register_frame(signer: Identity, claimed: Identity, nonce: bytes, server: RendezvousServer) -> bytes:
    payload = rv.register_payload(nonce, claimed.address.digest, server.address.digest)
    return rv.encode_control(rv.Register(claimed.public_key, signer.sign(payload)))


async def test_server_refuses_bad_registrations(server: RendezvousServer) -> None:
    me, victim = Identity.generate(), Identity.generate()
    # Unauthenticated: relaying before registering.
    reader, writer, _ = await raw_connect(server)
    writer.write(rv.encode_relay(victim.address.digest, b"\x40" * 100))
    assert "must be a registration" in await read_refusal(reader)
    # Forged: someone else's key, our signature.
    reader, writer, challenge = await raw_connect(server)
    writer.write(register_frame(me, victim, challenge.nonce, server))
    assert "does not verify" in await read_refusal(reader)
    # Replayed: a valid registration for an old challenge.
    old = register_frame(me, me, os.urandom(32), server)
    reader, writer, _ = await raw_connect(server)
    writer.write(old)
    assert "does not verify" in await read_refusal(reader)
    assert server.counters["refused"] == 3 and server.counters["registered"] == 0
    # The honest registration still works.
    reader, writer, challenge = await raw_connect(server)
    writer.write(register_frame(me, me, challenge.nonce, server))
    frames = rv.FrameDecoder().feed(await asyncio.wait_for(reader.read(65536), 5))
    assert isinstance(frames[0][0], rv.Registered)
    writer.close()


async def test_malformed_and_oversized_frames_cut_off_only_their_sender(agents, server) -> None:
    a, b = await agents("a"), await agents("b")
    befriend(a, b)
    b.on_message(answer)
    conn = await a.connect(b.address)
    for garbage in (b"\x07\x00\x00\x01x", b"\x01\xff\xff\xff", rv.encode_control(rv.Registered("x"))):
        me = Identity.generate()
        reader, writer, challenge = await raw_connect(server)
        writer.write(register_frame(me, me, challenge.nonce, server) + garbage)
        assert "protocol error" in await read_refusal(reader)
    assert server.counters["malformed"] == 3
    assert await conn.request(b"still here") == b"re:still here"


async def test_relay_quota_drops_then_cuts_off_a_flooder(tmp_path: Path) -> None:
    srv = RendezvousServer(
        Identity.generate(), tmp_path / "s", limits=ServerLimits(relay_rate=20_000, relay_burst=20_000, cutoff_drops=50)
    )
    await srv.start(["127.0.0.1"], 0)
    made = Agents(tmp_path, srv.url())
    try:
        flooder, target = await made("flooder"), await made("target")
        received: list[bytes] = []
        assert target.rendezvous is not None and flooder.rendezvous is not None
        target.rendezvous.on_relay = lambda source, data: received.append(data)
        start = time.monotonic()
        for _ in range(200):
            flooder.rendezvous.send_relay(target.address.digest, b"\x40" + bytes(999))
        for _ in range(100):
            if srv.counters["agents_cut_off"]:
                break
            await asyncio.sleep(0.02)
        # The 20 kB burst got through, plus what the 20 kB/s rate refilled meanwhile (a slow
        # machine takes longer to send the flood), and no more.
        allowed = (20_000 + 20_000 * (time.monotonic() - start)) / 1000
        assert 10 <= len(received) <= allowed + 2
        assert srv.counters["relay_dropped_quota"] >= 50
        assert srv.counters["agents_cut_off"] == 1
        assert target.rendezvous.registered.is_set()  # the other agent is unaffected
    finally:
        for node in made.nodes:
            await node.close()
        await srv.close()


async def test_agents_reregister_after_a_server_restart_and_the_session_survives(tmp_path: Path) -> None:
    identity = Identity.generate()
    srv = RendezvousServer(identity, tmp_path / "s")
    await srv.start(["127.0.0.1"], 0)
    port = srv.port
    made = Agents(tmp_path, srv.url())
    try:
        a, b = await made("a"), await made("b")
        for node in (a, b):
            assert node.rendezvous is not None
            node.rendezvous._backoff = (0.05, 0.2)
        befriend(a, b)
        b.on_message(answer)
        conn = await a.connect(b.address)
        await srv.close()
        for node in (a, b):
            assert node.rendezvous is not None
            for _ in range(100):
                if not node.rendezvous.registered.is_set():
                    break
                await asyncio.sleep(0.02)
            assert not node.rendezvous.registered.is_set()
        srv = RendezvousServer(identity, tmp_path / "s")
        await srv.start(["127.0.0.1"], port)
        for node in (a, b):
            assert node.rendezvous is not None
            await node.rendezvous.wait_registered(5)
            assert node.rendezvous.registrations == 2
        assert conn.is_established
        assert await conn.request(b"after the outage", timeout=10) == b"re:after the outage"
    finally:
        for node in made.nodes:
            await node.close()
        await srv.close()


async def test_relay_goes_over_udp_when_the_server_acknowledges_it(agents, server) -> None:
    a, b = await agents("a"), await agents("b")
    befriend(a, b)
    b.on_message(answer)
    assert a.rendezvous is not None and b.rendezvous is not None
    await eventually(lambda: a.rendezvous.udp_ready and b.rendezvous.udp_ready)
    conn = await a.connect(b.address)
    assert await conn.request(b"over udp") == b"re:over udp"
    assert a.rendezvous.counters["relay_sent_udp"] > 0
    assert b.rendezvous.counters["relay_received_udp"] > 0
    assert a.status()["rendezvous"]["relay_transport"] == "udp"


async def test_relay_falls_back_to_tcp_when_udp_is_blocked(tmp_path, server) -> None:
    for udp in server._udp:
        udp.close()  # the network drops UDP to the server
    made = Agents(tmp_path, server.url())
    try:
        a, b = await made("a"), await made("b")
        befriend(a, b)
        b.on_message(answer)
        conn = await a.connect(b.address)
        assert await conn.request(b"over tcp") == b"re:over tcp"
        assert a.rendezvous is not None and not a.rendezvous.udp_ready
        assert a.rendezvous.counters["relay_sent_udp"] == 0
    finally:
        for node in made.nodes:
            await node.close()


async def test_stray_udp_relay_frames_are_counted_and_ignored(agents, server) -> None:
    a = await agents("a")
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    try:
        target = ("127.0.0.1", server.port)
        transport.sendto(rv.encode_udp_relay(bytes(8), bytes(32), bytes(16), b"x"), target)  # unknown token
        transport.sendto(bytes([rv.UDP_HELLO]) + b"short", target)  # malformed
        transport.sendto(bytes([0x9E, 1, 2, 3]), target)  # unknown kind
        # And relay-looking frames from a stranger to an agent's socket are ignored too.
        transport.sendto(rv.encode_udp_delivery(bytes(32), bytes(16), b"\x40" * 50), a.local_endpoint)
        await eventually(lambda: server.counters["udp_unknown_token"] == 1 and server.counters["udp_malformed"] == 2)
    finally:
        transport.close()
    assert a.rendezvous is not None and a.rendezvous.counters["relay_received"] == 0


async def test_websocket_over_tls_when_only_https_gets_out(tmp_path) -> None:
    """TLS to the rendezvous port and UDP are blocked; WebSocket over TLS (443 in production)
    carries registration, lookups and relayed sessions."""
    srv = RendezvousServer(Identity.generate(), tmp_path / "s")
    await srv.start(["127.0.0.1"], 0, wss_port=0)
    for udp in srv._udp:
        udp.close()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        blocked_port = closed.getsockname()[1]
    url = RendezvousUrl(srv.address, "127.0.0.1", blocked_port, srv.wss_port)
    assert RendezvousUrl.parse(str(url)) == url and str(url).endswith(f"?wss={srv.wss_port}")
    made = Agents(tmp_path, url)
    try:
        a, b = await made("a"), await made("b")
        assert a.rendezvous is not None and a.rendezvous.transport_name == "wss"
        befriend(a, b)
        b.on_message(answer)
        conn = await a.connect(b.address)
        payload = os.urandom(500_000)
        assert await conn.request(payload, timeout=30) == b"re:" + payload
        assert a.status()["rendezvous"]["relay_transport"] == "wss"
    finally:
        for node in made.nodes:
            await node.close()
        await srv.close()


async def test_websocket_endpoint_answers_404_elsewhere(tmp_path) -> None:
    srv = RendezvousServer(Identity.generate(), tmp_path / "s")
    await srv.start(["127.0.0.1"], 0, wss_port=0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.wss_port, ssl=tls_client_context())
        writer.write(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 404")
        writer.close()
    finally:
        await srv.close()


async def test_a_peer_is_reached_through_its_home_relay(tmp_path, monkeypatch) -> None:
    from peerpath.node import relays as relays_module

    relay = RendezvousServer(Identity.generate(), tmp_path / "relay")
    await relay.start(["127.0.0.2"], 0)
    main = RendezvousServer(Identity.generate(), tmp_path / "main", relays=[relay.url()])
    await main.start(["127.0.0.1"], 0)

    async def nearer_relay(net, url_text: str, timeout: float = 2.0, *, clock=None) -> float:
        return 0.001 if "127.0.0.2" in url_text else 0.005  # the relay measures closer

    monkeypatch.setattr(relays_module, "connect_rtt", nearer_relay)
    made = Agents(tmp_path, main.url())
    try:
        a, b = await made("a"), await made("b")
        await eventually(lambda: a.home_relay is not None and b.home_relay is not None)
        assert b.home_relay == str(relay.url())
        befriend(a, b)
        b.on_message(answer)
        assert a.rendezvous is not None
        await eventually(lambda: len(relay.agents) == 2)
        found = await a.rendezvous.lookup(b.address)
        assert found.relay == str(relay.url())
        conn = await a.connect(b.address)
        assert conn.path is not None and conn.path.describe() == f"relay {relay.url().endpoint}"
        assert await conn.request(b"via the home relay") == b"re:via the home relay"
        assert relay.counters["relay_bytes"] > 0 and main.counters["relay_bytes"] == 0
        assert a.status()["home_relay"] == str(relay.url())
    finally:
        for node in made.nodes:
            await node.close()
        await main.close()
        await relay.close()


async def test_home_relay_must_be_one_the_server_offers(agents, server) -> None:
    a = await agents("a")
    assert a.rendezvous is not None
    a.rendezvous.set_home_relay(str(RendezvousUrl(Identity.generate().address, "198.51.100.9", 7000)))
    await eventually(lambda: server.counters["malformed"] == 1)


async def test_server_writes_its_counters_for_operators(tmp_path) -> None:
    import json as json_module

    srv = RendezvousServer(Identity.generate(), tmp_path / "s")
    await srv.start(["127.0.0.1"], 0)
    made = Agents(tmp_path, srv.url())
    try:
        await made("a")
        srv.write_status()
        status = json_module.loads((tmp_path / "s" / "status.json").read_text())
        assert status["agents_online"] == 1 and status["counters"]["registered"] == 1
        assert status["url"] == str(srv.url())
    finally:
        for node in made.nodes:
            await node.close()
        await srv.close()
    final = json_module.loads((tmp_path / "s" / "status.json").read_text())
    assert final["agents_online"] == 0


async def test_a_node_learns_its_nat_behaviour_and_keeps_it_from_the_server(tmp_path) -> None:
    from peerpath.nat.stun_server import StunServer

    stun = await StunServer.start(["127.0.0.1", "127.0.0.2"], 0)
    srv = RendezvousServer(Identity.generate(), tmp_path / "s", stun=[f"127.0.0.1:{stun.responder.ports[0]}"])
    await srv.start(["127.0.0.1"], 0)
    made = Agents(tmp_path, srv.url())
    try:
        a, b = await made("a"), await made("b")
        await eventually(lambda: b.reachability.nat is not None)
        nat = b.reachability.nat
        assert nat is not None and nat["udp"] is True and nat["nat"] is False
        assert nat["mapping"] == "endpoint-independent"
        assert a.rendezvous is not None
        found = await a.rendezvous.lookup(b.address)
        # Peers learn it inside a session (the punch offer); a lookup does not tell it.
        assert found.online and not hasattr(found, "nat")
    finally:
        for node in made.nodes:
            await node.close()
        await srv.close()
        await stun.close()
