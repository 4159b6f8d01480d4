"""Several processes behind one URL (``peerpath server --workers N``): agents whose connections
two processes hold reach each other, over TLS and UDP; a UDP frame goes to the process of its
agent; the hub keeps the one list of who is online. The hub and a worker run here in one event
loop (SO_REUSEPORT shares a port within a process too), joined as forked processes would be;
one test runs the real command."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerpath.certs import tls_client_context
from peerpath.identity import Identity
from peerpath.rendezvous.hub import Cluster
from peerpath.rendezvous.letters import make_letter
from peerpath.rendezvous.limits import ServerLimits
from peerpath.rendezvous.mesh import MeshLink, RemoteLink, mesh_sockets
from peerpath.rendezvous.server import RendezvousServer
from peerpath.rendezvous.tls import Valve
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.rendezvous.workers import Worker
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import parse_endpoint

from .conftest import eventually

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")


class Hub:
    def __init__(self, server: RendezvousServer, worker: Worker) -> None:
        self.server, self.worker = server, worker

    def owner(self, agent: Identity) -> int:
        link = self.server.agents[agent.address.digest].link
        return link.owner if isinstance(link, RemoteLink) else 0


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    identity, limits = Identity.generate(), ServerLimits(register_burst=1000)
    ends = mesh_sockets(2)
    server = RendezvousServer(identity, tmp_path / "s", limits=limits)
    worker = Worker(1, 2, identity, tmp_path / "s", limits, {k: s for k, s in ends.items() if k[0] == 1})
    running = asyncio.get_running_loop().create_task(worker.run(["127.0.0.1"]))
    try:
        await server.start(["127.0.0.1"], 0, cluster=Cluster(server, 2, {k: s for k, s in ends.items() if k[0] == 0}))
        yield Hub(server, worker)
    finally:
        await server.close()
        await asyncio.wait_for(running, 10)
        for sock in ends.values():
            sock.close()


class Agent:
    """An agent speaking the protocol by hand: TLS, and a UDP socket once asked to."""

    def __init__(self, identity: Identity, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.identity, self.reader, self.writer = identity, reader, writer
        self.decoder = rv.FrameDecoder()
        self.registered: rv.Registered | None = None
        self.udp: socket.socket | None = None

    @classmethod
    async def register(cls, url: RendezvousUrl) -> Agent:
        identity = Identity.generate()
        reader, writer = await asyncio.open_connection(url.host, url.port, ssl=tls_client_context())
        agent = cls(identity, reader, writer)
        (challenge,) = await agent.messages()
        payload = rv.register_payload(challenge.nonce, identity.address.digest, url.address.digest)
        writer.write(rv.encode_control(rv.Register(identity.public_key, identity.sign(payload))))
        (registered,) = await agent.messages()
        assert isinstance(registered, rv.Registered)
        agent.registered = registered
        return agent

    async def frames(self) -> list[tuple[rv.Message | bytes, bytes | None]]:
        return self.decoder.feed(await asyncio.wait_for(self.reader.read(65536), 5))

    async def messages(self) -> list[rv.Message]:
        return [m for m, datagram in await self.frames() if datagram is None]  # type: ignore[misc]

    async def relayed(self, count: int) -> list[tuple[bytes, bytes]]:
        got: list[tuple[bytes, bytes]] = []
        while len(got) < count:
            got += [(s, d) for s, d in await self.frames() if d is not None]  # type: ignore[misc]
        return got

    async def on_udp(self) -> None:
        """Hello, challenge, response, acknowledgement; then UdpReady (as a node does)."""
        assert self.registered is not None
        token, key = self.registered.token, self.registered.udp_key
        server = parse_endpoint(self.registered.udp_relay[0])
        sock = self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        sock.sendto(rv.encode_udp_hello(token, key, 1), server)
        while True:
            frame = rv.parse_udp_relay(await asyncio.wait_for(loop.sock_recv(sock, 2048), 5))
            if frame.kind == rv.UDP_CHALLENGE:
                sock.sendto(rv.encode_udp_response(token, key, frame.payload), server)
            elif frame.kind == rv.UDP_HELLO_ACK:
                break
        self.writer.write(rv.encode_control(rv.UdpReady(True)))

    def close(self) -> None:
        self.writer.close()
        if self.udp is not None:
            self.udp.close()


async def one_on_each(hub: Hub) -> tuple[Agent, Agent, list[Agent]]:
    """Agents until the hub and the worker hold one each (the kernel picks, by address hash)."""
    agents: list[Agent] = []
    url = hub.server.url()
    while len({hub.owner(a.identity) for a in agents}) < 2:
        assert len(agents) < 64, "every connection went to one process"
        agents.append(await Agent.register(url))
    on_hub = next(a for a in agents if hub.owner(a.identity) == 0)
    on_worker = next(a for a in agents if hub.owner(a.identity) == 1)
    return on_hub, on_worker, agents


async def test_agents_held_by_two_processes_reach_each_other_over_tls(hub: Hub) -> None:
    a, b, agents = await one_on_each(hub)
    await eventually(lambda: len(hub.worker.agents) == len(agents))  # every process knows them all
    a.writer.write(b"".join(rv.encode_relay(b.identity.address.digest, bytes([i]) * 700) for i in range(50)))
    b.writer.write(rv.encode_relay(a.identity.address.digest, b"\x40pong"))
    assert await b.relayed(50) == [(a.identity.address.digest, bytes([i]) * 700) for i in range(50)]
    assert await a.relayed(1) == [(b.identity.address.digest, b"\x40pong")]
    # The hub answers for an agent a worker holds.
    a.writer.write(rv.encode_control(rv.Lookup(7, str(b.identity.address))))
    (answer,) = await a.messages()
    assert isinstance(answer, rv.LookupResult) and answer.online
    for agent in agents:
        agent.close()
    await eventually(lambda: not hub.server.agents and not hub.worker.agents and not hub.worker.links)


async def test_udp_frames_go_to_their_agents_process_and_reach_the_other(hub: Hub) -> None:
    a, b, agents = await one_on_each(hub)
    assert a.registered is not None and b.registered is not None
    assert a.registered.token[0] == 0 and b.registered.token[0] == 1  # the token names the process
    await a.on_udp()
    await b.on_udp()
    server_udp = parse_endpoint(a.registered.udp_relay[0])
    replicas = [hub.worker.agents[x.identity.address.digest] for x in (a, b)]  # the worker's, of both
    await eventually(lambda: all(x.udp_ready and x.udp_endpoint for x in replicas))
    hub_frames, worker_frames = hub.server.counters["udp_frames"], hub.worker.counters["udp_frames"]
    assert a.udp is not None and b.udp is not None
    a.udp.sendto(
        rv.encode_udp_relay(a.registered.token, a.registered.udp_key, b.identity.address.digest, b"to b"), server_udp
    )
    b.udp.sendto(
        rv.encode_udp_relay(b.registered.token, b.registered.udp_key, a.identity.address.digest, b"to a"), server_udp
    )
    loop = asyncio.get_running_loop()
    to_b = rv.parse_udp_relay(await asyncio.wait_for(loop.sock_recv(b.udp, 2048), 5))
    to_a = rv.parse_udp_relay(await asyncio.wait_for(loop.sock_recv(a.udp, 2048), 5))
    assert (to_b.address, to_b.payload) == (a.identity.address.digest, b"to b")
    assert (to_a.address, to_a.payload) == (b.identity.address.digest, b"to a")
    if hub.server.cluster is not None and hub.server.cluster.steered:
        assert hub.server.counters["udp_frames"] == hub_frames + 1
        assert hub.worker.counters["udp_frames"] == worker_frames + 1
    for agent in agents:
        agent.close()


async def test_agents_rest_on_udp_in_either_process_and_a_letter_wakes_them(hub: Hub) -> None:
    a, b, agents = await one_on_each(hub)
    assert a.registered is not None and b.registered is not None and hub.server.cluster is not None
    await a.on_udp()
    await b.on_udp()
    await eventually(
        lambda: all(hub.server.agents[x.identity.address.digest].udp_path(hub.server.clock()) for x in (a, b))
    )
    for agent in (a, b):
        agent.writer.write(rv.encode_control(rv.Rest(3)))
        (answer,) = await agent.messages()
        assert isinstance(answer, rv.Outcome) and answer.ok, answer
        agent.writer.close()
    await eventually(lambda: all(hub.server.agents[x.identity.address.digest].rests for x in (a, b)))
    b_digest = b.identity.address.digest
    await eventually(lambda: hub.worker.agents[b_digest].rests)  # the worker holds no connection for it
    assert sum(hub.server.cluster.agents_at.values()) == len(agents)

    # Still reachable over UDP, from either process.
    server_udp = parse_endpoint(a.registered.udp_relay[0])
    assert a.udp is not None and b.udp is not None
    a.udp.sendto(
        rv.encode_udp_relay(a.registered.token, a.registered.udp_key, b.identity.address.digest, b"to b"), server_udp
    )
    loop = asyncio.get_running_loop()
    to_b = rv.parse_udp_relay(await asyncio.wait_for(loop.sock_recv(b.udp, 2048), 5))
    assert (to_b.address, to_b.payload) == (a.identity.address.digest, b"to b")

    # A letter for the one a worker held: the hub wakes it over UDP.
    poster = await Agent.register(hub.server.url())
    agents.append(poster)
    letter = make_letter(poster.identity, "sealed", b.identity.address, sealed=b"box")
    poster.writer.write(rv.encode_control(rv.Post(4, letter)))
    (posted,) = await poster.messages()
    assert isinstance(posted, rv.PostResult) and posted.ok
    wake = await asyncio.wait_for(loop.sock_recv(b.udp, 2048), 5)
    assert rv.parse_udp_relay(wake).kind == rv.UDP_WAKE and rv.udp_authentic(b.registered.udp_key, wake)
    # Its goodbye reaches the worker its token names, and the hub takes it offline.
    b.udp.sendto(rv.encode_udp_goodbye(b.registered.token, b.registered.udp_key), server_udp)
    await eventually(lambda: b_digest not in hub.server.agents and b_digest not in hub.worker.agents)
    for agent in agents:
        agent.close()


async def test_a_worker_drops_control_frames_over_the_quota_before_they_cross_to_the_hub(hub: Hub) -> None:
    """What the hub would drop does not fill the socketpair every connection of the worker
    shares: the worker applies the same control quota first."""
    _, b, agents = await one_on_each(hub)
    await eventually(lambda: b.identity.address.digest in hub.worker.agents)
    burst = int(hub.worker.limits.control_burst)
    b.writer.write(b"".join(rv.encode_control(rv.Ping(i)) for i in range(burst * 2)))
    pongs: list[rv.Message] = []
    while len(pongs) < burst - 5:  # (the registration took a token at the worker)
        pongs += [m for m in await b.messages() if isinstance(m, rv.Pong)]
    dropped = hub.worker.counters["control_dropped_quota"]
    assert dropped >= burst * 2 - len(pongs) - 10  # (a few tokens come back while they are read)
    assert hub.server.counters["control_dropped_quota"] == 0  # none crossed to be dropped there
    for agent in agents:
        agent.close()


async def test_the_newest_connection_of_an_agent_wins_whichever_process_holds_it(hub: Hub) -> None:
    url = hub.server.url()
    first = await Agent.register(url)
    for _ in range(6):
        again = Agent(first.identity, *await asyncio.open_connection(url.host, url.port, ssl=tls_client_context()))
        (challenge,) = await again.messages()
        payload = rv.register_payload(challenge.nonce, first.identity.address.digest, url.address.digest)
        again.writer.write(rv.encode_control(rv.Register(first.identity.public_key, first.identity.sign(payload))))
        (registered,) = await again.messages()
        assert isinstance(registered, rv.Registered)
        assert await asyncio.wait_for(first.reader.read(), 5) == b""  # the older one is closed
        digest = first.identity.address.digest
        await eventually(lambda r=registered, d=digest: hub.worker.agents[d].token == r.token)
        first = again
    assert len(hub.server.agents) == 1 and len(hub.worker.agents) == 1
    first.close()


async def test_the_hub_knows_when_a_worker_is_gone(hub: Hub) -> None:
    assert hub.server.cluster is not None
    hub.worker.done.set()
    await asyncio.wait_for(hub.server.cluster.gone.wait(), 5)


def test_a_valve_pauses_only_the_links_that_read_while_shut() -> None:
    class Transport:
        paused = False

        def pause_reading(self) -> None:
            self.paused = True

        def resume_reading(self) -> None:
            self.paused = False

        def is_closing(self) -> bool:
            return False

    valve, busy, idle = Valve(), Transport(), Transport()
    valve.hold(busy)  # type: ignore[arg-type]
    assert not busy.paused
    valve.shut()
    valve.shut()
    valve.hold(busy)  # type: ignore[arg-type]
    assert busy.paused and not idle.paused
    valve.open()
    assert busy.paused  # one process still behind
    valve.open()
    assert not busy.paused


@pytest.mark.parametrize("kind", ["server", "relay"])
def test_the_server_command_runs_its_workers_and_stops_them(tmp_path: Path, kind: str) -> None:
    def free_port(kind: socket.SocketKind) -> int:
        with socket.socket(type=kind) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    command = [sys.executable, "-m", "peerpath", kind, "--public-ip", "127.0.0.1", "--port", "0", "--workers", "2"]
    if kind == "server":
        command += ["--stun-port", str(free_port(socket.SOCK_DGRAM))]
    command += ["--wss-port", "0", "--state-dir", str(tmp_path)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = RendezvousUrl.parse(server.stdout.readline())

        async def register_two() -> None:
            agents = [await Agent.register(url) for _ in range(2)]
            agents[0].writer.write(rv.encode_relay(agents[1].identity.address.digest, b"\x40hi"))
            assert await agents[1].relayed(1) == [(agents[0].identity.address.digest, b"\x40hi")]
            for agent in agents:
                agent.close()

        asyncio.run(register_two())
        workers = _children(server.pid)
        assert len(workers) == 1
        again = list(command)
        if kind == "server":
            again[again.index("--stun-port") + 1] = str(free_port(socket.SOCK_DGRAM))
        second = subprocess.run(again, check=False, capture_output=True, text=True, timeout=30)
        assert second.returncode != 0 and "another server uses" in second.stderr  # the state directory is not shared
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=20)
    assert server.returncode == 0, stderr
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def test_messages_between_processes_survive_any_cut() -> None:
    got: list[object] = []

    class Host:
        def handle(self, source: int, message: list[object]) -> None:
            got.append((source, message))

        def deliver(self, ident: int, data: memoryview) -> None:
            got.append((ident, bytes(data)))

    class Transport:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, data: bytes) -> None:
            self.data += data

        def writelines(self, parts: tuple[bytes, ...]) -> None:
            for part in parts:
                self.data += part

        def is_closing(self) -> bool:
            return False

        def set_write_buffer_limits(self, high: int, low: int) -> None:
            pass

    host = Host()
    sender = MeshLink(1, host.handle, host.deliver, lambda backed_up: None, lambda index: None)
    receiver = MeshLink(3, host.handle, host.deliver, lambda backed_up: None, lambda index: None)
    wire = Transport()
    sender.connection_made(wire)  # type: ignore[arg-type]
    sender.send("online", b"\x01" * 16, 2, 7, b"token", b"key", True)
    sender.send_frames(7, bytes(range(256)) * 300)
    sender.send_frames(8, b"")
    sender.send("offline", b"\x01" * 16)
    stream = bytes(wire.data)
    rng = random.Random(3)
    position = 0
    while position < len(stream):
        step = rng.choice([1, 2, 5, 9, 100, 4096, 70000])
        receiver.data_received(stream[position : position + step])
        position += step
    assert got == [
        (3, ["online", b"\x01" * 16, 2, 7, b"token", b"key", True]),
        (7, bytes(range(256)) * 300),
        (8, b""),
        (3, ["offline", b"\x01" * 16]),
    ]


class _BackedUpLink:
    """A link to an agent that does not read: its buffer is past the high-water mark."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def buffered(self) -> int:
        return (1 << 20) + 1

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))


def test_a_worker_writes_nothing_more_to_an_agent_that_does_not_read() -> None:
    """Control replies included (a single process drops them too), so the buffer stays bounded."""
    from peerpath.rendezvous.mesh import write_to

    link, counters = _BackedUpLink(), {"relay_dropped_backpressure": 0, "replies_dropped_backpressure": 0}
    reply = rv.encode_control(rv.Pong(1))
    write_to(link, memoryview(reply), counters)  # type: ignore[arg-type]
    assert link.written == [] and counters["replies_dropped_backpressure"] == 1


def test_udp_frames_of_another_process_agents_are_dropped() -> None:
    """Where the kernel does not steer datagrams, a process still spends only its own agents' quotas."""
    from peerpath.rendezvous.udp_relay import UdpRelay

    counters: dict[str, int] = {}
    relay = UdpRelay(counters, lambda *args: None, lambda *args: None)  # type: ignore[arg-type]
    relay.process = 1
    hello = bytes([rv.UDP_HELLO, 0]) + bytes(64)  # a token naming process 0
    relay.received(hello, ("192.0.2.1", 4000), None, 0.0)  # type: ignore[arg-type]
    assert counters == {"udp_other_process": 1}


def test_with_port_443_taken_the_relay_runs_its_workers_without_websocket(tmp_path: Path) -> None:
    """No --wss-port: 443 where the relay may listen on it; else it runs without WebSocket and
    says so, workers or not (it used to refuse to start with workers)."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 443))  # as root; otherwise 443 is out of reach anyway
        holder.listen()
    except OSError:
        pass
    command = [sys.executable, "-m", "peerpath", "relay", "--public-ip", "127.0.0.1", "--port", "0", "--workers", "2"]
    relay = subprocess.Popen(
        [*command, "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert relay.stdout is not None
        url = RendezvousUrl.parse(relay.stdout.readline())
        assert url.wss_port is None
        assert relay.stderr is not None
        said = [relay.stderr.readline(), relay.stderr.readline()]
        assert "no WebSocket listener: port 443 is not available" in said[0], said
        assert "(2 processes)" in said[1], said
    finally:
        relay.terminate()
        relay.communicate(timeout=20)
        holder.close()
