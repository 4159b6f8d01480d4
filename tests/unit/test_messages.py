"""Messages with an inbox, on loopback: real agent nodes, a real rendezvous server and its
mailbox; restarts, a peer that is offline, a full disk and malformed frames."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import msgspec
import pytest

from peerpath import errors
from peerpath.identity import Identity
from peerpath.services import ports
from peerpath.services.agent import AgentNode
from peerpath.services.frames import encode
from peerpath.services.mailstore import MailStore, State
from peerpath.services.messages import MAX_MESSAGE, DeliveryError, Hello, Item, Refused, codec
from peerpath.services.names import UnknownNameError

from .conftest import Agents, eventually


async def next_message(node: AgentNode, timeout: float = 10.0):
    async with asyncio.timeout(timeout):
        async for message in node.inbox():
            return message
    raise AssertionError("no message")


async def test_a_message_lands_in_the_inbox_and_is_acknowledged_back(agents: Agents) -> None:
    alice, bob = await agents.pair()
    message_id = await alice.messages.send("bob", {"task": "summarize", "n": 3}, wait=True, timeout=10)
    message = await next_message(bob)
    assert (message.id, message.sender, message.data, message.via) == (
        message_id,
        alice.address,
        {"task": "summarize", "n": 3},
        "direct",
    )
    [sent] = alice.messages.outbox()
    assert (sent.state, sent.peer) == (State.DELIVERED, bob.address)
    bob.messages.ack(message.id[:8])
    assert bob.messages.messages() == []
    assert [m.id for m in bob.messages.messages(acked=True)] == [message_id]


async def test_many_messages_arrive_once_each_and_in_order(agents: Agents) -> None:
    alice, bob = await agents.pair()
    ids = [await alice.messages.send(bob.address, i) for i in range(100)]
    await alice.messages.wait_delivered(ids[-1], timeout=20)
    await eventually(lambda: len(bob.messages.messages()) == 100)
    assert [m.data for m in bob.messages.messages()] == list(range(100))


async def test_a_message_to_an_offline_peer_waits_in_the_mailbox_sealed(agents: Agents, server) -> None:
    alice, bob = await agents.pair()
    await alice.messages.send(bob.address, "hello", wait=True, timeout=10)  # they have met: alice knows bob's key
    await agents.stop("bob")
    message_id = await alice.messages.send(bob.address, {"secret": "the plan"})
    await eventually(lambda: alice.messages.counters["posted"] == 1)
    # The server keeps it and cannot read it.
    rows = server.mailbox._db.execute("SELECT body FROM letters").fetchall()
    assert len(rows) == 1 and b"the plan" not in rows[0][0]
    await agents.stop("alice")  # the sender is offline too when bob comes back
    bob = await agents.start("bob")
    await eventually(lambda: message_id in [m.id for m in bob.messages.messages()])
    [message] = [m for m in bob.messages.messages() if m.id == message_id]
    assert (message.data, message.via) == ({"secret": "the plan"}, "mailbox")
    # Back online, alice hears that it was delivered (a receipt), and does not deliver it twice.
    alice = await agents.start("alice")
    outcome = await alice.messages.wait_delivered(message_id, timeout=40)
    assert outcome.state is State.DELIVERED
    await asyncio.sleep(0.5)
    assert len([m for m in bob.messages.messages() if m.id == message_id]) == 1


async def test_the_outbox_survives_a_restart_and_delivers_when_the_peer_appears(agents: Agents) -> None:
    alice, bob = await agents.pair()
    await agents.stop("bob")  # alice has never met bob: no key, so it waits in the outbox
    message_id = await alice.messages.send("bob", "are you there?")
    await agents.stop("alice")
    alice = await agents.start("alice")
    assert [item.id for item in alice.messages.outbox()] == [message_id]
    bob = await agents.start("bob")
    await alice.messages.wait_delivered(message_id, timeout=40)
    assert [m.data for m in bob.messages.messages()] == ["are you there?"]


async def test_the_inbox_survives_a_restart(agents: Agents) -> None:
    alice, bob = await agents.pair()
    await alice.messages.send(bob.address, "keep me", wait=True, timeout=10)
    await agents.stop("bob")
    bob = await agents.start("bob")
    assert [m.data for m in bob.messages.messages()] == ["keep me"]


async def test_untrusted_unknown_and_oversize_are_refused_with_a_clear_error(agents: Agents) -> None:
    alice, bob = await agents.pair()
    stranger = Identity.generate().address
    with pytest.raises(errors.NotTrustedError, match="not trusted"):
        await alice.messages.send(stranger, "hi")
    with pytest.raises(UnknownNameError, match="planner"):
        await alice.resolve("planner")
    with pytest.raises(errors.LocalError, match="exceeds the limit"):
        await alice.messages.send(bob.address, b"x" * (MAX_MESSAGE + 1))
    assert alice.messages.outbox() == []


async def test_a_peer_that_does_not_trust_the_sender_never_gets_its_message(agents: Agents) -> None:
    alice, bob = await agents.pair()
    bob.trust.remove(alice.address)
    message_id = await alice.messages.send(bob.address, "let me in")
    await eventually(lambda: alice.messages.outbox()[0].attempts >= 1)
    [item] = alice.messages.outbox()
    assert item.state is State.QUEUED and "trust" in item.error
    assert bob.messages.messages() == []
    bob.trust.add(alice.address)  # trusted after all: the retry delivers it
    await alice.messages.wait_delivered(message_id, timeout=60)


async def test_a_full_disk_on_the_receiver_loses_nothing(agents: Agents) -> None:
    alice, bob = await agents.pair()
    await alice.messages.send(bob.address, "first", wait=True, timeout=10)
    store = bob.messages.store
    assert store is not None
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full now
    message_id = await alice.messages.send(bob.address, "x" * 200_000)
    await eventually(lambda: "disk is full" in alice.messages.outbox()[0].error)
    assert alice.messages.outbox()[0].state is State.QUEUED
    store._db.execute("PRAGMA max_page_count = 1073741823")  # room again
    await alice.messages.wait_delivered(message_id, timeout=60)
    assert [m.data for m in bob.messages.messages()][-1] == "x" * 200_000


async def test_malformed_frames_close_the_stream_and_the_node_keeps_serving(agents: Agents) -> None:
    alice, bob = await agents.pair()
    conn = await alice.connect(bob.address)
    for garbage in [
        b"\x00\x00\x00\x05hello",  # not msgpack of a frame
        struct.pack("!I", 2**31),  # a frame far over the limit
        encode(Item(bytes(16), "message", 0.0, b"")),  # an item before the hello
        encode(Hello(Identity.generate().public_key)),  # somebody else's key
        encode(Hello(alice.identity.public_key)) + b"\x00\x00\x00\x02\x81\xa1",  # a hello, then a cut frame
    ]:
        reader, writer = await conn.open_stream(ports.MESSAGES)
        writer.write(garbage)
        writer.write_eof()
        with pytest.raises((errors.StreamResetError, ConnectionError, asyncio.IncompleteReadError)):
            while await reader.read(65536):
                pass
            raise ConnectionError("closed")
    assert bob.messages.counters["streams_failed"] >= 4
    await alice.messages.send(bob.address, "still here", wait=True, timeout=10)


async def test_a_refused_message_fails_for_good_and_says_why(agents: Agents) -> None:
    """A host that refuses an item without retry makes the sender's ``wait`` fail with its reason."""
    alice, bob = await agents.pair()

    async def refuse(reader, writer) -> None:
        hello = await codec.read(reader, 5)
        assert isinstance(hello, Hello)
        writer.write(encode(Hello(bob.identity.public_key)))
        item = await codec.read(reader, 5)
        writer.write(encode(Refused(item.id, "no thanks", retry=False)))
        writer.write_eof()

    bob.serve(ports.MESSAGES, refuse)
    with pytest.raises(DeliveryError, match="no thanks"):
        await alice.messages.send(bob.address, "hello?", wait=True, timeout=10)
    assert alice.messages.outbox()[0].state is State.FAILED


def test_the_store_takes_each_message_once(tmp_path: Path) -> None:
    store = MailStore(tmp_path / "m.db")
    sender = Identity.generate().address
    assert store.receive(sender, bytes(16), 1.0, b"\xa1x", "direct")
    assert not store.receive(sender, bytes(16), 1.0, b"\xa1x", "mailbox")
    assert len(store.messages()) == 1
    assert (tmp_path / "m.db").stat().st_mode & 0o777 == 0o600


def test_an_id_prefix_must_be_long_and_unique(tmp_path: Path) -> None:
    store = MailStore(tmp_path / "m.db")
    sender = Identity.generate().address
    store.receive(sender, bytes.fromhex("abcdef" + "00" * 13), 1.0, b"\xc0", "direct")
    store.receive(sender, bytes.fromhex("abcdef" + "11" * 13), 1.0, b"\xc0", "direct")
    with pytest.raises(LookupError, match="at least"):
        store.find("abcd")
    with pytest.raises(LookupError, match="more than one"):
        store.find("abcdef")
    with pytest.raises(LookupError, match="no message"):
        store.find("abcdef22")
    assert store.find("ABCDEF11").id == "abcdef" + "11" * 13


async def test_a_peer_no_longer_trusted_is_refused_on_its_open_session(agents: Agents) -> None:
    alice, bob = await agents.pair()
    await alice.messages.send(bob.address, "while trusted", wait=True, timeout=10)
    assert alice.connection_to(bob.address) is not None
    bob.trust.remove(alice.address)
    late = await alice.messages.send(bob.address, "after")
    await eventually(lambda: "no longer trusted" in alice.messages.outbox()[0].error)
    assert [m.data for m in bob.messages.messages()] == ["while trusted"]
    assert alice.messages.outbox()[0].id == late
    # And the session itself is closed, from bob's side, within a few seconds.
    await eventually(lambda: bob.connection_to(alice.address) is None, timeout=10)
    assert bob.revocation.closed >= 1


async def test_content_that_does_not_decode_is_refused_and_the_inbox_stays_readable(agents: Agents) -> None:
    alice, bob = await agents.pair()
    conn = await alice.connect(bob.address)
    reader, writer = await conn.open_stream(ports.MESSAGES)
    writer.write(encode(Hello(alice.identity.public_key)))
    assert isinstance(await codec.read(reader, 10), Hello)
    ext = msgspec.msgpack.encode(msgspec.msgpack.Ext(1, b"x"))
    for body in (ext, b"\xc1", b"\x81\x91\x01\x02"):  # an extension type, no value at all, a list as a key
        writer.write(encode(Item(os.urandom(16), "message", 1.0, body)))
        answer = await codec.read(reader, 10)
        assert isinstance(answer, Refused) and not answer.retry and "does not decode" in answer.reason
    writer.write_eof()
    assert bob.messages.messages() == []
    await alice.messages.send(bob.address, {"fine": True}, wait=True, timeout=10)
    assert [m.describe()["data"] for m in bob.messages.messages()] == [{"fine": True}]
