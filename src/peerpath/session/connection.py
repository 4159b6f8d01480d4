"""One secure session with one peer: QUIC (aioquic) over a path set, plus peerpath's own
initiator proof, service streams and messages.

Authentication (see docs/security.md): the responder is authenticated by TLS 1.3 with a
certificate whose key is its identity key, checked against the dialled address; the
initiator proves its identity in-band, first thing on the encrypted connection, by
signing the responder's fresh nonce together with both addresses. Nothing but that proof
is accepted from an initiator before it succeeds.

The QUIC core is sans-I/O; this class drives it with its node's clock and the event loop's timers
and hands its datagrams to the :class:`PathSet`, which owns no QUIC state either.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, SupportsIndex

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicFrameType

from peerpath import errors
from peerpath.certs import certificate_address, self_signed_certificate
from peerpath.clock import Clock, monotonic
from peerpath.identity import Address, Identity, verify
from peerpath.session import control
from peerpath.session.pathset import HOLD_DOWN, VIRTUAL_PEER, Path, PathSet
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


@dataclass(frozen=True)
class SessionConfig:
    """Tunables of a session. Timeouts in seconds."""

    idle_timeout: float = 30.0
    keepalive_interval: float = 10.0
    connect_timeout: float = 10.0
    max_message_size: int = 64 * 1024 * 1024
    max_datagram_size: int = 1350
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


class _Quic(QuicConnection):
    """aioquic's connection, counting packets that decrypted (so only they validate a path),
    with the connection's receive window and stream counts held at their pre-authentication
    size until :meth:`open_windows`.

    aioquic doubles the window whenever the peer has used half of it, consumed or not, and
    keeps a stream's gap below its highest offset in memory: left alone, an unauthenticated
    peer could grow a session to gigabytes with a few bytes at ever higher offsets. Every
    such byte counts against the connection window, so holding that one bounds them all.
    """

    authentic_packets = 0
    windows_open = False
    #: Streams whose receive credit follows what the application has read: stream id ->
    #: the bytes it has consumed so far (a byte stream's reader); and the credit it gets
    #: beyond that. Other streams (messages) keep aioquic's credit, bounded by the message size.
    consumed: dict[int, Callable[[], int]]
    stream_window = 8 * 1024 * 1024

    def hold_windows(self) -> None:
        """Before the handshake: no stream but one unidirectional (control) stream."""
        for limit, value in ((self._local_max_streams_bidi, 0), (self._local_max_streams_uni, 1)):
            limit.value = limit.sent = value

    def open_windows(self, max_data: int, max_streams: int = 128) -> None:
        """The peer is authenticated: grow to the session's window (sent with the next packet)."""
        self.windows_open = True
        self._local_max_data.value = max(self._local_max_data.value, max_data)
        self._local_max_streams_bidi.value = max(self._local_max_streams_bidi.value, max_streams)
        self._local_max_streams_uni.value = max(self._local_max_streams_uni.value, max_streams)

    def _payload_received(self, *args: Any, **kwargs: Any) -> Any:
        self.authentic_packets += 1
        return super()._payload_received(*args, **kwargs)

    def _write_connection_limits(self, *args: Any, **kwargs: Any) -> None:
        if self.windows_open:
            super()._write_connection_limits(*args, **kwargs)

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        """A byte stream's credit is what its reader consumed plus :attr:`stream_window`,
        raised in steps of a quarter window: a peer that does not read holds the sender at
        the window, and its memory with it (aioquic doubles the credit as data arrives)."""
        consumed = self.consumed.get(stream.stream_id)
        if consumed is None or not stream.max_stream_data_local:
            super()._write_stream_limits(builder, space, stream)
            return
        credit = consumed() + self.stream_window
        if credit - stream.max_stream_data_local >= self.stream_window // 4:
            stream.max_stream_data_local = credit
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


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


@dataclass(eq=False)
class _Stream:
    stream_id: int
    local: bool
    header: control.FrameReader | None = field(default_factory=control.FrameReader)
    reader: asyncio.StreamReader | None = None
    payload: bytearray | None = None
    answer: asyncio.Future[Any] | None = None
    reply: control.Reply | None = None
    topic: str = ""
    kind: str = "pending"  # "open" | "request" | "oneway" on the remote side; "await-accept"/"await-reply" locally


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
        quic_config = QuicConfiguration(
            is_client=role is Role.INITIATOR,
            alpn_protocols=[control.ALPN],
            idle_timeout=config.idle_timeout,
            max_datagram_size=config.max_datagram_size,
            max_data=PREAUTH_MAX_DATA,
            max_stream_data=config.max_stream_data,
            verify_mode=ssl.CERT_NONE,  # the certificate is checked against the address below
        )
        if role is Role.RESPONDER:
            quic_config.certificate = self_signed_certificate(identity)
            quic_config.private_key = identity.private_key
        self.quic = _Quic(
            configuration=quic_config,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
        )
        self.quic.hold_windows()
        self.quic.consumed = {}
        self.quic.stream_window = config.max_stream_data
        self.established: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.close_reason = ""
        #: Why the session is on the relay and will stay there, when that is known.
        self.relay_reason: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: A responder whose peer has not proved itself by then closes (it holds a slot); an
        #: initiator gives up when its caller's connect timeout says so.
        self._deadline: asyncio.TimerHandle | None = None
        if role is Role.RESPONDER:
            self._deadline = self._loop.call_later(config.connect_timeout, self._too_slow)
        self._keepalive: asyncio.TimerHandle | None = None
        self._path_timer: asyncio.TimerHandle | None = None
        self._transmit_soon = False
        self._streams: dict[int, _Stream] = {}
        self._control_out: int | None = None
        self._control_in: int | None = None
        self._control_reader = control.FrameReader()
        self._nonce: bytes | None = None
        self._claimed_key: bytes | None = None
        self._early: list[events.StreamDataReceived | events.StreamReset] = []
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
        loss = getattr(self.quic, "_loss", None)
        rtt = getattr(loss, "_rtt_smoothed", 0.0)
        return float(rtt) if rtt else None

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
        stream, answer = self._new_local_stream("await-accept")
        self._send_stream(stream.stream_id, control.encode(control.OpenStream(port)))
        try:
            accept: control.Accept = await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            self._cancel_stream(stream)
            raise errors.RequestTimeoutError(
                f"{self.peer} did not answer on port {port} within {timeout:g} s"
            ) from None
        if not accept.ok or stream.reader is None:
            raise errors.ServiceNotFoundError(f"{self.peer}: {accept.error}")
        return stream.reader, StreamWriter(self, stream.stream_id)

    async def request(self, data: bytes, timeout: float = 30.0, *, _topic: str = "") -> bytes:
        """Send a message and wait for the peer's reply."""
        self._check_message(data)
        stream, answer = self._new_local_stream("await-reply")
        header = control.encode(control.Message(request=True, topic=_topic))
        self._send_stream(stream.stream_id, header + data, end_stream=True)
        try:
            reply, payload = await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            self._cancel_stream(stream)
            raise errors.RequestTimeoutError(f"no reply from {self.peer} within {timeout:g} s") from None
        if not reply.ok:
            raise errors.MessageError(f"{self.peer} could not handle the request: {reply.error}")
        return bytes(payload)

    async def ping(self, timeout: float = 5.0) -> float:
        """One round trip through the session, answered by the peer's session layer; seconds."""
        self._check_open()
        stream, answer = self._new_local_stream("await-reply")
        start = self.clock()
        self._send_stream(stream.stream_id, control.encode(control.Ping()), end_stream=True)
        try:
            await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            self._cancel_stream(stream)
            raise errors.RequestTimeoutError(f"no pong from {self.peer} within {timeout:g} s") from None
        return self.clock() - start

    async def send(self, data: bytes, *, _topic: str = "") -> None:
        """Send a one-way message (delivered reliably; no reply)."""
        self._check_message(data)
        stream, _ = self._new_local_stream("oneway")
        header = control.encode(control.Message(request=False, topic=_topic))
        self._send_stream(stream.stream_id, header + data, end_stream=True)
        await self._drain(stream.stream_id, self.config.max_stream_data)

    async def close(self, reason: str = "closed", timeout: float = 2.0) -> None:
        """Close the session cleanly and wait (briefly) for it to end."""
        if not self.closed.done():
            self.quic.close(error_code=0, reason_phrase=reason)
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
            self.quic.connect(VIRTUAL_PEER, now=self.clock())
        self.transmit()

    def datagram_received(self, data: bytes, path: Path, *, known: bool = True) -> None:
        """A datagram for this session arrived over ``path``.

        A path that is not ``known`` (not validated by a check, or the one the session
        started on) carries the datagram to QUIC but is not adopted: see docs/security.md.
        """
        if self.closed.done():
            return
        now = self.clock()
        before = self.quic.authentic_packets
        self.quic.receive_datagram(data, VIRTUAL_PEER, now=now)
        if self.quic.authentic_packets > before and known:
            self.paths.received(path, len(data), now)
        self._process_events()
        # Coalesced: a burst of datagrams read in one wakeup is answered by one transmit.
        self._schedule_transmit()

    def transmit(self) -> None:
        """Send what QUIC wants sent and re-arm its timer."""
        self._transmit_soon = False
        now = self.clock()
        for datagram, _ in self.quic.datagrams_to_send(now=now):
            self.paths.send(datagram)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.quic.get_timer()
        if deadline is not None and not self.closed.done():
            # QUIC's clock is high-resolution; the loop's may tick in milliseconds (uvloop).
            self._timer = self._loop.call_later(max(0.0, deadline - now), self._on_timer)
        self._wake_drains()

    def _schedule_transmit(self) -> None:
        if not self._transmit_soon:
            self._transmit_soon = True
            self._loop.call_soon(self.transmit)

    def _on_timer(self) -> None:
        self._timer = None
        self.quic.handle_timer(now=self.clock())
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
        self.quic.send_ping(0)
        self.transmit()
        self._keepalive = self._loop.call_later(self.config.keepalive_interval, self._on_keepalive)

    def _process_events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            try:
                self._handle_event(event)
            except control.ControlError as exc:
                self._abort(_ERR_PROTOCOL, f"protocol error: {exc}")

    def _handle_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionIdIssued | events.ConnectionIdRetired):
            if self._on_connection_id is not None:
                self._on_connection_id(self, event.connection_id, isinstance(event, events.ConnectionIdIssued))
        elif isinstance(event, events.HandshakeCompleted):
            self._on_handshake(event)
        elif isinstance(event, events.ConnectionTerminated):
            reason = event.reason_phrase or f"error {event.error_code:#x}"
            if event.error_code in (_ERR_REFUSED, _ERR_AUTH) and not self.established.done():
                self._fail_establish(errors.PeerRefusedError(f"{self.peer} refused the session: {reason}"))
            self._terminated(f"closed by peer: {reason}" if event.error_code in (0, _ERR_REFUSED) else reason)
        elif isinstance(event, events.StreamDataReceived | events.StreamReset):
            if event.stream_id & 0x2:  # unidirectional: only the peer's control stream exists
                self._on_control(event)
            elif not self.established.done():
                # Held until the session is established (on the initiator: streams of the
                # responder that overtook its Welcome); never delivered if it fails.
                self._early.append(event)
                # Only an initiator gets here (a responder allows no stream before the proof),
                # from a responder its TLS certificate proved: bounded by the session's window.
                self._early_bytes += len(getattr(event, "data", b"")) + 64
                if self._early_bytes > self.config.max_data:
                    self._abort(_ERR_PROTOCOL, "too much data before authentication")
            elif self.is_established:
                self._on_stream_event(event)

    def _is_local(self, stream_id: int) -> bool:
        # RFC 9000 2.1: the low bit is 0 for client-initiated streams.
        return (stream_id & 0x1 == 0) == (self.role is Role.INITIATOR)

    # -- authentication -----------------------------------------------------------

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        if event.alpn_protocol != control.ALPN:
            self._abort(_ERR_PROTOCOL, f"peer speaks {event.alpn_protocol!r}, not {control.ALPN}")
            return
        self._control_out = self.quic.get_next_available_stream_id(is_unidirectional=True)
        if self.role is Role.INITIATOR:
            certificate = getattr(self.quic.tls, "_peer_certificate", None)
            proven = certificate_address(certificate) if certificate is not None else None
            if proven != self.peer:
                self._fail_establish(
                    errors.PeerAuthenticationError(
                        f"the peer at this endpoint is {proven or 'not a peerpath node'}, not {self.peer}"
                    )
                )
                self._abort(_ERR_AUTH, "wrong identity")
                return
            self._open_windows()  # the responder is who we dialled: streams may come with its Welcome
            hello = control.Hello(control.PROTOCOL_VERSION, self.identity.public_key)
            self._send_control(hello)
        else:
            self._nonce = os.urandom(32)
            self._send_control(control.Challenge(self._nonce))

    def _send_control(self, frame: control.Frame) -> None:
        if self._control_out is None:
            raise RuntimeError("control stream used before the handshake completed")
        self._send_stream(self._control_out, control.encode(frame))

    def _on_control(self, event: events.StreamDataReceived | events.StreamReset) -> None:
        if isinstance(event, events.StreamReset):
            self._abort(_ERR_PROTOCOL, "control stream reset")
            return
        if self._control_in is None:
            self._control_in = event.stream_id
        elif event.stream_id != self._control_in:
            raise control.ControlError("a second unidirectional stream (only the control stream is one)")
        for frame in self._control_reader.feed(event.data):
            self._on_control_frame(frame)

    def _on_control_frame(self, frame: control.Frame) -> None:
        if self.role is Role.RESPONDER:
            if isinstance(frame, control.Hello) and self._claimed_key is None:
                if frame.version != control.PROTOCOL_VERSION:
                    self._refuse(f"protocol version {frame.version} not supported")
                    return
                self._claimed_key = frame.public_key
            elif (
                isinstance(frame, control.Auth)
                and self._claimed_key is not None
                and self._nonce is not None
                and self.peer is None
            ):
                self._check_auth(frame, self._claimed_key, self._nonce)
            else:
                raise control.ControlError(f"unexpected {type(frame).__name__} from the initiator")
        elif isinstance(frame, control.Challenge) and self._nonce is None and self.peer is not None:
            self._nonce = frame.nonce
            payload = control.auth_payload(frame.nonce, self.identity.address, self.peer)
            self._send_control(control.Auth(self.identity.sign(payload)))
        elif isinstance(frame, control.Welcome) and self._nonce is not None:
            self._established()
        else:
            raise control.ControlError(f"unexpected {type(frame).__name__} from the responder")

    def _check_auth(self, frame: control.Auth, claimed_key: bytes, nonce: bytes) -> None:
        try:
            claimed = Address.from_public_key(claimed_key)
        except ValueError:
            self._refuse("authentication failed: malformed key", _ERR_AUTH)
            return
        payload = control.auth_payload(nonce, claimed, self.identity.address)
        if not verify(claimed_key, frame.signature, payload):
            self._refuse("authentication failed: bad signature", _ERR_AUTH)
            return
        if not self._services.is_trusted(claimed):
            log.info("refused session from untrusted %s", claimed)
            self._refuse(f"{self.identity.address} does not trust {claimed}")
            return
        self.peer = claimed
        self._open_windows()
        self._send_control(control.Welcome())
        self._established()

    def _open_windows(self) -> None:
        self.quic.open_windows(self.config.max_data)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.established.done():
            self._abort(_ERR_PROTOCOL, f"not authenticated within {self.config.connect_timeout:g} s")

    def _refuse(self, reason: str, code: int = _ERR_REFUSED) -> None:
        # The reason travels in CONNECTION_CLOSE (RFC 9000 19.19); stream data queued now would be lost.
        self._abort(code, reason)

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

    # -- streams ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed.done():
            raise errors.SessionClosedError(f"session with {self.peer} is closed: {self.close_reason}")
        if not self.is_established:
            raise errors.SessionClosedError(f"session with {self.peer} is not established")

    def _check_message(self, data: bytes) -> None:
        self._check_open()
        if len(data) > self.config.max_message_size:
            raise ValueError(f"message of {len(data)} bytes exceeds max_message_size {self.config.max_message_size}")

    def _new_local_stream(self, kind: str) -> tuple[_Stream, asyncio.Future[Any]]:
        stream_id = self.quic.get_next_available_stream_id()
        answer: asyncio.Future[Any] = self._loop.create_future()
        stream = _Stream(stream_id, local=True, kind=kind, answer=answer)
        if kind == "await-reply":
            stream.payload = bytearray()
        if kind != "oneway":
            self._streams[stream_id] = stream
        return stream, answer

    def _send_stream(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if self.closed.done():
            raise errors.SessionClosedError(f"session with {self.peer} is closed: {self.close_reason}")
        try:
            self.quic.send_stream_data(stream_id, data, end_stream=end_stream)
        except ValueError as exc:
            if "finished stream" not in str(exc):
                raise
            # aioquic: the sending side is over, the peer stopped it (or we reset it).
            raise errors.StreamResetError(f"{self.peer} reset the stream") from exc
        self._schedule_transmit()

    def _cancel_stream(self, stream: _Stream) -> None:
        self._streams.pop(stream.stream_id, None)
        with contextlib.suppress(Exception):
            self.quic.reset_stream(stream.stream_id, _STREAM_CANCELLED)
            self.quic.stop_stream(stream.stream_id, _STREAM_CANCELLED)
        self._schedule_transmit()

    def _new_reader(self, stream_id: int) -> _CreditedReader:
        """A byte stream's reader, whose consumption gives the peer its credit."""
        reader = _CreditedReader(self.config.max_stream_data, self._schedule_transmit)
        self.quic.consumed[stream_id] = lambda: reader.consumed
        return reader

    def _abort_stream(self, stream_id: int, reason: ResetReason = ResetReason.RESET) -> None:
        """Reset a stream both ways (the peer's reader fails with StreamResetError). A stream
        the peer opened stays known, as discarded, until the peer's reset or end arrives:
        what it sent meanwhile is dropped, never taken for a new stream's header."""
        self.quic.consumed.pop(stream_id, None)
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.local:
            stream.kind, stream.reader, stream.payload = "discard", None, None
        else:
            self._streams.pop(stream_id, None)
        if self.closed.done():
            return
        with contextlib.suppress(Exception):
            self.quic.reset_stream(stream_id, reason)
            self.quic.stop_stream(stream_id, reason)
        self._schedule_transmit()

    def _unacked(self, stream_id: int) -> int:
        quic_stream = self.quic._streams.get(stream_id)
        if quic_stream is None:
            return 0
        return len(quic_stream.sender._buffer)

    async def _drain(self, stream_id: int, high_water: int) -> None:
        while self._unacked(stream_id) > high_water:
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

    def _on_stream_event(self, event: events.StreamDataReceived | events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            if self._is_local(event.stream_id):
                return  # a stream of ours we forgot (cancelled): ignore what still arrives
            stream = _Stream(event.stream_id, local=False)
            self._streams[event.stream_id] = stream
        if isinstance(event, events.StreamReset):
            self._stream_reset(stream, event.error_code)
            return
        data, fin = event.data, event.end_stream
        if stream.header is not None:
            frame = stream.header.feed_header(data)
            if frame is None:
                if fin:
                    raise control.ControlError("stream ended before its header")
                return
            data = stream.header.take_rest()
            stream.header = None
            self._on_header(stream, frame)
        self._on_payload(stream, data, fin)

    def _on_header(self, stream: _Stream, frame: control.Frame) -> None:
        if stream.local:
            if stream.kind == "await-accept" and isinstance(frame, control.Accept):
                stream.kind = "open"
                stream.reader = self._new_reader(stream.stream_id)
                if stream.answer is not None and not stream.answer.done():
                    stream.answer.set_result(frame)
                return
            if stream.kind == "await-reply" and isinstance(frame, control.Reply):
                stream.reply = frame
                return
            raise control.ControlError(f"unexpected {type(frame).__name__} on stream {stream.stream_id}")
        if isinstance(frame, control.OpenStream):
            handler = self._services.stream_handler(frame.port, self.peer) if self.peer else "not authenticated"
            if isinstance(handler, str):
                self._send_stream(stream.stream_id, control.encode(control.Accept(False, handler)), end_stream=True)
                stream.kind = "refused"
                return
            stream.kind = "open"
            stream.reader = self._new_reader(stream.stream_id)
            self._send_stream(stream.stream_id, control.encode(control.Accept(True)))
            self._spawn(self._run_stream_handler(handler, stream.reader, StreamWriter(self, stream.stream_id)))
        elif isinstance(frame, control.Message):
            stream.kind = "request" if frame.request else "oneway"
            stream.topic = frame.topic
            stream.payload = bytearray()
        elif isinstance(frame, control.Ping):
            stream.kind = "refused"  # nothing more is read from it
            self._send_stream(stream.stream_id, control.encode(control.Reply(True)), end_stream=True)
        else:
            raise control.ControlError(f"unexpected {type(frame).__name__} opening stream {stream.stream_id}")

    def _on_payload(self, stream: _Stream, data: bytes, fin: bool) -> None:
        if stream.kind == "open" and stream.reader is not None:
            if data:
                stream.reader.feed_data(data)
            if fin:
                stream.reader.feed_eof()
                self.quic.consumed.pop(stream.stream_id, None)  # nothing more can come
            return
        if stream.payload is None:  # refused or discarded: drop what still arrives
            if fin:
                self._streams.pop(stream.stream_id, None)
            return
        stream.payload += data
        if len(stream.payload) > self.config.max_message_size:
            self._stream_too_large(stream)
            return
        if not fin:
            return
        if stream.local:  # the reply to our request is complete
            if stream.reply is None:
                raise control.ControlError("reply without a header")
            self._streams.pop(stream.stream_id, None)
            if stream.answer is not None and not stream.answer.done():
                stream.answer.set_result((stream.reply, stream.payload))
            return
        payload, stream.payload = bytes(stream.payload), None
        self._streams.pop(stream.stream_id, None)
        self._spawn(self._run_message_handler(stream, payload))

    def _stream_too_large(self, stream: _Stream) -> None:
        # Keep the stream known (as "discard") so data still in flight is dropped, not parsed.
        stream.payload = None
        stream.kind = "discard"
        with contextlib.suppress(Exception):
            self.quic.stop_stream(stream.stream_id, _STREAM_TOO_LARGE)
            if not stream.local:
                self.quic.reset_stream(stream.stream_id, _STREAM_TOO_LARGE)
        if stream.answer is not None and not stream.answer.done():
            stream.answer.set_exception(errors.MessageError(f"reply from {self.peer} exceeds max_message_size"))
        self._schedule_transmit()

    def _stream_reset(self, stream: _Stream, code: int) -> None:
        self._streams.pop(stream.stream_id, None)
        self.quic.consumed.pop(stream.stream_id, None)
        exc: errors.PeerpathError = errors.SessionClosedError(f"{self.peer} reset the stream (code {code:#x})")
        if code == _STREAM_TOO_LARGE:
            exc = errors.MessageError(f"{self.peer} refused the message: larger than its max_message_size")
        elif code in _RESET_MESSAGES:
            exc = errors.StreamResetError(f"{self.peer} {_RESET_MESSAGES[ResetReason(code)]}")
        if stream.answer is not None and not stream.answer.done():
            stream.answer.set_exception(exc)
        if stream.reader is not None:
            stream.reader.set_exception(exc)

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

    async def _run_message_handler(self, stream: _Stream, payload: bytes) -> None:
        handler = self._services.message_handler()
        if stream.topic:
            topic = stream.topic

            async def internal(connection: Connection, data: bytes) -> bytes | None:
                return await self._services.internal_message(connection, topic, data)

            handler = internal
        reply: control.Reply
        response = b""
        if handler is None:
            reply = control.Reply(False, "this node takes no messages")
        else:
            try:
                result = await asyncio.wait_for(handler(self, payload), self.config.handler_timeout)
                reply, response = control.Reply(True), result or b""
            except Exception as exc:
                log.exception("message handler failed (peer %s)", self.peer)
                reply = control.Reply(False, f"handler error: {type(exc).__name__}")
        if stream.kind == "request" and not self.closed.done():
            with contextlib.suppress(errors.SessionClosedError):
                self._send_stream(stream.stream_id, control.encode(reply) + response, end_stream=True)

    # -- ending ---------------------------------------------------------------------

    def _abort(self, code: int, reason: str) -> None:
        if not self.closed.done():
            self.close_reason = reason
            self.quic.close(error_code=code, reason_phrase=reason)
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
        for stream in self._streams.values():
            if stream.answer is not None and not stream.answer.done():
                stream.answer.set_exception(exc)
            if stream.reader is not None and not stream.reader.at_eof():
                stream.reader.set_exception(exc)
        self._streams.clear()
        self._wake_drains()
        self.closed.set_result(None)
        if self._on_closed is not None:
            self._on_closed(self)
        if self.established.done() and not self.established.exception():
            self._tell("session-down", reason=self.close_reason)

    def _tell(self, kind: str, **details: Any) -> None:
        if self._on_event is not None:
            self._on_event(self, kind, details)
