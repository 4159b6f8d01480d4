"""Direct TCP paths: a listener on the node's port, outbound connects from that same port
(TCP simultaneous open through NATs that filter, a plain connect to a reachable listener),
and links that carry the session's datagrams length-framed.

A link is only a pipe. It carries nothing of a session until a connectivity check made with
the session's punch key crossed it (see :mod:`peerpath.node.direct`); until then an
inbound link may send checks only, and is closed if it sends anything else or stays
silent for :data:`IDENTIFY_TIMEOUT` seconds. When a session ends its links are released,
not closed: the next session between the same two nodes proves one again with its own key
and skips the TCP handshake (and the NAT traversal) altogether.

Frame: ``length (u16, big-endian) | datagram``. QUIC runs its own loss recovery and
congestion control above, so a link never queues without bound: when the kernel and the
transport hold more than :data:`MAX_BUFFERED` bytes, a datagram is dropped (QUIC sees a
loss and slows down), exactly as a full UDP socket buffer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from peerpath.clock import Clock, monotonic
from peerpath.net import Net, TcpListener
from peerpath.session.pathset import Path, PathKind, format_endpoint
from peerpath.session.pmtu import MAX_DATAGRAM as MAX_QUIC_DATAGRAM
from peerpath.wire.endpoint import Endpoint

if TYPE_CHECKING:
    from peerpath.session.connection import Connection

log = logging.getLogger(__name__)

FRAME = struct.Struct("!H")
#: Largest datagram a frame carries.
MAX_DATAGRAM = 0xFFFF
#: Bytes waiting in the transport above which datagrams are dropped rather than queued.
MAX_BUFFERED = 1 << 20
#: Seconds an inbound link has to prove it belongs to a session.
IDENTIFY_TIMEOUT = 10.0
#: Inbound links not yet identified; more are closed at once.
MAX_UNIDENTIFIED = 64

#: SO_LINGER on, zero seconds: close() sends a reset instead of a FIN.
LINGER_RESET = struct.pack("ii", 1, 0)


class TcpLink(asyncio.Protocol):
    """One TCP connection to a peer, carrying length-framed datagrams."""

    def __init__(self, owner: TcpLinks, inbound: bool) -> None:
        self.owner = owner
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None
        self.remote: Endpoint = ("", 0)
        #: The session this link carries and the key that proved it (set by the check layer).
        self.conn: Connection | None = None
        self.key: bytes | None = None
        self.closed = False
        #: Whether a check ever proved this link (a released link may carry a later session).
        self.proved = False
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        """The peer's endpoint as paths name it."""
        return format_endpoint(self.remote)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Close with a reset: a link carries only datagrams that QUIC may lose, and an
                # orderly close would leave TIME_WAIT on the very address pair (our port, the
                # peer's port) that the next session between the two nodes needs again.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.owner._added(self)
        if self.inbound:
            self._timer = asyncio.get_running_loop().call_later(IDENTIFY_TIMEOUT, self._identify_timeout)

    def _identify_timeout(self) -> None:
        if self.conn is None:
            log.debug("TCP link from %s sent no valid check; closing", self.name)
            self.close()

    def identified(self, conn: Connection, key: bytes) -> None:
        """A check proved that this link carries ``conn``."""
        self.conn, self.key, self.proved = conn, key, True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def release(self) -> None:
        """Its session ended: keep the link for :data:`IDENTIFY_TIMEOUT` seconds in case a
        new session between the same two nodes proves it again, then close it."""
        self.conn = self.key = None
        if self._timer is not None:
            self._timer.cancel()
        if not self.closed:
            self._timer = asyncio.get_running_loop().call_later(IDENTIFY_TIMEOUT, self._identify_timeout)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        while not self.closed and len(buffer) - offset >= FRAME.size:
            (size,) = FRAME.unpack_from(buffer, offset)
            end = offset + FRAME.size + size
            if len(buffer) < end:
                break
            frame = bytes(buffer[offset + FRAME.size : end])
            offset = end
            if not frame:
                continue  # an empty frame is a keepalive of nothing
            try:
                self.owner.on_frame(self, frame)
            except Exception:
                # Whatever a frame does, the node keeps running.
                log.exception("frame from TCP link %s could not be handled", self.name)
        del buffer[:offset]

    def path(self) -> Path:
        """A direct TCP path over this link."""
        # A stream has no MTU: the largest datagram the engine builds, from the start.
        return Path(
            PathKind.DIRECT_TCP, self.name, self.send, created=self.owner.clock(), max_datagram=MAX_QUIC_DATAGRAM
        )

    def send(self, datagram: bytes) -> None:
        """Send one datagram; dropped (like a full UDP buffer) when the link is backed up."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return
        if len(datagram) > MAX_DATAGRAM or transport.get_write_buffer_size() > MAX_BUFFERED:
            self.owner.counters["send_dropped"] += 1
            return
        transport.write(FRAME.pack(len(datagram)) + datagram)

    def close(self) -> None:
        """Close the connection (the owner hears of it through connection_lost)."""
        if self.transport is not None:
            self.transport.close()
        else:
            self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.owner._lost(self)


class TcpLinks:
    """The node's TCP listener and every TCP link, inbound and outbound."""

    def __init__(
        self,
        net: Net,
        on_frame: Callable[[TcpLink, bytes], None],
        on_lost: Callable[[TcpLink], None],
        clock: Clock = monotonic,
    ) -> None:
        self.net = net
        self.clock = clock
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.links: set[TcpLink] = set()
        self.counters = {"accepted": 0, "connected": 0, "connect_failed": 0, "refused": 0, "send_dropped": 0}
        self._server: TcpListener | None = None
        self._host = "0.0.0.0"
        self._port: int | None = None

    @property
    def port(self) -> int | None:
        """The local TCP port (None: no listener)."""
        return self._port

    async def listen(self, host: str, port: int) -> int | None:
        """Listen on ``port`` (the UDP socket's number), or any free port if that one is
        taken for TCP; None if TCP cannot be used at all."""
        for candidate in (port, 0):
            try:
                self._server = await self.net.listen_tcp(
                    host, candidate, lambda: TcpLink(self, inbound=True), reuse_port=True
                )
            except OSError as exc:
                log.debug("cannot listen on TCP %s:%s: %s", host, candidate, exc)
                continue
            self._host, self._port = host, self._server.port
            if candidate and self._port != port:
                log.info("TCP port %d is taken; direct TCP uses port %d", port, self._port)
            return self._port
        log.warning("no TCP listener: direct TCP paths are off")
        return None

    def link_to(self, remote: Endpoint) -> TcpLink | None:
        """The open link with ``remote``, if any."""
        for link in self.links:
            if link.remote == remote and not link.closed:
                return link
        return None

    async def connect(self, remote: Endpoint, timeout: float) -> TcpLink | None:
        """Connect to ``remote`` from the listener's port (a simultaneous open when the peer
        connects to us at the same time); None when it does not work out within ``timeout``."""
        existing = self.link_to(remote)
        if existing is not None or self._port is None:
            return existing
        try:
            _, protocol = await asyncio.wait_for(
                self.net.connect_tcp(remote, lambda: TcpLink(self, inbound=False), local=(self._host, self._port)),
                timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.counters["connect_failed"] += 1
            log.debug("TCP connect to %s: %s", format_endpoint(remote), exc)
            return self.link_to(remote)  # the peer's connect may have reached our listener
        self.counters["connected"] += 1
        return cast(TcpLink, protocol)

    def _added(self, link: TcpLink) -> None:
        if link.inbound:
            waiting = sum(1 for other in self.links if other.inbound and other.conn is None)
            if waiting >= MAX_UNIDENTIFIED:
                self.counters["refused"] += 1
                link.close()
                return
            self.counters["accepted"] += 1
        self.links.add(link)

    def _lost(self, link: TcpLink) -> None:
        if link in self.links:
            self.links.discard(link)
            self.on_lost(link)

    async def close(self) -> None:
        """Stop listening and close every link."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self.links):
            link.close()
        self._port = None
