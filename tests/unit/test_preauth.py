"""What an unauthenticated initiator can make a node hold: a few KiB, for a few seconds."""

from __future__ import annotations

import asyncio

import pytest

from peerpath import errors
from peerpath.session import control
from peerpath.session.connection import PREAUTH_MAX_DATA, Connection, SessionConfig

from .test_session_security import forged_connect

GAP = 8 * 1024 * 1024 - 1


def gap_writer(streams: int) -> type[Connection]:
    """A Connection that, instead of proving its identity, sends one byte at offset 8 MiB-1 on
    its control stream and on ``streams`` bidirectional streams (ignoring the responder's
    flow control, as an attacker's own QUIC stack would)."""

    class GapWriter(Connection):
        def _send_control(self, frame: control.Frame) -> None:
            if not isinstance(frame, control.Hello):
                return
            quic = self.quic._quic  # an attacker's own QUIC stack ignores flow control
            quic._remote_max_data = 1 << 40
            assert self._control_out is not None
            stream_ids = [self._control_out]
            for _ in range(streams):
                stream_id = self.quic.new_stream()
                quic._remote_max_streams_bidi = max(quic._remote_max_streams_bidi, stream_id // 4 + 1)
                stream_ids.append(stream_id)
            for stream_id in stream_ids:
                stream = quic._get_or_create_stream_for_send(stream_id)
                stream.is_blocked = False
                stream.max_stream_data_remote = 1 << 40
                stream.sender._buffer_start = stream.sender._buffer_stop = GAP
                quic.send_stream_data(stream_id, b"x")
            self.transmit()

    return GapWriter


def held_bytes(conn: Connection) -> int:
    """Bytes the responder's QUIC keeps for the peer's streams (gaps included)."""
    return sum(len(stream.receiver._buffer) for stream in conn.quic._quic._streams.values())


async def test_a_byte_far_ahead_cannot_make_an_unauthenticated_session_hold_megabytes(make_node, monkeypatch) -> None:
    b = await make_node("b", config=SessionConfig(connect_timeout=2.0))
    attacker = await make_node("attacker")
    attacker.trust.add(b.address)
    attack = asyncio.ensure_future(forged_connect(monkeypatch, attacker, b, gap_writer(streams=4)))
    most, seen = 0, set()
    for _ in range(40):  # watch the responder while the attack is on
        seen |= b.sessions.all
        most = max([most, *(held_bytes(conn) for conn in b.sessions.all)])
        await asyncio.sleep(0.05)
    with pytest.raises((errors.ConnectTimeoutError, errors.SessionClosedError)):
        await attack
    assert seen, "the attack never reached the responder"
    # The responder refused the data beyond its pre-authentication window and closed the session.
    assert most <= PREAUTH_MAX_DATA
    assert all(conn.closed.done() for conn in seen)


class SilentInitiator(Connection):
    """Completes the QUIC handshake and then never proves its identity."""

    def _send_control(self, frame: control.Frame) -> None:
        pass  # no Hello, no Auth


async def test_a_session_that_never_authenticates_is_closed_after_the_connect_timeout(make_node, monkeypatch) -> None:
    b = await make_node("b", config=SessionConfig(connect_timeout=1.0))
    attacker = await make_node("attacker")
    attacker.trust.add(b.address)
    with pytest.raises(errors.SessionClosedError, match="not authenticated within 1 s"):
        await forged_connect(monkeypatch, attacker, b, SilentInitiator)
    await asyncio.sleep(0.3)
    # Long before the 30 s idle timeout, the responder has given up on it.
    assert [c for c in b.sessions.all if not c.closed.done()] == []
    assert b.counters["sessions_refused"] >= 1


async def test_windows_open_once_the_peer_is_authenticated(make_node) -> None:
    a, b = await make_node("a"), await make_node("b")
    a.trust.add(b.address)
    b.trust.add(a.address)
    conn = await a.connect(b.address, b.local_endpoint)
    payload = bytes(3 * 1024 * 1024)
    b.on_message(lambda _c, data: asyncio.sleep(0, data[:8]))
    assert await conn.request(payload, timeout=20) == payload[:8]
    responder = b.connection_to(a.address)
    assert responder is not None and responder.quic._quic._local_max_data.value >= 1024 * 1024
