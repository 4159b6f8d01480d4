"""The one module that knows the QUIC library: aioquic, pinned in pyproject.toml.

Everything else speaks the small interface here: :class:`QuicEngine` (one connection,
sans-I/O: datagrams and a clock in, datagrams, a timer and :data:`Event` values out),
:func:`parse_header` and :func:`retry_packet` for routing and admission. Switching QUIC
engines means rewriting this module and nothing else; ``tests/unit/test_quic_engine.py``
fails if a behaviour the session relies on stops holding, such as "only a datagram that
decrypted counts as authentic" or "receive credit follows what the application read".

What peerpath needs beyond plain QUIC, and how aioquic is made to give it (the only
private attributes of aioquic used anywhere are used in this file):

- *Authentic datagrams.* :meth:`QuicEngine.receive` says whether the datagram carried a
  packet that decrypted; only such a datagram may validate a network path.
- *Windows held before authentication.* Until :meth:`QuicEngine.open_windows`, the
  connection's receive window stays at what :meth:`QuicEngine.hold_windows` set and the
  peer may open no bidirectional stream and one unidirectional stream. aioquic doubles the
  window whenever the peer has used half of it, consumed or not, and keeps a stream's gap
  below its highest offset in memory; every such byte counts against the connection window,
  so holding that one bounds them all.
- *Credit that follows reads.* A byte stream registered with :meth:`QuicEngine.follow_reads`
  gets as credit what its reader consumed plus one stream window (aioquic grants credit as
  data arrives), so a peer that does not read holds the sender at the window.
- *One key share.* The handshake offers and accepts X25519 alone: aioquic would make a key
  share for each of four groups (P-256, P-384, X25519, X448) and settle on P-256, which is
  most of a new connection's key exchange cost. Peers of any version offer X25519.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aioquic
from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic import events as _events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicFrameType, QuicPacketType, encode_quic_retry, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

#: Which engine this is, for status and benchmark output.
ENGINE = f"aioquic {aioquic.__version__}"
#: The length of the connection IDs the engine issues (aioquic's default).
CID_LENGTH = 8
#: Where every connection thinks its peer is: paths are peerpath's business (the PathSet), not
#: QUIC's, so QUIC sees one fixed peer address and never migrates on its own.
VIRTUAL_PEER = ("peerpath-peer", 0)


# -- packets --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """What routing and admission read off a QUIC packet before decrypting anything."""

    version: int | None
    initial: bool
    destination_cid: bytes
    source_cid: bytes
    token: bytes


def parse_header(data: bytes) -> PacketHeader | None:
    """The header of the QUIC packet ``data`` starts with, or None if it is not one."""
    if not data or not data[0] & 0x40:
        return None
    try:
        header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
    except ValueError:
        return None
    return PacketHeader(
        version=header.version,
        initial=header.packet_type == QuicPacketType.INITIAL,
        destination_cid=header.destination_cid,
        source_cid=header.source_cid,
        token=header.token,
    )


def retry_packet(
    *, version: int, source_cid: bytes, destination_cid: bytes, original_destination_cid: bytes, token: bytes
) -> bytes:
    """A Retry packet (RFC 9000 17.2.5) carrying ``token``."""
    return encode_quic_retry(
        version=version,
        source_cid=source_cid,
        destination_cid=destination_cid,
        original_destination_cid=original_destination_cid,
        retry_token=token,
    )


# -- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """TLS finished; ``alpn`` is the protocol both sides agreed on."""

    alpn: str | None


@dataclass(frozen=True, slots=True)
class StreamData:
    """In-order data of a stream (``end``: nothing follows)."""

    stream_id: int
    data: bytes
    end: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset a stream with an application error code."""

    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class ConnectionIdChange:
    """A connection ID of ours was issued (datagrams to it are this connection's) or retired."""

    cid: bytes
    issued: bool


@dataclass(frozen=True, slots=True)
class Terminated:
    """The connection is over: closed by either side, timed out, or failed."""

    code: int
    reason: str


Event = HandshakeDone | StreamData | StreamReset | ConnectionIdChange | Terminated


class StreamFinished(Exception):
    """Data sent on a stream whose sending side is over (the peer stopped it, or we reset it)."""


# -- the connection -------------------------------------------------------------------


class _Connection(QuicConnection):
    """aioquic's connection with the behaviours the module docstring lists."""

    authentic_packets = 0
    windows_open = False
    stream_window = 8 * 1024 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Streams whose credit follows reads: stream id -> bytes its reader consumed.
        self.consumed: dict[int, Callable[[], int]] = {}

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if tls.Group.X25519 in self.tls._supported_groups:  # (not in a FIPS build of OpenSSL)
            self.tls._supported_groups = [tls.Group.X25519]  # see "One key share" above

    def _payload_received(self, *args: Any, **kwargs: Any) -> Any:
        self.authentic_packets += 1
        return super()._payload_received(*args, **kwargs)

    def _write_connection_limits(self, *args: Any, **kwargs: Any) -> None:
        if self.windows_open:
            super()._write_connection_limits(*args, **kwargs)

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        consumed = self.consumed.get(stream.stream_id)
        if consumed is None or not stream.max_stream_data_local:
            super()._write_stream_limits(builder, space, stream)
            return
        # Raised in steps of a quarter window, so credit costs few frames.
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


class QuicEngine:
    """One QUIC connection, sans-I/O. A responder is given its certificate and key; an
    initiator accepts any certificate and checks :meth:`peer_certificate` itself."""

    def __init__(
        self,
        *,
        is_client: bool,
        alpn: str,
        idle_timeout: float,
        max_datagram_size: int,
        max_stream_data: int,
        certificate: x509.Certificate | None = None,
        private_key: Ed25519PrivateKey | None = None,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
    ) -> None:
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[alpn],
            idle_timeout=idle_timeout,
            max_datagram_size=max_datagram_size,
            max_stream_data=max_stream_data,
            verify_mode=ssl.CERT_NONE,  # the caller checks the certificate against the address
        )
        if certificate is not None:
            config.certificate = certificate
            config.private_key = private_key
        self._quic = _Connection(
            configuration=config,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
        )
        self._quic.stream_window = max_stream_data

    @property
    def host_cid(self) -> bytes:
        """The connection ID the peer addresses us by at first."""
        return self._quic.host_cid

    # -- windows --------------------------------------------------------------------

    def hold_windows(self, max_data: int) -> None:
        """Before the peer is authenticated: a receive window of ``max_data`` bytes, no
        bidirectional stream and one unidirectional (control) stream."""
        quic = self._quic
        quic._local_max_data.value = quic._local_max_data.sent = max_data
        for limit, value in ((quic._local_max_streams_bidi, 0), (quic._local_max_streams_uni, 1)):
            limit.value = limit.sent = value

    def open_windows(self, max_data: int, max_streams: int) -> None:
        """The peer is authenticated: grow to the session's window (sent with the next packet)."""
        quic = self._quic
        quic.windows_open = True
        quic._local_max_data.value = max(quic._local_max_data.value, max_data)
        quic._local_max_streams_bidi.value = max(quic._local_max_streams_bidi.value, max_streams)
        quic._local_max_streams_uni.value = max(quic._local_max_streams_uni.value, max_streams)

    def follow_reads(self, stream_id: int, consumed: Callable[[], int]) -> None:
        """From now on the stream's credit is ``consumed()`` plus one stream window."""
        self._quic.consumed[stream_id] = consumed

    def forget_reads(self, stream_id: int) -> None:
        """The stream's reader is gone (ended, reset): no more credit to compute."""
        self._quic.consumed.pop(stream_id, None)

    # -- driving --------------------------------------------------------------------

    def connect(self, now: float) -> None:
        """Start the handshake (initiator)."""
        self._quic.connect(VIRTUAL_PEER, now=now)

    def receive(self, data: bytes, now: float) -> bool:
        """Take a datagram; whether it carried at least one packet that decrypted."""
        before = self._quic.authentic_packets
        self._quic.receive_datagram(data, VIRTUAL_PEER, now=now)
        return self._quic.authentic_packets > before

    def datagrams(self, now: float, *, ack: bool = False) -> Iterator[bytes]:
        """The datagrams to send now. ``ack``: data is about to go anyway, so acknowledge
        what came in with it now rather than in a packet of its own after the ACK delay
        (aioquic holds every ACK for 1 ms, even when a packet leaves sooner)."""
        if ack:
            space = self._quic._spaces.get(tls.Epoch.ONE_RTT)
            if space is not None and space.ack_at is not None and space.ack_at > now:
                space.ack_at = now
        for datagram, _ in self._quic.datagrams_to_send(now=now):
            yield datagram

    def timer(self) -> float | None:
        """When :meth:`handle_timer` is due (on the clock given to the other calls)."""
        return self._quic.get_timer()

    def handle_timer(self, now: float) -> None:
        """The timer fired: retransmit, time out, probe."""
        self._quic.handle_timer(now=now)

    def events(self) -> Iterator[Event]:
        """What happened since the last call, in order."""
        quic = self._quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, _events.StreamDataReceived):
                yield StreamData(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, _events.StreamReset):
                yield StreamReset(event.stream_id, event.error_code)
            elif isinstance(event, _events.HandshakeCompleted):
                yield HandshakeDone(event.alpn_protocol)
            elif isinstance(event, _events.ConnectionIdIssued | _events.ConnectionIdRetired):
                yield ConnectionIdChange(event.connection_id, isinstance(event, _events.ConnectionIdIssued))
            elif isinstance(event, _events.ConnectionTerminated):
                yield Terminated(event.error_code, event.reason_phrase)

    # -- streams --------------------------------------------------------------------

    def new_stream(self, unidirectional: bool = False) -> int:
        """The id of a new local stream (it exists once data is sent on it)."""
        return self._quic.get_next_available_stream_id(is_unidirectional=unidirectional)

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """Queue ``data`` on a stream; raise :class:`StreamFinished` if its sending side is over."""
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=end)
        except (ValueError, RuntimeError) as exc:
            # aioquic: "...finished stream" once the stream is gone, "...was reset" after a
            # RESET_STREAM of ours or the peer's STOP_SENDING.
            if "finished stream" not in str(exc) and "reset" not in str(exc):
                raise
            raise StreamFinished(str(exc)) from exc

    def reset(self, stream_id: int, code: int) -> None:
        """Abandon sending on a stream (RESET_STREAM); nothing if it cannot be."""
        with contextlib.suppress(Exception):  # aioquic asserts on streams in the wrong state
            self._quic.reset_stream(stream_id, code)

    def stop(self, stream_id: int, code: int) -> None:
        """Ask the peer to stop sending on a stream (STOP_SENDING); nothing if it cannot be."""
        with contextlib.suppress(Exception):  # aioquic asserts on streams in the wrong state
            self._quic.stop_stream(stream_id, code)

    def unacked(self, stream_id: int) -> int:
        """Bytes of a stream queued or in flight, not yet acknowledged by the peer."""
        stream = self._quic._streams.get(stream_id)
        return len(stream.sender._buffer) if stream is not None else 0

    def set_max_datagram_size(self, size: int) -> None:
        """The largest datagram to build from now on (the current path's; datagrams in flight
        that were larger and get lost are rebuilt at this size by loss recovery)."""
        quic = self._quic
        if size == quic._max_datagram_size:
            return
        quic._max_datagram_size = size
        loss = quic._loss
        loss._pacer._max_datagram_size = size
        congestion: Any = loss._cc  # reno and cubic both keep the size
        congestion._max_datagram_size = size
        if hasattr(congestion, "additive_increase_factor"):  # cubic
            congestion.additive_increase_factor = size

    def ping(self) -> None:
        """Send an ack-eliciting PING with the next datagrams (keeps NAT mappings warm)."""
        self._quic.send_ping(0)

    def close(self, code: int, reason: str) -> None:
        """Close the connection with an application error code and reason."""
        self._quic.close(error_code=code, reason_phrase=reason)

    # -- what it knows ----------------------------------------------------------------

    @property
    def rtt(self) -> float | None:
        """The smoothed round-trip time in seconds, once measured."""
        rtt = self._quic._loss._rtt_smoothed
        return float(rtt) if rtt else None

    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer presented in the handshake, if any."""
        tls = getattr(self._quic, "tls", None)
        certificate = getattr(tls, "_peer_certificate", None) if tls is not None else None
        return certificate if isinstance(certificate, x509.Certificate) else None
