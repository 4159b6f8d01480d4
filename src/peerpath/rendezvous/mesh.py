"""What the processes of one server (:mod:`.workers`) share: a stream socketpair between every
two, carrying messages (msgpack arrays) and relayed frames for one another's connections, with
backpressure; and the UDP port, where a classic BPF program sends each relay datagram to the
process whose number its token starts with.

The kernel's network only: no Net can share a port between processes.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from peerpath.net import DatagramHandler, KernelUdp, bind_kernel_udp
from peerpath.rendezvous.links import WritableLink
from peerpath.rendezvous.presence import SEND_HIGH_WATER, Agent, UdpSocket
from peerpath.rendezvous.tls import TlsLink
from peerpath.rendezvous.udp_relay import RelayUdp
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint

log = logging.getLogger(__name__)

#: A message between processes is at most this large (relayed frames for one connection, a batch).
MAX_MESSAGE = 16 << 20
#: Frames for a connection of a process whose socketpair is this backed up are dropped.
MESH_HIGH_WATER = 8 << 20
#: A socketpair holding this much unread makes the process writing to it pause its readers
#: (tls.Valve) until it drains: relayed frames wait in the sending agents' TCP windows instead
#: of being read only to be dropped here.
MESH_PAUSE = 1 << 20
_LENGTH = struct.Struct("!I")
_HEAD = struct.Struct("!IBI")
_MESSAGE, _FRAMES = 0, 1
_RELAY_TYPE = bytes([rv.FrameType.RELAY])
# Linux: attach a classic BPF program choosing the socket of a SO_REUSEPORT group.
SO_ATTACH_REUSEPORT_CBPF = 51

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Any])


# -- between processes ---------------------------------------------------------------------------


class MeshLink(asyncio.Protocol):
    """This process's end of the socketpair to process ``index``. Messages (lists) go to
    ``handle``; frames for one of this process's connections to ``deliver`` (as a view, valid
    during the call); ``pressure(True)`` when the other process falls behind reading, False when
    it caught up; ``lost`` when it is gone.

    On the wire: a 4-byte length, a kind byte, a 4-byte connection number (frames) or zero, then
    the frames as they are or a msgpack array."""

    def __init__(
        self,
        index: int,
        handle: Callable[[int, list[Any]], None],
        deliver: Callable[[int, memoryview], None],
        pressure: Callable[[bool], None],
        lost: Callable[[int], None],
    ) -> None:
        self.index = index
        self._handle, self._deliver, self._pressure, self._lost = handle, deliver, pressure, lost
        #: The start of a message whose end has not arrived yet (grown in place).
        self._rest = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=MESH_PAUSE, low=MESH_PAUSE // 4)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        received: bytes | bytearray = data
        if self._rest:
            self._rest += data
            received, self._rest = self._rest, bytearray()
        view = memoryview(received)
        offset, size = 0, len(view)
        while size - offset >= _HEAD.size:
            length, kind, ident = _HEAD.unpack_from(view, offset)
            if length > MAX_MESSAGE:
                log.error("process %d sent a message of %d bytes: closing", self.index, length)
                self.close()
                return
            end = offset + _LENGTH.size + length
            if end > size:
                break
            body = view[offset + _HEAD.size : end]
            offset = end
            try:
                if kind == _FRAMES:
                    self._deliver(ident, body)
                else:
                    self._handle(self.index, _decoder.decode(body))
            except Exception:
                log.exception("a message from process %d could not be handled", self.index)
        if offset < size:
            self._rest = bytearray(view[offset:])

    def pause_writing(self) -> None:
        self._pressure(True)

    def resume_writing(self) -> None:
        self._pressure(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._lost(self.index)

    def send(self, *message: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            body = _encoder.encode(message)
            self.transport.write(_HEAD.pack(len(body) + 5, _MESSAGE, 0) + body)

    def send_frames(self, ident: int, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines((_HEAD.pack(len(data) + 5, _FRAMES, ident), data))

    def backlog(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RemoteLink:
    """A connection held by process ``owner``, as another process writes to it: through the
    socketpair (relayed frames beyond its backlog are dropped there, as at a local link)."""

    __slots__ = ("closed", "ident", "mesh", "owner", "peer")

    def __init__(self, mesh: MeshLink, ident: int, peer: Endpoint | None = None) -> None:
        self.mesh, self.owner, self.ident, self.peer = mesh, mesh.index, ident, peer
        self.closed = False

    def peername(self) -> Endpoint | None:
        return self.peer

    def ssl_object(self) -> ssl.SSLObject | None:
        return None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.mesh.send_frames(self.ident, data)

    def buffered(self) -> int:
        # The socketpair carries every connection of that process: it counts as backed up (for
        # relayed frames, see SEND_HIGH_WATER) once it holds MESH_HIGH_WATER.
        return max(0, self.mesh.backlog() - MESH_HIGH_WATER + SEND_HIGH_WATER)

    def is_closing(self) -> bool:
        return self.closed or self.mesh.transport is None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.mesh.send("close", self.ident)


def write_to(link: WritableLink | None, data: memoryview, counters: dict[str, int]) -> None:
    """Write what another process sent for one of this process's connections. Nothing is
    written to a link that is backed up (an agent that does not read): as in one process,
    relayed frames and control replies alike are dropped there, so its buffer stays bounded."""
    if link is None or link.is_closing():
        return
    if link.buffered() > SEND_HIGH_WATER:
        relayed = data[:1] == _RELAY_TYPE
        counters["relay_dropped_backpressure" if relayed else "replies_dropped_backpressure"] += 1
        return
    link.write(data if isinstance(link, TlsLink) else bytes(data))  # TLS takes it at once; others keep it


def mesh_sockets(count: int) -> dict[tuple[int, int], socket.socket]:
    """A socketpair between every two of ``count`` processes: ``[(i, j)]`` is i's end toward j."""
    ends = {}
    for i, j in itertools.combinations(range(count), 2):
        ends[i, j], ends[j, i] = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return ends


async def connect_mesh(index: int, ends: dict[tuple[int, int], socket.socket], host: MeshHost) -> dict[int, MeshLink]:
    """This process's links to every other, on its ends of the socketpairs."""
    loop = asyncio.get_running_loop()
    links = {}
    for (mine, other), sock in ends.items():
        if mine == index:
            sock.setblocking(False)

            def link(other: int = other) -> MeshLink:
                return MeshLink(other, host.handle, host.deliver, host.pressure, host.lost)

            _, links[other] = await loop.create_unix_connection(link, sock=sock)
    return links


class MeshHost(Protocol):
    """What a process's mesh links report to."""

    def handle(self, source: int, message: list[Any]) -> None: ...

    def deliver(self, ident: int, data: memoryview) -> None: ...

    def pressure(self, backed_up: bool) -> None: ...

    def lost(self, source: int) -> None: ...


# -- the shared UDP port ---------------------------------------------------------------------------


def bind_shared_udp(host: str, port: int, on_datagram: DatagramHandler) -> KernelUdp:
    """A UDP socket on ``host:port`` in the port's SO_REUSEPORT group (the kernel's network only:
    no Net can share a port between processes)."""
    return bind_kernel_udp(host, port, on_datagram, reuse_port=True)


class _Filter(ctypes.Structure):
    _fields_ = (("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32))


class _Program(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter)))


def steer_by_token(sock: socket.socket, count: int) -> bool:
    """Send each datagram of ``sock``'s SO_REUSEPORT group to socket number (its second byte,
    the first of a relay frame's token) mod ``count``: the sockets joined in process order.
    False (the kernel spreads datagrams by address) where the kernel does not take it."""
    program = (
        (0x30, 0, 0, 1),  # BPF_LD | BPF_B | BPF_ABS: A = byte 1 of the UDP payload
        (0x94, 0, 0, count),  # BPF_ALU | BPF_MOD | BPF_K: A %= count
        (0x16, 0, 0, 0),  # BPF_RET | BPF_A
    )
    filters = (_Filter * len(program))(*(_Filter(*step) for step in program))
    fprog = _Program(len(program), ctypes.cast(filters, ctypes.POINTER(_Filter)))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
    except OSError as exc:
        log.warning("UDP relay datagrams not steered to their agent's process: %s", exc.strerror or exc)
        return False
    return True


# -- agents' UDP paths, told between processes ------------------------------------------------


def _udp_socket_for(sockets: list[RelayUdp], host: str) -> RelayUdp | None:
    for udp in sockets:
        if udp.host == host:
            return udp
    return None


def announce_path(mesh: Any, agent: Agent, sock: UdpSocket) -> None:
    """Tell every other process where ``agent``'s relayed datagrams go over UDP, from which of
    the server's addresses, and how far its numbered hellos have come."""
    endpoint = agent.udp_endpoint
    host = getattr(sock, "host", None)
    if endpoint is None or host is None:
        return
    told = (agent.address.digest, endpoint[0], endpoint[1], agent.udp_seen, host, agent.hello_sequence)
    for link in mesh:
        link.send("udp-path", *told)


def learn_path(agent: Agent | None, args: list[Any], sockets: list[RelayUdp]) -> None:
    """What :func:`announce_path` told: the agent's UDP endpoint, and this process's socket on
    the same address of the server."""
    if agent is None:
        return
    sock = _udp_socket_for(sockets, args[4])
    if sock is not None:
        # Announced only when a fresh hello or an answered challenge confirmed it.
        agent.udp_endpoint, agent.udp_socket, agent.udp_seen = (args[1], args[2]), sock, args[3]
        agent.hello_seen = args[3]
        agent.hello_sequence = max(agent.hello_sequence, args[5])
