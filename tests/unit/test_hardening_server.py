"""The rendezvous server and its client under hostile input: what a stranger, an agent or a
server can make the other side hold, wedge or redirect (issue 11's findings)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import msgspec

from peerpath.certs import tls_client_context
from peerpath.identity import Identity
from peerpath.rendezvous.client import RendezvousClient
from peerpath.rendezvous.letters import make_letter
from peerpath.rendezvous.limits import ServerLimits
from peerpath.rendezvous.server import RendezvousServer
from peerpath.wire import rendezvous as rv

from .conftest import eventually


class RawAgent:
    """An agent speaking the rendezvous protocol by hand over TLS."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity) -> None:
        self.reader, self.writer, self.identity = reader, writer, identity
        self.decoder = rv.FrameDecoder()

    @classmethod
    async def connect(cls, server: RendezvousServer, identity: Identity | None = None) -> RawAgent:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=tls_client_context())
        return cls(reader, writer, identity or Identity.generate())

    async def frames(self, timeout: float = 5.0) -> list:
        data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
        return self.decoder.feed(data) if data else []

    async def register_frame(self, server: RendezvousServer) -> bytes:
        (challenge, _), *_ = await self.frames()
        payload = rv.register_payload(challenge.nonce, self.identity.address.digest, server.address.digest)
        return rv.encode_control(rv.Register(self.identity.public_key, self.identity.sign(payload)))

    def close(self) -> None:
        self.writer.close()


async def test_a_registration_followed_by_garbage_leaves_no_ghost(server) -> None:
    """Finding 2: the agent was added, then the same write's next frame failed; before, the
    connection's teardown did not know the agent and it stayed 'online' for good."""
    agents = []
    for _ in range(20):
        agent = await RawAgent.connect(server)
        agent.writer.write(await agent.register_frame(server) + bytes([9, 0, 0, 1, 0]))  # unknown frame type
        agents.append(agent)
    try:
        await eventually(lambda: server.counters["malformed"] == 20)
        await eventually(lambda: not server.agents and not server.udp_relay.tokens)
    finally:
        for agent in agents:
            agent.close()


async def test_a_letter_too_large_to_deliver_cannot_be_posted(server) -> None:
    """Finding 3: a 64 KiB Post made a Deliver over the frame limit, so the recipient's every
    registration failed for a week. Now its fields are bounded and the Post is refused."""
    sender, recipient = Identity.generate(), Identity.generate()
    agent = await RawAgent.connect(server, sender)
    agent.writer.write(await agent.register_frame(server))
    letter = make_letter(sender, "trust-request", recipient.address, note="hi")
    bloated = msgspec.structs.replace(letter, reply_to=os.urandom(60_000))
    agent.writer.write(rv.encode_control(rv.Post(1, bloated)))
    try:
        await eventually(lambda: server.counters["malformed"] == 1)
    finally:
        agent.close()
    assert server.mailbox is not None and server.mailbox.waiting_for(recipient.address.digest) == []
    # The recipient registers and gets an ordinary letter as before.
    friend = Identity.generate()
    poster = await RawAgent.connect(server, friend)
    poster.writer.write(await poster.register_frame(server))
    poster.writer.write(rv.encode_control(rv.Post(2, make_letter(friend, "trust-request", recipient.address))))
    await eventually(lambda: server.counters["letters_posted"] == 1)
    poster.close()
    target = await RawAgent.connect(server, recipient)
    target.writer.write(await target.register_frame(server))
    kinds: list = []
    while not any(isinstance(m, rv.Deliver) for m in kinds):
        kinds += [m for m, _ in await target.frames()]
    target.close()


async def test_a_flood_of_control_messages_is_rate_limited_and_then_cut_off(tmp_path: Path) -> None:
    srv = RendezvousServer(
        Identity.generate(), tmp_path / "s", limits=ServerLimits(control_rate=10, control_burst=20, cutoff_drops=200)
    )
    await srv.start(["127.0.0.1"], 0)
    agent = await RawAgent.connect(srv)
    try:
        agent.writer.write(await agent.register_frame(srv))
        lookups = b"".join(rv.encode_control(rv.Lookup(i, str(agent.identity.address))) for i in range(500))
        agent.writer.write(lookups)
        await eventually(lambda: srv.counters["agents_cut_off"] == 1)
        assert srv.counters["lookups"] <= 30  # the burst, and what the rate refilled meanwhile
        assert srv.counters["control_dropped_quota"] >= 200
        await eventually(lambda: not srv.agents)
    finally:
        agent.close()
        await srv.close()


async def test_connections_per_ip_are_limited(tmp_path: Path) -> None:
    srv = RendezvousServer(Identity.generate(), tmp_path / "s", limits=ServerLimits(max_connections_per_ip=3))
    await srv.start(["127.0.0.1"], 0)
    held = [await RawAgent.connect(srv) for _ in range(3)]
    try:
        for agent in held:
            await agent.frames()  # each got its challenge
        extra = await RawAgent.connect(srv)
        refused = [m for m, _ in await extra.frames()]
        assert isinstance(refused[0], rv.Refused) and "too many connections" in refused[0].reason
        extra.close()
        held.pop().close()
        await eventually(lambda: srv._open == 2)
        again = await RawAgent.connect(srv)
        assert isinstance((await again.frames())[0][0], rv.Challenge)
        again.close()
    finally:
        for agent in held:
            agent.close()
        await srv.close()


async def test_the_client_survives_a_server_that_sends_garbage(tmp_path: Path, monkeypatch) -> None:
    """Finding 4: deeply nested msgpack in a CONTROL frame raised RecursionError, which killed the
    client's run loop for good. Now it is a protocol error: the client reconnects."""
    srv = RendezvousServer(Identity.generate(), tmp_path / "s")
    await srv.start(["127.0.0.1"], 0)
    poisoned = {"done": False}
    admit = srv._admit

    def admit_then_poison(link, register, observed):
        agent = admit(link, register, observed)
        if not poisoned["done"]:
            poisoned["done"] = True
            body = b"\x83\xa4type\xa4ping\xa2id\x01\xa4junk" + b"\x91" * 1000 + b"\xc0"
            link.write(bytes([1]) + len(body).to_bytes(3, "big") + body)
        return agent

    monkeypatch.setattr(srv, "_admit", admit_then_poison)
    client = RendezvousClient(Identity.generate(), srv.url(), on_relay=lambda s, d: None, backoff=(0.05, 0.1))
    await client.start()
    try:
        # Registered again after the poisoned connection (whether the poison came in the same
        # read as the first Registered or in the next one).
        await eventually(lambda: srv.counters["registered"] == 2 and client.registered.is_set(), timeout=10)
        assert client._task is not None and not client._task.done()
    finally:
        await client.close()
        await srv.close()


async def test_the_client_survives_its_handlers_failing(tmp_path: Path) -> None:
    srv = RendezvousServer(Identity.generate(), tmp_path / "s")
    await srv.start(["127.0.0.1"], 0)

    def broken(source: bytes, datagram: bytes) -> None:
        raise RuntimeError("a bug in the node")

    a = RendezvousClient(Identity.generate(), srv.url(), on_relay=broken)
    b = RendezvousClient(Identity.generate(), srv.url(), on_relay=lambda s, d: None)
    await a.start()
    await b.start()
    try:
        await a.wait_registered(5)
        await b.wait_registered(5)
        for _ in range(3):
            b.send_relay(a.identity.address.digest, b"\x40datagram")
        await eventually(lambda: a.counters["relay_received"] == 3)
        assert a.registrations == 1 and a.registered.is_set()  # the link stayed up
    finally:
        await a.close()
        await b.close()
        await srv.close()


class Listener(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagram_received(self, data: bytes, addr) -> None:
        self.got.append(data)


async def test_a_copied_hello_from_elsewhere_cannot_redirect_relayed_datagrams(tmp_path: Path) -> None:
    """Finding 7: a spoofed hello with the agent's token moved its UDP endpoint, and relayed data
    went to a third address. Now a new endpoint must answer a challenge under the key first."""
    srv = RendezvousServer(Identity.generate(), tmp_path / "s")
    await srv.start(["127.0.0.1"], 0)
    loop = asyncio.get_running_loop()
    sockets = []

    async def udp_agent() -> tuple[RendezvousClient, asyncio.DatagramTransport]:
        holder: dict = {}

        class Socket(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                holder["client"].udp_received(data, (addr[0], addr[1]))

        transport, _ = await loop.create_datagram_endpoint(Socket, local_addr=("127.0.0.1", 0))
        sockets.append(transport)
        client = RendezvousClient(
            Identity.generate(), srv.url(), on_relay=lambda s, d: got.append(d), udp_send=transport.sendto
        )
        holder["client"] = client
        await client.start()
        return client, transport

    got: list[bytes] = []
    attacker, _ = await loop.create_datagram_endpoint(Listener, local_addr=("127.0.0.1", 0))
    sockets.append(attacker)
    try:
        a, _ = await udp_agent()
        b, _ = await udp_agent()
        await eventually(lambda: a.udp_ready and b.udp_ready)
        victim = srv.agents[a.identity.address.digest]
        endpoint = victim.udp_endpoint
        # The attacker saw the token (it travels in the clear) and even a whole genuine hello.
        server_udp = ("127.0.0.1", srv.port)
        attacker.sendto(bytes([rv.UDP_HELLO]) + a._token + bytes(32), server_udp)  # no key: no MAC
        attacker.sendto(rv.encode_udp_hello(a._token, a._udp_key), server_udp)  # a copy of a real one
        await eventually(lambda: srv.counters["udp_unauthentic"] >= 1)
        await asyncio.sleep(0.2)
        for i in range(20):
            b.send_relay(a.identity.address.digest, b"\x40" + bytes([i]) * 40)
        await eventually(lambda: len(got) == 20)
        protocol = attacker.get_protocol()
        # The attacker got at most a challenge, no larger than the hello it sent, and no data.
        assert all(frame[0] == rv.UDP_CHALLENGE for frame in protocol.got)
        assert all(len(frame) <= len(rv.encode_udp_hello(a._token, a._udp_key)) for frame in protocol.got)
        assert victim.udp_endpoint == endpoint
        # Nor can a stranger inject a delivery at the agent's socket.
        a.udp_received(rv.encode_udp_delivery(os.urandom(32), bytes(16), b"\x40x"), server_udp)
        assert len(got) == 20 and a.counters["udp_dropped"] >= 1
        await a.close()
        await b.close()
    finally:
        for transport in sockets:
            transport.close()
        await srv.close()


async def test_the_mailbox_is_private_to_the_server(server) -> None:
    sender, recipient = Identity.generate(), Identity.generate()
    assert server.mailbox is not None  # a letter, so that SQLite writes its -wal and -shm files
    server.mailbox.post(
        make_letter(sender, "trust-request", recipient.address),
        sender.address.digest,
        recipient.address.digest,
        time.time(),
    )
    files = sorted(server.state_dir.glob("rendezvous.db*"))
    assert [f.name for f in files] == ["rendezvous.db", "rendezvous.db-shm", "rendezvous.db-wal"]
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}


async def test_a_full_mailbox_is_delivered_batch_after_batch(server) -> None:
    """Letters go out 64 at a time; each acknowledged batch brings the next, so none waits
    for the recipient's next registration."""
    recipient = Identity.generate()
    posted = 0
    for _ in range(18):
        sender = Identity.generate()
        agent = await RawAgent.connect(server, sender)
        agent.writer.write(await agent.register_frame(server))
        for i in range(4):
            agent.writer.write(rv.encode_control(rv.Post(i, make_letter(sender, "trust-request", recipient.address))))
            posted += 1
        await eventually(lambda n=posted: server.counters["letters_posted"] == n)
        agent.close()
    got: list[rv.Letter] = []
    client = RendezvousClient(recipient, server.url(), on_relay=lambda s, d: None, on_letter=got.append)
    await client.start()
    try:
        await eventually(lambda: len(got) == posted)
        assert server.mailbox is not None
        await eventually(lambda: server.mailbox.waiting_for(recipient.address.digest) == [])
    finally:
        await client.close()


async def test_a_flood_over_two_quotas_is_cut_off_all_the_same(tmp_path: Path) -> None:
    """Drops under one quota are not forgiven by messages that pass another."""
    srv = RendezvousServer(
        Identity.generate(),
        tmp_path / "s",
        limits=ServerLimits(relay_rate=1024, relay_burst=2048, cutoff_drops=100, control_rate=1000, control_burst=1000),
    )
    await srv.start(["127.0.0.1"], 0)
    agent = await RawAgent.connect(srv)
    try:
        agent.writer.write(await agent.register_frame(srv))
        flood = rv.encode_relay(bytes(16), b"\x40" * 2000) + rv.encode_control(rv.Ping(1))
        agent.writer.write(flood * 200)  # relay frames over quota, each followed by a ping that passes
        await eventually(lambda: srv.counters["agents_cut_off"] == 1)
    finally:
        agent.close()
        await srv.close()


class FakeLink:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def buffered(self) -> int:
        return 0

    def close(self) -> None:
        pass


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> bool:
        self.sent.append((data, addr))
        return True


async def test_a_rebound_agent_is_challenged_by_its_first_data_frame(server) -> None:
    identity = Identity.generate()
    agent = server._admit(FakeLink(), rv.Register(identity.public_key, b""), "198.51.100.7:4000")
    sock = FakeSocket()
    old, new = ("198.51.100.7", 4000), ("198.51.100.7", 4100)

    def answer_challenges() -> None:
        for data, addr in sock.sent:
            if data[0] == rv.UDP_CHALLENGE:
                nonce = rv.parse_udp_relay(data).payload
                server._udp_received(rv.encode_udp_response(agent.token, agent.udp_key, nonce), addr, sock)
        sock.sent.clear()

    server._udp_received(rv.encode_udp_hello(agent.token, agent.udp_key), old, sock)
    answer_challenges()
    assert agent.udp_endpoint == old
    data = rv.encode_udp_relay(agent.token, agent.udp_key, bytes(16), b"\x40quic")
    server._udp_received(data, new, sock)  # the NAT gave it a new port
    assert [addr for _, addr in sock.sent] == [new] and len(sock.sent[0][0]) < len(data)
    answer_challenges()
    assert agent.udp_endpoint == new


async def test_copies_of_a_hello_from_elsewhere_cannot_hold_the_real_endpoint_back(server) -> None:
    identity = Identity.generate()
    agent = server._admit(FakeLink(), rv.Register(identity.public_key, b""), "198.51.100.7:4000")
    sock = FakeSocket()
    hello = rv.encode_udp_hello(agent.token, agent.udp_key)
    attacker, real = ("203.0.113.66", 5000), ("198.51.100.7", 4100)
    server._udp_received(hello, attacker, sock)  # a copy, replayed from elsewhere
    server._udp_received(hello, real, sock)  # the agent itself, a moment later
    challenged = {addr: rv.parse_udp_relay(data).payload for data, addr in sock.sent}
    assert set(challenged) == {attacker, real}
    server._udp_received(rv.encode_udp_response(agent.token, agent.udp_key, challenged[real]), real, sock)
    assert agent.udp_endpoint == real


async def test_registrations_from_one_address_are_rate_limited(tmp_path: Path) -> None:
    srv = RendezvousServer(
        Identity.generate(), tmp_path / "s", limits=ServerLimits(register_rate=0.001, register_burst=3)
    )
    await srv.start(["127.0.0.1"], 0)
    try:
        answers = []
        for _ in range(5):  # five throwaway identities, one after another
            agent = await RawAgent.connect(srv)
            agent.writer.write(await agent.register_frame(srv))
            answers.append(type((await agent.frames())[0][0]).__name__)
            agent.close()
        assert answers == ["Registered"] * 3 + ["Refused"] * 2
        assert srv.counters["registrations_refused"] == 2
    finally:
        await srv.close()


async def test_the_server_takes_at_most_max_agents_and_max_connections(tmp_path: Path) -> None:
    srv = RendezvousServer(Identity.generate(), tmp_path / "s", limits=ServerLimits(max_agents=2, max_connections=3))
    await srv.start(["127.0.0.1"], 0)
    held: list[RawAgent] = []
    try:
        answers = []
        for _ in range(3):
            agent = await RawAgent.connect(srv)
            agent.writer.write(await agent.register_frame(srv))
            answers.append(type((await agent.frames())[0][0]).__name__)
            held.append(agent)
        assert answers == ["Registered", "Registered", "Refused"]  # the third: "the server is full"
        await eventually(lambda: srv._open == 2)
        held.append(await RawAgent.connect(srv))  # a third connection, unregistered: allowed
        assert isinstance((await held[-1].frames())[0][0], rv.Challenge)
        fourth = await RawAgent.connect(srv)
        refused = (await fourth.frames())[0][0]
        assert isinstance(refused, rv.Refused) and "too many connections" in refused.reason
        fourth.close()
    finally:
        for agent in held:
            agent.close()
        await srv.close()
