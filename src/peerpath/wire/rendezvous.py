"""The rendezvous protocol between an agent and the server: frames and messages.

Sans-I/O. A byte stream (TLS over TCP) carries frames: a 1-byte type, a 3-byte length
and a body. ``CONTROL`` bodies are msgpack-encoded messages (the structs below);
``RELAY`` bodies are a 16-byte overlay address (the destination when an agent sends,
the source when the server delivers) followed by one opaque, already end-to-end
encrypted session datagram. Malformed input raises :class:`FrameError`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from typing import Annotated

import msgspec

from peerpath.wire.codec import decode

PROTOCOL_VERSION = 1
ADDRESS_BYTES = 16
#: Largest control message body.
MAX_CONTROL = 64 * 1024
#: Largest relayed datagram (QUIC datagrams are at most ~1500 bytes on real paths).
MAX_DATAGRAM = 2048
#: Longest letter note (characters).
MAX_NOTE = 1000
#: Largest sealed box a letter carries (a message to an agent that is offline, which only it can open).
MAX_SEALED = 48 * 1024
#: Relays, UDP relay endpoints or STUN servers a server may offer.
MAX_ENDPOINTS = 16

# Every field a peer or a stranger fills has a bound, checked by the decoder, so no message
# can grow past what its receiver accepts: a Deliver or LookupResult the server builds from
# them fits MAX_CONTROL by construction (tests/unit/test_rendezvous_wire.py checks the
# largest of each).
Text = Annotated[str, msgspec.Meta(max_length=64)]  # an address, an endpoint, a kind
Url = Annotated[str, msgspec.Meta(max_length=256)]
Reason = Annotated[str, msgspec.Meta(max_length=512)]
Blob = Annotated[bytes, msgspec.Meta(max_length=64)]  # keys, signatures, nonces, tokens
RequestId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]  # SQLite's and msgpack's common range
Endpoints = Annotated[list[Text], msgspec.Meta(max_length=MAX_ENDPOINTS)]
Urls = Annotated[list[Url], msgspec.Meta(max_length=MAX_ENDPOINTS)]
#: A name an agent claims: lower-case letters, digits and '-', starting with a letter, and never
#: what looks like an address (addresses start with "pp1").
MAX_NAME = 63
NAME_PATTERN = r"^(?!pp1)[a-z][a-z0-9-]{0,62}\Z"
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN)]
#: An agent's tags: ``key`` or ``key=value``, lower-case; at most MAX_TAGS of them.
MAX_TAGS = 8
MAX_TAG = 64
MAX_TAG_KEY = 32
TAG_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,31}(=[a-z0-9._:/+-]+)?\Z"
Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TAG, pattern=TAG_PATTERN)]
Tags = Annotated[list[Tag], msgspec.Meta(max_length=MAX_TAGS)]
#: Agents one :class:`Find` answers with (the largest answer fits MAX_CONTROL).
MAX_FOUND = 50
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

    nonce: Blob
    server: Text
    version: int = PROTOCOL_VERSION


class Register(msgspec.Struct, tag="register", frozen=True):
    """Agent -> server: my key and the signature over :func:`register_payload`."""

    public_key: Blob
    signature: Blob


class Registered(msgspec.Struct, tag="registered", frozen=True):
    """Server -> agent: welcome; the address the server sees you at, and the relays.

    ``udp_relay`` lists the server's UDP relay endpoints; ``token`` names this registration
    there and ``udp_key`` authenticates its frames (see :func:`encode_udp_relay`). ``rest``
    says the server lets an idle agent :class:`Rest` on UDP (servers before it leave it out).
    """

    observed: Text
    relays: Urls = []
    udp_relay: Endpoints = []
    token: Blob = b""
    stun: Endpoints = []
    udp_key: Blob = b""
    rest: bool = False


class Refused(msgspec.Struct, tag="refused", frozen=True):
    """Server -> agent: the connection is refused (the server closes it next)."""

    reason: Reason


class Lookup(msgspec.Struct, tag="lookup", frozen=True):
    """Agent -> server: is this agent online, and how can it be reached?"""

    id: RequestId
    address: Text


class LookupResult(msgspec.Struct, tag="lookup-result", frozen=True):
    """Server -> agent: the answer to :class:`Lookup`: whether the agent is online and the relay
    that reaches it, nothing more (its endpoints and NAT travel only inside its sessions)."""

    id: RequestId
    address: Text
    online: bool
    relay: Url | None = None


class Unreachable(msgspec.Struct, tag="unreachable", frozen=True):
    """Server -> agent: a relayed datagram was dropped because its destination is offline."""

    address: Text


class Ping(msgspec.Struct, tag="ping", frozen=True):
    """Either way: answer with :class:`Pong` (keepalive, and RTT for synchronised punching)."""

    id: RequestId


class Pong(msgspec.Struct, tag="pong", frozen=True):
    """The answer to :class:`Ping`."""

    id: RequestId


class Letter(msgspec.Struct, frozen=True):
    """A signed note from one agent to another, kept by the server until delivered.

    ``kind`` is ``trust-request``, ``trust-approval`` (whose ``reply_to`` is the
    request's nonce) or ``sealed`` (whose ``sealed`` box only the recipient can open: a
    message waiting for it). The signature covers every other field (:func:`letter_payload`), so
    the server can neither forge nor alter one; ``nonce`` makes each one unique (replays
    are refused by the server and ignored by the recipient).
    """

    kind: Text
    sender_key: Blob
    recipient: Text
    created: Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]  # signed 64-bit, as it is signed
    nonce: Blob
    note: Annotated[str, msgspec.Meta(max_length=MAX_NOTE)] = ""
    reply_to: Blob = b""
    signature: Blob = b""
    sealed: Annotated[bytes, msgspec.Meta(max_length=MAX_SEALED)] = b""


class Post(msgspec.Struct, tag="post", frozen=True):
    """Agent -> server: keep this letter for its recipient."""

    id: RequestId
    letter: Letter


class PostResult(msgspec.Struct, tag="post-result", frozen=True):
    """Server -> agent: the letter was stored (and delivered if the recipient is online), or why not."""

    id: RequestId
    ok: bool
    error: Reason = ""


class Deliver(msgspec.Struct, tag="deliver", frozen=True):
    """Server -> agent: a letter for you; answer :class:`Received` to have it deleted."""

    letter_id: RequestId
    letter: Letter


class Received(msgspec.Struct, tag="received", frozen=True):
    """Agent -> server: the letter was handled; forget it."""

    letter_id: RequestId


class HomeRelay(msgspec.Struct, tag="home-relay", frozen=True):
    """Agent -> server: I chose this relay (one of those the server listed); send others there."""

    url: Url


class UdpReady(msgspec.Struct, tag="udp-ready", frozen=True):
    """Agent -> server: deliver my relayed datagrams over UDP (``ready``), or stop doing so.

    Sent once the agent's UDP hello was acknowledged (so UDP works both ways), and again
    with ``ready`` false when acknowledgements stop arriving.
    """

    ready: bool


class Rest(msgspec.Struct, tag="rest", frozen=True):
    """Agent -> server: I am idle; keep my registration on UDP alone while I close this
    connection. Answered by an :class:`Outcome`; once it says yes, the agent closes the
    connection and the server keeps it online (lookups find it, relayed datagrams reach it over
    UDP) for as long as its UDP hellos go on. Anything else the agent sends on the connection
    afterwards calls the rest off (:class:`Stay` says so and nothing more). What needs the
    connection again (a letter for it) is said with a UDP wake (0x96), and the agent registers
    anew.
    """

    id: RequestId


class Stay(msgspec.Struct, tag="stay", frozen=True):
    """Agent -> server: calls off the rest the server agreed to; the agent stays connected
    (something happened between its :class:`Rest` and the answer)."""

    id: RequestId


class NameClaim(msgspec.Struct, frozen=True):
    """A name an agent claims at one server, signed with the agent's key over
    :func:`name_claim_payload` (which names the server too), so that whoever resolves the name
    checks the claim itself instead of taking the server's word for it."""

    name: Name
    public_key: Blob
    signature: Blob


class ClaimName(msgspec.Struct, tag="claim-name", frozen=True):
    """Agent -> server: this name is mine (first come, first served; it replaces the agent's
    previous name). Sent again at every registration, which renews it."""

    id: RequestId
    claim: NameClaim


class ReleaseName(msgspec.Struct, tag="release-name", frozen=True):
    """Agent -> server: forget my name."""

    id: RequestId


class ResolveName(msgspec.Struct, tag="resolve-name", frozen=True):
    """Agent -> server: who claims this name?"""

    id: RequestId
    name: Name


class NameResolved(msgspec.Struct, tag="name-resolved", frozen=True):
    """Server -> agent: the answer to :class:`ResolveName`: the claim, or None if nobody holds the name."""

    id: RequestId
    name: Name
    claim: NameClaim | None = None


class SetProfile(msgspec.Struct, tag="set-profile", frozen=True):
    """Agent -> server: my tags, and whether searches may list me (``public``). Sent at every
    registration; a private agent's tags are not kept."""

    id: RequestId
    tags: Tags = []
    public: bool = False


class Find(msgspec.Struct, tag="find", frozen=True):
    """Agent -> server: the public agents that have every one of these tags."""

    id: RequestId
    tags: Annotated[list[Tag], msgspec.Meta(min_length=1, max_length=MAX_TAGS)]


class Listing(msgspec.Struct, frozen=True):
    """One agent a :class:`Find` found: its key (its address is derived from it), its tags,
    whether it is online, and its signed name claim if it has one."""

    public_key: Blob
    tags: Tags
    online: bool
    claim: NameClaim | None = None


class Found(msgspec.Struct, tag="found", frozen=True):
    """Server -> agent: the answer to :class:`Find`; ``more`` if agents were left out."""

    id: RequestId
    agents: Annotated[list[Listing], msgspec.Meta(max_length=MAX_FOUND)] = []
    more: bool = False


class Outcome(msgspec.Struct, tag="outcome", frozen=True):
    """Server -> agent: a :class:`ClaimName`, :class:`ReleaseName` or :class:`SetProfile` was done,
    or why not; also the answer to any directory request the server refuses (a quota, say)."""

    id: RequestId
    ok: bool
    error: Reason = ""


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
    | UdpReady
    | Rest
    | Stay
    | HomeRelay
    | ClaimName
    | ReleaseName
    | ResolveName
    | NameResolved
    | SetProfile
    | Find
    | Found
    | Outcome
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


def encode_relay_header(datagram_length: int) -> bytes:
    """The 4-byte header of a RELAY frame whose datagram has ``datagram_length`` bytes (the
    16-byte address and the datagram follow it)."""
    if not 0 < datagram_length <= MAX_DATAGRAM:
        raise FrameError(f"datagram of {datagram_length} bytes (1 to {MAX_DATAGRAM})")
    return _HEADER.pack(FrameType.RELAY << 24 | (ADDRESS_BYTES + datagram_length))


def decode_control(body: bytes | memoryview) -> Message:
    """One control message body. Raises :class:`FrameError` for anything malformed."""
    return decode(_decoder, body, FrameError, "control message")  # type: ignore[arg-type]


def _header(data: bytes | bytearray) -> tuple[int, int]:
    (word,) = _HEADER.unpack_from(data)
    return word >> 24, word & 0xFFFFFF


#: Bytes before a RELAY frame's datagram: the header and the address.
RELAY_HEAD = _HEADER.size + ADDRESS_BYTES
_RELAY_LIMIT = ADDRESS_BYTES + MAX_DATAGRAM


def frame_at(data: bytes | bytearray | memoryview, offset: int) -> tuple[int, int] | None:
    """The frame that starts at ``offset`` of a stream buffer, without copying or decoding it:
    ``(FrameType, end)``, or None if it is not all there yet. Its body is
    ``data[offset + 4 : end]``; a RELAY frame's address is the body's first 16 bytes and its
    datagram the rest (at least one byte). Raises :class:`FrameError` for a header no frame has.

    What a relay forwards needs nothing more, so it is routed without being copied twice.
    """
    if len(data) - offset < _HEADER.size:
        return None
    (word,) = _HEADER.unpack_from(data, offset)
    kind, length = word >> 24, word & 0xFFFFFF
    if kind == FrameType.RELAY:
        if length > _RELAY_LIMIT:
            raise FrameError(f"RELAY frame of {length} bytes exceeds {_RELAY_LIMIT}")
        if length <= ADDRESS_BYTES:
            raise FrameError("relay frame without a datagram")
    elif kind == FrameType.CONTROL:
        if length > MAX_CONTROL:
            raise FrameError(f"CONTROL frame of {length} bytes exceeds {MAX_CONTROL}")
    else:
        raise FrameError(f"unknown frame type {kind}")
    end = offset + _HEADER.size + length
    return (kind, end) if end <= len(data) else None


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
                out.append((decode_control(body), None))
            else:
                if length < ADDRESS_BYTES + 1:
                    raise FrameError("relay frame without a datagram")
                out.append((body[:ADDRESS_BYTES], body[ADDRESS_BYTES:]))
        return out


LETTER_CONTEXT = b"peerpath-letter-v1\x00"
LETTER_KINDS = ("trust-request", "trust-approval", "sealed")


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
    if letter.sealed:  # absent from letters without a box, so their payload is what it always was
        fields.append(letter.sealed)
    return LETTER_CONTEXT + b"".join(struct.pack("!I", len(f)) + f for f in fields)


NAME_CONTEXT = b"peerpath-name-claim-v1\x00"


def name_claim_payload(name: str, public_key: bytes, server: bytes) -> bytes:
    """What an agent signs to claim ``name`` at the server whose 16-byte address is ``server``."""
    fields = [name.encode(), public_key, server]
    return NAME_CONTEXT + b"".join(struct.pack("!I", len(f)) + f for f in fields)


# -- the UDP relay transport -------------------------------------------------------------
#
# Relay datagrams may also travel over UDP, on the agent's one UDP socket. Their first byte
# lies in 0x90-0x9F (0xA0-0xAF are the connectivity checks of wire/punch.py): the long-header
# bit set and QUIC's fixed bit (0x40) clear, which no QUIC packet of ours has (we never
# negotiate RFC 9287's greased bit), and no STUN message has either (its two top bits are
# zero).
#
# Every frame, in both directions, ends in a 16-byte MAC (keyed BLAKE2b over the rest of the
# frame, kind byte included) under the key the server handed this registration over TLS;
# agent frames name the registration by its token. Nobody without the key can relay, inject
# a delivery, or move where the server sends: the server delivers over UDP only to an
# address that answered a challenge (sent to that address) with the key.
#
#   0x90 to-server   token(8) destination(16) datagram  MAC    agent -> server
#   0x91 delivery    source(16) datagram                MAC    server -> agent
#   0x92 hello       token(8) sequence(8) zero(8)       MAC    agent -> server
#   0x93 hello-ack   token(8)                           MAC    server -> agent
#   0x94 challenge   token(8) nonce(16)                 MAC    server -> agent
#   0x95 response    token(8) nonce(16)                 MAC    agent -> server
#   0x96 wake        token(8)                           MAC    server -> agent
#   0x97 goodbye     token(8)                           MAC    agent -> server
#
# A wake goes only to an agent resting on UDP (see :class:`Rest`): the server has something
# for it that needs its connection. Replaying one does no more than the first did: the agent
# registers anew, and its new registration's key no longer authenticates it. A goodbye is a
# resting agent's last word, from its confirmed endpoint: it is offline at once (as closing
# its connection makes a connected agent), not when its hellos have been missed long enough.
#
# A hello is padded to a challenge's size: the server never answers a stranger's datagram
# with more bytes than it received. Its sequence number grows with every hello of a
# registration (1, 2, ...), so a copy replayed later says nothing about the agent; agents
# from before it send zero, which the server takes as it always did.

UDP_TO_SERVER = 0x90
UDP_FROM_SERVER = 0x91
UDP_HELLO = 0x92
UDP_HELLO_ACK = 0x93
UDP_CHALLENGE = 0x94
UDP_RESPONSE = 0x95
UDP_WAKE = 0x96
UDP_GOODBYE = 0x97
TOKEN_BYTES = 8
UDP_KEY_BYTES = 32
UDP_NONCE_BYTES = 16
MAC_BYTES = 16
_TOKENED = (UDP_TO_SERVER, UDP_HELLO, UDP_HELLO_ACK, UDP_CHALLENGE, UDP_RESPONSE, UDP_WAKE, UDP_GOODBYE)
#: Sizes of the fixed-size frames, MAC included.
_FIXED = {
    UDP_HELLO: 1 + TOKEN_BYTES + UDP_NONCE_BYTES + MAC_BYTES,
    UDP_HELLO_ACK: 1 + TOKEN_BYTES + MAC_BYTES,
    UDP_CHALLENGE: 1 + TOKEN_BYTES + UDP_NONCE_BYTES + MAC_BYTES,
    UDP_RESPONSE: 1 + TOKEN_BYTES + UDP_NONCE_BYTES + MAC_BYTES,
    UDP_WAKE: 1 + TOKEN_BYTES + MAC_BYTES,
    UDP_GOODBYE: 1 + TOKEN_BYTES + MAC_BYTES,
}


class UdpRelayFrame(msgspec.Struct, frozen=True):
    """A parsed UDP relay frame, not yet authenticated (see :func:`udp_authentic`).

    ``address`` is the destination (0x90) or source (0x91); ``payload`` the datagram, or the
    nonce of a challenge or response; absent parts are empty.
    """

    kind: int
    token: bytes
    address: bytes
    payload: bytes


def is_udp_relay(data: bytes) -> bool:
    """Whether a datagram on the node's socket belongs to the UDP relay transport (0x90-0x9F)."""
    return bool(data) and 0x90 <= data[0] <= 0x9F


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=MAC_BYTES).digest()


def _seal(key: bytes, frame: bytes) -> bytes:
    return frame + _mac(key, frame)


def udp_authentic(key: bytes, data: bytes) -> bool:
    """Whether a UDP relay frame's MAC is right under ``key``."""
    return len(data) > MAC_BYTES and bool(key) and hmac.compare_digest(data[-MAC_BYTES:], _mac(key, data[:-MAC_BYTES]))


# A relay keys BLAKE2b once per registration and copies the keyed state for each frame, which
# costs a third less than keying it again every time (a 128-byte key block is hashed each time).
UdpMac = hashlib.blake2b
#: Bytes before the datagram of an agent's relay datagram (0x90): kind, token, destination.
UDP_DATA_HEAD = 1 + TOKEN_BYTES + ADDRESS_BYTES
#: Sizes an agent's relay datagram (0x90) may have, MAC included.
UDP_DATA_MIN = UDP_DATA_HEAD + 1 + MAC_BYTES
UDP_DATA_MAX = UDP_DATA_HEAD + MAX_DATAGRAM + MAC_BYTES
_DELIVERY = bytes([UDP_FROM_SERVER])


def udp_mac(key: bytes) -> UdpMac:
    """The MAC of one registration's UDP frames, keyed, for :func:`udp_authentic_under` and
    :func:`seal_udp_delivery` (it is copied per frame, never updated itself)."""
    return hashlib.blake2b(key=key, digest_size=MAC_BYTES)


def udp_authentic_under(mac: UdpMac, data: bytes) -> bool:
    """:func:`udp_authentic` with the keyed state of :func:`udp_mac` (the frame is not copied)."""
    if len(data) <= MAC_BYTES:
        return False
    state = mac.copy()
    state.update(memoryview(data)[:-MAC_BYTES])
    return hmac.compare_digest(state.digest(), data[-MAC_BYTES:])


def seal_udp_delivery(mac: UdpMac, source: bytes, datagram: bytes | memoryview) -> bytes:
    """:func:`encode_udp_delivery` with the keyed state of :func:`udp_mac`: the datagram is
    copied once, into the frame."""
    head = _DELIVERY + source
    state = mac.copy()
    state.update(head)
    state.update(datagram)
    return b"".join((head, datagram, state.digest()))


def encode_udp_relay(token: bytes, key: bytes, destination: bytes, datagram: bytes) -> bytes:
    """An agent's relay datagram for ``destination``."""
    return _seal(key, bytes([UDP_TO_SERVER]) + token + destination + datagram)


def encode_udp_delivery(key: bytes, source: bytes, datagram: bytes) -> bytes:
    """The server's delivery of a relayed datagram from ``source``."""
    return _seal(key, bytes([UDP_FROM_SERVER]) + source + datagram)


def encode_udp_hello(token: bytes, key: bytes, sequence: int = 0) -> bytes:
    """An agent's "this is my UDP endpoint", the ``sequence``-th of its registration."""
    return _seal(key, bytes([UDP_HELLO]) + token + sequence.to_bytes(8, "big") + bytes(UDP_NONCE_BYTES - 8))


def hello_sequence(frame: UdpRelayFrame) -> int:
    """The sequence number of a parsed hello (0: an agent that does not number them)."""
    return int.from_bytes(frame.payload[:8], "big")


def encode_udp_ack(token: bytes, key: bytes) -> bytes:
    """The server's "relayed datagrams for you go to the endpoint this came to"."""
    return _seal(key, bytes([UDP_HELLO_ACK]) + token)


def encode_udp_wake(token: bytes, key: bytes) -> bytes:
    """The server's "connect again: something waits for you" to an agent resting on UDP."""
    return _seal(key, bytes([UDP_WAKE]) + token)


def encode_udp_goodbye(token: bytes, key: bytes) -> bytes:
    """A resting agent's "I am going offline" (it closes)."""
    return _seal(key, bytes([UDP_GOODBYE]) + token)


def encode_udp_challenge(token: bytes, key: bytes, nonce: bytes) -> bytes:
    """The server's "prove this new endpoint is yours"."""
    return _seal(key, bytes([UDP_CHALLENGE]) + token + nonce)


def encode_udp_response(token: bytes, key: bytes, nonce: bytes) -> bytes:
    """An agent's answer to a challenge, from the endpoint the challenge reached."""
    return _seal(key, bytes([UDP_RESPONSE]) + token + nonce)


def parse_udp_relay(data: bytes) -> UdpRelayFrame:
    """The parts of a UDP relay frame (its MAC is checked by :func:`udp_authentic`).

    Raises :class:`FrameError` for anything malformed.
    """
    if not is_udp_relay(data):
        raise FrameError("not a UDP relay frame")
    kind = data[0]
    size = len(data)
    if kind in _FIXED:
        if size != _FIXED[kind]:
            raise FrameError(f"UDP relay frame {kind:#04x} of {size} bytes, not {_FIXED[kind]}")
        return UdpRelayFrame(kind, data[1 : 1 + TOKEN_BYTES], b"", data[1 + TOKEN_BYTES : -MAC_BYTES])
    if kind not in (UDP_TO_SERVER, UDP_FROM_SERVER):
        raise FrameError(f"unknown UDP relay frame {kind:#04x}")
    head = 1 + (TOKEN_BYTES if kind in _TOKENED else 0)
    if not head + ADDRESS_BYTES < size - MAC_BYTES <= head + ADDRESS_BYTES + MAX_DATAGRAM:
        raise FrameError(f"UDP relay datagram frame of {size} bytes")
    return UdpRelayFrame(kind, data[1:head], data[head : head + ADDRESS_BYTES], data[head + ADDRESS_BYTES : -MAC_BYTES])


def register_payload(nonce: bytes, agent: bytes, server: bytes) -> bytes:
    """What an agent signs to register: the server's nonce and both 16-byte addresses."""
    return REGISTER_CONTEXT + nonce + agent + server
