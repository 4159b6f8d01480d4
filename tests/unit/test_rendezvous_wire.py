"""The rendezvous frame codec: round trips, stream reassembly, and malformed input."""

from __future__ import annotations

import contextlib
import os

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerpath.wire import rendezvous as rv


def test_control_and_relay_frames_round_trip_through_a_split_stream() -> None:
    messages = [
        rv.Challenge(os.urandom(32), "pp1server"),
        rv.Register(os.urandom(32), os.urandom(64)),
        rv.Registered("198.51.100.7:40000", ["203.0.113.10:7000"], udp_key=os.urandom(32)),
        rv.Lookup(7, "pp1x"),
        rv.LookupResult(7, "pp1x", True, "203.0.113.10:7000"),
        rv.Ping(1),
    ]
    address, datagram = os.urandom(16), os.urandom(1350)
    stream = b"".join(rv.encode_control(m) for m in messages) + rv.encode_relay(address, datagram)
    decoder = rv.FrameDecoder()
    frames = []
    for i in range(0, len(stream), 7):  # arbitrary TCP segmentation
        frames += decoder.feed(stream[i : i + 7])
    assert [f for f, _ in frames[:-1]] == messages
    assert frames[-1] == (address, datagram)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (bytes([9, 0, 0, 1, 0]), "unknown frame type 9"),
        (bytes([1, 0xFF, 0xFF, 0xFF]), "exceeds"),
        (bytes([2, 0, 0x10, 0]), "exceeds"),
        (bytes([2, 0, 0, 16]) + bytes(16), "without a datagram"),
        (bytes([1, 0, 0, 3]) + b"\xc1\xc1\xc1", "malformed control message"),
    ],
)
def test_malformed_frames_raise_frame_error(data: bytes, reason: str) -> None:
    with pytest.raises(rv.FrameError, match=reason):
        rv.FrameDecoder().feed(data)


def test_encoders_refuse_oversized_input() -> None:
    with pytest.raises(rv.FrameError):
        rv.encode_relay(bytes(16), bytes(rv.MAX_DATAGRAM + 1))
    with pytest.raises(rv.FrameError):
        rv.encode_relay(bytes(15), b"x")
    with pytest.raises(rv.FrameError):
        rv.encode_control(rv.Refused("x" * (rv.MAX_CONTROL + 1)))


@given(st.binary(max_size=300))
def test_garbage_raises_only_frame_error(data: bytes) -> None:
    with contextlib.suppress(rv.FrameError):
        rv.FrameDecoder().feed(data)


def _largest_letter() -> rv.Letter:
    """A letter with every field at the size the decoder allows (4-byte characters in the note)."""
    return rv.Letter(
        kind="k" * 64,
        sender_key=bytes(64),
        recipient="r" * 64,
        created=-(1 << 63),
        nonce=bytes(64),
        note="\U0001f600" * rv.MAX_NOTE,
        reply_to=bytes(64),
        signature=bytes(64),
        sealed=bytes(rv.MAX_SEALED),
    )


def test_the_largest_messages_the_server_builds_fit_a_frame() -> None:
    """What the server relays is built from fields the decoder bounds, so it always fits."""
    letter = _largest_letter()
    assert rv.FrameDecoder().feed(rv.encode_control(rv.Post((1 << 63) - 1, letter)))  # accepted as posted
    rv.encode_control(rv.Deliver((1 << 63) - 1, letter))  # and delivered: no FrameError
    rv.encode_control(rv.LookupResult((1 << 63) - 1, "a" * 64, True, "u" * 256))


@pytest.mark.parametrize(
    "message",
    [
        rv.Post(1, msgspec.structs.replace(_largest_letter(), sealed=b"", reply_to=bytes(60_000))),
        rv.Post(1, msgspec.structs.replace(_largest_letter(), note="x" * (rv.MAX_NOTE + 1))),
        rv.Received((1 << 64) - 1),
        rv.Lookup(-1, "pp1x"),
        rv.HomeRelay("u" * 257),
    ],
)
def test_fields_beyond_their_bounds_are_a_frame_error(message: rv.Message) -> None:
    with pytest.raises(rv.FrameError, match="malformed control message"):
        rv.FrameDecoder().feed(rv.encode_control(message))


@pytest.mark.parametrize("container", [b"\x91", b"\x81\xa1k"])
def test_deep_nesting_is_a_frame_error_not_a_recursion_error(container: bytes) -> None:
    # An unknown field the decoder would skip, holding arrays (or maps) nested 1000 deep.
    body = b"\x83\xa4type\xa4ping\xa2id\x01\xa4junk" + container * 1000 + b"\xc0"
    frame = bytes([1]) + len(body).to_bytes(3, "big") + body
    with pytest.raises(rv.FrameError, match="nested too deeply"):
        rv.FrameDecoder().feed(frame)


def test_udp_relay_frames_carry_a_mac_under_the_registration_key() -> None:
    token, key, other = os.urandom(8), os.urandom(32), os.urandom(32)
    frames = [
        rv.encode_udp_relay(token, key, bytes(16), b"\x40quic"),
        rv.encode_udp_delivery(key, bytes(16), b"\x40quic"),
        rv.encode_udp_hello(token, key),
        rv.encode_udp_ack(token, key),
        rv.encode_udp_challenge(token, key, bytes(16)),
        rv.encode_udp_response(token, key, bytes(16)),
    ]
    for frame in frames:
        parsed = rv.parse_udp_relay(frame)
        assert parsed.kind == frame[0]
        assert rv.udp_authentic(key, frame)
        assert not rv.udp_authentic(other, frame)
        tampered = bytearray(frame)
        tampered[-MAC_POSITION] ^= 1
        assert not rv.udp_authentic(key, bytes(tampered))
    # A hello is as large as the challenge it may draw: no amplification toward a spoofed source.
    assert len(rv.encode_udp_hello(token, key)) >= len(rv.encode_udp_challenge(token, key, bytes(16)))
    assert rv.parse_udp_relay(frames[0]).payload == b"\x40quic"
    assert rv.parse_udp_relay(frames[1]).address == bytes(16)


MAC_POSITION = rv.MAC_BYTES + 1  # a byte just before the MAC: the MAC covers it
