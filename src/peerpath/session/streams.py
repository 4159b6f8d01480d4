"""Byte streams over a session: asyncio StreamReader, and a StreamWriter-like writer with backpressure."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peerpath.session.connection import Connection

#: drain() waits while more than this many bytes of a stream are unacknowledged.
HIGH_WATER = 1 << 20


class ResetReason(enum.IntEnum):
    """Why a stream was reset (the QUIC error code the peer sees)."""

    #: The connection behind it was reset (a TCP RST on a tunnel's far side).
    RESET = 0x112
    #: A service could not reach what it stands for (a tunnel's target is down).
    UNREACHABLE = 0x113


class StreamWriter:
    """The sending half of a stream to a peer's service port (asyncio.StreamWriter's interface)."""

    def __init__(self, connection: Connection, stream_id: int) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._eof = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; call :meth:`drain` to wait for room."""
        if self._eof:
            raise RuntimeError("write() after write_eof() or close()")
        if data:
            self._connection._send_stream(self.stream_id, bytes(data))

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write every buffer in ``data``."""
        for chunk in data:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        """Streams always support a half-close."""
        return True

    def write_eof(self) -> None:
        """Half-close: the peer's reader sees EOF once everything before it has arrived."""
        if not self._eof:
            self._eof = True
            self._connection._send_stream(self.stream_id, b"", end_stream=True)

    async def drain(self) -> None:
        """Wait until the stream's unacknowledged data is below the high-water mark."""
        await self._connection._drain(self.stream_id, HIGH_WATER)

    def close(self) -> None:
        """Finish the stream (a half-close; the peer may still send)."""
        self.write_eof()

    def abort(self, reason: ResetReason = ResetReason.RESET) -> None:
        """Reset the stream both ways at once (what a TCP reset is to a connection): the
        peer's reader fails with :class:`~peerpath.errors.StreamResetError` saying ``reason``,
        and what is still queued is dropped."""
        self._eof = True
        self._connection._abort_stream(self.stream_id, reason)

    def is_closing(self) -> bool:
        """True after :meth:`close` or :meth:`write_eof`."""
        return self._eof

    async def wait_closed(self) -> None:
        """Wait until what was written has been acknowledged by the peer."""
        await self._connection._drain(self.stream_id, 0)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peer_address`` (the peer's overlay address), ``connection``, ``stream_id``."""
        return {
            "peer_address": self._connection.peer,
            "connection": self._connection,
            "stream_id": self.stream_id,
        }.get(name, default)
