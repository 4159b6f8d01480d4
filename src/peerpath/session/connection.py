"""One secure session with one peer: the driver that joins a QUIC connection, a path set,
the identity proof and the stream multiplexer.

- :mod:`peerpath.quic` is the QUIC connection (sans-I/O; the only module that knows the
  QUIC library);
- :mod:`peerpath.session.auth` is the proof of who the peer is (sans-I/O): the responder by
  its TLS certificate, the initiator in-band, first thing on the encrypted connection.
  Nothing but that proof is accepted from an initiator before it succeeds;
- :mod:`peerpath.session.mux` is what the streams carry (sans-I/O): byte streams, messages,
  requests and pings;
- :class:`~peerpath.session.pathset.PathSet` carries the datagrams.

:class:`Connection` drives them with its node's clock and the event loop's timers, and owns
what the application holds: stream readers, the futures of requests, handler tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, SupportsIndex

from peerpath import errors, quic
from peerpath.certs import session_certificate
from peerpath.clock import Clock, monotonic
from peerpath.identity import Address, Identity
from peerpath.quic import QuicEngine
from peerpath.session import control, mux
from peerpath.session.auth import InitiatorAuth, Refused, ResponderAuth
from peerpath.session.mux import Kind, Mux
from peerpath.session.pathset import HOLD_DOWN, Path, PathSet
from peerpath.session.pmtu import BASE_DATAGRAM
from peerpath.session.streams import ResetReason, StreamWriter
from peerpath.tasks import spawn

log = logging.getLogger(__name__)

StreamHandler = Callable[[asyncio.StreamReader, StreamWriter], Awaitable[None]]
MessageHandler = Callable[["Connection", bytes], Awaitable[bytes | None]]

# QUIC application error codes (RFC 9000 20.2 leaves them to the application).
_ERR_REFUSED = 0x101
_ERR_PROTOCOL = 0x102
_ERR_AUTH = 0x103
_STREAM_CANCELLED = 0x110
_STREAM_TOO_LARGE = 0x111
#: What the peer's reset of a stream means (StreamWriter.abort's reasons).
_RESET_MESSAGES = {
    ResetReason.RESET: "reset the stream (the connection behind it was reset)",
    ResetReason.UNREACHABLE: "reset the stream: the service could not reach its target",
}
#: How often the session re-evaluates its paths (a silent direct path hands over to the relay).
PATH_TICK = 1.0
#: Until the peer is authenticated it may send this much stream data in all (gaps included)
#: and open no stream but its control stream; the window grows to the session's afterwards.
PREAUTH_MAX_DATA = 16 * 1024
#: Streams each way an authenticated peer may have open at once.
MAX_STREAMS = 128


@dataclass(frozen=True)
class SessionConfig:
    """Tunables of a session. Timeouts in seconds."""

    idle_timeout: float = 30.0
    keepalive_interval: float = 10.0
    connect_timeout: float = 10.0
    max_message_size: int = 64 * 1024 * 1024
    #: Datagram size on a path that has not proved it carries more (see peerpath.session.pmtu).
    max_datagram_size: int = BASE_DATAGRAM
    max_data: int = 32 * 1024 * 1024
    max_stream_data: int = 8 * 1024 * 1024
    #: Reply with nothing to a request from a peer whose handler is slower than this.
    handler_timeout: float = 300.0
    #: A direct path set aside for being clearly worse than the relay stays aside this long
    #: at least (see :class:`~peerpath.session.pathset.PathSet`).
    path_hold_down: float = HOLD_DOWN


class Services(Protocol):
    """What the local node offers a session: trust decisions and handlers."""

    def is_trusted(self, address: Address) -> bool:
        """Whether a session with ``address`` is allowed."""
        ...

    def stream_handler(self, port: int, peer: Address) -> StreamHandler | str:
        """The handler serving ``port`` for ``peer``, or why a stream there is refused."""
        ...

    def message_handler(self) -> MessageHandler | None:
        """The handler for incoming messages, or None."""
        ...

    async def internal_message(self, connection: Connection, topic: str, data: bytes) -> bytes | None:
        """Handle one of peerpath's own messages (path upgrades); the reply, for requests."""
        ...


class Role(enum.Enum):
    """Who opened the session."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


class _CreditedReader(asyncio.StreamReader):
    """A stream's reader that knows how much the application has consumed, and says when
    it has drained after filling up (so the session sends new credit at once)."""

    def __init__(self, window: int, on_room: Callable[[], None]) -> None:
        # Paused (for our purpose: noted) above a quarter window, resumed at an eighth.
        super().__init__(limit=max(1, window // 8))
        self.fed = 0
        self.set_transport(_RoomSignal(on_room))  # type: ignore[arg-type]

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        chunk = bytes(data)
        self.fed += len(chunk)
        super().feed_data(chunk)

    @property
    def consumed(self) -> int:
        """Bytes the application has read (those fed, less those still buffered)."""
        buffered: bytearray = getattr(self, "_buffer", bytearray())
        return self.fed - len(buffered)


class _RoomSignal:
    """What asyncio's StreamReader pauses and resumes: here, resuming asks for a transmit."""

    def __init__(self, on_room: Callable[[], None]) -> None:
        self._on_room = on_room

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        self._on_room()


class Connection:
    """A mutually authenticated, end-to-end encrypted session with one peer.

    Obtain one from :meth:`peerpath.Node.connect` (or a node's accepted sessions); use
    :meth:`open_stream`, :meth:`request` and :meth:`send`; :meth:`close` it when done.
    """

    def __init__(
        self,
        identity: Identity,
        role: Role,
        paths: PathSet,
        services: Services,
        config: SessionConfig,
        *,
        expected_peer: Address | None = None,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
        on_connection_id: Callable[[Connection, bytes, bool], None] | None = None,
        on_closed: Callable[[Connection], None] | None = None,
        on_event: Callable[[Connection, str, dict[str, Any]], None] | None = None,
        clock: Clock = monotonic,
    ) -> None:
        if role is Role.INITIATOR and expected_peer is None:
            raise ValueError("an initiator must know which address it dials")
        self.identity = identity
        self.role = role
        self.paths = paths
        paths.on_change = self._path_changed
        paths.hold_down = config.path_hold_down
        self.config = config
        self.peer: Address | None = expected_peer if role is Role.INITIATOR else None
        self._services = services
        self._on_connection_id = on_connection_id
        self._on_closed = on_closed
        #: Told ``session-up``, ``path-changed`` and ``session-down``, with details.
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        #: The session's clock (its node's).
        self.clock = clock
        initiator = role is Role.INITIATOR
        #: The QUIC connection (through the engine adapter, :mod:`peerpath.quic`).
        self.quic = QuicEngine(
            is_client=initiator,
            alpn=control.ALPN,
            idle_timeout=config.idle_timeout,
            max_datagram_size=config.max_datagram_size,
            max_stream_data=config.max_stream_data,
            certificate=None if initiator else session_certificate(identity),
            private_key=None if initiator else identity.private_key,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
        )
        self.quic.hold_windows(PREAUTH_MAX_DATA)
        self._auth: InitiatorAuth | ResponderAuth
        if expected_peer is not None and initiator:
            self._auth = InitiatorAuth(identity, expected_peer)
        else:
            self._auth = ResponderAuth(identity, services.is_trusted)
        self._mux = Mux(initiator=initiator, max_message_size=config.max_message_size)
        #: Who waits for an answer on a stream of ours (open_stream, request, ping).
        self._answers: dict[int, asyncio.Future[Any]] = {}
        #: The readers of byte streams the peer has not finished.
        self._readers: dict[int, _CreditedReader] = {}
        self.established: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.close_reason = ""
        #: Why the session is on the relay and will stay there, when that is known.
        self.relay_reason: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        #: A responder whose peer has not proved itself by then closes (it holds a slot); an
        #: initiator gives up when its caller's connect timeout says so.
        self._deadline: asyncio.TimerHandle | None = None
        if role is Role.RESPONDER:
            self._deadline = self._loop.call_later(config.connect_timeout, self._too_slow)
        self._keepalive: asyncio.TimerHandle | None = None
        self._path_timer: asyncio.TimerHandle | None = None
        self._transmit_soon = False
        #: Stream data was queued since the last transmit (what came in is acknowledged with it).
        self._sending = False
        #: The datagram size QUIC builds to: the current path's.
        self._datagram_size = config.max_datagram_size
        self._control_out: int | None = None
        self._control_in: int | None = None
        self._control_reader = control.FrameReader()
        #: Stream events that overtook the responder's Welcome (initiator only), and their size.
        self._early: list[quic.StreamData | quic.StreamReset] = []
        self._early_bytes = 0
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # -- public API -----------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The path datagrams take now."""
        return self.paths.current

    @property
    def rtt(self) -> float | None:
        """QUIC's smoothed round-trip time in seconds, once measured."""
        return self.quic.rtt

    @property
    def is_established(self) -> bool:
        """True once both sides are authenticated and the session is open."""
        return self.established.done() and not self.established.exception() and not self.closed.done()

    async def wait_established(self, timeout: float | None = None) -> None:
        """Wait for the handshake and the initiator's proof; raise what went wrong."""
        try:
            await asyncio.wait_for(asyncio.shield(self.established), timeout or self.config.connect_timeout)
        except TimeoutError:
            self._abort(_ERR_PROTOCOL, "connect timed out")
            raise errors.ConnectTimeoutError(
                f"no session with {self.peer} within {timeout or self.config.connect_timeout:g} s"
            ) from None

    async def open_stream(self, port: int, timeout: float = 10.0) -> tuple[asyncio.StreamReader, StreamWriter]:
        """Open a byte stream to the peer's service on ``port``."""
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range 0-65535")
        self._check_open()
        stream_id, answer = self._new_local_stream(Kind.AWAIT_ACCEPT)
        self._send_stream(stream_id, control.encode(control.OpenStream(port)))
        try:
            async with asyncio.timeout(timeout):  # no task of its own: one loop turn less
                accept, reader = await answer
        except TimeoutError:
            self._cancel_stream(stream_id)
            raise errors.RequestTimeoutError(
                f"{self.peer} did not answer on port {port} within {timeout:g} s"
            ) from None
        if reader is None:
            raise errors.ServiceNotFoundError(f"{self.peer}: {accept.error}")
        return reader, StreamWriter(self, stream_id)

    async def request(self, data: bytes, timeout: float = 30.0, *, _topic: str = "") -> bytes:
        """Send a message and wait for the peer's reply."""
        self._check_message(data)
        stream_id, answer = self._new_local_stream(Kind.AWAIT_REPLY)
        header = control.encode(control.Message(request=True, topic=_topic))
        self._send_stream(stream_id, header + data, end_stream=True)
        try:
            async with asyncio.timeout(timeout):
                reply, payload = await answer
        except TimeoutError:
            self._cancel_stream(stream_id)
            raise errors.RequestTimeoutError(f"no reply from {self.peer} within {timeout:g} s") from None
        if not reply.ok:
            raise errors.MessageError(f"{self.peer} could not handle the request: {reply.error}")
        return bytes(payload)

    async def ping(self, timeout: float = 5.0) -> float:
        """One round trip through the session, answered by the peer's session layer; seconds."""
        self._check_open()
        stream_id, answer = self._new_local_stream(Kind.AWAIT_REPLY)
        start = self.clock()
        self._send_stream(stream_id, control.encode(control.Ping()), end_stream=True)
        try:
            async with asyncio.timeout(timeout):
                await answer
        except TimeoutError:
            self._cancel_stream(stream_id)
            raise errors.RequestTimeoutError(f"no pong from {self.peer} within {timeout:g} s") from None
        return self.clock() - start

    async def send(self, data: bytes, *, _topic: str = "") -> None:
        """Send a one-way message (delivered reliably; no reply)."""
        self._check_message(data)
        stream_id = self.quic.new_stream()
        header = control.encode(control.Message(request=False, topic=_topic))
        self._send_stream(stream_id, header + data, end_stream=True)
        await self._drain(stream_id, self.config.max_stream_data)

    async def close(self, reason: str = "closed", timeout: float = 2.0) -> None:
        """Close the session cleanly and wait (briefly) for it to end."""
        if not self.closed.done():
            self.quic.close(0, reason)
            self.transmit()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), timeout)
            self._terminated(reason)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        """A snapshot for status displays: peer, path, RTT and counters."""
        path = self.path
        return {
            "peer": str(self.peer) if self.peer else None,
            "role": self.role.value,
            "established": self.is_established,
            "path": path.describe() if path else None,
            "rtt_ms": round(self.rtt * 1000, 2) if self.rtt is not None else None,
            "bytes_sent": sum(p.bytes_sent for p in self.paths.paths.values()),
            "bytes_received": sum(p.bytes_received for p in self.paths.paths.values()),
            "relay_reason": self.relay_reason,
            "paths": [p.quality(self.clock()) for p in self.paths.paths.values()],
        }

    # -- driving QUIC ---------------------------------------------------------------

    def start(self) -> None:
        """Start the handshake (initiator) or wait for it (responder)."""
        if self.role is Role.INITIATOR:
            self.quic.connect(self.clock())
        self.transmit()

    def datagram_received(self, data: bytes, path: Path, *, known: bool = True) -> None:
        """A datagram for this session arrived over ``path``.

        A path that is not ``known`` (not validated by a check, or the one the session
        started on) carries the datagram to QUIC but is not adopted: see docs/security.md.
        """
        if self.closed.done():
            return
        now = self.clock()
        if self.quic.receive(data, now) and known:
            self.paths.received(path, len(data), now)
        self._process_events()
        # Coalesced: a burst of datagrams read in one wakeup is answered by one transmit.
        self._schedule_transmit()

    def transmit(self) -> None:
        """Send what QUIC wants sent and re-arm its timer."""
        self._transmit_soon = False
        now = self.clock()
        path = self.paths.current
        size = self.config.max_datagram_size
        if path is not None and path.max_datagram > BASE_DATAGRAM:
            size = path.max_datagram  # a path that proved it carries more
        if size != self._datagram_size:  # another path, or a path MTU probe got through
            self._datagram_size = size
            self.quic.set_max_datagram_size(size)
        sending, self._sending = self._sending, False
        for datagram in self.quic.datagrams(now, ack=sending):
            self.paths.send(datagram)
        deadline = self.quic.timer()
        if deadline != self._timer_deadline or self._timer is None:  # most transmits keep the timer
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_deadline = deadline
            if deadline is not None and not self.closed.done():
                # QUIC's clock is high-resolution; the loop's may tick in milliseconds (uvloop).
                self._timer = self._loop.call_later(max(0.0, deadline - now), self._on_timer)
        self._wake_drains()

    def _schedule_transmit(self) -> None:
        if not self._transmit_soon:
            self._transmit_soon = True
            self._loop.call_soon(self.transmit)

    def _on_timer(self) -> None:
        self._timer = self._timer_deadline = None
        self.quic.handle_timer(self.clock())
        self._process_events()
        self.transmit()

    def _path_changed(self, old: Path | None, new: Path) -> None:
        if old is not None:
            why = f" ({old.describe()} {old.degraded})" if old.degraded else ""
            log.info("path to %s: %s -> %s%s", self.peer, old.describe(), new.describe(), why)
            if self.peer is not None:
                self._tell("path-changed", old=old.describe(), new=new.describe(), reason=old.degraded or "better")
        # Datagrams queued for the old path are resent by QUIC's loss recovery; poke it so
        # the first of them goes out on the new path now rather than at the next timer.
        self._schedule_transmit()

    def _on_path_tick(self) -> None:
        self._path_timer = None
        if self.closed.done():
            return
        self.paths.tick(self.clock())
        self._path_timer = self._loop.call_later(PATH_TICK, self._on_path_tick)

    def _on_keepalive(self) -> None:
        self._keepalive = None
        if self.closed.done():
            return
        self.quic.ping()
        self.transmit()
        self._keepalive = self._loop.call_later(self.config.keepalive_interval, self._on_keepalive)

    def _process_events(self) -> None:
        for event in self.quic.events():
            try:
                self._handle_event(event)
            except control.ControlError as exc:
                self._abort(_ERR_PROTOCOL, f"protocol error: {exc}")

    def _handle_event(self, event: quic.Event) -> None:
        if isinstance(event, quic.StreamData | quic.StreamReset):
            if event.stream_id & 0x2:  # unidirectional: only the peer's control stream exists
                self._on_control(event)
            elif self.is_established:
                self._on_stream_event(event)
            elif not self.established.done():
                # Held until the session is established (on the initiator: streams of the
                # responder that overtook its Welcome); never delivered if it fails.
                self._early.append(event)
                # Only an initiator gets here (a responder allows no stream before the proof),
                # from a responder its TLS certificate proved: bounded by the session's window.
                self._early_bytes += len(getattr(event, "data", b"")) + 64
                if self._early_bytes > self.config.max_data:
                    self._abort(_ERR_PROTOCOL, "too much data before authentication")
        elif isinstance(event, quic.ConnectionIdChange):
            if self._on_connection_id is not None:
                self._on_connection_id(self, event.cid, event.issued)
        elif isinstance(event, quic.HandshakeDone):
            self._on_handshake(event)
        elif isinstance(event, quic.Terminated):
            reason = event.reason or f"error {event.code:#x}"
            if event.code in (_ERR_REFUSED, _ERR_AUTH) and not self.established.done():
                self._fail_establish(errors.PeerRefusedError(f"{self.peer} refused the session: {reason}"))
            self._terminated(f"closed by peer: {reason}" if event.code in (0, _ERR_REFUSED) else reason)

    # -- authentication (the proof itself is peerpath.session.auth) ------------------

    def _on_handshake(self, event: quic.HandshakeDone) -> None:
        if event.alpn != control.ALPN:
            self._abort(_ERR_PROTOCOL, f"peer speaks {event.alpn!r}, not {control.ALPN}")
            return
        self._control_out = self.quic.new_stream(unidirectional=True)
        try:
            if isinstance(self._auth, InitiatorAuth):
                hello = self._auth.handshake_done(self.quic.peer_certificate())
                self._open_windows()  # the responder is who we dialled: streams may come with its Welcome
                self._send_control(hello)
            else:
                self._send_control(self._auth.handshake_done())
        except Refused as exc:
            self._refused(exc)

    def _send_control(self, frame: control.Frame) -> None:
        if self._control_out is None:
            raise RuntimeError("control stream used before the handshake completed")
        self._send_stream(self._control_out, control.encode(frame))

    def _on_control(self, event: quic.StreamData | quic.StreamReset) -> None:
        if isinstance(event, quic.StreamReset):
            self._abort(_ERR_PROTOCOL, "control stream reset")
            return
        if self._control_in is None:
            self._control_in = event.stream_id
        elif event.stream_id != self._control_in:
            raise control.ControlError("a second unidirectional stream (only the control stream is one)")
        for frame in self._control_reader.feed(event.data):
            if self.closed.done():
                return
            try:
                step = self._auth.on_frame(frame)
            except Refused as exc:
                self._refused(exc)
                return
            if isinstance(self._auth, ResponderAuth) and step.done:
                self.peer = self._auth.peer
                self._open_windows()
            if step.reply is not None:
                self._send_control(step.reply)
            if step.done:
                self._established()

    def _refused(self, exc: Refused) -> None:
        if exc.authentication:
            if isinstance(self._auth, InitiatorAuth):
                self._fail_establish(errors.PeerAuthenticationError(str(exc)))
            self._abort(_ERR_AUTH, "wrong identity" if isinstance(self._auth, InitiatorAuth) else str(exc))
        else:
            log.info("refused session: %s", exc)
            # The reason travels in CONNECTION_CLOSE (RFC 9000 19.19); stream data queued now would be lost.
            self._abort(_ERR_REFUSED, str(exc))

    def _open_windows(self) -> None:
        self.quic.open_windows(self.config.max_data, MAX_STREAMS)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.established.done():
            self._abort(_ERR_PROTOCOL, f"not authenticated within {self.config.connect_timeout:g} s")

    def _established(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if not self.established.done():
            self.established.set_result(None)
            log.debug("session with %s established over %s", self.peer, self.path and self.path.describe())
            if self.config.keepalive_interval > 0:
                self._keepalive = self._loop.call_later(self.config.keepalive_interval, self._on_keepalive)
            self._path_timer = self._loop.call_later(PATH_TICK, self._on_path_tick)
            early, self._early = self._early, []
            for event in early:
                self._on_stream_event(event)
            self._tell("session-up", path=self.path.describe() if self.path else None)

    def _fail_establish(self, exc: BaseException) -> None:
        if not self.established.done():
            self.established.set_exception(exc)
            self.established.exception()  # mark retrieved: the caller may have given up already

    # -- streams (what they carry is peerpath.session.mux) ---------------------------

    def _check_open(self) -> None:
        if self.closed.done():
            raise errors.SessionClosedError(f"session with {self.peer} is closed: {self.close_reason}")
        if not self.is_established:
            raise errors.SessionClosedError(f"session with {self.peer} is not established")

    def _check_message(self, data: bytes) -> None:
        self._check_open()
        if len(data) > self.config.max_message_size:
            raise ValueError(f"message of {len(data)} bytes exceeds max_message_size {self.config.max_message_size}")

    def _new_local_stream(self, kind: Kind) -> tuple[int, asyncio.Future[Any]]:
        stream_id = self.quic.new_stream()
        answer: asyncio.Future[Any] = self._loop.create_future()
        self._mux.expect(stream_id, kind)
        self._answers[stream_id] = answer
        return stream_id, answer

    def _send_stream(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if self.closed.done():
            raise errors.SessionClosedError(f"session with {self.peer} is closed: {self.close_reason}")
        try:
            self.quic.send(stream_id, data, end_stream)
        except quic.StreamFinished as exc:
            raise errors.StreamResetError(f"{self.peer} reset the stream") from exc
        self._sending = True
        self._schedule_transmit()

    def _cancel_stream(self, stream_id: int) -> None:
        self._mux.forget(stream_id)
        self._answers.pop(stream_id, None)
        self.quic.reset(stream_id, _STREAM_CANCELLED)
        self.quic.stop(stream_id, _STREAM_CANCELLED)
        self._schedule_transmit()

    def _new_reader(self, stream_id: int) -> _CreditedReader:
        """A byte stream's reader, whose consumption gives the peer its credit."""
        reader = _CreditedReader(self.config.max_stream_data, self._schedule_transmit)
        self._readers[stream_id] = reader
        self.quic.follow_reads(stream_id, lambda: reader.consumed)
        return reader

    def _drop_reader(self, stream_id: int) -> _CreditedReader | None:
        self.quic.forget_reads(stream_id)
        return self._readers.pop(stream_id, None)

    def _abort_stream(self, stream_id: int, reason: ResetReason = ResetReason.RESET) -> None:
        """Reset a stream both ways (the peer's reader fails with StreamResetError). A stream
        the peer opened stays known, as discarded, until the peer's reset or end arrives:
        what it sent meanwhile is dropped, never taken for a new stream's header."""
        self._drop_reader(stream_id)
        self._mux.refuse(stream_id)
        if self.closed.done():
            return
        self.quic.reset(stream_id, reason)
        self.quic.stop(stream_id, reason)
        self._schedule_transmit()

    async def _drain(self, stream_id: int, high_water: int) -> None:
        while self.quic.unacked(stream_id) > high_water:
            if self.closed.done():
                raise errors.SessionClosedError(f"session with {self.peer} is closed: {self.close_reason}")
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _wake_drains(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_stream_event(self, event: quic.StreamData | quic.StreamReset) -> None:
        if isinstance(event, quic.StreamReset):
            self._stream_reset(event.stream_id, event.code)
            return
        for out in self._mux.on_data(event.stream_id, event.data, event.end):
            if isinstance(out, mux.Bytes):
                reader = self._readers.get(out.stream_id)
                if reader is not None:
                    if out.data:
                        reader.feed_data(out.data)
                    if out.end:
                        reader.feed_eof()
                        self._drop_reader(out.stream_id)  # nothing more can come
            elif isinstance(out, mux.OpenRequested):
                self._on_open_requested(out.stream_id, out.port)
            elif isinstance(out, mux.Answered):
                reader = self._new_reader(out.stream_id) if out.accept.ok else None
                self._answer(out.stream_id, (out.accept, reader))
            elif isinstance(out, mux.ReplyIn):
                self._answer(out.stream_id, (out.reply, out.payload))
            elif isinstance(out, mux.MessageIn):
                self._spawn(self._run_message_handler(out))
            elif isinstance(out, mux.PingIn):
                self._send_stream(out.stream_id, control.encode(control.Reply(True)), end_stream=True)
            elif isinstance(out, mux.TooLarge):
                self._stream_too_large(out.stream_id, out.local)

    def _on_open_requested(self, stream_id: int, port: int) -> None:
        handler = self._services.stream_handler(port, self.peer) if self.peer else "not authenticated"
        if isinstance(handler, str):
            self._mux.refuse(stream_id)
            self._send_stream(stream_id, control.encode(control.Accept(False, handler)), end_stream=True)
            return
        reader = self._new_reader(stream_id)
        self._send_stream(stream_id, control.encode(control.Accept(True)))
        self._spawn(self._run_stream_handler(handler, reader, StreamWriter(self, stream_id)))

    def _answer(self, stream_id: int, result: Any) -> None:
        answer = self._answers.pop(stream_id, None)
        if answer is not None and not answer.done():
            answer.set_result(result)

    def _fail(self, stream_id: int, exc: Exception) -> None:
        answer = self._answers.pop(stream_id, None)
        if answer is not None and not answer.done():
            answer.set_exception(exc)
        reader = self._drop_reader(stream_id)
        if reader is not None:
            reader.set_exception(exc)

    def _stream_too_large(self, stream_id: int, local: bool) -> None:
        # The mux keeps the stream known (as discarded) so data still in flight is dropped, not parsed.
        self.quic.stop(stream_id, _STREAM_TOO_LARGE)
        if not local:
            self.quic.reset(stream_id, _STREAM_TOO_LARGE)
        self._fail(stream_id, errors.MessageError(f"reply from {self.peer} exceeds max_message_size"))
        self._schedule_transmit()

    def _stream_reset(self, stream_id: int, code: int) -> None:
        self._mux.on_reset(stream_id)
        exc: errors.PeerpathError = errors.SessionClosedError(f"{self.peer} reset the stream (code {code:#x})")
        if code == _STREAM_TOO_LARGE:
            exc = errors.MessageError(f"{self.peer} refused the message: larger than its max_message_size")
        elif code in _RESET_MESSAGES:
            exc = errors.StreamResetError(f"{self.peer} {_RESET_MESSAGES[ResetReason(code)]}")
        self._fail(stream_id, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(coro, f"a task of the session with {self.peer}", self._tasks)

    async def _run_stream_handler(
        self, handler: StreamHandler, reader: asyncio.StreamReader, writer: StreamWriter
    ) -> None:
        try:
            await handler(reader, writer)
        except errors.SessionClosedError:
            pass
        except Exception:
            log.exception("stream handler failed (peer %s)", self.peer)
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _run_message_handler(self, message: mux.MessageIn) -> None:
        handler = self._services.message_handler()
        if message.topic:
            topic = message.topic

            async def internal(connection: Connection, data: bytes) -> bytes | None:
                return await self._services.internal_message(connection, topic, data)

            handler = internal
        reply: control.Reply
        response = b""
        if handler is None:
            reply = control.Reply(False, "this node takes no messages")
        else:
            try:
                async with asyncio.timeout(self.config.handler_timeout):  # the handler runs in this task
                    result = await handler(self, message.payload)
                reply, response = control.Reply(True), result or b""
            except Exception as exc:
                log.exception("message handler failed (peer %s)", self.peer)
                reply = control.Reply(False, f"handler error: {type(exc).__name__}")
        if message.request and not self.closed.done():
            with contextlib.suppress(errors.SessionClosedError):
                self._send_stream(message.stream_id, control.encode(reply) + response, end_stream=True)

    # -- ending ---------------------------------------------------------------------

    def _abort(self, code: int, reason: str) -> None:
        if not self.closed.done():
            self.close_reason = reason
            self.quic.close(code, reason)
            self._fail_establish(
                errors.PeerAuthenticationError(reason) if code == _ERR_AUTH else errors.SessionClosedError(reason)
            )
            self._schedule_transmit()

    def _terminated(self, reason: str) -> None:
        if self.closed.done():
            return
        self.close_reason = self.close_reason or reason
        for handle in (self._timer, self._keepalive, self._path_timer, self._deadline):
            if handle is not None:
                handle.cancel()
        self._timer = self._keepalive = self._path_timer = self._deadline = None
        exc = errors.SessionClosedError(f"session with {self.peer} closed: {self.close_reason}")
        self._fail_establish(exc)
        answers, self._answers = self._answers, {}
        for answer in answers.values():
            if not answer.done():
                answer.set_exception(exc)
        readers, self._readers = self._readers, {}
        for reader in readers.values():
            if not reader.at_eof():
                reader.set_exception(exc)
        self._mux.clear()
        self._wake_drains()
        self.closed.set_result(None)
        if self._on_closed is not None:
            self._on_closed(self)
        if self.established.done() and not self.established.exception():
            self._tell("session-down", reason=self.close_reason)

    def _tell(self, kind: str, **details: Any) -> None:
        if self._on_event is not None:
            self._on_event(self, kind, details)
