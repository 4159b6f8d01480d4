"""The byte streams the rendezvous protocol runs over: TLS over TCP, or WebSocket over TLS
(port 443, for networks that let only HTTPS out). Both carry the same frames; a WebSocket
binary message holds any number of whole or partial frames."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any, Protocol

from websockets.asyncio.connection import Connection as WebSocketConnection
from websockets.exceptions import ConnectionClosed

#: The WebSocket path the server answers on.
WS_PATH = "/peerpath"
#: Largest WebSocket message accepted (a batch of frames).
WS_MAX_MESSAGE = 1 << 20


class WritableLink(Protocol):
    """A reliable, ordered byte stream to the other side, as far as writing to it goes (the
    server's TLS links are read by their protocol, which pushes what arrives)."""

    def peername(self) -> Any:
        """The remote transport address."""
        ...

    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS state (for the peer's certificate)."""
        ...

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes (never blocks; the link may keep ``data``, which must not change)."""
        ...

    def buffered(self) -> int:
        """Bytes queued but not yet handed to the kernel."""
        ...

    def is_closing(self) -> bool:
        """True once closed or closing."""
        ...

    def close(self) -> None:
        """Close (queued bytes are still sent where possible)."""
        ...


class Link(WritableLink, Protocol):
    """A reliable, ordered byte stream to the other side, read by awaiting it."""

    async def read(self) -> bytes:
        """Some bytes; ``b""`` at the end."""
        ...


class StreamLink:
    """TLS over TCP, as asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def peername(self) -> Any:
        return self.writer.get_extra_info("peername")

    def ssl_object(self) -> ssl.SSLObject | None:
        obj: ssl.SSLObject | None = self.writer.get_extra_info("ssl_object")
        return obj

    async def read(self) -> bytes:
        return await self.reader.read(65536)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writer.write(data)

    def buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self.writer.transport.is_closing()

    def close(self) -> None:
        self.writer.close()


class WebSocketLink:
    """WebSocket over TLS (websockets' asyncio connection), with a send queue so that
    writing never blocks the caller."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._queue: asyncio.Queue[bytes | bytearray | memoryview | None] = asyncio.Queue()
        self._queued = 0
        self._closing = False
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    def peername(self) -> Any:
        return self.ws.remote_address

    def ssl_object(self) -> ssl.SSLObject | None:
        obj: ssl.SSLObject | None = self.ws.transport.get_extra_info("ssl_object")
        return obj

    async def read(self) -> bytes:
        try:
            message = await self.ws.recv()
        except ConnectionClosed:
            return b""
        if isinstance(message, str):
            return b""  # the protocol is binary: a text message ends the link
        return message

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self._queued += len(data)
        self._queue.put_nowait(data)

    def buffered(self) -> int:
        transport_buffer = self.ws.transport.get_write_buffer_size() if not self.ws.transport.is_closing() else 0
        return self._queued + transport_buffer

    def is_closing(self) -> bool:
        return self._closing or self.ws.transport.is_closing()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(None)

    async def _send_loop(self) -> None:
        try:
            while (data := await self._queue.get()) is not None:
                # Coalesce what is queued into one message: fewer, larger WebSocket frames.
                batch = [data]
                while not self._queue.empty() and sum(map(len, batch)) < WS_MAX_MESSAGE // 2:
                    more = self._queue.get_nowait()
                    if more is None:
                        self._closing = True
                        break
                    batch.append(more)
                payload = b"".join(batch)
                self._queued -= len(payload)
                await self.ws.send(payload)
                if self._closing:
                    break
        except ConnectionClosed:
            pass
        finally:
            self._closing = True
            with contextlib.suppress(Exception):
                await self.ws.close()
