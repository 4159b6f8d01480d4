"""The fuzz targets: one per decoder of untrusted bytes, with seeds from peerpath's own encoders.

Where the code that consumes a decoded message is sans-I/O (the rendezvous server's and
client's message handlers, the STUN responder, the trust-request broker, the control
socket's request handler), the target runs it too, against small in-process fixtures:
a foreign exception there escapes the connection's handler just the same.
"""

from __future__ import annotations

import asyncio
import atexit
import binascii
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import random
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peerpath import errors
from peerpath.identity import Address, Identity
from peerpath.nat import punch as nat_punch
from peerpath.nat import traversal
from peerpath.nat.punch import Puncher
from peerpath.nat.stun_responder import SocketKey, StunResponder
from peerpath.node import control as node_control
from peerpath.node.requests import Request, TrustBroker
from peerpath.node.tcp import FRAME, TcpLink
from peerpath.node.trust import TrustStore
from peerpath.ratelimit import RateLimiter, TokenBucket
from peerpath.rendezvous import client as rv_client
from peerpath.rendezvous import limits as rv_limits
from peerpath.rendezvous import mailbox as rv_mailbox
from peerpath.rendezvous import server as rv_server
from peerpath.rendezvous.directory import make_claim
from peerpath.rendezvous.letters import LetterError, check_letter
from peerpath.rendezvous.presence import Agent
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.session import control as session
from peerpath.tunnels.registry import parse_bind
from peerpath.tunnels.services import Destination, service_port, split_target
from peerpath.wire import portmap, punch, stun
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import format_endpoint, parse_endpoint
from peerpath.wire.stun import Attr, ChangeRequest, Class, ErrorCode, Message, StunError

from .harness import Target, split

TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


# -- fixtures ----------------------------------------------------------------------------


def _identity(n: int) -> Identity:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32))


ALICE, BOB, CAROL, SERVER = _identity(1), _identity(2), _identity(3), _identity(4)
SIGNERS = {i.public_key: i for i in (ALICE, BOB, CAROL)}
SERVER_URL = f"pp://{SERVER.address}@127.0.0.1:7878"
#: "Now" for letters (any fixed time works; the seeds are made for it).
NOW = 1_800_000_000
REQUEST_NONCE = bytes(range(100, 116))
PUNCH_KEY = bytes(range(32))
#: The UDP relay credentials (token, key) the fixture server hands ALICE and BOB.
UDP_TOKEN = b"tokenAAA"
UDP_KEY = bytes(range(64, 96))
BOB_TOKEN = b"tokenBBB"
BOB_KEY = bytes(range(96, 128))
CAROL_TOKEN = b"tokenCCC"
CAROL_KEY = bytes(range(128, 160))
UDP_KEYS = {UDP_TOKEN: UDP_KEY, BOB_TOKEN: BOB_KEY, CAROL_TOKEN: CAROL_KEY}
#: The nonce of the UDP challenge outstanding in the UDP server target.
UDP_NONCE = bytes(range(200, 216))
CLIENT_ADDR = ("198.51.100.7", 40000)
#: The server's UDP relay endpoint, as the client picked it (the fixture server listens on 127.0.0.1:7878).
SERVER_UDP = ("127.0.0.1", 7878)


@functools.cache
def _tmpdir() -> Path:
    """A directory for this process's fixtures (under ``PEERPATH_FUZZ_TMP`` when the runner set it)."""
    base = os.environ.get("PEERPATH_FUZZ_TMP")
    path = Path(tempfile.mkdtemp(prefix=f"fuzz-{os.getpid()}-", dir=base))
    if base is None:  # the runner removes its own directory; a test process removes this one
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class _InstantLoop(asyncio.SelectorEventLoop):
    """An event loop whose timers fire at once: a ``sleep(3600)`` (or ``sleep(nan)``) in the
    code under test costs nothing, so an input cannot stall the run by asking for a delay."""

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any, context: Any = None) -> Any:  # type: ignore[override]
        return self.call_soon(callback, *args, context=context)

    def call_at(self, when: float, callback: Callable[..., object], *args: Any, context: Any = None) -> Any:  # type: ignore[override]
        return self.call_soon(callback, *args, context=context)


@functools.cache
def _loop() -> asyncio.AbstractEventLoop:
    loop = _InstantLoop()
    atexit.register(loop.close)
    return loop


class _Catch(logging.Handler):
    """Keeps the first exception a catch-all handler logged (its traceback says where the bug is)."""

    def __init__(self) -> None:
        super().__init__()
        self.exc: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None and self.exc is None:
            self.exc = record.exc_info[1]


def _run_catching(logger_name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` in the loop; an exception that a catch-all logged to ``logger_name`` is
    raised again (with its traceback), as one that escaped the catch-all would be."""
    logger = logging.getLogger(logger_name)
    catch = _Catch()
    saved = logger.disabled, logger.propagate
    logger.disabled, logger.propagate = False, False
    logger.addHandler(catch)
    try:
        _loop().run_until_complete(main())
    finally:
        logger.removeHandler(catch)
        logger.disabled, logger.propagate = saved
    if catch.exc is not None:
        raise catch.exc


def _in_loop(fn: Callable[[], object]) -> None:
    """Run sans-I/O code that needs a running loop (it may create tasks or read the clock)."""

    async def call() -> None:
        fn()

    _loop().run_until_complete(call())


class _FakeLink:
    """A rendezvous link that swallows what is written to it."""

    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def peername(self) -> Any:
        return CLIENT_ADDR

    def ssl_object(self) -> None:
        return None

    async def read(self) -> bytes:
        return b""

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def buffered(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


class _FakeUdp:
    """One of the server's UDP relay sockets: keeps what is sent, for the target to check."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> bool:
        self.sent.append((data, addr))
        return True


def _letter(
    sender: Identity,
    kind: str,
    recipient: Address,
    nonce: bytes,
    note: str = "",
    reply_to: bytes = b"",
    now: int = NOW,
) -> rv.Letter:
    unsigned = rv.Letter(kind, sender.public_key, str(recipient), now - 60, nonce, note, reply_to)
    return msgspec.structs.replace(unsigned, signature=sender.sign(rv.letter_payload(unsigned)))


def _resign_letter(letter: rv.Letter) -> rv.Letter | None:
    signer = SIGNERS.get(letter.sender_key)
    if signer is None:
        return None
    try:
        payload = rv.letter_payload(letter)
    except (struct.error, OverflowError, UnicodeEncodeError):
        return None
    return msgspec.structs.replace(letter, signature=signer.sign(payload))


def _letters(now: int = NOW) -> list[rv.Letter]:
    """Letters dated ``now`` (less a minute); the largest has the longest note the decoder takes."""
    to_bob = BOB.address
    return [
        _letter(ALICE, "trust-request", to_bob, bytes(range(16)), "alice, the planner agent", now=now),
        _letter(ALICE, "trust-approval", to_bob, bytes(range(16, 32)), reply_to=REQUEST_NONCE, now=now),
        _letter(CAROL, "trust-request", to_bob, bytes(range(32, 48)), now=now),
        _letter(CAROL, "trust-request", to_bob, bytes(range(48, 64)), "n" * rv.MAX_NOTE, now=now),
        _letter(ALICE, "trust-request", CAROL.address, bytes(range(64, 80)), "to someone else", now=now),
        _letter(CAROL, "trust-approval", to_bob, bytes(range(80, 96)), reply_to=bytes(16), now=now),
        _letter(ALICE, "trust-request", to_bob, bytes(range(96, 112)), "\U0001f600" * rv.MAX_NOTE, now=now),
    ]


def _control_frame(body: bytes) -> bytes:
    return struct.pack("!I", rv.FrameType.CONTROL << 24 | (len(body) & 0xFFFFFF)) + body


def _session_frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def _first_error(*steps: Callable[[], object], ours: tuple[type[BaseException], ...]) -> None:
    """Run every step; a foreign exception escapes at once, the first of ``ours`` at the end."""
    error: BaseException | None = None
    for step in steps:
        try:
            step()
        except ours as exc:
            error = error or exc
    if error is not None:
        raise error


# -- STUN --------------------------------------------------------------------------------

STUN_KEY = b"fuzz-stun-key"
_TID = bytes(range(12))
_STUN_V4 = stun.Address("198.51.100.7", 41641)
_STUN_V6 = stun.Address("2001:db8::7", 3478)
# Every address attribute the codec knows, plain and XOR'd.
_STUN_ADDRESS_ATTRS = (*sorted(stun._ADDRESS_ATTRS), Attr.XOR_MAPPED_ADDRESS)


def _stun_plain_attrs() -> list[tuple[int, bytes]]:
    return [
        (Attr.CHANGE_REQUEST, ChangeRequest(change_ip=True, change_port=True).encode()),
        (Attr.CHANGE_REQUEST, ChangeRequest(change_port=True).encode()),
        (Attr.RESPONSE_PORT, struct.pack("!HH", 5000, 0)),
        (Attr.PADDING, bytes(37)),
        (Attr.USERNAME, b"fuzz-user"),
        (Attr.REALM, b"example.org"),
        (Attr.NONCE, b"f//499k954d6OL34oL9FSTvy64sA"),
        (Attr.SOFTWARE, b"peerpath"),
        (Attr.PASSWORD_ALGORITHM, struct.pack("!HH", 2, 0)),
        (Attr.PASSWORD_ALGORITHMS, struct.pack("!HHHH", 1, 0, 2, 0)),
        (Attr.USERHASH, hashlib.sha256(b"user").digest()),
        (Attr.ALTERNATE_DOMAIN, b"stun.example.org"),
        (Attr.ERROR_CODE, ErrorCode(420, "Unknown Attribute").encode()),
        (Attr.UNKNOWN_ATTRIBUTES, struct.pack("!HH", 0x7777, 0x0031)),
        (0x7777, b"comprehension required, unknown"),
        (0xC001, b"optional, unknown"),
    ]


def _stun_seeds() -> list[bytes]:
    request = Message.request(_TID)
    classic = Message(1, Class.REQUEST, _TID, (), cookie=0x01020304)
    plain = _stun_plain_attrs()
    addresses = [request.encode_address(a, addr) for a in _STUN_ADDRESS_ATTRS for addr in (_STUN_V4, _STUN_V6)]
    out = [request.serialize(), request.serialize(fingerprint=True), classic.serialize()]
    for attr in plain:
        out.append(Message.request(_TID, [attr]).serialize(fingerprint=True))
    for attr in addresses:
        out.append(request.response([attr]).serialize(fingerprint=True))
    everything = Message.request(_TID, plain)
    out += [
        everything.serialize(key=STUN_KEY, fingerprint=True),
        everything.serialize(key=STUN_KEY, sha256=True, fingerprint=True, pad=0xFF),
        everything.serialize(key=STUN_KEY),
        request.response(addresses).serialize(fingerprint=True),
        request.response(addresses + plain).serialize(key=STUN_KEY, sha256=True, fingerprint=True),
        request.error_response(ErrorCode(420, "Unknown Attribute"), [(Attr.UNKNOWN_ATTRIBUTES, b"\x77\x77")]).serialize(
            fingerprint=True
        ),
        request.error_response(ErrorCode(300, "Try Alternate"), [addresses[8]]).serialize(),
        request.error_response(ErrorCode(699, "\u00e9" * 100)).serialize(fingerprint=True),
        Message(1, Class.INDICATION, _TID).serialize(fingerprint=True),
        Message(0x2AB, Class.REQUEST, _TID, tuple(plain[:3])).serialize(fingerprint=True),
        Message(1, Class.REQUEST, _TID, tuple(plain[:4]), cookie=0x01020304).serialize(),
        classic.response([classic.encode_address(Attr.MAPPED_ADDRESS, _STUN_V4)]).serialize(),
    ]
    # And what our own server answers to them.
    responder = StunResponder(["203.0.113.10", "203.0.113.11"], (3478, 3479))
    for data in list(out):
        reply = responder.handle(data, _STUN_V4, SocketKey(0, 0), 0.0)
        if reply is not None:
            out.append(reply.data)
    return out


def _stun_fixup(data: bytes, rng: random.Random) -> bytes:
    """Make the header's length and the FINGERPRINT agree with the mutated message."""
    buf = bytearray(data)
    if len(buf) < stun.HEADER_LENGTH:
        return data
    if rng.random() < 0.5:
        buf += bytes(-len(buf) % 4)
    if rng.random() < 0.2:
        buf[4:8] = struct.pack("!I", stun.MAGIC_COOKIE)
    buf[2:4] = struct.pack("!H", (len(buf) - stun.HEADER_LENGTH) & 0xFFFF)
    if len(buf) >= 28 and buf[-8:-4] == b"\x80\x28\x00\x04" and rng.random() < 0.9:
        crc = (binascii.crc32(bytes(buf[:-8])) ^ 0x5354554E) & 0xFFFFFFFF
        buf[-4:] = struct.pack("!I", crc)
    return bytes(buf)


def _run_stun(data: bytes, rng: random.Random) -> None:
    stun.is_stun(data)
    message = stun.parse(data)
    readers: list[Callable[[], object]] = [
        lambda: message.mapped_address,
        lambda: message.other_address,
        lambda: message.change_request,
        lambda: message.response_port,
        lambda: message.error_code,
        lambda: message.software,
        message.unknown_required,
        lambda: message.full_transaction_id,
        lambda: stun.check_integrity(data, STUN_KEY),
        lambda: message.serialize(fingerprint=True),
        lambda: message.response(message.attributes).serialize(key=STUN_KEY),
    ]
    readers += [functools.partial(message.address, attr) for attr in _STUN_ADDRESS_ATTRS]
    for read in readers:
        with contextlib.suppress(StunError):
            read()


register(
    Target(
        "stun",
        _stun_seeds,
        _run_stun,
        (StunError,),
        fixup=_stun_fixup,
        doc="wire/stun.py parse, every attribute accessor, check_integrity and re-serialization",
    )
)


@functools.cache
def _responders() -> tuple[StunResponder, StunResponder]:
    unlimited = functools.partial(RateLimiter, rate=1e12, burst=1e12)
    full = StunResponder(["203.0.113.10", "203.0.113.11"], (3478, 3479), rate_limiter=unlimited())
    single = StunResponder(["2001:db8::10"], (3478, 3479), rate_limiter=unlimited())
    return full, single


def _run_stun_responder(data: bytes, rng: random.Random) -> None:
    full, single = _responders()
    responder = full if rng.random() < 0.7 else single
    local = SocketKey(rng.randrange(2), rng.randrange(2)) if responder.full else SocketKey(0, 0)
    source = _STUN_V4 if rng.random() < 0.7 else _STUN_V6
    reply = responder.handle(data, source, local, 0.0, tcp=rng.random() < 0.2)
    if reply is not None:
        answer = stun.parse(reply.data)  # what we send must be well-formed
        if answer.transaction_id != data[8:20]:
            raise AssertionError("the reply does not answer the request's transaction")


register(
    Target(
        "stun-responder",
        _stun_seeds,
        _run_stun_responder,
        (),
        fixup=_stun_fixup,
        doc="nat/stun_responder.py StunResponder.handle: never raises, and its replies parse",
    )
)


# -- rendezvous --------------------------------------------------------------------------


def _rendezvous_messages(letters: list[rv.Letter] | None = None) -> list[rv.Message]:
    alice, bob = ALICE.address, BOB.address
    nonce = bytes(range(32))
    signature = ALICE.sign(rv.register_payload(nonce, alice.digest, SERVER.address.digest))
    request, approval = (letters or _letters())[:2]
    longest = "x" * 64  # the longest Text a field may hold
    return [
        rv.Challenge(nonce, str(SERVER.address)),
        rv.Challenge(nonce, "pp1someoneelse"),
        rv.Register(ALICE.public_key, signature),
        rv.Registered(
            "198.51.100.7:40000",
            [SERVER_URL],
            ["127.0.0.1:7878", "[::1]:7878"],
            UDP_TOKEN,
            ["1.2.3.4:3478"],
            UDP_KEY,
        ),
        rv.Registered("198.51.100.7:40000"),
        rv.Registered(longest, ["u" * 256] * rv.MAX_ENDPOINTS, [longest] * rv.MAX_ENDPOINTS, bytes(64)),
        rv.Refused("protocol error"),
        rv.Refused("r" * 512),
        rv.Lookup(7, str(bob)),
        rv.Lookup(8, "pp1notanaddress"),
        rv.Lookup(2**63 - 1, longest),
        rv.LookupResult(7, str(bob), True, SERVER_URL),
        rv.LookupResult(8, str(bob), False),
        rv.Unreachable(str(bob)),
        rv.Ping(1),
        rv.Ping(0),
        rv.Pong(1),
        rv.Post(3, request),
        rv.Post(4, approval),
        rv.PostResult(3, True),
        rv.PostResult(4, False, "the recipient's mailbox is full"),
        rv.Deliver(9, request),
        rv.Deliver(10, approval),
        rv.Received(9),
        rv.UdpReady(True),
        rv.UdpReady(False),
        rv.Rest(19),
        rv.Stay(19),
        rv.HomeRelay(SERVER_URL),
        *_directory_messages(),
    ]


#: Ids of the directory requests the seeds answer (the client target has them waiting).
DIRECTORY_IDS = (11, 12, 13, 14, 15, 16, 17, 18)


def _directory_messages() -> list[rv.Message]:
    """Names and tags: requests (claims signed for SERVER) and the server's answers."""
    claim = make_claim(ALICE, "planner", SERVER.address)
    longest = make_claim(ALICE, "p" + "x" * (rv.MAX_NAME - 1), SERVER.address)
    tags = ["gpu", "region=eu", "k" * rv.MAX_TAG_KEY + "=" + "v" * (rv.MAX_TAG - rv.MAX_TAG_KEY - 1)]
    return [
        rv.ClaimName(11, claim),
        rv.ClaimName(12, longest),
        rv.ClaimName(12, make_claim(BOB, "planner", SERVER.address)),  # not the sender's own claim
        rv.ReleaseName(13),
        rv.ResolveName(14, "planner"),
        rv.NameResolved(14, "planner", claim),
        rv.NameResolved(15, "nobody"),
        rv.SetProfile(16, tags, True),
        rv.SetProfile(16, ["gpu"] * rv.MAX_TAGS, False),
        rv.SetProfile(17),
        rv.Find(18, ["gpu"]),
        rv.Find(18, tags),
        rv.Found(18, [rv.Listing(ALICE.public_key, tags, True, claim), rv.Listing(BOB.public_key, ["gpu"], False)]),
        rv.Found(18, [rv.Listing(BOB.public_key, ["gpu"], True, claim)], True),  # another agent's claim
        rv.Outcome(11, True),
        rv.Outcome(12, False, "name taken"),
        rv.Outcome(13, False, "r" * 512),
    ]


def _control_bodies() -> list[bytes]:
    return [msgspec.msgpack.encode(m) for m in _rendezvous_messages()]


def _rendezvous_streams() -> list[bytes]:
    frames = [rv.encode_control(m) for m in _rendezvous_messages()]
    relays = [
        rv.encode_relay(BOB.address.digest, b"\x40" + bytes(1199)),
        rv.encode_relay(ALICE.address.digest, b"x"),
        rv.encode_relay(BOB.address.digest, bytes(rv.MAX_DATAGRAM)),
    ]
    return [*frames, *relays, b"".join(frames), b"".join(relays + frames[:3]), frames[0] + relays[0] + frames[-1]]


def _run_frames(data: bytes, rng: random.Random) -> None:
    decoder = rv.FrameDecoder()
    for chunk in split(data, rng):
        decoder.feed(chunk)


register(
    Target(
        "rendezvous-frames",
        _rendezvous_streams,
        _run_frames,
        (rv.FrameError,),
        doc="wire/rendezvous.py FrameDecoder on whole streams of CONTROL and RELAY frames, cut anywhere",
    )
)


def _run_control_body(data: bytes, rng: random.Random) -> None:
    _run_frames(_control_frame(data), rng)


register(
    Target(
        "rendezvous-control",
        _control_bodies,
        _run_control_body,
        (rv.FrameError,),
        dialect="msgpack",
        doc="wire/rendezvous.py FrameDecoder on one CONTROL frame whose msgpack body is mutated",
    )
)


def _resign_post(data: bytes, rng: random.Random) -> bytes:
    """Re-sign a Post's letter, or a ClaimName's claim, so the server's checks get past the signature."""
    try:
        message = msgspec.msgpack.decode(data, type=rv.Message)
    except (msgspec.DecodeError, RecursionError):
        return data
    if isinstance(message, rv.Post):
        letter = _resign_letter(message.letter)
        if letter is not None:
            return msgspec.msgpack.encode(msgspec.structs.replace(message, letter=letter))
    if isinstance(message, rv.ClaimName) and message.claim.public_key in SIGNERS:
        claim = make_claim(SIGNERS[message.claim.public_key], message.claim.name, SERVER.address)
        return msgspec.msgpack.encode(msgspec.structs.replace(message, claim=claim))
    return data


def _server_bodies() -> list[bytes]:
    """The control messages, with letters dated now: the server checks them against its own clock."""
    return [msgspec.msgpack.encode(m) for m in _rendezvous_messages(_letters(int(time.time())))]


_UNLIMITED = 1e15
#: The server's limits: an agent made with them (CAROL) is soon over its quotas, and cut off
#: after a few dropped messages in a row. Every fuzz input registers from the same address:
#: the registration rate is not what is fuzzed.
_TIGHT_LIMITS = rv_limits.ServerLimits(
    relay_rate=100.0,
    relay_burst=20_000.0,
    control_rate=0.1,
    control_burst=5.0,
    cutoff_drops=20,
    register_rate=_UNLIMITED,
    register_burst=_UNLIMITED,
)


def _admit(server: rv_server.RendezvousServer, identity: Identity, *, limited: bool = False) -> Agent:
    """``identity`` registered as the server registers an agent (``RendezvousServer._admit``,
    after the signature check), with the UDP credentials of ``UDP_KEYS``
    and, unless ``limited``, quotas no fuzz run exhausts."""
    agent = server._admit(_FakeLink(), rv.Register(identity.public_key, b""), format_endpoint(CLIENT_ADDR))
    if agent is None:
        raise AssertionError(f"the fixture server refused {identity.address}")
    credentials = {
        ALICE.public_key: (UDP_TOKEN, UDP_KEY),
        BOB.public_key: (BOB_TOKEN, BOB_KEY),
        CAROL.public_key: (CAROL_TOKEN, CAROL_KEY),
    }
    if identity.public_key in credentials:
        del server.udp_relay.tokens[agent.token]
        agent.token, agent.udp_key = credentials[identity.public_key]
        server.udp_relay.tokens[agent.token] = agent
    if not limited:
        now = time.monotonic()
        agent.control_quota = TokenBucket(_UNLIMITED, _UNLIMITED, now)
        agent.relay_quota = TokenBucket(_UNLIMITED, _UNLIMITED, now)
    return agent


@functools.cache
def _server(purpose: str) -> rv_server.RendezvousServer:
    """A server (one per target) with ALICE and BOB online, and CAROL on its tight limits (for
    whole connections, BOB alone, and the default limits)."""
    limits = (
        rv_limits.ServerLimits(register_rate=_UNLIMITED, register_burst=_UNLIMITED)
        if purpose == "connection"
        else _TIGHT_LIMITS
    )
    server = rv_server.RendezvousServer(SERVER, _tmpdir() / f"server-{purpose}", limits=limits)
    server.mailbox = rv_mailbox.Mailbox(":memory:")
    server.directory.open(":memory:")
    server.hosts = [SERVER_UDP[0]]
    server.port = SERVER_UDP[1]
    _admit(server, BOB)
    if purpose != "connection":  # there, the input registers
        _admit(server, ALICE)
        _admit(server, CAROL, limited=True)
    return server


def _online(server: rv_server.RendezvousServer, identity: Identity) -> Agent:
    """The agent of ``identity``, registered again if the server forgot it (as a cut-off agent reconnects)."""
    agent = server.agents.get(identity.address.digest)
    return agent if agent is not None else _admit(server, identity, limited=identity is CAROL)


def _run_server(data: bytes, rng: random.Random) -> None:
    server = _server("control")
    mailbox = server.mailbox
    assert mailbox is not None
    mailbox._db.execute("DELETE FROM seen")  # every letter is a fresh one to the server,
    mailbox._seen = 0
    mailbox._db.execute("DELETE FROM letters")  # and no mailbox is ever full
    agent = _online(server, CAROL if rng.random() < 0.1 else ALICE)
    _online(server, BOB)
    stream = _control_frame(data)
    if rng.random() < 0.1:
        stream += rv.encode_relay(BOB.address.digest, b"\x40" * 100)
    decoder = rv.FrameDecoder()
    try:
        for chunk in split(stream, rng):
            for message, datagram in decoder.feed(chunk):  # as RendezvousServer._serve does
                if datagram is None:
                    server._on_control(agent, message)  # type: ignore[arg-type]
                else:
                    server._relay(agent, message, datagram)  # type: ignore[arg-type]
    except rv_limits.CutOff:
        server._forget(agent)  # as _serve's finally does; the next input registers it again
        raise


register(
    Target(
        "rendezvous-server",
        _server_bodies,
        _run_server,
        (rv.FrameError, rv_limits.CutOff),
        dialect="msgpack",
        fixup=_resign_post,
        seeds_valid=False,
        doc="rendezvous/server.py: control messages decoded and handled (_on_control) for a registered agent "
        "(now and then one on tight quotas, which gets cut off)",
    )
)


@functools.cache
def _client(purpose: str) -> tuple[rv_client.RendezvousClient, list[tuple[bytes, tuple[str, int]]]]:
    """A client connected to a fake link (and, for ``udp``, registered with known UDP credentials);
    and the UDP datagrams it sends."""
    sent: list[tuple[bytes, tuple[str, int]]] = []

    def on_relay(source: bytes, datagram: bytes) -> None:
        if len(source) != rv.ADDRESS_BYTES or not 0 < len(datagram) <= rv.MAX_DATAGRAM:
            raise AssertionError(f"relayed a datagram of {len(datagram)} bytes from a {len(source)}-byte source")

    client = rv_client.RendezvousClient(
        ALICE,
        RendezvousUrl.parse(SERVER_URL),
        on_relay=on_relay,
        on_letter=lambda letter: None,
        on_registered=lambda registered: None,
        # Only the UDP client sends over UDP (the other's hello task would run on in the shared loop).
        udp_send=(lambda data, addr: sent.append((data, addr))) if purpose == "udp" else None,
    )
    client._link = _FakeLink()
    if purpose == "udp":
        client._udp_endpoint = SERVER_UDP
        client._token = UDP_TOKEN
        client._udp_key = UDP_KEY
    return client, sent


def _run_client(data: bytes, rng: random.Random) -> None:
    client, sent = _client("control")
    stream = _control_frame(data)
    decoder = rv.FrameDecoder()

    def handle() -> None:
        # Requests waiting for an answer (the seeds answer ids 3, 4, 7 and 8).
        loop = asyncio.get_running_loop()
        for pending in (client._lookups, client._posts):
            for request_id in (3, 4, 7, 8):
                if pending.get(request_id) is None or pending[request_id].done():
                    pending[request_id] = loop.create_future()
        for request_id in DIRECTORY_IDS:
            answer = client._answers.get(request_id)
            if answer is None or answer.done():
                client._answers[request_id] = loop.create_future()
        for chunk in split(stream, rng):
            for message, datagram in decoder.feed(chunk):  # as RendezvousClient._connect_and_serve does
                if datagram is None:
                    client._on_control(message)  # type: ignore[arg-type]

    try:
        _in_loop(handle)
    finally:
        sent.clear()


register(
    Target(
        "rendezvous-client",
        _control_bodies,
        _run_client,
        (rv.FrameError, rv_client.RendezvousError),
        dialect="msgpack",
        seeds_valid=False,
        doc="rendezvous/client.py: server messages decoded and handled (_on_control)",
    )
)


# -- the UDP relay transport ---------------------------------------------------------------


def _udp_seeds() -> list[bytes]:
    bob, alice, carol = BOB.address.digest, ALICE.address.digest, CAROL.address.digest
    return [
        # Agent -> server.
        rv.encode_udp_relay(UDP_TOKEN, UDP_KEY, bob, b"\x40" + bytes(1199)),
        rv.encode_udp_relay(UDP_TOKEN, UDP_KEY, bob, b"x"),
        rv.encode_udp_relay(UDP_TOKEN, UDP_KEY, bob, bytes(rv.MAX_DATAGRAM)),
        rv.encode_udp_relay(UDP_TOKEN, UDP_KEY, carol, b"x"),  # an agent without UDP
        rv.encode_udp_relay(UDP_TOKEN, UDP_KEY, bytes(16), b"x"),  # nobody online
        rv.encode_udp_relay(BOB_TOKEN, BOB_KEY, alice, b"\x40" + bytes(40)),
        rv.encode_udp_relay(CAROL_TOKEN, CAROL_KEY, bob, bytes(rv.MAX_DATAGRAM)),  # on tight quotas
        rv.encode_udp_hello(CAROL_TOKEN, CAROL_KEY),
        rv.encode_udp_relay(b"unknown!", UDP_KEY, bob, b"x"),
        rv.encode_udp_relay(UDP_TOKEN, BOB_KEY, bob, b"x"),  # the wrong key
        rv.encode_udp_hello(UDP_TOKEN, UDP_KEY),
        rv.encode_udp_hello(BOB_TOKEN, BOB_KEY),
        rv.encode_udp_hello(UDP_TOKEN, UDP_KEY, 5),  # numbered
        rv.encode_udp_hello(UDP_TOKEN, UDP_KEY, 2**64 - 1),
        rv.encode_udp_goodbye(UDP_TOKEN, UDP_KEY),
        rv.encode_udp_goodbye(BOB_TOKEN, UDP_KEY),  # another registration's key
        rv.encode_udp_response(UDP_TOKEN, UDP_KEY, UDP_NONCE),
        rv.encode_udp_response(UDP_TOKEN, UDP_KEY, bytes(rv.UDP_NONCE_BYTES)),  # not the nonce asked for
        # Server -> agent.
        rv.encode_udp_delivery(UDP_KEY, bob, b"\x40" + bytes(100)),
        rv.encode_udp_delivery(UDP_KEY, bob, bytes(rv.MAX_DATAGRAM)),
        rv.encode_udp_ack(UDP_TOKEN, UDP_KEY),
        rv.encode_udp_ack(BOB_TOKEN, UDP_KEY),  # another registration's token
        rv.encode_udp_challenge(UDP_TOKEN, UDP_KEY, UDP_NONCE),
        rv.encode_udp_wake(UDP_TOKEN, UDP_KEY),
        rv.encode_udp_wake(BOB_TOKEN, UDP_KEY),  # another registration's token
    ]


def _udp_seal(data: bytes) -> bytes:
    """``data`` with its MAC made again, under the key of the token it names (else ALICE's)."""
    if len(data) <= rv.MAC_BYTES:
        return data
    body = data[: -rv.MAC_BYTES]
    key = UDP_KEYS.get(body[1 : 1 + rv.TOKEN_BYTES], UDP_KEY) if body[:1] != bytes([rv.UDP_FROM_SERVER]) else UDP_KEY
    return body + hashlib.blake2b(body, key=key, digest_size=rv.MAC_BYTES).digest()


def _udp_fixup(data: bytes, rng: random.Random) -> bytes:
    """Seal the mutated frame again, so what follows the MAC check runs; now and then give it
    a kind and the size that kind has first."""
    if rng.random() < 0.3:
        return data
    buf = bytearray(data)
    if len(buf) > rv.MAC_BYTES and rng.random() < 0.3:
        kind = rng.choice((*rv._FIXED, rv.UDP_TO_SERVER, rv.UDP_FROM_SERVER))
        buf[0] = kind
        size = rv._FIXED.get(kind)
        if size is not None:
            buf = (buf + bytes(size))[:size]
    return _udp_seal(bytes(buf))


def _check_udp_frame(frame: bytes) -> None:
    """A frame we send must parse and be sealed under a key of ours."""
    rv.parse_udp_relay(frame)
    if not any(rv.udp_authentic(key, frame) for key in UDP_KEYS.values()):
        raise AssertionError(f"sent a UDP relay frame sealed under no key of ours: {frame[:40].hex()}")


def _run_udp_relay(data: bytes, rng: random.Random) -> None:
    rv.is_udp_relay(data)
    frame = rv.parse_udp_relay(data)
    for key in (UDP_KEY, BOB_KEY, b""):
        rv.udp_authentic(key, data)
    _ = frame.kind, frame.token, frame.address, frame.payload


register(
    Target(
        "udp-relay",
        _udp_seeds,
        _run_udp_relay,
        (rv.FrameError,),
        fixup=_udp_fixup,
        doc="wire/rendezvous.py parse_udp_relay and udp_authentic (mutated frames sealed again)",
    )
)


@functools.cache
def _udp_sockets() -> tuple[_FakeUdp, _FakeUdp]:
    return _FakeUdp(), _FakeUdp()


#: Where the UDP relay frames come from: agents' endpoints, and a stranger's.
_UDP_SOURCES = (CLIENT_ADDR, ("198.51.100.7", 40001), ("2001:db8::7", 40000), ("203.0.113.66", 666))
#: BOB's confirmed UDP endpoint, when he has one.
_BOB_UDP = ("203.0.113.9", 5000)


def _run_udp_server(data: bytes, rng: random.Random) -> None:
    server = _server("udp")
    agents = {identity: _online(server, identity) for identity in (ALICE, BOB, CAROL)}
    sockets = _udp_sockets()
    sock = rng.choice(sockets)
    source = rng.choice(_UDP_SOURCES)
    now = time.monotonic()
    # BOB receives relayed datagrams over UDP, or over TLS.
    bob = agents[BOB]
    bob.udp_ready = rng.random() < 0.5
    bob.udp_endpoint, bob.udp_socket, bob.udp_seen = _BOB_UDP, rng.choice(sockets), now  # type: ignore[assignment]
    # The sender's UDP state as the protocol may have left it: a challenge outstanding for this
    # source, this source confirmed, or whatever the previous input left.
    sender = server.udp_relay.tokens.get(data[1 : 1 + rv.TOKEN_BYTES], agents[ALICE])
    state = rng.random()
    if state < 0.3:
        sender.udp_challenges[source] = (UDP_NONCE, sock, now, 0)  # type: ignore[assignment]
    elif state < 0.6:
        sender.udp_endpoint, sender.udp_socket, sender.udp_seen = source, sock, now  # type: ignore[assignment]
    try:
        server._udp_received(data, source, sock)  # type: ignore[arg-type]
        for out, to in [*sockets[0].sent, *sockets[1].sent]:
            # The server never answers a datagram with more bytes than came in, and what it sends is well-formed.
            if to == source and len(out) > len(data):
                raise AssertionError(f"answered {len(data)} bytes from {source} with {len(out)}")
            if to not in (source, _BOB_UDP):
                raise AssertionError(f"sent to {to}, neither the source {source} nor a confirmed endpoint")
            _check_udp_frame(out)
    finally:
        for s in sockets:
            s.sent.clear()


register(
    Target(
        "udp-server",
        _udp_seeds,
        _run_udp_server,
        (),
        fixup=_udp_fixup,
        doc="rendezvous/udp_relay.py UdpRelay.received: never raises, never answers with more bytes "
        "than came in, and what it sends parses and is sealed",
    )
)


def _run_udp_client(data: bytes, rng: random.Random) -> None:
    client, sent = _client("udp")
    if rng.random() < 0.3:
        client.udp_ready = False
    source = SERVER_UDP if rng.random() < 0.9 else rng.choice(_UDP_SOURCES)
    try:
        _in_loop(lambda: client.udp_received(data, source))
        for out, to in sent:
            if to != SERVER_UDP or len(out) > len(data):
                raise AssertionError(f"answered {len(data)} bytes from {source} with {len(out)} to {to}")
            _check_udp_frame(out)
    finally:
        sent.clear()


register(
    Target(
        "udp-client",
        _udp_seeds,
        _run_udp_client,
        (),
        fixup=_udp_fixup,
        doc="rendezvous/client.py RendezvousClient.udp_received: never raises, and answers only the server, "
        "with no more bytes than came in",
    )
)


# -- a whole connection to the server ---------------------------------------------------


class _Stranger(_FakeLink):
    """A connection to the server that sends the input, cut as the split says. Once the server's
    challenge is out, a registration first in the input that names a key of ours is signed over
    it (unless ``resign`` is off), so what follows the signature check runs."""

    def __init__(self, data: bytes, rng: random.Random, resign: bool) -> None:
        super().__init__()
        self.data, self.rng, self.resign = data, rng, resign
        self.chunks: list[bytes] | None = None
        self.nonce: bytes | None = None

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.nonce is None:
            with contextlib.suppress(rv.FrameError, ValueError, IndexError):
                challenge = rv.FrameDecoder().feed(data)[0][0]
                if isinstance(challenge, rv.Challenge):
                    self.nonce = challenge.nonce

    async def read(self) -> bytes:
        if self.chunks is None:
            self.chunks = split(self._signed(self.data), self.rng)
        return self.chunks.pop(0) if self.chunks else b""

    def _signed(self, data: bytes) -> bytes:
        if not self.resign or self.nonce is None or len(data) < 4:
            return data
        kind, length = data[0], int.from_bytes(data[1:4], "big")
        if kind != rv.FrameType.CONTROL or len(data) < 4 + length:
            return data
        try:
            register = rv.decode_control(data[4 : 4 + length])
        except rv.FrameError:
            return data
        signer = SIGNERS.get(register.public_key) if isinstance(register, rv.Register) else None
        if signer is None:
            return data
        payload = rv.register_payload(self.nonce, signer.address.digest, SERVER.address.digest)
        signed = rv.encode_control(rv.Register(signer.public_key, signer.sign(payload)))
        return signed + data[4 + length :]


def _connection_seeds() -> list[bytes]:
    register = rv.encode_control(rv.Register(ALICE.public_key, bytes(64)))  # signed over the server's nonce
    messages = _rendezvous_messages(_letters(int(time.time())))
    agents = (
        *(rv.Lookup, rv.Ping, rv.Pong, rv.Post, rv.Received, rv.UdpReady, rv.Rest, rv.Stay, rv.HomeRelay),
        *(rv.ClaimName, rv.ReleaseName, rv.ResolveName, rv.SetProfile, rv.Find),
    )
    # What an agent sends, then what only a server sends (which ends the connection).
    ordered = [m for m in messages if isinstance(m, agents)] + [m for m in messages if not isinstance(m, agents)]
    relay = rv.encode_relay(BOB.address.digest, b"\x40" * 100)
    return [
        register,
        register + b"".join(map(rv.encode_control, ordered)),
        register + relay + rv.encode_control(messages[0]),
        register + rv.encode_control(rv.Lookup(1, str(BOB.address))) + rv.encode_control(rv.Ping(2)),
        register + rv.encode_control(rv.Post(3, _letters(int(time.time()))[0])) + rv.encode_control(rv.Received(1)),
        register + register,
        rv.encode_control(rv.Register(CAROL.public_key, bytes(64))),
        rv.encode_control(rv.Register(SERVER.public_key, bytes(64))),  # a key we hold no signature of
        # A small-order key (nobody holds its private key): its zero "signature" verifies for about
        # one nonce in four (test_fuzz.py, test_a_small_order_key_*).
        rv.encode_control(rv.Register(bytes(32), bytes(64))),
        rv.encode_control(rv.Register(b"short", b"")),
        rv.encode_control(rv.Lookup(1, str(BOB.address))),  # not a registration
        relay,
    ]


def _run_connection(data: bytes, rng: random.Random) -> None:
    server = _server("connection")
    assert server.mailbox is not None
    server.mailbox._db.execute("DELETE FROM seen")  # every letter is a fresh one to the server,
    server.mailbox._seen = 0
    server.mailbox._db.execute("DELETE FROM letters")  # and no mailbox is ever full
    _online(server, BOB)
    link = _Stranger(data, rng, resign=rng.random() < 0.8)
    _run_catching(rv_server.__name__, lambda: server._serve(link))
    # Whatever the connection made is gone with it.
    if server._open or server._per_ip:
        raise AssertionError(f"{server._open} connection(s) still counted: {server._per_ip}")
    for identity in SIGNERS.values():
        if identity is not BOB and identity.address.digest in server.agents:
            raise AssertionError(f"{identity.address} still online after its connection ended")
    if set(server.udp_relay.tokens.values()) - set(server.agents.values()):
        raise AssertionError("a token outlived its agent")
    if not link.closed:
        raise AssertionError("the connection was not closed")


register(
    Target(
        "rendezvous-connection",
        _connection_seeds,
        _run_connection,
        (),
        doc="rendezvous/server.py RendezvousServer._serve on a whole connection (registration over the "
        "server's challenge, re-signed, then frames); its catch-all must log nothing, and what the "
        "connection made is gone when it ends",
    )
)


# -- connectivity checks -------------------------------------------------------------------


def _punch_tag(*parts: bytes) -> bytes:
    return hmac.new(PUNCH_KEY, b"".join(parts), hashlib.sha256).digest()[: punch.TAG_BYTES]


#: Where checks come from: the round's two candidates, and peer-reflexive sources.
_PUNCH_SOURCES = [(f"198.51.100.{i}", 40000 + i) for i in range(12)]


def _punch_seeds() -> list[bytes]:
    tid = bytes(range(12))
    return [
        punch.encode_check(PUNCH_KEY, tid),
        punch.encode_check(PUNCH_KEY, bytes(range(12, 24))),
        punch.encode_check(PUNCH_KEY, bytes(range(24, 36)), 2000),  # a path MTU probe
        punch.encode_response(PUNCH_KEY, tid, ("198.51.100.7", 40000)),
        punch.encode_response(PUNCH_KEY, tid, ("2001:db8::7", 1)),
        punch.encode_response(PUNCH_KEY, tid, ("0.0.0.0", 0)),
        punch.encode_check(bytes(32), tid),
        punch.encode_response(PUNCH_KEY, (1).to_bytes(punch.TID_BYTES, "big"), _PUNCH_SOURCES[0]),  # the round's own
    ]


def _punch_fixup(data: bytes, rng: random.Random) -> bytes:
    """Sign the mutated check or response with the session's key, so parse reads on past the MAC
    (a check's padding is left as mutated, or zeroed)."""
    buf = bytearray(data)
    if buf and rng.random() < 0.2:
        buf[0] = rng.choice((punch.CHECK, punch.RESPONSE))
    if buf and rng.random() < 0.2:
        buf = (buf + bytes(punch.SIZE))[: punch.SIZE]
    head = 1 + punch.TID_BYTES
    probe = bool(buf) and buf[0] == punch.CHECK and punch.SIZE < len(buf) <= punch.MAX_SIZE
    if len(buf) != punch.SIZE and not probe:
        return bytes(buf)
    tid, rest = bytes(buf[1:head]), head + punch.TAG_BYTES
    if buf[0] == punch.CHECK:
        buf[head:rest] = _punch_tag(b"check", tid)
        if rng.random() < 0.7:
            buf[rest:] = bytes(len(buf) - rest)
    elif buf[0] == punch.RESPONSE:
        buf[head:rest] = _punch_tag(b"response", tid, bytes(buf[rest:]))
    return bytes(buf)


@functools.cache
def _puncher() -> tuple[Puncher, list[int]]:
    """One long round of checks (with a transaction id counter that makes its checks known)."""
    counter = [0]

    def tids(n: int) -> bytes:
        counter[0] += 1
        return counter[0].to_bytes(n, "big")

    puncher = Puncher(PUNCH_KEY, _PUNCH_SOURCES[:2], start=0.0, duration=1e18, random_bytes=tids)
    puncher.datagrams_to_send(0.0)  # its first checks (transaction ids 1 and 2), to its two candidates
    return puncher, counter


def _run_punch(data: bytes, rng: random.Random) -> None:
    # The round's engine first: it must take a datagram or leave it, never raise, and what it
    # answers with is bounded (no bigger than a check; peer-reflexive sources within their limits).
    puncher, _ = _puncher()
    source = rng.choice(_PUNCH_SOURCES)
    puncher.receive(data, source)
    for out, to in puncher.datagrams_to_send(0.0):
        if len(out) != punch.SIZE or (to == source and len(out) > len(data)):
            raise AssertionError(f"answered {len(data)} bytes with {len(out)}")
        punch.parse(PUNCH_KEY, out)
    if len(puncher.triggered) > nat_punch.MAX_PEER_REFLEXIVE or any(
        sent > nat_punch.TRIGGERED_PER_SOURCE for _, sent in puncher.triggered.values()
    ):
        raise AssertionError(f"triggered checks beyond the limits: {puncher.triggered}")
    if len(puncher._sent) > 100_000:  # a long run: start a fresh round
        _puncher.cache_clear()
    punch.is_check(data)
    punch.parse(PUNCH_KEY, data)


register(
    Target(
        "punch",
        _punch_seeds,
        _run_punch,
        (punch.CheckError,),
        fixup=_punch_fixup,
        seeds_valid=False,
        doc="wire/punch.py parse with the session's key (mutated inputs re-signed with it), and nat/punch.py "
        "Puncher.receive: bounded answers, peer-reflexive limits",
    )
)


# -- port mapping ------------------------------------------------------------------------


def _map_requests() -> list[portmap.MapRequest]:
    return [
        portmap.MapRequest("udp", 40000, 7200, "192.168.1.20", bytes(range(12)), 40000, "0.0.0.0"),
        portmap.MapRequest("tcp", 40000, 0, "192.168.1.20", bytes(12)),
        portmap.MapRequest("udp", 1, 7200, "2001:db8::20", b"n" * 12, 0, "2001:db8::1"),
    ]


def _portmap_response_seeds() -> list[bytes]:
    udp, tcp, v6 = _map_requests()
    return [
        portmap.encode_pcp_map_response(udp, 0, 7200, 1234, ("203.0.113.5", 40000)),
        portmap.encode_pcp_map_response(tcp, 0, 0, 1, ("203.0.113.5", 40001)),
        portmap.encode_pcp_map_response(v6, 0, 7200, 1, ("2001:db8::5", 40000)),
        portmap.encode_pcp_map_response(udp, 2, 0, 1, ("0.0.0.0", 0)),
        portmap.encode_pcp_map_response(udp, 13, 0, 1, ("0.0.0.0", 0)) + bytes(24),
        portmap.encode_natpmp_map_response(portmap.NATPMP_OP_UDP, 0, 99, 40000, 40000, 7200),
        portmap.encode_natpmp_map_response(portmap.NATPMP_OP_TCP, 0, 99, 40000, 40001, 0),
        portmap.encode_natpmp_map_response(portmap.NATPMP_OP_UDP, 3, 99, 40000, 0, 0),
        portmap.encode_natpmp_address_response(0, 99, "203.0.113.5"),
        portmap.encode_natpmp_address_response(3, 99, "0.0.0.0"),
        struct.pack("!BBHI", portmap.NATPMP_VERSION, portmap.RESPONSE_BIT, 1, 99),  # "unsupported version"
    ]


def _portmap_fixup(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    if rng.random() < 0.5:
        buf += bytes(-len(buf) % 4)
    if buf and rng.random() < 0.3:
        buf[0] = rng.choice((portmap.PCP_VERSION, portmap.NATPMP_VERSION))
    return bytes(buf)


def _run_portmap_response(data: bytes, rng: random.Random) -> None:
    with contextlib.suppress(portmap.PortMapError):
        portmap.decode_natpmp_address(data)
    answer = portmap.decode_response(data)
    _ = answer.ok, answer.reason


register(
    Target(
        "portmap-response",
        _portmap_response_seeds,
        _run_portmap_response,
        (portmap.PortMapError,),
        fixup=_portmap_fixup,
        seeds_valid=False,
        doc="wire/portmap.py decode_response and decode_natpmp_address (PCP and NAT-PMP answers)",
    )
)


def _portmap_request_seeds() -> list[bytes]:
    requests = _map_requests()
    return [
        *(portmap.encode_pcp_map(r) for r in requests),
        portmap.encode_pcp_map(requests[0]) + struct.pack("!BBH", 0x80, 0, 4) + bytes(4),  # with an option
        portmap.encode_natpmp_map(requests[0]),
        portmap.encode_natpmp_address(),
    ]


def _run_portmap_request(data: bytes, rng: random.Random) -> None:
    request, _ = portmap.decode_pcp_map_request(data)
    _ = request.protocol, request.internal_port


register(
    Target(
        "portmap-request",
        _portmap_request_seeds,
        _run_portmap_request,
        (portmap.PortMapError,),
        fixup=_portmap_fixup,
        seeds_valid=False,
        doc="wire/portmap.py decode_pcp_map_request (as a PCP server reads requests)",
    )
)


# -- session control -------------------------------------------------------------------


def _session_frames() -> list[session.Frame]:
    return [
        session.Hello(session.PROTOCOL_VERSION, ALICE.public_key),
        session.Challenge(bytes(range(32))),
        session.Auth(ALICE.sign(b"anything")),
        session.Welcome(),
        session.OpenStream(80),
        session.Accept(True),
        session.Accept(False, "no service on port 81"),
        session.Message(True),
        session.Message(False, "punch-offer"),
        session.Ping(),
        session.Reply(True),
        session.Reply(False, "handler error: ValueError"),
    ]


def _session_bodies() -> list[bytes]:
    return [msgspec.msgpack.encode(f) for f in _session_frames()]


def _session_streams() -> list[bytes]:
    frames = [session.encode(f) for f in _session_frames()]
    return [
        *frames,
        b"".join(frames[:4]),
        frames[4] + b"payload of the stream",
        frames[7] + bytes(3000),
        b"".join(frames),
    ]


def _run_session(data: bytes, rng: random.Random) -> None:
    cuts = split(data, rng)

    def feed() -> None:
        reader = session.FrameReader()
        for chunk in cuts:
            reader.feed(chunk)

    def feed_header() -> None:
        reader = session.FrameReader()
        for chunk in cuts:
            if reader.feed_header(chunk) is not None:
                break
        reader.take_rest()

    _first_error(feed, feed_header, ours=(session.ControlError,))


register(
    Target(
        "session-frames",
        _session_streams,
        _run_session,
        (session.ControlError,),
        seeds_valid=False,
        doc="session/control.py FrameReader.feed and feed_header on streams of frames, cut anywhere",
    )
)


def _run_session_body(data: bytes, rng: random.Random) -> None:
    _run_session(_session_frame(data), rng)


register(
    Target(
        "session-control",
        _session_bodies,
        _run_session_body,
        (session.ControlError,),
        dialect="msgpack",
        doc="session/control.py FrameReader on one frame whose msgpack body is mutated",
    )
)


# -- letters -----------------------------------------------------------------------------


def _letter_seeds() -> list[bytes]:
    return [msgspec.msgpack.encode(letter) for letter in _letters()]


def _letters_fixup(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.4:
        return data
    try:
        letter = msgspec.msgpack.decode(data, type=rv.Letter)
    except (msgspec.DecodeError, RecursionError):
        return data
    signed = _resign_letter(letter)
    return msgspec.msgpack.encode(signed) if signed is not None else data


@functools.cache
def _broker() -> tuple[TrustBroker, rv_mailbox.Mailbox]:
    directory = _tmpdir() / "bob"
    broker = TrustBroker(BOB, TrustStore(directory / "trust.json"), directory / "trust-requests.json")
    alice = str(ALICE.address)
    broker.requests.outgoing[alice] = Request(alice, "", NOW - 3600, REQUEST_NONCE.hex())
    return broker, rv_mailbox.Mailbox(":memory:")


#: A Deliver message up to its letter: letters reach an agent inside one (and the server inside a Post).
_DELIVER_HEAD = b"\x83\xa4type\xa7deliver\xa9letter_id\x01\xa6letter"


def _run_letters(data: bytes, rng: random.Random) -> None:
    broker, mailbox = _broker()
    mailbox._db.execute("DELETE FROM seen")  # every input is a fresh letter to the server
    mailbox._seen = 0
    ((message, _),) = rv.FrameDecoder().feed(_control_frame(_DELIVER_HEAD + data))
    letter = message.letter  # type: ignore[union-attr]
    sender, recipient = check_letter(letter, NOW)
    broker.receive(letter, NOW)  # the recipient's side: must never raise
    if len(broker.requests.seen) > 1000:
        broker.requests.seen.clear()
    letter_id = mailbox.post(letter, sender.digest, recipient.digest, NOW)  # the server's side
    stored = dict(mailbox.waiting_for(recipient.digest))  # the mailbox's decoder of stored bodies
    mailbox.delete(letter_id, recipient.digest)
    if stored.get(letter_id) != letter:
        raise AssertionError("the mailbox did not give back the letter it stored")


register(
    Target(
        "letters",
        _letter_seeds,
        _run_letters,
        (rv.FrameError, LetterError),
        dialect="msgpack",
        fixup=_letters_fixup,
        doc="rendezvous/letters.py check_letter on letters decoded from a Deliver frame, then the recipient's "
        "TrustBroker.receive and the mailbox's store and read back (mutated letters re-signed)",
    )
)


# -- direct paths ----------------------------------------------------------------------


def _direct_seeds() -> list[bytes]:
    return [
        msgspec.msgpack.encode(
            traversal.Offer(
                PUNCH_KEY,
                ["10.0.0.2:4000", "[2001:db8::2]:4000"],
                "198.51.100.7:40000",
                True,
                ["10.0.0.2:4000"],
                False,
                40000,
                2,
            )
        ),
        msgspec.msgpack.encode(traversal.Offer(PUNCH_KEY, [])),
        msgspec.msgpack.encode(  # every field at its largest
            traversal.Offer(
                PUNCH_KEY,
                [f"[2001:db8::{i}]:65535" for i in range(nat_punch.MAX_CANDIDATES)],
                "r" * 64,
                True,
                ["t" * 64] * nat_punch.MAX_CANDIDATES,
                True,
                65535,
                65535,
            )
        ),
        msgspec.msgpack.encode(traversal.Answer(["10.0.0.3:4000"], "198.51.100.8:50000", False, ["10.0.0.3:4000"])),
        msgspec.msgpack.encode(traversal.Answer([], held=0.25, next_port=65000, port_step=7)),
        msgspec.msgpack.encode(traversal.Go(True)),
        msgspec.msgpack.encode(traversal.Go()),
    ]


_LOCAL = traversal.LocalSide(
    ["10.0.0.1:4000", "198.51.100.1:4000"], ["10.0.0.1:4000"], "198.51.100.1:4000", False, True
)


def _run_direct(data: bytes, rng: random.Random) -> None:
    decoded: list[Any] = []
    error: errors.RemoteError | None = None
    for kind in (traversal.Offer, traversal.Answer, traversal.Go, traversal.CheckKey):
        try:
            decoded.append(traversal.decode_message(data, kind))
        except errors.RemoteError as exc:
            error = exc
    for message in decoded:  # the controller fed the peer's word, as a node does
        plans = []
        if isinstance(message, traversal.Go):
            responder = traversal.Traversal(initiator=False)
            responder.offered(traversal.Offer(PUNCH_KEY, ["198.51.100.9:4000"]), _LOCAL, held=0.0)
            plans.append(responder.go(message, now=1.0))
        elif isinstance(message, traversal.CheckKey):
            traversal.Traversal(initiator=False).remember(message.key)
        elif isinstance(message, traversal.Offer):
            responder = traversal.Traversal(initiator=False)
            responder.remember(message.key)
            responder.offered(message, _LOCAL, held=0.0)
            plans.append(responder.go(traversal.Go(rng.random() < 0.5), now=1.0))
        else:
            initiator = traversal.Traversal(initiator=True)
            offer = initiator.offer(traversal.LocalSide(_LOCAL.candidates, _LOCAL.tcp, None, rng.random() < 0.5, True))
            initiator.answered(offer, message, sent=0.0, now=0.1)
            plans.append(initiator.begin(now=0.1))
        for plan in plans:
            if plan is None:
                continue
            udp = traversal.UdpRound(plan, fresh_socket=rng.random() < 0.5, rng=rng)
            udp.opened(min(udp.sockets_wanted, 4))
            udp.datagrams_to_send(plan.start + 0.1)
            udp.poll(plan.start + 0.1)
    if not decoded and error is not None:
        raise error


register(
    Target(
        "direct-offer",
        _direct_seeds,
        _run_direct,
        (errors.RemoteError,),
        dialect="msgpack",
        doc="nat/traversal.py: punch-offer, answer and go messages (msgpack from the peer), fed to the "
        "direct-path controller and a UDP round planned from them",
    )
)


# -- TCP links ---------------------------------------------------------------------------


class _FakeTcpLinks:
    def __init__(self) -> None:
        self.frames = 0
        self.counters = {"send_dropped": 0}

    def on_frame(self, link: TcpLink, frame: bytes) -> None:
        self.frames += 1

    def _added(self, link: TcpLink) -> None:
        pass

    def _lost(self, link: TcpLink) -> None:
        pass


def _tcp_seeds() -> list[bytes]:
    check = punch.encode_check(PUNCH_KEY, bytes(12))
    datagram = b"\x40" + bytes(1199)
    return [
        FRAME.pack(len(check)) + check,
        FRAME.pack(0),
        FRAME.pack(len(datagram)) + datagram + FRAME.pack(len(check)) + check,
        FRAME.pack(0xFFFF) + b"\x41" * 0xFFFF,
    ]


def _run_tcp(data: bytes, rng: random.Random) -> None:
    link = TcpLink(_FakeTcpLinks(), inbound=True)  # type: ignore[arg-type]
    for chunk in split(data, rng):
        link.data_received(chunk)


register(
    Target(
        "tcp-link",
        _tcp_seeds,
        _run_tcp,
        (),
        doc="node/tcp.py TcpLink.data_received: the length-framed datagrams of a direct TCP link",
    )
)


# -- the local control socket ------------------------------------------------------------


class _FakeConn:
    def __init__(self, peer: Address) -> None:
        self.pings = 0
        self.path = None
        self.peer = peer

    async def ping(self, timeout: float) -> float:
        self.pings += 1
        if self.pings == 2:
            raise errors.RequestTimeoutError("no pong")
        if self.pings > 3:
            raise errors.SessionClosedError("the fake session ends after three pings")
        return 0.001


class _FakeNode:
    """What ControlServer asks of a node, minus the network."""

    def status(self) -> dict[str, Any]:
        return {"address": str(BOB.address), "sessions": []}

    async def request_trust(self, address: Address, note: str) -> None:
        pass

    async def approve_trust(self, address: Address) -> None:
        pass

    def deny_trust(self, address: Address) -> None:
        pass

    def pending_trust(self) -> list[Request]:
        return [Request(str(ALICE.address), "hi", NOW, REQUEST_NONCE.hex())]

    async def connect(
        self, address: Address | str, via: tuple[str, int] | None = None, *, timeout: float | None
    ) -> Any:
        return _FakeConn(Address.parse(address) if isinstance(address, str) else address)


class _FakeWriter:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def _control_seeds() -> list[bytes]:
    alice = str(ALICE.address)
    requests: list[dict[str, Any]] = [
        {"op": "status"},
        {"op": "ping", "address": alice, "count": 3, "interval": 0.5, "timeout": 2.0, "via": "127.0.0.1:40000"},
        {"op": "ping", "address": alice},
        {"op": "trust-request", "address": alice, "note": "alice, the planner agent"},
        {"op": "trust-approve", "address": alice},
        {"op": "trust-deny", "address": alice},
        {"op": "trust-pending"},
        {"op": "tunnels-reload"},
        {"op": "connect", "address": alice, "service": "ssh"},
        {"op": "connect", "address": alice, "service": "50051"},
        {"op": "nonsense"},
    ]
    return [msgspec.json.encode(r) for r in requests]


def _control_fixup(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        data += b"\n" + rng.choice(_control_seeds())
    if rng.random() < 0.5:
        data += b"\n"
    return data


#: The longest request line the daemon reads.
_MAX_REQUEST_LINE = node_control.MAX_REQUEST_LINE


def control_answers(data: bytes) -> list[dict[str, Any]]:
    """What ControlServer._serve answers to ``data`` (request lines from a client); an exception
    its catch-all logged is raised again (with its traceback), as one that escaped it would be."""
    server = node_control.ControlServer(_FakeNode(), Path("/nonexistent/control.sock"))  # type: ignore[arg-type]
    writer = _FakeWriter()

    async def serve() -> None:
        reader = asyncio.StreamReader(limit=_MAX_REQUEST_LINE)
        reader.feed_data(data)
        reader.feed_eof()
        await server._serve(reader, writer)  # type: ignore[arg-type]

    _run_catching(node_control.__name__, serve)  # the daemon's catch-all caught a bug: raised here
    answers = []
    for line in writer.lines:
        answer = msgspec.json.decode(line)
        if not isinstance(answer, dict):
            raise AssertionError(f"the control socket answered {line!r}")
        answers.append(answer)
    return answers


def _run_control(data: bytes, rng: random.Random) -> None:
    answers = control_answers(data)
    for answer in answers:
        error = answer.get("error")
        if isinstance(error, str) and error.startswith("internal error"):
            raise AssertionError(f"the control socket answered {error!r}")
    # Every request line is answered, and its answer ends with "done" or "error" (a blank
    # line may be skipped or answered with an error).
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    requests = sum(1 for line in lines if line.strip())
    ends = sum(1 for answer in answers if answer.get("done") is True or "error" in answer)
    if not requests <= ends <= len(lines):
        raise AssertionError(f"{requests} request line(s) ({len(lines)} with blank ones) got {ends} final answer(s)")


register(
    Target(
        "node-control",
        _control_seeds,
        _run_control,
        (),
        dialect="json",
        fixup=_control_fixup,
        doc="node/control.py ControlServer._serve on JSON request lines (a fake node behind it); an "
        '"internal error" answer counts as a foreign exception',
    )
)


# -- text from the network ---------------------------------------------------------------


def _text_seeds() -> list[bytes]:
    return [
        str(ALICE.address).encode(),
        str(ALICE.address).upper().encode(),
        SERVER_URL.encode(),
        f"pp://{SERVER.address}@[2001:db8::1]:443?wss=443".encode(),
        f"pp://{SERVER.address}@relay.example.org".encode(),
        b"127.0.0.1:7878",
        b"[2001:db8::1]:40000",
    ]


def _run_text(data: bytes, rng: random.Random) -> None:
    text = data.decode("utf-8", "replace")
    rv_client._pick_udp_endpoint([text, "127.0.0.1:7878"], "127.0.0.1")  # the client does not expect it to raise
    for parse in (
        Address.parse,
        RendezvousUrl.parse,
        parse_endpoint,
        functools.partial(parse_endpoint, default_port=3478),
        service_port,
        split_target,
        parse_bind,
        Destination.parse,
    ):
        with contextlib.suppress(ValueError):
            parse(text)


register(
    Target(
        "text",
        _text_seeds,
        _run_text,
        (),
        dialect="text",
        doc="addresses, rendezvous URLs, endpoints and tunnel arguments that arrive in messages or are typed "
        "(Address.parse, RendezvousUrl.parse, parse_endpoint strict and with a default port, service names, "
        "PEER[:SERVICE], [BIND:]PORT, tunnel targets, the client's _pick_udp_endpoint)",
    )
)


# The agent services' and the relay data plane's targets register themselves on import.
from . import relay_targets, service_targets  # noqa: E402, F401
