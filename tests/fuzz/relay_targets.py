"""Fuzz targets of the server's relay data plane (issue 14): the stream of a registered agent
read frame by frame in place (``wire.rendezvous.frame_at``), its relay frames routed by their
header alone (``DataPlane.relay_frames``) and its control frames handled, cut anywhere."""

from __future__ import annotations

import functools
import random
import struct

from peerpath.rendezvous import limits as rv_limits
from peerpath.rendezvous import mailbox as rv_mailbox
from peerpath.rendezvous import server as rv_server
from peerpath.rendezvous.connection import AgentConnection
from peerpath.wire import rendezvous as rv

from .harness import Target, split
from .targets import ALICE, BOB, CAROL, SERVER, SERVER_UDP, _admit, _FakeLink, _run_catching, _tmpdir, register

_UNLIMITED = 1e15


def _stream_seeds() -> list[bytes]:
    bob, carol = BOB.address.digest, CAROL.address.digest
    relays = [
        rv.encode_relay(bob, b"\x40" + bytes(1199)),
        rv.encode_relay(bob, b"x"),
        rv.encode_relay(bob, bytes(rv.MAX_DATAGRAM)),
        rv.encode_relay(carol, bytes(300)),  # an agent on tight quotas
        rv.encode_relay(bytes(16), b"x"),  # nobody online
    ]
    controls = [rv.encode_control(m) for m in (rv.Ping(1), rv.Lookup(2, str(BOB.address)), rv.UdpReady(True))]
    return [
        *relays,
        b"".join(relays),
        relays[0] * 40,
        b"".join(relays[:2]) + controls[0] + b"".join(relays[2:]) + controls[1],
        controls[2] + relays[0] * 3,
        b"".join(controls),
    ]


class _Receiver(_FakeLink):
    """BOB's link: keeps what is relayed to him, to check it."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        super().write(data)
        self.data += data


@functools.cache
def _server() -> tuple[rv_server.RendezvousServer, _Receiver]:
    """A server with BOB online (on a link that keeps what he gets) and CAROL on tight quotas."""
    limits = rv_limits.ServerLimits(register_rate=_UNLIMITED, register_burst=_UNLIMITED)
    server = rv_server.RendezvousServer(SERVER, _tmpdir() / "server-stream", limits=limits)
    server.mailbox = rv_mailbox.Mailbox(":memory:")
    server.directory.open(":memory:")
    server.hosts = [SERVER_UDP[0]]
    server.port = SERVER_UDP[1]
    bob = _Receiver()
    server._admit(bob, rv.Register(BOB.public_key, b""), "198.51.100.9:4000")
    carol = _admit(server, CAROL, limited=True)
    carol.relay_quota.rate, carol.relay_quota.burst = 100.0, 2_000.0
    return server, bob


def _run_stream(data: bytes, rng: random.Random) -> None:
    server, bob = _server()
    bob.data.clear()
    link = _FakeLink()
    connection = AgentConnection(server, link)

    async def run() -> None:
        if not connection.open():
            raise AssertionError("the fixture server refused a connection")
        # Registered as the server registers a verified agent (the signature is not fuzzed here).
        connection._nonce = None
        connection.agent = _admit(server, ALICE)
        for chunk in split(data, rng):
            if not connection.received(memoryview(bytearray(chunk))):
                break
        connection.end()

    _run_catching(rv_server.__name__, run)
    if server._open or server._per_ip or ALICE.address.digest in server.agents:
        raise AssertionError("the connection left something behind")
    # What BOB got is whole relay frames from ALICE, each with a datagram it may carry.
    offset, out = 0, bytes(bob.data)
    while (found := rv.frame_at(out, offset)) is not None:
        kind, end = found
        if kind == rv.FrameType.RELAY and out[offset + 4 : offset + rv.RELAY_HEAD] != ALICE.address.digest:
            raise AssertionError(f"relayed to BOB from {out[offset + 4 : offset + rv.RELAY_HEAD].hex()}")
        offset = end
    if offset != len(out):
        raise AssertionError(f"BOB got a partial frame: {out[offset:][:20].hex()}")


def _stream_fixup(data: bytes, rng: random.Random) -> bytes:
    """Now and then mend a mutated header's length, so the frames after it are read too."""
    if len(data) < 4 or rng.random() < 0.5:
        return data
    kind = rng.choice((rv.FrameType.RELAY, rv.FrameType.CONTROL, data[0]))
    return struct.pack("!I", kind << 24 | (len(data) - 4) & 0xFFFFFF) + data[4:]


register(
    Target(
        "rendezvous-stream",
        _stream_seeds,
        _run_stream,
        (),
        fixup=_stream_fixup,
        doc="rendezvous/connection.py AgentConnection.received on a registered agent's stream, cut anywhere: "
        "frames found in place (wire/rendezvous.py frame_at), relay frames routed by their header "
        "(rendezvous/dataplane.py relay_frames), control frames handled; never raises, leaves nothing "
        "behind, and relays only whole frames from their sender",
    )
)
