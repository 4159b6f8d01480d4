"""The rendezvous protocol between an agent and the server: frames and messages.

Sans-I/O. A byte stream (TLS over TCP) carries frames: a 1-byte type, a 3-byte length
and a body. ``CONTROL`` bodies are msgpack-encoded messages (the structs below);
``RELAY`` bodies are a 16-byte overlay address (the destination when an agent sends,
the source when the server delivers) followed by one opaque, already end-to-end
encrypted session datagram. Malformed input raises :class:`FrameError`.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgspec

PROTOCOL_VERSION = 1
ADDRESS_BYTES = 16
#: Largest control message body.
MAX_CONTROL = 64 * 1024
#: Largest relayed datagram (QUIC datagrams are at most ~1500 bytes on real paths).
MAX_DATAGRAM = 2048
_HEADER = struct.Struct("!I")  # type in the top byte, length in the low 24 bits
REGISTER_CONTEXT = b"peerpath-rendezvous-register-v1\x00"


class FrameError(ValueError):
    """Bytes that are not a well-formed rendezvous frame or message."""


class FrameType(enum.IntEnum):
    """What a frame carries."""

    CONTROL = 1
    RELAY = 2


# -- control messages --------------------------------------------------------------------


class Challenge(msgspec.Struct, tag="challenge", frozen=True):
    """Server -> agent, first: prove your key by signing this nonce (with both addresses)."""

    nonce: bytes
    server: str
    version: int = PROTOCOL_VERSION


class Register(msgspec.Struct, tag="register", frozen=True):
    """Agent -> server: my key, the signature over :func:`register_payload`, how to reach me."""

    public_key: bytes
    signature: bytes
    endpoints: list[str] = []
    nat: dict[str, Any] | None = None


class Registered(msgspec.Struct, tag="registered", frozen=True):
    """Server -> agent: welcome; the address the server sees you at, and the relays.

    ``udp_relay`` lists the server's UDP relay endpoints and ``token`` is this
    registration's secret for them (see :func:`encode_udp_relay`).
    """

    observed: str
    relays: list[str] = []
    udp_relay: list[str] = []
    token: bytes = b""
    stun: list[str] = []


class Refused(msgspec.Struct, tag="refused", frozen=True):
    """Server -> agent: the connection is refused (the server closes it next)."""

    reason: str


class Lookup(msgspec.Struct, tag="lookup", frozen=True):
    """Agent -> server: is this agent online, and how can it be reached?"""

    id: int
    address: str


class LookupResult(msgspec.Struct, tag="lookup-result", frozen=True):
    """Server -> agent: the answer to :class:`Lookup` (``online`` false: nothing else is said)."""

    id: int
    address: str
    online: bool
    endpoints: list[str] = []
    observed: str | None = None
    nat: dict[str, Any] | None = None
    relay: str | None = None


class Unreachable(msgspec.Struct, tag="unreachable", frozen=True):
    """Server -> agent: a relayed datagram was dropped because its destination is offline."""

    address: str


class Ping(msgspec.Struct, tag="ping", frozen=True):
    """Either way: answer with :class:`Pong` (keepalive, and RTT for synchronised punching)."""

    id: int


class Pong(msgspec.Struct, tag="pong", frozen=True):
    """The answer to :class:`Ping`."""

    id: int


class Letter(msgspec.Struct, frozen=True):
    """A signed note from one agent to another, kept by the server until delivered.

    ``kind`` is ``trust-request`` or ``trust-approval`` (whose ``reply_to`` is the
    request's nonce). The signature covers every other field (:func:`letter_payload`), so
    the server can neither forge nor alter one; ``nonce`` makes each one unique (replays
    are refused by the server and ignored by the recipient).
    """

    kind: str
    sender_key: bytes
    recipient: str
    created: int
    nonce: bytes
    note: str = ""
    reply_to: bytes = b""
    signature: bytes = b""


class Post(msgspec.Struct, tag="post", frozen=True):
    """Agent -> server: keep this letter for its recipient."""

    id: int
    letter: Letter


class PostResult(msgspec.Struct, tag="post-result", frozen=True):
    """Server -> agent: the letter was stored (and delivered if the recipient is online), or why not."""

    id: int
    ok: bool
    error: str = ""


class Deliver(msgspec.Struct, tag="deliver", frozen=True):
    """Server -> agent: a letter for you; answer :class:`Received` to have it deleted."""

    letter_id: int
    letter: Letter


class Received(msgspec.Struct, tag="received", frozen=True):
    """Agent -> server: the letter was handled; forget it."""

    letter_id: int


class Signal(msgspec.Struct, tag="signal", frozen=True):
    """Agent -> server: forward this to ``peer`` (an offer, an answer, candidates).

    The server delivers it as a :class:`Signal` whose ``peer`` is the sender, adding its own
    round-trip estimates to both agents so they can start probing at the same moment.
    ``payload`` is opaque to the server (the agents sign what must be authentic).
    """

    peer: str
    kind: str
    payload: bytes
    sender_rtt_ms: float | None = None
    recipient_rtt_ms: float | None = None


MAX_SIGNAL = 8 * 1024


class NatReport(msgspec.Struct, tag="nat-report", frozen=True):
    """Agent -> server: what netcheck found about my NAT (kept with my presence)."""

    nat: dict[str, Any]


class HomeRelay(msgspec.Struct, tag="home-relay", frozen=True):
    """Agent -> server: I chose this relay (one of those the server listed); send others there."""

    url: str


class UdpReady(msgspec.Struct, tag="udp-ready", frozen=True):
    """Agent -> server: deliver my relayed datagrams over UDP (``ready``), or stop doing so.

    Sent once the agent's UDP hello was acknowledged (so UDP works both ways), and again
    with ``ready`` false when acknowledgements stop arriving.
    """

    ready: bool


Message = (
    Challenge
    | Register
    | Registered
    | Refused
    | Lookup
    | LookupResult
    | Unreachable
    | Ping
    | Pong
    | Post
    | PostResult
    | Deliver
    | Received
    | Signal
    | UdpReady
    | HomeRelay
    | NatReport
)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode_control(message: Message) -> bytes:
    """A CONTROL frame."""
    body = _encoder.encode(message)
    if len(body) > MAX_CONTROL:
        raise FrameError(f"control message of {len(body)} bytes exceeds {MAX_CONTROL}")
    return _HEADER.pack(FrameType.CONTROL << 24 | len(body)) + body


def encode_relay(address: bytes, datagram: bytes) -> bytes:
    """A RELAY frame: a 16-byte overlay address and a datagram."""
    if len(address) != ADDRESS_BYTES:
        raise FrameError(f"relay address must be {ADDRESS_BYTES} bytes, got {len(address)}")
    if len(datagram) > MAX_DATAGRAM:
        raise FrameError(f"datagram of {len(datagram)} bytes exceeds {MAX_DATAGRAM}")
    return _HEADER.pack(FrameType.RELAY << 24 | (ADDRESS_BYTES + len(datagram))) + address + datagram


def _header(data: bytes | bytearray) -> tuple[int, int]:
    (word,) = _HEADER.unpack_from(data)
    return word >> 24, word & 0xFFFFFF


class FrameDecoder:
    """Splits a byte stream into frames; yields ``(Message, None)`` or ``(address, datagram)``."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Message | bytes, bytes | None]]:
        """Add stream data; return every complete frame. Raises :class:`FrameError`."""
        self._buffer += data
        out: list[tuple[Message | bytes, bytes | None]] = []
        while len(self._buffer) >= _HEADER.size:
            kind, length = _header(self._buffer)
            if kind == FrameType.CONTROL:
                limit = MAX_CONTROL
            elif kind == FrameType.RELAY:
                limit = ADDRESS_BYTES + MAX_DATAGRAM
            else:
                raise FrameError(f"unknown frame type {kind}")
            if length > limit:
                raise FrameError(f"{FrameType(kind).name} frame of {length} bytes exceeds {limit}")
            if len(self._buffer) < _HEADER.size + length:
                break
            body = bytes(self._buffer[_HEADER.size : _HEADER.size + length])
            del self._buffer[: _HEADER.size + length]
            if kind == FrameType.CONTROL:
                try:
                    out.append((_decoder.decode(body), None))
                except msgspec.DecodeError as exc:
                    raise FrameError(f"malformed control message: {exc}") from exc
            else:
                if length < ADDRESS_BYTES + 1:
                    raise FrameError("relay frame without a datagram")
                out.append((body[:ADDRESS_BYTES], body[ADDRESS_BYTES:]))
        return out


LETTER_CONTEXT = b"peerpath-letter-v1\x00"
LETTER_KINDS = ("trust-request", "trust-approval")
MAX_NOTE = 1000


def letter_payload(letter: Letter) -> bytes:
    """What the sender of a letter signs: every field but the signature, each length-prefixed."""
    fields = [
        letter.kind.encode(),
        letter.sender_key,
        letter.recipient.encode(),
        struct.pack("!q", letter.created),
        letter.nonce,
        letter.note.encode(),
        letter.reply_to,
    ]
    return LETTER_CONTEXT + b"".join(struct.pack("!I", len(f)) + f for f in fields)


# -- the UDP relay transport -------------------------------------------------------------
#
# Relay datagrams may also travel over UDP, on the agent's one UDP socket. Their first byte
# lies in 0x90-0x9F (0xA0-0xAF are the connectivity checks of wire/punch.py): the long-header
# bit set and QUIC's fixed bit (0x40) clear, which no QUIC packet of ours has (we never
# negotiate RFC 9287's greased bit), and no STUN message has either (its two top bits are
# zero). An agent proves its registration with the token the server gave it over TLS.

UDP_TO_SERVER = 0x90  # token(8) dest(16) datagram
UDP_FROM_SERVER = 0x91  # source(16) datagram
UDP_HELLO = 0x92  # token(8): "this is my UDP endpoint"
UDP_HELLO_ACK = 0x93  # token(8)
TOKEN_BYTES = 8


def is_udp_relay(data: bytes) -> bool:
    """Whether a datagram on the node's socket belongs to the UDP relay transport (0x90-0x9F)."""
    return bool(data) and 0x90 <= data[0] <= 0x9F


def encode_udp_relay(token: bytes, destination: bytes, datagram: bytes) -> bytes:
    """An agent's relay datagram for ``destination``."""
    return bytes([UDP_TO_SERVER]) + token + destination + datagram


def encode_udp_delivery(source: bytes, datagram: bytes) -> bytes:
    """The server's delivery of a relayed datagram from ``source``."""
    return bytes([UDP_FROM_SERVER]) + source + datagram


def parse_udp_relay(data: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(kind, token, address, datagram) of a UDP relay frame; absent parts are empty.

    Raises :class:`FrameError` for anything malformed.
    """
    if not is_udp_relay(data):
        raise FrameError("not a UDP relay frame")
    kind = data[0]
    if kind in (UDP_HELLO, UDP_HELLO_ACK):
        if len(data) != 1 + TOKEN_BYTES:
            raise FrameError("hello of the wrong size")
        return kind, data[1:], b"", b""
    if kind == UDP_TO_SERVER:
        head = 1 + TOKEN_BYTES + ADDRESS_BYTES
        if not head < len(data) <= head + MAX_DATAGRAM:
            raise FrameError("relay datagram of the wrong size")
        return kind, data[1 : 1 + TOKEN_BYTES], data[1 + TOKEN_BYTES : head], data[head:]
    if kind == UDP_FROM_SERVER:
        head = 1 + ADDRESS_BYTES
        if not head < len(data) <= head + MAX_DATAGRAM:
            raise FrameError("relay delivery of the wrong size")
        return kind, b"", data[1:head], data[head:]
    raise FrameError(f"unknown UDP relay frame {kind:#04x}")


def register_payload(nonce: bytes, agent: bytes, server: bytes) -> bytes:
    """What an agent signs to register: the server's nonce and both 16-byte addresses."""
    return REGISTER_CONTEXT + nonce + agent + server
