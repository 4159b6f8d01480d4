"""Security properties of sessions: who can connect, what a forger or a middlebox can do."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import struct
from collections.abc import Callable

import pytest

from peerpath import errors
from peerpath.identity import Identity
from peerpath.node import sessions as sessions_module
from peerpath.node.node import Node
from peerpath.session import control
from peerpath.session.auth import InitiatorAuth
from peerpath.session.connection import Connection

from .conftest import eventually, trust_each_other


async def test_impostor_at_the_endpoint_is_refused(make_node) -> None:
    a = await make_node("a")
    impostor = await make_node("impostor")
    real = Identity.generate()
    a.trust.add(real.address)
    impostor.trust.add(a.address)
    with pytest.raises(errors.PeerAuthenticationError, match=f"not {real.address}"):
        await a.connect(real.address, impostor.local_endpoint)
    assert a.connections == []


async def test_untrusted_initiator_is_refused(make_node) -> None:
    a, b = await make_node("a"), await make_node("b")
    a.trust.add(b.address)  # b does not trust a
    b.on_message(lambda c, d: asyncio.sleep(0, b"should never run"))
    with pytest.raises(errors.PeerRefusedError, match="does not trust"):
        await a.connect(b.address, b.local_endpoint)
    assert b.connection_to(a.address) is None
    assert b.counters["sessions_refused"] == 1


async def test_node_refuses_to_dial_an_untrusted_address(make_node) -> None:
    a, b = await make_node("a"), await make_node("b")
    with pytest.raises(errors.NotTrustedError, match=f"peerpath trust add {b.address}"):
        await a.connect(b.address, b.local_endpoint)


async def test_trust_removal_takes_effect_for_new_sessions(make_node) -> None:
    a, b = await make_node("a"), await make_node("b")
    trust_each_other(a, b)
    conn = await a.connect(b.address, b.local_endpoint)
    await conn.close()
    b.trust.remove(a.address)
    with pytest.raises(errors.PeerRefusedError):
        await a.connect(b.address, b.local_endpoint)


def forging_connection(claimed: Identity, forge: Callable[[bytes], bytes], early: bool = False) -> type[Connection]:
    """A Connection that claims ``claimed``'s key and answers the challenge with ``forge(nonce)``."""

    class Forger(Connection):
        def _send_control(self, frame: control.Frame) -> None:
            if isinstance(frame, control.Hello):
                frame = control.Hello(frame.version, claimed.public_key)
                if early:  # try to get a message in before the proof
                    stream_id = self.quic.new_stream()
                    payload = control.encode(control.Message(request=False)) + b"smuggled"
                    self.quic.send(stream_id, payload, end=True)
            elif isinstance(frame, control.Auth):
                assert isinstance(self._auth, InitiatorAuth) and self._auth.nonce is not None
                frame = control.Auth(forge(self._auth.nonce))
            super()._send_control(frame)

    return Forger


async def forged_connect(monkeypatch, attacker: Node, target: Node, forger: type[Connection]) -> Connection:
    with monkeypatch.context() as patch:
        patch.setattr(sessions_module, "Connection", forger)
        return await attacker.connect(target.address, target.local_endpoint, timeout=5)


async def test_forged_proofs_are_refused_and_the_honest_one_is_accepted(make_node, monkeypatch) -> None:
    victim = Identity.generate()  # the trusted peer whose address the attacker claims
    b = await make_node("b")
    attacker = await make_node("attacker")
    b.trust.add(victim.address)
    attacker.trust.add(b.address)
    received: list[bytes] = []

    async def inbox(_: Connection, data: bytes) -> None:
        received.append(data)

    b.on_message(inbox)

    def payload(nonce: bytes, responder) -> bytes:
        return control.auth_payload(nonce, victim.address, responder)

    # Signed with the attacker's own key.
    wrong_key = forging_connection(victim, lambda n: attacker.identity.sign(payload(n, b.address)), early=True)
    with pytest.raises(errors.PeerRefusedError, match="bad signature"):
        await forged_connect(monkeypatch, attacker, b, wrong_key)
    # A signature the victim made for another responder (the attacker), relayed onward.
    relayed = forging_connection(victim, lambda n: victim.sign(payload(n, attacker.address)))
    with pytest.raises(errors.PeerRefusedError, match="bad signature"):
        await forged_connect(monkeypatch, attacker, b, relayed)
    # A signature the victim made for b, but over an old nonce (replay).
    old = victim.sign(payload(os.urandom(32), b.address))
    replayed = forging_connection(victim, lambda n: old)
    with pytest.raises(errors.PeerRefusedError, match="bad signature"):
        await forged_connect(monkeypatch, attacker, b, replayed)
    await eventually(lambda: b.counters["sessions_refused"] == 3)  # b is done with all three
    assert received == []  # the smuggled pre-proof message never reached the handler
    assert b.connection_to(victim.address) is None
    # The harness is sound: with the victim's key and the right nonce it gets in.
    honest = forging_connection(victim, lambda n: victim.sign(payload(n, b.address)))
    conn = await forged_connect(monkeypatch, attacker, b, honest)
    assert conn.is_established and b.connection_to(victim.address) is not None


async def test_garbage_datagrams_are_dropped_without_harm(make_node) -> None:
    a, b = await make_node("a"), await make_node("b")
    trust_each_other(a, b)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    rng = random.Random(1)
    try:
        junk = [b"", b"\x00", b"\xff" * 1500, bytes(rng.randrange(256) for _ in range(1200))]
        # Long-header packets with random connection IDs: look like QUIC, belong to nobody.
        junk += [b"\xc0" + struct.pack("!I", 1) + b"\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + os.urandom(1180)]
        junk += [b"\x40" + os.urandom(40), b"\xc0\x00\x00\x00\x01\xff"]
        junk += [os.urandom(rng.randrange(1, 1500)) for _ in range(300)]
        for data in junk:
            transport.sendto(data, b.local_endpoint)
    finally:
        transport.close()
    # Loopback delivers in order: by the time a's session is up, b has read all the junk.
    conn = await a.connect(b.address, b.local_endpoint)
    assert await conn.ping() > 0
    assert b.counters["datagrams_failed"] == 0
    assert b.counters["datagrams_dropped"] > 0


class HostileMiddlebox(asyncio.DatagramProtocol):
    """A UDP forwarder between a client and a server that corrupts, drops, duplicates,
    reorders and replays datagrams."""

    def __init__(self, server: tuple[str, int], seed: int = 7) -> None:
        self.server = server
        self.client: tuple[str, int] | None = None
        self.rng = random.Random(seed)
        self.seen: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.corrupted = self.dropped = self.duplicated = self.replayed = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr != self.server:
            self.client = addr
        dest = self.client if addr == self.server else self.server
        if dest is None or self.transport is None:
            return
        roll = self.rng.random()
        loop = asyncio.get_running_loop()
        if roll < 0.05:
            self.dropped += 1
            return
        if roll < 0.10:
            flipped = bytearray(data)
            flipped[self.rng.randrange(len(flipped))] ^= 1 << self.rng.randrange(8)
            self.transport.sendto(bytes(flipped), dest)
            self.corrupted += 1
            return
        if roll < 0.13:
            self.transport.sendto(data, dest)
            self.duplicated += 1
        if roll > 0.97 and self.seen:
            old, old_dest = self.rng.choice(self.seen)
            self.transport.sendto(old, old_dest)
            self.replayed += 1
        self.seen = ([*self.seen, (data, dest)])[-200:]
        if 0.13 <= roll < 0.18:  # reorder: hold it back a little
            loop.call_later(0.003, self.transport.sendto, data, dest)
        else:
            self.transport.sendto(data, dest)


async def test_hostile_middlebox_never_gets_corrupted_data_to_the_application(make_node) -> None:
    a, b = await make_node("a"), await make_node("b")
    trust_each_other(a, b)
    loop = asyncio.get_running_loop()
    transport, box = await loop.create_datagram_endpoint(
        lambda: HostileMiddlebox(b.local_endpoint), local_addr=("127.0.0.1", 0)
    )
    got: list[bytes] = []

    async def record(_: Connection, data: bytes) -> bytes:
        got.append(data)
        return hashlib.sha256(data).digest()

    b.on_message(record)
    try:
        conn = await a.connect(b.address, transport.get_extra_info("sockname"), timeout=15)
        payloads = [os.urandom(random.Random(i).randrange(1, 300_000)) for i in range(20)]
        for payload in payloads:
            assert await conn.request(payload, timeout=30) == hashlib.sha256(payload).digest()
    finally:
        transport.close()
    assert got == payloads
    assert box.corrupted > 0 and box.dropped > 0 and box.duplicated > 0 and box.replayed > 0
