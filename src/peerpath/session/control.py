"""What the session says on top of QUIC: the in-band initiator proof and stream headers.

Every frame is a 4-byte big-endian length and a msgpack-encoded struct. The control
streams (one unidirectional stream each way) carry :class:`Hello`, :class:`Challenge`,
:class:`Auth` and :class:`Welcome` (a refusal is a CONNECTION_CLOSE with its reason); every application stream starts
with :class:`OpenStream` or :class:`Message`, and its answer starts with :class:`Accept`
or :class:`Reply`.
"""

from __future__ import annotations

import struct
from typing import Annotated

import msgspec

from peerpath.identity import Address
from peerpath.wire.codec import decode

PROTOCOL_VERSION = 1
ALPN = f"peerpath/{PROTOCOL_VERSION}"
#: Control frames and stream headers are small; anything larger is an attack or a bug.
MAX_FRAME = 16 * 1024
_AUTH_CONTEXT = b"peerpath-session-auth-v1\x00"


# Bounds on what a peer fills in (a frame is at most MAX_FRAME bytes in any case).
Blob = Annotated[bytes, msgspec.Meta(max_length=64)]  # keys, nonces, signatures
Reason = Annotated[str, msgspec.Meta(max_length=512)]
Topic = Annotated[str, msgspec.Meta(max_length=64)]
Port = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]


class ControlError(ValueError):
    """A malformed frame from the peer."""


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """Initiator -> responder: who I claim to be."""

    version: int
    public_key: Blob


class Challenge(msgspec.Struct, tag="challenge", frozen=True):
    """Responder -> initiator: a fresh nonce to sign."""

    nonce: Blob


class Auth(msgspec.Struct, tag="auth", frozen=True):
    """Initiator -> responder: the signature over :func:`auth_payload`."""

    signature: Blob


class Welcome(msgspec.Struct, tag="welcome", frozen=True):
    """Responder -> initiator: proof accepted, you are trusted."""


class OpenStream(msgspec.Struct, tag="open", frozen=True):
    """First frame of a byte stream to a numbered service port."""

    port: Port


class Accept(msgspec.Struct, tag="accept", frozen=True):
    """Answer to :class:`OpenStream`."""

    ok: bool
    error: Reason = ""


class Message(msgspec.Struct, tag="message", frozen=True):
    """First frame of a message; the payload follows until the end of the stream.

    A non-empty ``topic`` marks peerpath's own messages (path upgrades), which go to the
    node, never to the application's handler.
    """

    request: bool
    topic: Topic = ""


class Ping(msgspec.Struct, tag="ping", frozen=True):
    """First frame of a ping; answered by the session itself with a :class:`Reply` and the same payload."""


class Reply(msgspec.Struct, tag="reply", frozen=True):
    """First frame of the answer to a request; the payload follows until the end of the stream."""

    ok: bool
    error: Reason = ""


Frame = Hello | Challenge | Auth | Welcome | OpenStream | Accept | Message | Ping | Reply
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def encode(frame: Frame) -> bytes:
    """One frame with its length prefix."""
    body = _encoder.encode(frame)
    return struct.pack("!I", len(body)) + body


class FrameReader:
    """Reassembles frames from stream data that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Add data; return every complete frame. Raises :class:`ControlError` on garbage."""
        self._buffer += data
        frames: list[Frame] = []
        while (frame := self._next()) is not None:
            frames.append(frame)
        return frames

    def feed_header(self, data: bytes) -> Frame | None:
        """Add data; return the first frame once complete, leaving what follows it unread."""
        self._buffer += data
        return self._next()

    def _next(self) -> Frame | None:
        if len(self._buffer) < 4:
            return None
        (length,) = struct.unpack_from("!I", self._buffer)
        if length > MAX_FRAME:
            raise ControlError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
        if len(self._buffer) < 4 + length:
            return None
        body = bytes(self._buffer[4 : 4 + length])
        del self._buffer[: 4 + length]
        return decode(_decoder, body, ControlError, "frame")

    def take_rest(self) -> bytes:
        """Whatever follows the frames read so far (a stream's payload)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def auth_payload(nonce: bytes, initiator: Address, responder: Address) -> bytes:
    """What the initiator signs: the responder's nonce and both addresses.

    The nonce makes the signature fresh (no replay); the responder's address makes it
    useless to anyone but the peer the initiator meant to reach (no relaying it onward).
    """
    return _AUTH_CONTEXT + nonce + initiator.digest + responder.digest
