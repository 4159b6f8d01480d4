"""The server's relay data plane (issue 14): frames routed by their header alone and written
out together, within the sender's quota; the server's own TLS; UDP deliveries in trains; idle
agents pinged and dropped by one sweep instead of a timer each."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import pytest

from peerpath.certs import tls_client_context
from peerpath.identity import Identity
from peerpath.net import KernelNet
from peerpath.rendezvous import server as server_module
from peerpath.rendezvous.connection import AgentConnection
from peerpath.rendezvous.limits import CutOff, ServerLimits
from peerpath.rendezvous.presence import SEND_HIGH_WATER, Agent
from peerpath.rendezvous.server import PING_INTERVAL, RendezvousServer
from peerpath.rendezvous.tls import Valve
from peerpath.rendezvous.udp_relay import RelayUdp
from peerpath.wire import rendezvous as rv

from .conftest import eventually


class RecordingLink:
    """A link that keeps what the server writes to it."""

    def __init__(self, buffered: int = 0) -> None:
        self.data = bytearray()
        self.writes = 0
        self.closed = False
        self.backlog = buffered

    def peername(self) -> tuple[str, int]:
        return ("198.51.100.7", 4000)

    def ssl_object(self) -> None:
        return None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data
        self.writes += 1

    def buffered(self) -> int:
        return self.backlog

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def frames(self) -> list[tuple[rv.Message | bytes, bytes | None]]:
        return rv.FrameDecoder().feed(bytes(self.data))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_server(tmp_path: Path, clock: Clock | None = None, **limits: float) -> RendezvousServer:
    """A server that is not listening: its agents are fed by hand."""
    server = RendezvousServer(
        Identity.generate(), tmp_path / "s", limits=ServerLimits(**limits), clock=clock or Clock()
    )
    server.hosts, server.port = ["127.0.0.1"], 7000
    return server


def admit(server: RendezvousServer, link: RecordingLink | None = None) -> Agent:
    identity = Identity.generate()
    agent = server._admit(link or RecordingLink(), rv.Register(identity.public_key, b""), "198.51.100.7:4000")
    assert agent is not None
    return agent


def connect(server: RendezvousServer, identity: Identity) -> tuple[AgentConnection, RecordingLink]:
    """A connection that registers ``identity`` as an agent does: over the server's challenge."""
    link = RecordingLink()
    connection = AgentConnection(server, link)
    assert connection.open()
    ((challenge, _),) = link.frames()
    assert isinstance(challenge, rv.Challenge)
    link.data.clear()
    payload = rv.register_payload(challenge.nonce, identity.address.digest, server.address.digest)
    assert connection.received(rv.encode_control(rv.Register(identity.public_key, identity.sign(payload))))
    assert connection.registered
    link.data.clear()
    link.writes = 0
    return connection, link


# -- the frame header ---------------------------------------------------------------------


def test_frame_at_finds_each_frame_without_decoding_it() -> None:
    relay = rv.encode_relay(bytes(range(16)), b"\x40quic")
    control = rv.encode_control(rv.Ping(7))
    stream = relay + control
    assert rv.frame_at(stream, 0) == (rv.FrameType.RELAY, len(relay))
    assert rv.frame_at(stream, len(relay)) == (rv.FrameType.CONTROL, len(stream))
    assert rv.frame_at(stream, len(stream)) is None
    assert rv.frame_at(stream[:-1], len(relay)) is None  # not all there yet
    assert rv.frame_at(memoryview(bytearray(stream)), len(relay)) == (rv.FrameType.CONTROL, len(stream))


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (bytes([9, 0, 0, 1]), "unknown frame type"),
        ((rv.FrameType.RELAY << 24 | 16).to_bytes(4, "big"), "without a datagram"),
        ((rv.FrameType.RELAY << 24 | (16 + rv.MAX_DATAGRAM + 1)).to_bytes(4, "big"), "exceeds"),
        ((rv.FrameType.CONTROL << 24 | (rv.MAX_CONTROL + 1)).to_bytes(4, "big"), "exceeds"),
    ],
)
def test_frame_at_refuses_a_header_no_frame_has(header: bytes, error: str) -> None:
    with pytest.raises(rv.FrameError, match=error):
        rv.frame_at(header, 0)


@pytest.mark.parametrize("size", [1, 1200, rv.MAX_DATAGRAM])
def test_the_keyed_mac_state_seals_and_checks_as_the_key_does(size: int) -> None:
    key, source, datagram = bytes(range(32)), bytes(range(16)), random.Random(size).randbytes(size)
    mac = rv.udp_mac(key)
    assert rv.seal_udp_delivery(mac, source, memoryview(datagram)) == rv.encode_udp_delivery(key, source, datagram)
    frame = rv.encode_udp_relay(b"tokenAAA", key, source, datagram)
    assert rv.udp_authentic_under(mac, frame)
    assert not rv.udp_authentic_under(rv.udp_mac(bytes(32)), frame)
    assert not rv.udp_authentic_under(mac, frame[:-1] + bytes([frame[-1] ^ 1]))
    assert not rv.udp_authentic_under(mac, frame[: rv.MAC_BYTES])


# -- a stream of frames -------------------------------------------------------------------


def test_frames_cut_anywhere_arrive_whole_in_order_and_from_their_sender(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    alice, bob = Identity.generate(), Identity.generate()
    sender, _ = connect(server, alice)
    _, receiver = connect(server, bob)
    rng = random.Random(14)
    datagrams = [rng.randbytes(rng.choice([1, 40, 1200, rv.MAX_DATAGRAM])) for _ in range(40)]
    stream = b"".join(rv.encode_relay(bob.address.digest, d) for d in datagrams[:20])
    stream += rv.encode_control(rv.Ping(3))
    stream += b"".join(rv.encode_relay(bob.address.digest, d) for d in datagrams[20:])
    position = 0
    while position < len(stream):
        step = rng.choice([1, 3, 4, 5, 21, 700, 5000])
        assert sender.received(memoryview(bytearray(stream[position : position + step])))
        position += step
    relayed = receiver.frames()
    assert [datagram for _, datagram in relayed] == datagrams
    assert {source for source, _ in relayed} == {alice.address.digest}
    assert server.counters["relay_frames"] == 40


def test_frames_read_together_leave_together(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    bob = Identity.generate()
    sender, _ = connect(server, Identity.generate())
    _, receiver = connect(server, bob)
    assert sender.received(b"".join(rv.encode_relay(bob.address.digest, bytes(1200)) for _ in range(100)))
    assert receiver.writes == 1 and len(receiver.frames()) == 100


def test_a_relay_frame_before_the_registration_is_refused(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    link = RecordingLink()
    connection = AgentConnection(server, link)
    assert connection.open()
    assert not connection.received(rv.encode_relay(bytes(16), b"x"))
    connection.end()
    assert link.closed and not server.agents and not server._open and not server._per_ip
    assert isinstance(link.frames()[-1][0], rv.Refused)


def test_a_malformed_header_mid_stream_ends_only_that_connection(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    bob = Identity.generate()
    sender, link = connect(server, Identity.generate())
    _, receiver = connect(server, bob)
    good = rv.encode_relay(bob.address.digest, b"\x40ok")
    assert not sender.received(good + bytes([7, 0, 0, 1]) + good)
    assert [d for _, d in receiver.frames()] == [b"\x40ok"]  # what came before it went on
    assert server.counters["malformed"] == 1
    assert "protocol error" in link.frames()[-1][0].reason  # type: ignore[union-attr]


# -- quotas and backpressure ----------------------------------------------------------------


@pytest.mark.parametrize("burst", [5_000.0, 1e9])
def test_the_quota_ends_where_frame_by_frame_taking_would_leave_it(tmp_path: Path, burst: float) -> None:
    server = make_server(tmp_path, relay_rate=1024.0, relay_burst=burst)
    bob = Identity.generate()
    sender, _ = connect(server, Identity.generate())
    _, receiver = connect(server, bob)
    agent = sender.agent
    assert agent is not None
    assert sender.received(b"".join(rv.encode_relay(bob.address.digest, bytes(1000)) for _ in range(10)))
    relayed = min(10, int(burst // 1000))
    assert len(receiver.frames()) == relayed
    assert server.counters["relay_dropped_quota"] == 10 - relayed
    assert agent.relay_quota.level == pytest.approx(burst - relayed * 1000)


def test_a_flood_over_quota_is_cut_off(tmp_path: Path) -> None:
    server = make_server(tmp_path, relay_rate=1024.0, relay_burst=2048.0, cutoff_drops=5)
    sender, link = connect(server, Identity.generate())
    bob = Identity.generate()
    connect(server, bob)
    assert not sender.received(b"".join(rv.encode_relay(bob.address.digest, bytes(1000)) for _ in range(10)))
    assert server.counters["agents_cut_off"] == 1
    sender.end()
    assert link.closed and sender.agent is None and len(server.agents) == 1


def test_a_backed_up_receiver_loses_datagrams_and_the_sender_nothing(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    bob = Identity.generate()
    sender, _ = connect(server, Identity.generate())
    _, receiver = connect(server, bob)
    receiver.backlog = SEND_HIGH_WATER + 1
    assert sender.received(rv.encode_relay(bob.address.digest, b"x") * 3)
    assert not receiver.data and server.counters["relay_dropped_backpressure"] == 3
    receiver.backlog = 0
    big = rv.encode_relay(bob.address.digest, bytes(rv.MAX_DATAGRAM))
    assert sender.received(big * (SEND_HIGH_WATER // len(big) + 10))
    assert SEND_HIGH_WATER <= len(receiver.data) <= SEND_HIGH_WATER + len(big)


def test_frames_for_an_agent_offline_are_counted_and_dropped(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    sender, _ = connect(server, Identity.generate())
    assert sender.received(rv.encode_relay(bytes(16), b"x") * 2)
    assert server.counters["relay_dropped_offline"] == 2


# -- the server's TLS -----------------------------------------------------------------------


async def test_tls_relays_between_two_agents_and_survives_a_stranger(server: RendezvousServer) -> None:
    stranger_reader, stranger = await asyncio.open_connection("127.0.0.1", server.port)
    stranger.write(b"GET / HTTP/1.0\r\n\r\n")  # not TLS
    assert await asyncio.wait_for(stranger_reader.read(), 5) == b""
    stranger.close()
    identities = [Identity.generate(), Identity.generate()]
    agents = []
    for identity in identities:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=tls_client_context())
        decoder = rv.FrameDecoder()
        ((challenge, _),) = decoder.feed(await reader.read(65536))
        payload = rv.register_payload(challenge.nonce, identity.address.digest, server.address.digest)
        writer.write(rv.encode_control(rv.Register(identity.public_key, identity.sign(payload))))
        agents.append((reader, writer, decoder))
    await eventually(lambda: len(server.agents) == 2)
    datagrams = [bytes([i]) * 1200 for i in range(200)]
    agents[0][1].write(b"".join(rv.encode_relay(identities[1].address.digest, d) for d in datagrams))
    reader, _, decoder = agents[1]
    got: list[bytes] = []
    while len(got) < len(datagrams) + 1:  # and the registration
        got += [d or b"" for _, d in decoder.feed(await asyncio.wait_for(reader.read(1 << 20), 5))]
    assert got[1:] == datagrams
    for _, writer, _ in agents:
        writer.close()
    await eventually(lambda: not server.agents and not server._links)


async def test_a_connection_that_does_not_register_in_time_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "REGISTER_TIMEOUT", 0.2)
    srv = RendezvousServer(Identity.generate(), tmp_path / "s")
    await srv.start(["127.0.0.1"], 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=tls_client_context())
        ((challenge, _),) = rv.FrameDecoder().feed(await reader.read(65536))
        assert isinstance(challenge, rv.Challenge)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, challenge unanswered
        writer.close()
        await eventually(lambda: not srv._open and not srv._links)
    finally:
        await srv.close()


# -- UDP deliveries -------------------------------------------------------------------------


async def test_deliveries_to_one_endpoint_leave_in_trains_and_arrive_one_by_one() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    relay = RelayUdp(KernelNet(), "127.0.0.1", 0, lambda data, addr, sock: None)
    try:
        deliveries = [bytes([rv.UDP_FROM_SERVER]) + bytes([i]) * 99 for i in range(70)]
        deliveries += [bytes([rv.UDP_FROM_SERVER]) + b"short", bytes([rv.UDP_FROM_SERVER]) + bytes(300)]
        sends = []
        kernel = relay._gso
        if kernel is not None:
            real = kernel.sendmsg
            relay._gso = type("Counting", (), {"sendmsg": lambda self, *a: sends.append(a) or real(*a)})()  # type: ignore[assignment]
        for data in deliveries:
            assert relay.sendto(data, receiver.getsockname())
        await asyncio.sleep(0)  # the batch is over: they leave
        await asyncio.sleep(0.05)
        got = []
        while True:
            try:
                got.append(receiver.recv(65536))
            except BlockingIOError:
                break
        assert got == deliveries
        if kernel is not None:
            assert len(sends) == 2  # 64 + 6 and the shorter one, then the longer one alone
    finally:
        relay.close()
        receiver.close()


class UdpWithoutKernel:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append(data)

    def close(self) -> None:
        pass


class NetWithoutKernel:
    def __init__(self) -> None:
        self.sock = UdpWithoutKernel()

    def bind_udp(self, host: str, port: int, handler: object) -> UdpWithoutKernel:
        return self.sock


async def test_deliveries_go_one_by_one_where_the_net_has_no_kernel_socket() -> None:
    net = NetWithoutKernel()
    relay = RelayUdp(net, "198.51.100.1", 7000, lambda data, addr, sock: None)  # type: ignore[arg-type]
    deliveries = [bytes([rv.UDP_FROM_SERVER, i]) for i in range(5)]
    for data in deliveries:
        relay.sendto(data, ("198.51.100.7", 4000))
    challenge = bytes([rv.UDP_CHALLENGE]) + bytes(40)
    relay.sendto(challenge, ("198.51.100.7", 4000))
    assert net.sock.sent == [challenge]  # at once; deliveries wait for the end of the batch
    await asyncio.sleep(0)
    assert net.sock.sent == [challenge, *deliveries]


# -- idle agents ------------------------------------------------------------------------------


def test_silent_agents_are_pinged_then_dropped(tmp_path: Path) -> None:
    clock = Clock()
    server = make_server(tmp_path, clock)
    talkative, quiet = RecordingLink(), RecordingLink()
    admit(server, talkative)
    silent = admit(server, quiet)
    talkative.data.clear()
    quiet.data.clear()
    for agent in server.agents.values():
        agent.last_seen = clock.now
    clock.now += PING_INTERVAL - 1
    next(a for a in server.agents.values() if a is not silent).last_seen = clock.now
    clock.now += 1
    server._ping_silent(clock.now)
    assert isinstance(quiet.frames()[0][0], rv.Ping) and not talkative.data
    clock.now += PING_INTERVAL * 3
    server._ping_silent(clock.now)
    assert quiet.closed and silent.address.digest not in server.agents
    assert talkative.closed  # it went silent too


def test_agents_held_by_the_valve_are_not_dropped_as_silent(tmp_path: Path) -> None:
    """While another process is backed up, this one's links are paused: their silence is ours."""
    clock = Clock()
    server = make_server(tmp_path, clock)
    server.valve = Valve()
    link = RecordingLink()
    agent = admit(server, link)
    agent.last_seen = clock.now
    server.valve.shut()
    clock.now += PING_INTERVAL * 4
    server._ping_silent(clock.now)
    assert not link.closed and agent.address.digest in server.agents
    server.valve.open()
    server._ping_silent(clock.now)
    assert link.closed and agent.address.digest not in server.agents


def test_an_agent_cut_off_over_udp_is_gone_from_udp_and_its_link(tmp_path: Path) -> None:
    server = make_server(tmp_path, relay_rate=1024.0, relay_burst=2048.0, cutoff_drops=2)
    link = RecordingLink()
    agent = admit(server, link)
    with pytest.raises(CutOff):
        for _ in range(5):
            server.plane.relay(agent, bytes(16), bytes(1500), server.clock())
    server._cut_off(agent, CutOff("relay quota"))
    assert link.closed and agent.token not in server.udp_relay.tokens and not server.agents
