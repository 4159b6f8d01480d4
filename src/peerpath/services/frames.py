"""Frames on a service's stream: a 4-byte big-endian length, then one msgpack message.

Each service decodes into its own tagged union of msgspec structs, with bounds on every
field, and a frame limit of its own; whatever a peer sends that does not fit becomes a
:class:`FrameError`, and the service closes that stream (the node keeps serving).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Generic, TypeVar

import msgspec

from peerpath import errors

T = TypeVar("T")
_LENGTH = struct.Struct("!I")
_encoder = msgspec.msgpack.Encoder()


class FrameError(errors.RemoteError):
    """A peer sent a frame that is malformed, too large, or cut short."""


def encode(message: Any) -> bytes:
    """One frame holding ``message``."""
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


class FrameCodec(Generic[T]):
    """Decodes frames of one service's messages (``kind``, a union of tagged structs), each
    at most ``limit`` bytes."""

    def __init__(self, kind: Any, limit: int) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(kind)
        self.limit = limit

    def decode(self, body: bytes) -> T:
        """One frame's body as a message; FrameError for anything else."""
        try:
            return self._decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise FrameError(f"malformed frame: {exc}") from None
        except RecursionError:
            raise FrameError("malformed frame: nested too deeply") from None

    async def read(self, reader: asyncio.StreamReader, timeout: float | None = None) -> T | None:
        """The next message on ``reader``, or None at the end of the stream (between frames).
        FrameError for a bad or cut frame; TimeoutError if none comes within ``timeout``."""
        async with asyncio.timeout(timeout):
            try:
                header = await reader.readexactly(_LENGTH.size)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise FrameError("the stream ended inside a frame's length") from None
                return None
            (length,) = _LENGTH.unpack(header)
            if length > self.limit:
                raise FrameError(f"frame of {length} bytes exceeds the limit of {self.limit}")
            try:
                body = await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise FrameError(f"the stream ended inside a frame of {length} bytes") from None
        return self.decode(body)

    def feed(self, buffer: bytearray) -> list[T]:
        """The whole frames at the start of ``buffer`` (removed from it), for decoding without a
        stream (the fuzz harness)."""
        messages = []
        while len(buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer)
            if length > self.limit:
                raise FrameError(f"frame of {length} bytes exceeds the limit of {self.limit}")
            if len(buffer) < _LENGTH.size + length:
                break
            body = bytes(buffer[_LENGTH.size : _LENGTH.size + length])
            del buffer[: _LENGTH.size + length]
            messages.append(self.decode(body))
        return messages


def check_data(body: bytes) -> Any:
    """The value a peer's msgpack ``body`` holds (a message, a task's input or result, an
    event), if our APIs can hand it on: it decodes, and it has a JSON form (no extension types,
    no keys that are lists or maps). FrameError otherwise, so that nothing undecodable is ever
    stored and then breaks whoever lists it."""
    try:
        value = msgspec.msgpack.decode(body)
        msgspec.json.encode(value)
    except (msgspec.DecodeError, msgspec.EncodeError, TypeError, ValueError, RecursionError) as exc:
        raise FrameError(f"content that does not decode to JSON-like data: {exc}") from None
    return value


def shown(body: bytes) -> Any:
    """``body`` as JSON-ready data for listings: its value, or a note that it does not decode
    (for what was stored before :func:`check_data` guarded the way in)."""
    try:
        return msgspec.to_builtins(check_data(body))
    except FrameError:
        return {"undecodable": body[:64].hex(), "bytes": len(body)}
