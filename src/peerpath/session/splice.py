"""Joining two byte streams: what one end sends, the other receives, in both directions,
with the semantics a TCP user expects.

- Half-close: the end of one direction (EOF) is passed on as EOF in that direction only;
  the other keeps flowing until it ends too.
- Reset: a connection reset on one side resets the other (a stream reset across the
  overlay, a TCP RST on a local socket).
- Backpressure: each direction writes only as fast as the other side drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from peerpath import errors

log = logging.getLogger(__name__)

#: Bytes read at a time.
CHUNK = 64 * 1024


class Writer(Protocol):
    """What both asyncio's StreamWriter and a session's StreamWriter offer."""

    def write(self, data: bytes) -> None:
        """Queue bytes."""
        ...

    async def drain(self) -> None:
        """Wait for room."""
        ...

    def can_write_eof(self) -> bool:
        """Whether a half-close is possible."""
        ...

    def write_eof(self) -> None:
        """Half-close."""
        ...

    def close(self) -> None:
        """Close."""
        ...


def abort(writer: Writer) -> None:
    """Reset ``writer``'s connection: a session stream's reset, or a TCP RST."""
    reset = getattr(writer, "abort", None)
    if callable(reset):  # a session's StreamWriter
        reset()
        return
    transport = getattr(writer, "transport", None)
    if transport is not None:
        transport.abort()  # SO_LINGER 0: the peer sees a reset
    else:
        writer.close()


class _Reset(Exception):
    """One direction saw a reset."""


async def _pump(reader: asyncio.StreamReader, writer: Writer) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError, errors.PeerpathError) as exc:
        raise _Reset from exc  # a reset, or the session under the stream ended
    if writer.can_write_eof():
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.write_eof()


async def splice(
    a_reader: asyncio.StreamReader, a_writer: Writer, b_reader: asyncio.StreamReader, b_writer: Writer
) -> None:
    """Copy A to B and B to A until both directions have ended; a reset of either side
    resets the other. Both writers are closed at the end."""
    tasks = [asyncio.ensure_future(_pump(a_reader, b_writer)), asyncio.ensure_future(_pump(b_reader, a_writer))]
    try:
        for done in asyncio.as_completed(tasks):
            await done
    except _Reset:
        for writer in (a_writer, b_writer):
            with contextlib.suppress(Exception):
                abort(writer)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (a_writer, b_writer):
            with contextlib.suppress(Exception):
                writer.close()
