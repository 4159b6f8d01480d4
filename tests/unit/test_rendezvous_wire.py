"""The rendezvous frame codec: round trips, stream reassembly, and malformed input."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerpath.wire import rendezvous as rv


def test_control_and_relay_frames_round_trip_through_a_split_stream() -> None:
    messages = [
        rv.Challenge(os.urandom(32), "pp1server"),
        rv.Register(os.urandom(32), os.urandom(64), ["10.0.0.2:4000"], {"mapping": "endpoint-independent"}),
        rv.Registered("198.51.100.7:40000", ["203.0.113.10:7000"]),
        rv.Lookup(7, "pp1x"),
        rv.LookupResult(7, "pp1x", True, ["10.0.0.3:1"], "198.51.100.8:2", None, "203.0.113.10:7000"),
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
