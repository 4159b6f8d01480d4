"""Trust requests through the rendezvous: offline delivery, approval both ways, and refusal of
unsigned, forged and replayed letters."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from peerpath import errors
from peerpath.identity import Identity
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.client import RendezvousError
from peerpath.rendezvous.letters import make_letter
from peerpath.rendezvous.server import RendezvousServer
from peerpath.wire import rendezvous as rv

from .conftest import eventually


async def start(tmp_path: Path, name: str, server: RendezvousServer, identity: Identity | None = None) -> Node:
    node = await Node.start(
        identity=identity or Identity.generate(),
        trust=TrustStore(tmp_path / name / "trust.json"),
        host="127.0.0.1",
        rendezvous=server.url(),
    )
    assert node.rendezvous is not None
    await node.rendezvous.wait_registered(5)
    return node


async def test_request_to_an_offline_peer_is_delivered_and_approval_trusts_both_ways(tmp_path, server) -> None:
    bob_identity = Identity.generate()
    alice = await start(tmp_path, "alice", server)
    try:
        await alice.request_trust(bob_identity.address, "alice from the build farm")
        assert bob_identity.address not in alice.trust  # not before bob approves
        bob = await start(tmp_path, "bob", server, bob_identity)  # bob comes online later
        try:
            await eventually(lambda: bool(bob.pending_trust()))
            (pending,) = bob.pending_trust()
            assert pending.address == str(alice.address) and pending.note == "alice from the build farm"
            await bob.approve_trust(alice.address)
            assert alice.address in bob.trust
            await eventually(lambda: bob.address in alice.trust)
            conn = await alice.connect(bob.address)
            assert await conn.ping() > 0
            assert bob.pending_trust() == []
        finally:
            await bob.close()
    finally:
        await alice.close()
    assert server.mailbox is not None
    assert server.mailbox.waiting_for(bob_identity.address.digest) == []  # delivered letters are deleted


async def test_denied_request_trusts_nobody(tmp_path, server) -> None:
    alice, bob = await start(tmp_path, "alice", server), await start(tmp_path, "bob", server)
    try:
        await alice.request_trust(bob.address)
        await eventually(lambda: bool(bob.pending_trust()))
        bob.deny_trust(alice.address)
        assert bob.pending_trust() == [] and alice.address not in bob.trust
        with pytest.raises(errors.LocalError, match="no trust request"):
            await bob.approve_trust(alice.address)
    finally:
        await alice.close()
        await bob.close()


async def test_server_refuses_forged_unsigned_and_replayed_letters(tmp_path, server) -> None:
    mallory, bob = await start(tmp_path, "mallory", server), await start(tmp_path, "bob", server)
    victim = Identity.generate()
    client = mallory.rendezvous
    assert client is not None
    try:
        forged = make_letter(victim, "trust-request", bob.address, "it's me, victim")  # not mallory's key
        with pytest.raises(RendezvousError, match="signed by the agent that posts it"):
            await client.post(forged)
        honest = make_letter(mallory.identity, "trust-request", bob.address, "hi")
        unsigned = rv.Letter(honest.kind, honest.sender_key, honest.recipient, honest.created, honest.nonce, "hi")
        with pytest.raises(RendezvousError, match="does not verify"):
            await client.post(unsigned)
        tampered = rv.Letter(**{**{f: getattr(honest, f) for f in honest.__struct_fields__}, "note": "changed"})
        with pytest.raises(RendezvousError, match="does not verify"):
            await client.post(tampered)
        await client.post(honest)
        with pytest.raises(RendezvousError, match="replayed"):
            await client.post(honest)
        stale = make_letter(mallory.identity, "trust-request", bob.address, now=time.time() - 30 * 24 * 3600)
        with pytest.raises(RendezvousError, match="too old"):
            await client.post(stale)
        await eventually(lambda: len(bob.pending_trust()) == 1)
        assert server.counters["letters_refused"] == 5
    finally:
        await mallory.close()
        await bob.close()


async def test_recipient_checks_letters_itself(tmp_path, server) -> None:
    """A compromised server could deliver anything: the node checks signature, recipient, replay,
    and accepts an approval only for a request it made."""
    bob = await start(tmp_path, "bob", server)
    try:
        mallory, carol = Identity.generate(), Identity.generate()
        broker = bob.broker
        assert (
            broker.receive(make_letter(mallory, "trust-request", carol.address))
            == "ignored: not addressed to this node"
        )
        letter = make_letter(mallory, "trust-request", bob.address)
        bad = rv.Letter(**{**{f: getattr(letter, f) for f in letter.__struct_fields__}, "signature": bytes(64)})
        assert broker.receive(bad).startswith("ignored: letter signature")
        assert broker.receive(letter) == "pending"
        assert broker.receive(letter) == "ignored: replayed"
        unsolicited = make_letter(mallory, "trust-approval", bob.address, reply_to=bytes(16))
        assert broker.receive(unsolicited) == "ignored: approval of no request of ours"
        assert mallory.address not in bob.trust
    finally:
        await bob.close()


def test_a_note_too_long_for_the_server_is_refused_here(tmp_path) -> None:
    from peerpath.errors import LocalError
    from peerpath.identity import Identity
    from peerpath.node.requests import TrustBroker
    from peerpath.node.trust import TrustStore
    from peerpath.wire import rendezvous as rv

    broker = TrustBroker(Identity.generate(), TrustStore(tmp_path / "t.json"), tmp_path / "r.json")
    with pytest.raises(LocalError, match="at most 1000 characters"):
        broker.request(Identity.generate().address, "x" * (rv.MAX_NOTE + 1))
