"""Two nodes on loopback: streams and messages both ways, failures with clear errors."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from peerpath import errors
from peerpath.node.node import Node
from peerpath.session.connection import Connection, Role, SessionConfig

from .conftest import trust_each_other


async def echo(reader: asyncio.StreamReader, writer) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def pair(make_node, config: SessionConfig | None = None) -> tuple[Node, Node, Connection]:
    a, b = await make_node("a", config), await make_node("b", config)
    trust_each_other(a, b)
    conn = await a.connect(b.address, b.local_endpoint)
    return a, b, conn


async def test_connect_reports_path_rtt_and_peer(make_node) -> None:
    a, b, conn = await pair(make_node)
    assert conn.peer == b.address and conn.is_established
    assert conn.path is not None and conn.path.describe() == f"direct udp 127.0.0.1:{b.local_endpoint[1]}"
    assert conn.rtt is not None and conn.rtt > 0
    rtt = await conn.ping()
    assert rtt > 0
    assert await a.connect(str(b.address), b.local_endpoint) is conn  # reused, text address accepted
    accepted = b.connection_to(a.address)
    assert accepted is not None and accepted.peer == a.address


async def test_streams_both_ways(make_node) -> None:
    a, b, conn = await pair(make_node)
    a.serve(22, echo)
    b.serve(80, echo)
    reader, writer = await conn.open_stream(80)
    writer.write(b"hello over the overlay")
    writer.write_eof()
    assert await reader.read() == b"hello over the overlay"
    back = b.connection_to(a.address)
    assert back is not None
    reader, writer = await back.open_stream(22)  # the responder opens a stream to the initiator
    writer.write(b"and back")
    writer.write_eof()
    assert await reader.read() == b"and back"
    assert writer.get_extra_info("peer_address") == a.address


async def test_many_concurrent_streams_keep_their_data_apart(make_node) -> None:
    _, b, conn = await pair(make_node)
    b.serve(7, echo)

    async def one(i: int) -> bool:
        payload = os.urandom(1000 + i * 517)
        reader, writer = await conn.open_stream(7)
        writer.write(payload)
        writer.write_eof()
        return await reader.read() == payload

    assert all(await asyncio.gather(*(one(i) for i in range(50))))


async def test_large_stream_with_backpressure_arrives_intact(make_node) -> None:
    _, b, conn = await pair(make_node)
    received = hashlib.sha256()
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer) -> None:
        while data := await reader.read(1 << 16):
            received.update(data)
        done.set()

    b.serve(9, sink)
    _reader, writer = await conn.open_stream(9)
    sent = hashlib.sha256()
    for _ in range(64):
        chunk = os.urandom(64 * 1024)
        sent.update(chunk)
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    await asyncio.wait_for(done.wait(), 30)
    assert received.digest() == sent.digest()


async def test_requests_and_one_way_messages_both_ways(make_node) -> None:
    a, b, conn = await pair(make_node)
    inbox: list[bytes] = []

    async def answer(c: Connection, data: bytes) -> bytes | None:
        inbox.append(data)
        return b"re:" + data + str(c.peer).encode()

    b.on_message(answer)
    a.on_message(answer)
    assert await conn.request(b"task") == b"re:task" + str(a.address).encode()
    await conn.send(b"fire and forget")
    back = b.connection_to(a.address)
    assert back is not None
    assert await back.request(b"from b") == b"re:from b" + str(b.address).encode()
    for _ in range(100):
        if b"fire and forget" in inbox:
            break
        await asyncio.sleep(0.01)
    assert b"fire and forget" in inbox


async def test_large_messages(make_node) -> None:
    _, b, conn = await pair(make_node)

    async def digest(_: Connection, data: bytes) -> bytes:
        return hashlib.sha256(data).digest() + data[:16]

    b.on_message(digest)
    payload = os.urandom(12 * 1024 * 1024)
    reply = await conn.request(payload, timeout=60)
    assert reply == hashlib.sha256(payload).digest() + payload[:16]


async def test_message_larger_than_the_peer_accepts_is_refused(make_node) -> None:
    a = await make_node("a")
    b = await make_node("b", SessionConfig(max_message_size=1000))
    trust_each_other(a, b)

    async def ok(_: Connection, data: bytes) -> bytes:
        return b"ok"

    b.on_message(ok)
    conn = await a.connect(b.address, b.local_endpoint)
    assert await conn.request(b"x" * 1000) == b"ok"
    with pytest.raises(errors.MessageError, match="max_message_size"):
        await conn.request(b"x" * 5000)
    with pytest.raises(ValueError, match="max_message_size"):
        await conn.request(b"x" * (conn.config.max_message_size + 1))


async def test_no_service_on_port(make_node) -> None:
    _, _, conn = await pair(make_node)
    with pytest.raises(errors.ServiceNotFoundError, match="no service on port 8080"):
        await conn.open_stream(8080)


async def test_no_message_handler_and_failing_handler(make_node) -> None:
    _, b, conn = await pair(make_node)
    with pytest.raises(errors.MessageError, match="takes no messages"):
        await conn.request(b"x")

    async def broken(_: Connection, data: bytes) -> bytes:
        raise RuntimeError("boom")

    b.on_message(broken)
    with pytest.raises(errors.MessageError, match="RuntimeError"):
        await conn.request(b"x")
    assert await conn.ping() > 0  # the session survives a failing handler


async def test_request_timeout(make_node) -> None:
    _, b, conn = await pair(make_node)

    async def slow(_: Connection, data: bytes) -> bytes:
        await asyncio.sleep(10)
        return b"late"

    b.on_message(slow)
    with pytest.raises(errors.RequestTimeoutError):
        await conn.request(b"x", timeout=0.2)
    assert await conn.ping() > 0


async def test_closing_fails_pending_and_later_operations(make_node) -> None:
    _, b, conn = await pair(make_node)
    arrived = asyncio.Event()

    async def never(_: Connection, data: bytes) -> bytes:
        arrived.set()
        await asyncio.sleep(60)
        return b""

    b.on_message(never)
    pending = asyncio.ensure_future(conn.request(b"x", timeout=30))
    await asyncio.wait_for(arrived.wait(), 5)  # the request is with the peer
    await conn.close()
    with pytest.raises(errors.SessionClosedError):
        await pending
    with pytest.raises(errors.SessionClosedError):
        await conn.request(b"x")
    with pytest.raises(errors.SessionClosedError):
        await conn.open_stream(1)


async def test_peer_closing_is_seen_and_reconnect_works(make_node) -> None:
    a, b, conn = await pair(make_node)
    back = b.connection_to(a.address)
    assert back is not None
    await back.close("bye")
    await asyncio.wait_for(conn.closed, 5)
    assert "bye" in conn.close_reason
    again = await a.connect(b.address, b.local_endpoint)
    assert again is not conn and await again.ping() > 0


async def test_idle_timeout_ends_a_silent_session(make_node) -> None:
    config = SessionConfig(idle_timeout=0.5, keepalive_interval=0)
    a = await make_node("a", config)
    b = await make_node("b", config)
    trust_each_other(a, b)
    conn = await a.connect(b.address, b.local_endpoint)
    assert b.udp.main is not None
    b.udp.main.close()  # b vanishes without a word
    await asyncio.wait_for(conn.closed, 5)
    with pytest.raises(errors.SessionClosedError):
        await conn.request(b"x")


async def test_keepalives_hold_an_idle_session_open(make_node) -> None:
    config = SessionConfig(idle_timeout=0.6, keepalive_interval=0.15)
    _, _, conn = await pair(make_node, config)
    await asyncio.sleep(1.5)
    assert conn.is_established
    assert await conn.ping() > 0


async def test_both_dialling_at_once_converges_on_the_session_the_lower_address_started(make_node) -> None:
    for _ in range(5):
        a, b = await make_node("a"), await make_node("b")
        trust_each_other(a, b)
        low, high = sorted((a, b), key=lambda n: n.address.digest)
        got_low, got_high = await asyncio.gather(
            low.connect(high.address, high.local_endpoint, timeout=5),
            high.connect(low.address, low.local_endpoint, timeout=5),
        )
        assert got_low.role is Role.INITIATOR  # the lower address keeps the session it started
        for _ in range(100):
            kept_low, kept_high = low.connection_to(high.address), high.connection_to(low.address)
            if kept_high is not None and kept_high.role is Role.RESPONDER:
                break
            await asyncio.sleep(0.01)
        # Both ends now hand out the two ends of one session, and it works both ways.
        assert kept_low is got_low and kept_high is not None and kept_high.role is Role.RESPONDER
        assert await kept_low.ping() > 0 and await kept_high.ping() > 0
        # The duplicate the higher address started is closed unless it was already handed out;
        # the lower address lets it go once the close has drained (RFC 9000 10.2: 3 PTOs).
        if got_high.role is Role.RESPONDER:
            for _ in range(200):
                if len(low.connections) == len(high.connections) == 1:
                    break
                await asyncio.sleep(0.01)
            assert len(low.connections) == len(high.connections) == 1
