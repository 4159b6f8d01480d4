"""The server's side of TLS over TCP, as a protocol on a plain transport: OpenSSL works through
memory BIOs and the plaintext is read into one buffer shared by every connection.

Why not the event loop's TLS: asyncio (and uvloop) keep a 256 KiB buffer per connection and
allocate another on every read; with ten thousand idle agents that is most of the server's
memory, and at full relay speed most of its time. Here an idle connection costs OpenSSL's own
state and a few small objects, and a read allocates nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

log = logging.getLogger(__name__)

#: Plaintext read from OpenSSL at once (many TLS records), into one buffer shared by every
#: connection: what a receiver keeps of it past its call, it copies.
READ_BUFFER = 256 * 1024
#: Seconds a closed connection may take to hand over what it still has queued before it is aborted.
CLOSE_GRACE = 10.0
_buffer = bytearray(READ_BUFFER)
_view = memoryview(_buffer)


class Receiver(Protocol):
    """What a :class:`TlsLink` hands its plaintext to."""

    def received(self, data: memoryview) -> bool:
        """Plaintext (valid only during the call); False to end the connection."""
        ...

    def end(self) -> None:
        """The connection is over (called once)."""
        ...

    @property
    def registered(self) -> bool:
        """Whether the client has done what it connected for (registered, for an agent)."""
        ...


class Valve:
    """Backpressure for links that read more than can go on: while something downstream is
    backed up (:meth:`shut` more often than :meth:`open`), every link that reads is paused after
    that read, and they all read again once it drains. Only the links that read are touched."""

    __slots__ = ("_held", "_shut")

    def __init__(self) -> None:
        self._shut = 0
        self._held: list[asyncio.Transport] = []

    @property
    def is_shut(self) -> bool:
        """Whether links that read are being held (what they send is not heard meanwhile)."""
        return self._shut > 0

    def shut(self) -> None:
        self._shut += 1

    def pressure(self, backed_up: bool) -> None:
        """:meth:`shut` while something downstream is ``backed_up``, :meth:`open` once it is not."""
        if backed_up:
            self.shut()
        else:
            self.open()

    def open(self) -> None:
        self._shut = max(0, self._shut - 1)
        if not self._shut:
            held, self._held = self._held, []
            for transport in held:
                if not transport.is_closing():
                    transport.resume_reading()

    def hold(self, transport: asyncio.Transport) -> None:
        """After a read: pause ``transport`` if the valve is shut."""
        if self._shut:
            transport.pause_reading()
            self._held.append(transport)


class TlsLink(asyncio.Protocol):
    """One TLS connection, server side: a :class:`~peerpath.rendezvous.links.Link` for writing.

    ``opened(link)`` is called once the handshake is done and returns the receiver of what the
    client sends (None: close). Until then nothing but the handshake is read. The link is in
    ``owner``, under its number ``ident``, while its connection is open. A client that has not
    registered within ``register_within`` seconds is closed.

    The link's one timer (that deadline, then the grace of a close) ends with its connection:
    nothing holds a closed connection's TLS state past its end.
    """

    __slots__ = (
        "_closing",
        "_context",
        "_incoming",
        "_opened",
        "_outgoing",
        "_owner",
        "_receiver",
        "_ssl",
        "_timer",
        "_transport",
        "_valve",
        "ident",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        opened: Callable[[TlsLink], Receiver | None],
        owner: dict[int, TlsLink],
        ident: int,
        valve: Valve | None = None,
        register_within: float = 10.0,
    ) -> None:
        self._context = context
        self._valve = valve
        self._owner = owner
        self.ident = ident
        self._opened: Callable[[TlsLink], Receiver | None] | None = opened
        self._transport: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None
        self._receiver: Receiver | None = None
        self._closing = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            register_within, self._registration_due
        )

    # -- the transport's side ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._ssl = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._owner[self.ident] = self

    def data_received(self, data: bytes) -> None:
        if self._closing or self._ssl is None:
            return
        self._incoming.write(data)
        try:
            if self._opened is not None and not self._handshake(self._ssl, self._opened):
                return
            self._read(self._ssl)
            if self._valve is not None and self._transport is not None:
                self._valve.hold(self._transport)
        except ssl.SSLError as exc:
            # What a stranger sends before (or instead of) TLS: nothing to answer.
            log.debug("TLS connection from %s failed: %s", self.peername(), exc)
            self._abort()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        self._owner.pop(self.ident, None)
        receiver, self._receiver = self._receiver, None
        self._opened = None
        if receiver is not None:
            receiver.end()

    @property
    def registered(self) -> bool:
        """Whether the client is past the handshake and its receiver says it registered."""
        return self._receiver is not None and self._receiver.registered

    # -- the Link's side --------------------------------------------------------------------

    def peername(self) -> Any:
        return self._transport.get_extra_info("peername") if self._transport is not None else None

    def ssl_object(self) -> ssl.SSLObject | None:
        return self._ssl

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._ssl is None:
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            log.debug("TLS write to %s failed: %s", self.peername(), exc)
            self._abort()
            return
        self._flush()

    def buffered(self) -> int:
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def is_closing(self) -> bool:
        return self._closing or self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        """Close with a TLS close_notify after what is queued."""
        if self._closing:
            return
        self._closing = True
        if self._ssl is not None and self._opened is None:
            with contextlib.suppress(ssl.SSLError, ValueError):  # SSLWantReadError: theirs is not awaited
                self._ssl.unwrap()
            self._flush()
        self._cancel_timer()
        if self._transport is not None:
            transport = self._transport
            transport.close()
            # asyncio's close waits for the write buffer to drain: a peer that never reads
            # (a zero TCP window) would hold the connection, its buffer and its slots forever.
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to wait for
                self._timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    # -- inside -----------------------------------------------------------------------------

    def _registration_due(self) -> None:
        self._timer = None
        if not self.registered:
            self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handshake(self, sslobj: ssl.SSLObject, opened: Callable[[TlsLink], Receiver | None]) -> bool:
        """Go on with the handshake; True once it is done (and the receiver made)."""
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        self._flush()
        self._opened = None
        self._receiver = opened(self)
        if self._receiver is None:
            self.close()
            return False
        return True

    def _read(self, sslobj: ssl.SSLObject) -> None:
        """Hand the receiver the plaintext of every whole record received (as much at once as the
        shared buffer holds)."""
        filled = 0
        while True:
            try:
                count = cast("int", sslobj.read(READ_BUFFER - filled, _view[filled:]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the client is done
                count = 0
            if count == 0:
                if filled:
                    self._deliver(filled)
                self.close()
                return
            filled += count
            if filled == READ_BUFFER:
                if not self._deliver(filled):
                    return
                filled = 0
        if filled:
            self._deliver(filled)
        self._flush()  # what OpenSSL answers by itself (a key update, say)

    def _deliver(self, filled: int) -> bool:
        receiver = self._receiver
        if receiver is None or self._closing:
            return False
        if receiver.received(_view[:filled]):
            return True
        self.close()
        return False

    def _flush(self) -> None:
        if self._outgoing.pending and self._transport is not None:
            self._transport.write(self._outgoing.read())

    def _abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
