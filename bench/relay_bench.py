#!/usr/bin/env python3
"""Relay benchmark on loopback, printing JSON:

- time from ``connect(address)`` (lookup + handshake + proof over the relay) to the first
  reply byte, over fresh identities;
- one session stream's throughput through the relay, next to the same bytes through a
  plain TCP forwarder written the obvious way with asyncio, measured in the same run;
- the server's forwarding capacity on its own: raw agents (the real registration and frame
  codec, no QUIC) push relay frames to each other over UDP and over TLS, next to a plain
  forwarder of the same transport (a minimal UDP forwarder; a minimal TLS-terminating TCP
  forwarder), each in its own process on the same event loop as the server, in the same run;
- the server's memory (RSS) and CPU with thousands of registered idle agents (that send the
  keepalives a node sends and answer the server's pings), how long registering them took, and
  how busy the server was meanwhile (below 100%: the agents here were the bottleneck);
- the same with the agents resting on UDP, as an idle node does (registered over TLS, UDP
  confirmed, told yes to a rest, connection closed, a UDP hello every 10 s), on a server of its
  own started for it (so that what the connected agents left in its heap does not count here).

The server runs in its own process(es) (``peerpath server``, with relay quotas set so that they
are counted but never bind; its CPU and RSS are those of all its processes); agents and clients
run here. Ratios are server / plain forwarder. ``forwarder_cpu_percent`` is the forwarding
process's (or processes') CPU during the measurement: near 100 per process, it was the limit.

    python bench/relay_bench.py [--trials 20] [--mbytes 64] [--agents 10000] [--only capacity,idle,rest]
                                [--server-arg=--workers --server-arg=2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import resource
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from peerpath.certs import tls_client_context, tls_server_context
from peerpath.cli import run_event_loop
from peerpath.identity import Identity
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.client import KEEPALIVE, UDP_HELLO_INTERVAL
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import parse_endpoint

CHUNK = 256 * 1024
#: Linux's UDP GSO option (python 3.11's socket module lacks the name): the raw UDP agents
#: send a train of equal datagrams per system call, so that sending costs the bench little.
SOL_UDP, UDP_SEGMENT = 17, 103
#: Raw agents per source address (the server allows 64 connections and a burst of 64
#: registrations per client IP; loopback has all of 127/8).
AGENTS_PER_IP = 50
#: Datagrams per GSO send.
TRAIN = 16
#: The quotas of the benchmark's server: counted on every frame, never binding.
UNBOUND_RATE = str(10**12)


def _free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on 127.0.0.1."""
    while True:
        with socket.socket(type=kind) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        with socket.socket(type=other) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _source_ip(index: int) -> str:
    """The loopback source address of the ``index``-th raw agent."""
    block = index // AGENTS_PER_IP
    return f"127.1.{block // 250}.{block % 250 + 1}"


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
    return kids


def _proc_stats(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of a process and its children (a server's workers), from /proc."""
    rss, cpu = 0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for one in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / ticks
    return rss, cpu


def _udp_drops(sockets: list[socket.socket]) -> int:
    """Datagrams the kernel dropped at these sockets' full receive queues (/proc/net/udp)."""
    inodes = {str(os.fstat(s.fileno()).st_ino) for s in sockets}
    drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                drops += int(fields[-1])
    return drops


# -- a QUIC session through the relay ------------------------------------------------------


async def _sink(reader: asyncio.StreamReader, writer) -> None:
    while await reader.read(1 << 20):
        pass
    writer.write(b"k")
    writer.close()


async def _answer(_conn, data: bytes) -> bytes:
    return b"k"


async def measure_sessions(url: RendezvousUrl, tmp: Path, trials: int, total: int) -> dict[str, object]:
    """Connect-to-first-byte over fresh identities, then one stream's throughput."""
    callers = [Identity.generate() for _ in range(trials)]
    trust = TrustStore(tmp / "b-trust.json")
    for caller in callers:
        trust.add(caller.address)
    async with Node.start(
        identity=Identity.generate(), trust=trust, host="127.0.0.1", rendezvous=url, direct=False
    ) as b:
        b.on_message(_answer)
        b.serve(9, _sink)
        assert b.rendezvous is not None
        await b.rendezvous.wait_registered(10)
        first_byte = []
        for i, caller in enumerate(callers):
            a_trust = TrustStore(tmp / f"a{i}.json")
            a_trust.add(b.address)
            async with Node.start(identity=caller, trust=a_trust, host="127.0.0.1", rendezvous=url, direct=False) as a:
                assert a.rendezvous is not None
                await a.rendezvous.wait_registered(10)
                start = time.perf_counter()
                conn = await a.connect(b.address)
                await conn.request(b"x")
                first_byte.append(time.perf_counter() - start)
                if i == len(callers) - 1:
                    reader, writer = await conn.open_stream(9)
                    chunk = os.urandom(CHUNK)
                    start = time.perf_counter()
                    for _ in range(total // CHUNK):
                        writer.write(chunk)
                        await writer.drain()
                    writer.write_eof()
                    await reader.read()
                    gbits = total * 8 / (time.perf_counter() - start) / 1e9
    ordered = sorted(first_byte)
    return {
        "connect_to_first_byte_ms": {
            "median": round(statistics.median(ordered) * 1000, 2),
            "p90": round(ordered[int(len(ordered) * 0.9) - 1] * 1000, 2),
            "trials": len(ordered),
        },
        "relayed_session_gbit_s": round(gbits, 3),
    }


async def _forwarder(port: int, ready: asyncio.Event, total: int, result: list[float]) -> None:
    """A plain TCP forwarder: the first connection is forwarded to the second."""
    peers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    both = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append((reader, writer))
        if len(peers) == 2:
            both.set()
        await both.wait()
        if len(peers) == 2 and peers[0][0] is reader:
            (src, _), (_, dst) = peers
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
            dst.close()

    server = await asyncio.start_server(accept, "127.0.0.1", port)
    ready.set()
    async with server:
        await asyncio.sleep(3600)


def _start_helper(*args: str) -> subprocess.Popen[str]:
    """This script in another process, in one of its helper roles; returns once it is ready."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def measure_forwarder(total: int) -> float:
    """Bytes through a plain asyncio TCP forwarder in another process, Gbit/s."""
    port = _free_port()
    proc = _start_helper("_forward", str(port))
    try:

        async def run() -> float:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.05)
            reader, sink_writer = await asyncio.open_connection("127.0.0.1", port)
            chunk = os.urandom(CHUNK)

            async def drain_all() -> None:
                got = 0
                while got < total:
                    data = await reader.read(1 << 20)
                    if not data:
                        break
                    got += len(data)

            start = time.perf_counter()
            receiver = asyncio.ensure_future(drain_all())
            for _ in range(total // CHUNK):
                writer.write(chunk)
                await writer.drain()
            await receiver
            elapsed = time.perf_counter() - start
            writer.close()
            sink_writer.close()
            return total * 8 / elapsed / 1e9

        return asyncio.run(run())
    finally:
        proc.kill()
        proc.wait()


# -- raw agents: the real registration and frames, no QUIC -----------------------------------


class _Counter(asyncio.Protocol):
    """A connection that counts the bytes it receives, and while the transport's buffer is full
    holds a future (``paused``) a sender can await."""

    def __init__(self) -> None:
        self.received = 0
        self.transport: asyncio.Transport | None = None
        self.paused: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's are not asyncio's classes)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)

    def pause_writing(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        self.paused = None


class RawAgent(_Counter):
    """An agent registered over TLS as a node registers (signed challenge), without a node:
    answers the server's pings and counts the bytes it receives; nothing else."""

    def __init__(self, url: RendezvousUrl, identity: Identity) -> None:
        super().__init__()
        self.url, self.identity = url, identity
        self.decoder: rv.FrameDecoder | None = rv.FrameDecoder()
        self.registered: asyncio.Future[rv.Registered] = asyncio.get_running_loop().create_future()
        #: The answer to a request of ours that the server answers with an Outcome (a rest).
        self.outcome: asyncio.Future[rv.Outcome] | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.decoder is None:
            return  # counting only (the capacity measurement)
        for message, datagram in self.decoder.feed(data):
            if datagram is not None:
                continue
            if isinstance(message, rv.Challenge):
                payload = rv.register_payload(message.nonce, self.identity.address.digest, self.url.address.digest)
                self.write(rv.encode_control(rv.Register(self.identity.public_key, self.identity.sign(payload))))
            elif isinstance(message, rv.Registered) and not self.registered.done():
                self.registered.set_result(message)
            elif isinstance(message, rv.Refused) and not self.registered.done():
                self.registered.set_exception(RuntimeError(f"refused: {message.reason}"))
            elif isinstance(message, rv.Ping):
                self.write(rv.encode_control(rv.Pong(message.id)))
            elif isinstance(message, rv.Outcome) and self.outcome is not None and not self.outcome.done():
                self.outcome.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.registered.done():
            self.registered.set_exception(ConnectionError("closed before registering"))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def register_raw(url: RendezvousUrl, index: int, context: ssl.SSLContext) -> tuple[RawAgent, rv.Registered]:
    """One raw agent, registered (from its own loopback source address, see :func:`_source_ip`)."""
    loop = asyncio.get_running_loop()
    identity = Identity.generate()
    _, agent = await loop.create_connection(
        lambda: RawAgent(url, identity), url.host, url.port, ssl=context, local_addr=(_source_ip(index), 0)
    )
    return agent, await asyncio.wait_for(agent.registered, 30)


async def register_many(url: RendezvousUrl, count: int, first: int = 0, parallel: int = 200) -> list[RawAgent]:
    context = tls_client_context()
    agents: list[RawAgent] = []
    for start in range(first, first + count, parallel):
        batch = range(start, min(start + parallel, first + count))
        agents += [a for a, _ in await asyncio.gather(*(register_raw(url, i, context) for i in batch))]
    return agents


def _udp_handshake(sock: socket.socket, server: tuple[str, int], token: bytes, key: bytes) -> None:
    """Hello, challenge, response, acknowledgement: the server then takes this socket's frames
    and delivers there (as the node's rendezvous client does, blocking here)."""
    sock.settimeout(2.0)
    sock.sendto(rv.encode_udp_hello(token, key), server)
    while True:
        data, _ = sock.recvfrom(2048)
        frame = rv.parse_udp_relay(data)
        if frame.kind == rv.UDP_CHALLENGE:
            sock.sendto(rv.encode_udp_response(token, key, frame.payload), server)
        elif frame.kind == rv.UDP_HELLO_ACK:
            sock.setblocking(False)
            return


class UdpPair:
    """A sender and a receiver socket, and the datagram train the sender pushes."""

    def __init__(self, sender: socket.socket, receiver: socket.socket, train: bytes, segment: int) -> None:
        self.sender, self.receiver, self.train, self.segment = sender, receiver, train, segment


def _train(frame: bytes) -> bytes:
    """Copies of ``frame`` for one GSO send."""
    return frame * TRAIN


def _offer(pairs: list[UdpPair], rate: float, seconds: float) -> int:
    """Send trains round-robin at ``rate`` datagrams per second for ``seconds``; datagrams sent.
    Paced (sleeping between trains) rather than flat out: a flood beyond what anything forwards
    would only spend the machine's two cores in the kernel, dropping it."""
    sent = 0
    gso = True
    start = time.perf_counter()
    deadline = start + seconds
    due = start
    step = TRAIN / rate
    while True:
        now = time.perf_counter()
        if now >= deadline:
            return sent
        if now < due:
            time.sleep(min(due - now, deadline - now))
            continue
        for pair in pairs:
            if gso:
                try:
                    pair.sender.sendmsg([pair.train], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", pair.segment))])
                    sent += TRAIN
                    continue
                except OSError:
                    gso = False  # no GSO here: one datagram per call
            for _ in range(TRAIN):
                with contextlib.suppress(BlockingIOError):
                    pair.sender.send(pair.train[: pair.segment])
                    sent += 1
        due += step * len(pairs)


def _drain(sockets: list[socket.socket]) -> int:
    got = 0
    for s in sockets:
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                s.recv(65536)
                got += 1
    return got


def _arrivals(pairs: list[UdpPair], rate: float, seconds: float) -> tuple[float, float, float]:
    """(datagrams per second that reached the receivers, offered per second, elapsed): read, or
    dropped at the receivers' full queues (counted by the kernel), so receiving costs the bench
    nothing while it sends."""
    receivers = [p.receiver for p in pairs]
    _drain(receivers)
    drops0 = _udp_drops(receivers)
    start = time.perf_counter()
    sent = _offer(pairs, rate, seconds)
    elapsed = time.perf_counter() - start
    arrived = _udp_drops(receivers) - drops0 + _drain(receivers)
    time.sleep(0.1)  # what the forwarder still had queued goes, uncounted
    _drain(receivers)
    return arrived / elapsed, sent / elapsed, elapsed


def measure_udp(pairs: list[UdpPair], forwarder_pid: int, payload: int, seconds: float) -> dict[str, float]:
    """The most datagrams per second the forwarder delivers: the offered rate grows until it no
    longer keeps up, then a measurement at a third above what it delivered."""
    rate, delivered = 20_000.0, 0.0
    for _ in range(8):
        delivered, _, _ = _arrivals(pairs, rate, 0.5)
        if delivered < 0.9 * rate:
            break
        rate *= 2
    rate = delivered * 1.33
    _, cpu0 = _proc_stats(forwarder_pid)
    pps, offered, elapsed = _arrivals(pairs, rate, seconds)
    _, cpu1 = _proc_stats(forwarder_pid)
    return {
        "packets_s": round(pps),
        "gbit_s": round(pps * payload * 8 / 1e9, 3),
        "offered_packets_s": round(offered),
        "forwarder_cpu_percent": round((cpu1 - cpu0) / elapsed * 100, 1),
    }


async def udp_server_pairs(url: RendezvousUrl, count: int, payload: int) -> tuple[list[UdpPair], list[RawAgent]]:
    """``count`` sender/receiver pairs of raw agents on the server's UDP relay."""
    agents = await register_many(url, 2 * count, first=AGENTS_PER_IP * 190)
    pairs = []
    for i in range(count):
        sender, receiver = agents[2 * i], agents[2 * i + 1]
        socks = []
        for agent in (sender, receiver):
            registered = await agent.registered
            server = parse_endpoint(registered.udp_relay[0])
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            await asyncio.to_thread(_udp_handshake, sock, server, registered.token, registered.udp_key)
            agent.write(rv.encode_control(rv.UdpReady(True)))
            sock.connect(server)
            socks.append(sock)
        out = await sender.registered
        frame = rv.encode_udp_relay(out.token, out.udp_key, receiver.identity.address.digest, os.urandom(payload))
        pairs.append(UdpPair(socks[0], socks[1], _train(frame), len(frame)))
    await asyncio.sleep(0.2)  # the UdpReady frames are in
    return pairs, agents


def udp_forwarder_pairs(port: int, count: int, payload: int) -> list[UdpPair]:
    """``count`` sender/receiver pairs on the plain UDP forwarder (paired by a hello each)."""
    pairs = []
    for i in range(count):
        socks = []
        for role in (b"S", b"R"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.connect(("127.0.0.1", port))
            sock.send(b"PAIR" + role + struct.pack("!I", i))
            socks.append(sock)
        frame = rv.encode_udp_relay(bytes(8), bytes(32), bytes(16), os.urandom(payload))  # same size as the server's
        pairs.append(UdpPair(socks[0], socks[1], _train(frame), len(frame)))
    time.sleep(0.2)
    return pairs


async def measure_capacity(
    url: RendezvousUrl, server_pid: int, tmp: Path, args: argparse.Namespace
) -> dict[str, object]:
    """The server's relay capacity over UDP and TLS, each next to a plain forwarder of the transport."""
    payload, count, seconds = args.datagram, args.pairs, args.seconds
    out: dict[str, object] = {"datagram_bytes": payload, "pairs": count, "seconds": seconds}
    loop = asyncio.get_running_loop()

    # UDP: the server, then the plain forwarder.
    pairs, agents = await udp_server_pairs(url, count, payload)
    server_udp = await asyncio.to_thread(measure_udp, pairs, server_pid, payload, seconds)
    for pair in pairs:
        pair.sender.close()
        pair.receiver.close()
    for agent in agents:
        agent.close()
    port = _free_port(socket.SOCK_DGRAM)
    proc = _start_helper("_forward_udp", str(port))
    try:
        pairs = udp_forwarder_pairs(port, count, payload)
        plain_udp = await asyncio.to_thread(measure_udp, pairs, proc.pid, payload, seconds)
        for pair in pairs:
            pair.sender.close()
            pair.receiver.close()
    finally:
        proc.kill()
        proc.wait()
    out["udp"] = {
        "server": server_udp,
        "plain_forwarder": plain_udp,
        "ratio": round(server_udp["packets_s"] / plain_udp["packets_s"], 3),
    }

    # TLS over TCP: the server, then the plain TLS-terminating forwarder.
    frame = rv.encode_relay(bytes(16), os.urandom(payload))
    per_batch = 64
    agents = await register_many(url, 2 * count, first=AGENTS_PER_IP * 195)
    receivers: list[RawAgent | _Counter] = []
    senders: list[tuple[asyncio.Transport, RawAgent | _Counter]] = []
    batches: dict[int, bytes] = {}
    for i in range(count):
        sender, receiver = agents[2 * i], agents[2 * i + 1]
        receiver.decoder = None  # from here on it only counts
        receivers.append(receiver)
        assert sender.transport is not None
        senders.append((sender.transport, sender))
        batches[id(sender)] = rv.encode_relay(receiver.identity.address.digest, frame[4 + 16 :]) * per_batch
    server_tls = await _measure_tls_pairs(senders, receivers, batches, len(frame), payload, server_pid, seconds)
    for agent in agents:
        agent.close()

    port = _free_port()
    proc = _start_helper("_forward_tls", str(port), str(tmp / "tls-forwarder"))
    try:
        context = tls_client_context()
        receivers, senders, batches = [], [], {}
        for i in range(count):
            _, receiver_end = await loop.create_connection(_Counter, "127.0.0.1", port, ssl=context)
            assert receiver_end.transport is not None
            receiver_end.transport.write(b"R" + struct.pack("!I", i))
            await asyncio.sleep(0.02)
            transport, sender_end = await loop.create_connection(_Counter, "127.0.0.1", port, ssl=context)
            transport.write(b"S" + struct.pack("!I", i))
            receivers.append(receiver_end)
            senders.append((transport, sender_end))
            batches[id(sender_end)] = frame * per_batch
        await asyncio.sleep(0.1)
        plain_tls = await _measure_tls_pairs(senders, receivers, batches, len(frame), payload, proc.pid, seconds)
        for transport, _ in senders:
            transport.close()
        for receiver_end in receivers:
            assert receiver_end.transport is not None
            receiver_end.transport.close()
    finally:
        proc.kill()
        proc.wait()
    out["tls"] = {
        "server": server_tls,
        "plain_forwarder": plain_tls,
        "ratio": round(server_tls["packets_s"] / plain_tls["packets_s"], 3),
    }
    return out


async def _measure_tls_pairs(
    senders: list[tuple[asyncio.Transport, RawAgent | _Counter]],
    receivers: list[RawAgent | _Counter],
    batches: dict[int, bytes],
    frame: int,
    payload: int,
    pid: int,
    seconds: float,
) -> dict[str, float]:
    """Relay frames per second the receivers get while each sender pushes its batch as fast
    as TCP lets it."""
    stop = asyncio.Event()

    async def one(transport: asyncio.Transport, protocol: RawAgent | _Counter) -> None:
        batch = batches[id(protocol)]
        while not stop.is_set():
            transport.write(batch)
            if protocol.paused is not None:
                await protocol.paused
            else:
                await asyncio.sleep(0)

    pushing = asyncio.gather(*(one(t, p) for t, p in senders))
    await asyncio.sleep(0.5)
    got0 = sum(r.received for r in receivers)
    _, cpu0 = _proc_stats(pid)
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    got = sum(r.received for r in receivers) - got0
    elapsed = time.perf_counter() - start
    _, cpu1 = _proc_stats(pid)
    stop.set()
    for _, protocol in senders:
        protocol.resume_writing()
    await pushing
    pps = got / frame / elapsed
    return {
        "packets_s": round(pps),
        "gbit_s": round(pps * payload * 8 / 1e9, 3),
        "forwarder_cpu_percent": round((cpu1 - cpu0) / elapsed * 100, 1),
    }


# -- idle agents -----------------------------------------------------------------------------


async def measure_idle(url: RendezvousUrl, server_pid: int, count: int, seconds: float) -> dict[str, object]:
    """RSS and CPU of the server with ``count`` registered agents that only keep alive (a ping
    every KEEPALIVE seconds, as a node sends, and pongs to the server's pings)."""
    rss_before, cpu_before = _proc_stats(server_pid)
    start = time.perf_counter()
    agents = await register_many(url, count)
    registered_s = time.perf_counter() - start
    _, cpu_registered = _proc_stats(server_pid)
    await asyncio.sleep(1.0)  # the last registrations' work is done
    ping = rv.encode_control(rv.Ping(1))
    keepalives = [functools.partial(agent.write, ping) for agent in agents]
    idle = await _keep_idle(server_pid, rss_before, keepalives, KEEPALIVE, seconds)
    for agent in agents:
        agent.close()
    return {
        "agents": len(agents),
        "register_all_s": round(registered_s, 2),
        "registrations_per_s": round(len(agents) / registered_s),
        "register_server_cpu_percent": round((cpu_registered - cpu_before) / registered_s * 100, 1),
        **idle,
    }


async def _keep_idle(
    server_pid: int, rss_before: int, keepalives: list[Callable[[], None]], interval: float, seconds: float
) -> dict[str, float]:
    """The server's RSS (per agent, from ``rss_before``) and CPU while each agent's keepalive
    is called every ``interval`` seconds, spread evenly over it, for ``seconds``."""
    rss, cpu0 = _proc_stats(server_pid)
    stop = asyncio.Event()

    async def keep() -> None:
        slices = 100
        while not stop.is_set():
            for k in range(slices):
                for keepalive in keepalives[k::slices]:
                    keepalive()
                await asyncio.sleep(interval / slices)

    keeping = asyncio.ensure_future(keep())
    idle_start = time.perf_counter()
    await asyncio.sleep(seconds)
    _, cpu1 = _proc_stats(server_pid)
    idle_elapsed = time.perf_counter() - idle_start
    rss_end, _ = _proc_stats(server_pid)
    stop.set()
    await keeping
    count = len(keepalives)
    return {
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_with_agents_mib": round(rss / 2**20, 1),
        "rss_per_agent_kib": round((rss - rss_before) / count / 1024, 2),
        "rss_per_agent_after_idle_kib": round((rss_end - rss_before) / count / 1024, 2),
        "idle_cpu_percent": round((cpu1 - cpu0) / idle_elapsed * 100, 2),
        "idle_seconds": seconds,
    }


class _UdpSide(asyncio.DatagramProtocol):
    """The UDP side of raw agents sharing one socket: their hellos, the challenges answered,
    the acknowledgements awaited (the server keys frames by token, so agents may share)."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.keys: dict[bytes, bytes] = {}
        self.sequence: dict[bytes, int] = {}
        self.acked: dict[bytes, asyncio.Future[None]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            frame = rv.parse_udp_relay(data)
        except rv.FrameError:
            return
        key = self.keys.get(frame.token)
        if key is None or not rv.udp_authentic(key, data) or self.transport is None:
            return
        if frame.kind == rv.UDP_CHALLENGE:
            self.transport.sendto(rv.encode_udp_response(frame.token, key, frame.payload), addr)
        elif frame.kind == rv.UDP_HELLO_ACK:
            waiting = self.acked.pop(frame.token, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(None)

    def hello(self, token: bytes) -> None:
        """The agent's next hello (numbered, as a node's: the server ignores a repeated number)."""
        if self.transport is not None:
            sequence = self.sequence[token] = self.sequence.get(token, 0) + 1
            self.transport.sendto(rv.encode_udp_hello(token, self.keys[token], sequence), self.server)


async def rest_raw(agent: RawAgent, registered: rv.Registered, udp: _UdpSide) -> bytes:
    """Confirm the agent's UDP endpoint, ask to rest, and close its connection once told yes
    (as an idle node does); its token, for the hellos that keep it registered."""
    token = registered.token
    udp.keys[token] = registered.udp_key
    for attempt in range(4):
        acked = udp.acked[token] = asyncio.get_running_loop().create_future()
        udp.hello(token)
        try:
            await asyncio.wait_for(acked, 1.0 + attempt)
            break
        except TimeoutError:
            continue
    else:
        raise RuntimeError("the server never acknowledged a UDP hello")
    agent.outcome = asyncio.get_running_loop().create_future()
    agent.write(rv.encode_control(rv.UdpReady(True)))
    agent.write(rv.encode_control(rv.Rest(1)))
    outcome = await asyncio.wait_for(agent.outcome, 30)
    if not outcome.ok:
        raise RuntimeError(f"rest refused: {outcome.error}")
    agent.close()
    return token


async def measure_resting(url: RendezvousUrl, server_pid: int, count: int, seconds: float) -> dict[str, object]:
    """RSS and CPU of the server with ``count`` agents resting on UDP: each registers over TLS,
    confirms its UDP endpoint, rests and closes its connection, then sends a hello every
    UDP_HELLO_INTERVAL seconds (as a resting node does). 100 UDP sockets carry them."""
    loop = asyncio.get_running_loop()
    server_udp = (url.host, url.port)
    sides: list[_UdpSide] = []
    for i in range(100):
        _, side = await loop.create_datagram_endpoint(
            lambda: _UdpSide(server_udp), local_addr=(_source_ip(i * AGENTS_PER_IP), 0)
        )
        sides.append(side)
    rss_before, cpu_before = _proc_stats(server_pid)
    context = tls_client_context()
    start = time.perf_counter()
    tokens: list[tuple[_UdpSide, bytes]] = []
    parallel = 200
    for first in range(0, count, parallel):
        batch = range(first, min(first + parallel, count))
        registered = await asyncio.gather(*(register_raw(url, i, context) for i in batch))
        rested = await asyncio.gather(
            *(
                rest_raw(agent, answer, sides[i % len(sides)])
                for i, (agent, answer) in zip(batch, registered, strict=True)
            )
        )
        tokens += [(sides[i % len(sides)], token) for i, token in zip(batch, rested, strict=True)]
    rested_s = time.perf_counter() - start
    _, cpu_rested = _proc_stats(server_pid)
    await asyncio.sleep(2.0)  # the last connections are closed at the server
    hellos = [functools.partial(side.hello, token) for side, token in tokens]
    idle = await _keep_idle(server_pid, rss_before, hellos, UDP_HELLO_INTERVAL, seconds)
    for side in sides:
        if side.transport is not None:
            side.transport.close()
    return {
        "agents": len(tokens),
        "register_and_rest_all_s": round(rested_s, 2),
        "register_server_cpu_percent": round((cpu_rested - cpu_before) / rested_s * 100, 1),
        **idle,
    }


# -- the plain forwarders (helper processes) --------------------------------------------------


class _UdpForwarder(asyncio.DatagramProtocol):
    """A plain UDP forwarder: a sender's datagrams go to the receiver paired with it by hellos."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, int], tuple[str, int]] = {}
        self.waiting: dict[bytes, dict[bytes, tuple[str, int]]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        to = self.routes.get(addr)
        if to is not None:
            assert self.transport is not None
            self.transport.sendto(data, to)
        elif data[:4] == b"PAIR":
            ends = self.waiting.setdefault(data[5:9], {})
            ends[data[4:5]] = addr
            if len(ends) == 2:
                self.routes[ends[b"S"]] = ends[b"R"]


class _TlsForwarder(asyncio.Protocol):
    """A plain TLS-terminating forwarder: what a sender writes goes to the receiver paired
    with it (each names its pair in its first 5 bytes), with flow control both ways."""

    receivers: dict[bytes, _TlsForwarder] = {}  # noqa: RUF012

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _TlsForwarder | None = None
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's are not asyncio's classes)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            assert self.peer.transport is not None
            self.peer.transport.write(data)
            return
        self.head += data
        if len(self.head) < 5:
            return
        role, pair, rest = self.head[:1], self.head[1:5], self.head[5:]
        if role == b"R":
            _TlsForwarder.receivers[pair] = self
        else:
            self.peer = _TlsForwarder.receivers[pair]
            self.peer.peer = self
            if rest:
                self.data_received(rest)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def _serve_udp_forwarder(port: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)  # as the server's (net.large_buffers)
    sock.bind(("127.0.0.1", port))
    await loop.create_datagram_endpoint(_UdpForwarder, sock=sock)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _serve_tls_forwarder(port: int, state: Path) -> None:
    context = tls_server_context(Identity.generate(), state)
    server = await asyncio.get_running_loop().create_server(_TlsForwarder, "127.0.0.1", port, ssl=context)
    print("ready", flush=True)
    async with server:
        await asyncio.Event().wait()


# -- main ------------------------------------------------------------------------------------


def _start_server(tmp: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[str], RendezvousUrl]:
    port = _free_port()
    command = [sys.executable, "-m", "peerpath", "server", "--public-ip", "127.0.0.1", "--port", str(port)]
    command += ["--stun-port", str(_free_port(socket.SOCK_DGRAM)), "--wss-port", "0"]
    command += ["--state-dir", str(tmp / "server"), "--max-agents", str(args.agents + 200)]
    command += ["--relay-rate", UNBOUND_RATE, "--relay-burst", UNBOUND_RATE, *args.server_arg]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=_raise_fd_limit,  # noqa: PLW1509
    )
    assert server.stdout is not None
    return server, RendezvousUrl.parse(server.stdout.readline())


def main() -> None:
    """Run everything and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--mbytes", type=int, default=64)
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--pairs", type=int, default=4, help="sender/receiver pairs in the capacity runs")
    parser.add_argument("--datagram", type=int, default=1200, help="relayed datagram size in the capacity runs")
    parser.add_argument("--seconds", type=float, default=3.0, help="each capacity measurement's length")
    parser.add_argument("--only", default="sessions,capacity,idle,rest", help="which parts to run (comma-separated)")
    parser.add_argument("--server-arg", action="append", default=[], help="an extra argument for peerpath server")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    _raise_fd_limit()
    total = args.mbytes * 1024 * 1024
    results: dict[str, object] = {
        "benchmark": "relay",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "server_args": args.server_arg,
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        server, url = _start_server(tmp, args)
        try:
            if "sessions" in parts:
                results |= run_event_loop(measure_sessions(url, tmp, args.trials, total))
                results["tcp_forwarder_gbit_s"] = round(measure_forwarder(total), 3)
            if "capacity" in parts:
                results["relay_capacity"] = run_event_loop(measure_capacity(url, server.pid, tmp, args))
            if "idle" in parts:
                time.sleep(1.0)  # the capacity runs' agents are gone
                results["idle_agents"] = run_event_loop(measure_idle(url, server.pid, args.agents, args.idle_seconds))
        finally:
            server.terminate()
            server.wait(10)
        if "rest" in parts:
            (tmp / "resting").mkdir()
            server, url = _start_server(tmp / "resting", args)
            try:
                results["resting_agents"] = run_event_loop(
                    measure_resting(url, server.pid, args.agents, args.idle_seconds)
                )
            finally:
                server.terminate()
                server.wait(10)
    print(json.dumps(results, indent=2))


def _helper(argv: list[str]) -> None:
    role, port = argv[0], int(argv[1])
    serve: Callable[[], object]
    if role == "_forward":

        async def serve_tcp() -> None:
            ready = asyncio.Event()
            task = asyncio.ensure_future(_forwarder(port, ready, 0, []))
            await ready.wait()
            print("ready", flush=True)
            await task

        asyncio.run(serve_tcp())
        return
    if role == "_forward_udp":
        serve = lambda: run_event_loop(_serve_udp_forwarder(port))  # noqa: E731
    else:
        serve = lambda: run_event_loop(_serve_tls_forwarder(port, Path(argv[2])))  # noqa: E731
    serve()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1].startswith("_forward"):
        _helper(sys.argv[1:])
    else:
        main()
