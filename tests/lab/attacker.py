"""A hostile party for the lab's soak: garbage, floods and many sources against a rendezvous
server and a node, for a bounded time and count. Runs inside its own lab namespace and sends
only to the lab addresses it is given.

python attacker.py SECONDS SERVER_URL NODE_HOST:PORT NODE_ADDRESS SOURCE_IP [SOURCE_IP ...]

Prints one JSON object: what it sent, per attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import ssl
import sys
import time
from collections import Counter

import msgspec
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from peerpath.certs import tls_client_context
from peerpath.identity import Address, Identity
from peerpath.rendezvous.client import RendezvousClient
from peerpath.rendezvous.letters import make_letter
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.session import control
from peerpath.wire import punch
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import parse_endpoint

sent: Counter[str] = Counter()
NESTED = b"\x83\xa4type\xa4ping\xa2id\x01\xa4junk" + b"\x91" * 2000 + b"\xc0"


def control_frame(body: bytes) -> bytes:
    return bytes([1]) + len(body).to_bytes(3, "big") + body


async def tls(url: RendezvousUrl, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context: ssl.SSLContext = tls_client_context()
    return await asyncio.wait_for(asyncio.open_connection(url.host, url.port, ssl=context, local_addr=(source, 0)), 5)


async def register(url: RendezvousUrl, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Identity]:
    """A throwaway identity, registered by hand."""
    identity = Identity.generate()
    reader, writer = await tls(url, source)
    decoder = rv.FrameDecoder()
    frames: list = []
    while not frames:
        data = await asyncio.wait_for(reader.read(65536), 5)
        if not data:
            raise ConnectionError("closed before the challenge")
        frames = decoder.feed(data)
    challenge = frames[0][0]
    if not isinstance(challenge, rv.Challenge):
        raise ConnectionError(f"refused: {challenge}")  # too many connections from this address, say
    payload = rv.register_payload(challenge.nonce, identity.address.digest, url.address.digest)
    writer.write(rv.encode_control(rv.Register(identity.public_key, identity.sign(payload))))
    return reader, writer, identity


async def idle_connections(url: RendezvousUrl, sources: list[str], until: float) -> None:
    """Connections that never register, 100 per source address, held open."""
    held = []
    for source in sources[:2]:
        for _ in range(100):
            try:
                held.append(await tls(url, source))
                sent["idle_connections"] += 1
            except (OSError, TimeoutError):
                sent["idle_refused"] += 1
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    for _, writer in held:
        writer.close()


async def ghosts_and_garbage(url: RendezvousUrl, source: str, until: float) -> None:
    """Registrations followed by garbage, nested msgpack, oversized letters, floods."""
    garbage = [bytes([9, 0, 0, 1, 0]), control_frame(NESTED), os.urandom(64)]
    while time.monotonic() < until and sent["registrations"] < 2000:
        try:
            reader, writer, identity = await register(url, source)
        except (OSError, TimeoutError, ConnectionError, rv.FrameError):
            sent["registrations_failed"] += 1
            await asyncio.sleep(0.05)
            continue
        sent["registrations"] += 1
        kind = sent["registrations"] % 4
        if kind == 0:
            writer.write(random.choice(garbage))
            sent["garbage_frames"] += 1
        elif kind == 1:
            letter = make_letter(identity, "trust-request", identity.address)
            bloated = msgspec.structs.replace(letter, reply_to=os.urandom(60_000))
            writer.write(rv.encode_control(rv.Post(1, bloated)))
            sent["oversized_letters"] += 1
        elif kind == 2:
            lookups = [rv.encode_control(rv.Lookup(i, str(identity.address))) for i in range(500)]
            writer.write(b"".join(lookups))
            sent["lookups"] += 500
        else:
            writer.write(rv.encode_control(rv.Ping(1)) * 2000)
            sent["pings"] += 2000
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(reader.read(65536), 0.5)
        writer.close()


async def letters_to(url: RendezvousUrl, source: str, target: str, until: float) -> None:
    """Trust requests to the node from throwaway identities (its mailbox and pending list)."""
    while time.monotonic() < until and sent["letters"] < 600:
        try:
            _, writer, identity = await register(url, source)
        except (OSError, TimeoutError, ConnectionError, rv.FrameError):
            await asyncio.sleep(0.1)
            continue
        posts = [
            rv.encode_control(rv.Post(i, make_letter(identity, "trust-request", Address.parse(target), note="\x1b[2J")))
            for i in range(10)
        ]
        writer.write(b"".join(posts))
        sent["letters"] += 10
        await asyncio.sleep(0.2)
        writer.close()


async def udp_garbage(target: tuple[str, int], sources: list[str], until: float, what: str) -> None:
    """Datagrams of every kind the target demultiplexes, from many source addresses, ~1000/s."""
    loop = asyncio.get_running_loop()
    transports = []
    for source in sources:
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(source, 0))
        transports.append(transport)
    key = os.urandom(32)
    makers = [
        lambda: os.urandom(random.randrange(1, 1500)),
        lambda: rv.encode_udp_hello(os.urandom(8), key),
        lambda: rv.encode_udp_relay(os.urandom(8), key, os.urandom(16), os.urandom(1200)),
        lambda: punch.encode_check(key, os.urandom(punch.TID_BYTES)),
        lambda: b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12),  # STUN binding request
        lambda: bytes([0xC0]) + os.urandom(1250),  # looks like a long-header QUIC packet
    ]
    try:
        while time.monotonic() < until and sent[what] < 400_000:
            for _ in range(50):
                random.choice(transports).sendto(random.choice(makers)(), target)
                sent[what] += 1
            await asyncio.sleep(0.05)
    finally:
        for transport in transports:
            transport.close()


async def initials(target: tuple[str, int], sources: list[str], until: float) -> None:
    """QUIC Initials that never complete, from many addresses (fill the handshake slots)."""
    loop = asyncio.get_running_loop()
    transports = []
    for source in sources:
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(source, 0))
        transports.append(transport)
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[control.ALPN])
    try:
        while time.monotonic() < until and sent["initials"] < 20_000:
            for transport in transports:
                quic = QuicConnection(configuration=configuration)
                quic.connect(target, now=time.monotonic())
                for datagram, _ in quic.datagrams_to_send(now=time.monotonic()):
                    transport.sendto(datagram, target)
                    sent["initials"] += 1
            await asyncio.sleep(0.05)
    finally:
        for transport in transports:
            transport.close()


async def relayed_initials(url: RendezvousUrl, target: str, until: float) -> None:
    """A registered stranger relays Initials to the node (the server vouches for who it is)."""
    client = RendezvousClient(Identity.generate(), url, on_relay=lambda s, d: None)
    await client.start()
    try:
        await client.wait_registered(10)
        destination = Address.parse(target).digest
        configuration = QuicConfiguration(is_client=True, alpn_protocols=[control.ALPN])
        while time.monotonic() < until and sent["relayed_initials"] < 5000:
            quic = QuicConnection(configuration=configuration)
            quic.connect(("0.0.0.0", 0), now=time.monotonic())
            for datagram, _ in quic.datagrams_to_send(now=time.monotonic()):
                if client.send_relay(destination, datagram):
                    sent["relayed_initials"] += 1
            await asyncio.sleep(0.02)
    finally:
        await client.close()


async def main() -> None:
    seconds = float(sys.argv[1])
    url = RendezvousUrl.parse(sys.argv[2])
    node = parse_endpoint(sys.argv[3])
    node_address = sys.argv[4]
    sources = sys.argv[5:]
    until = time.monotonic() + seconds
    server_udp = (url.host, url.port)
    stun = (url.host, 3478)
    attacks = [
        idle_connections(url, sources, until),
        ghosts_and_garbage(url, sources[2 % len(sources)], until),
        ghosts_and_garbage(url, sources[3 % len(sources)], until),
        letters_to(url, sources[4 % len(sources)], node_address, until),
        udp_garbage(server_udp, sources, until, "udp_to_server"),
        udp_garbage(stun, sources, until, "udp_to_stun"),
        udp_garbage(node, sources, until, "udp_to_node"),
        initials(node, sources, until),
        relayed_initials(url, node_address, until),
    ]
    outcomes = await asyncio.gather(*attacks, return_exceptions=True)
    failed = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    print(json.dumps({"sent": dict(sent), "attack_errors": failed}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
