"""A node's UDP sockets: the main one that every session, the rendezvous client and STUN share,
and extra ones for birthday rounds and port prediction; and the direct paths over them.
The sockets come from the node's :class:`~peerpath.net.Net`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from peerpath import errors
from peerpath.clock import Clock, monotonic
from peerpath.nat.stun_client import UdpStunSocket
from peerpath.net import BoundUdp, Net
from peerpath.session.pathset import Path, PathKind, format_endpoint, parse_endpoint
from peerpath.wire.endpoint import Endpoint
from peerpath.wire.stun import Address as TransportAddress

log = logging.getLogger(__name__)


class UdpSocket:
    """One of the node's UDP sockets: every datagram goes to ``on_datagram``, and whatever
    that raises is counted and logged, never the end of the reading."""

    def __init__(
        self,
        net: Net,
        host: str,
        port: int,
        on_datagram: Callable[[bytes, Endpoint, UdpSocket], None],
        counters: dict[str, int],
    ) -> None:
        self._on_datagram = on_datagram
        self._counters = counters
        self.closed = False
        #: STUN transactions run from this socket (an extra socket asking the server where its
        #: mapping is); the main socket's STUN is :attr:`UdpSockets.stun`.
        self.stun: UdpStunSocket | None = None
        self._sock: BoundUdp = net.bind_udp(host, port, self._received)

    @property
    def local(self) -> Endpoint:
        """The (host, port) the socket is bound to."""
        return self._sock.local

    def _received(self, data: bytes, addr: Endpoint) -> None:
        try:
            self._on_datagram(data, addr, self)
        except Exception:
            # Whatever a datagram does, the node keeps running.
            self._counters["datagrams_failed"] += 1
            log.exception("datagram from %s could not be handled", format_endpoint(addr))

    def sendto(self, data: bytes, addr: Endpoint) -> None:
        """Send a datagram; a full socket buffer drops it (a lost packet to QUIC)."""
        if self.closed:
            return
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._counters["send_dropped"] += 1
        except OSError as exc:
            log.debug("UDP send to %s failed: %s", addr, exc)

    def sendto_unfragmented(self, data: bytes, addr: Endpoint) -> None:
        """Send a path MTU probe: a datagram that is lost, not fragmented, where it does not fit."""
        if self.closed:
            return
        try:
            self._sock.sendto_unfragmented(data, addr)
        except OSError as exc:  # EMSGSIZE: larger than the first link; the probe is lost
            log.debug("UDP probe of %d bytes to %s not sent: %s", len(data), addr, exc)

    def close(self) -> None:
        """Stop reading and close the socket."""
        if not self.closed:
            self.closed = True
            self._sock.close()


class StunTransport(asyncio.DatagramTransport):
    """Lets a UdpStunSocket run its transactions over one of these sockets, so that the
    reflexive address it learns is the one peers can punch to."""

    def __init__(self, udp: UdpSocket) -> None:
        super().__init__()
        self._udp = udp

    def sendto(self, data: Any, addr: Any = None) -> None:
        self._udp.sendto(bytes(data), (str(addr[0]), int(addr[1])))

    def is_closing(self) -> bool:
        return self._udp.closed

    def close(self) -> None:
        pass  # the socket's owner closes it


class UdpSockets:
    """The node's main UDP socket and the extra ones it opens."""

    def __init__(
        self,
        net: Net,
        on_datagram: Callable[[bytes, Endpoint, UdpSocket], None],
        counters: dict[str, int],
        clock: Clock = monotonic,
    ) -> None:
        self.net = net
        self.clock = clock
        self._on_datagram = on_datagram
        self._counters = counters
        self.main: UdpSocket | None = None
        #: STUN transactions from the main socket (the reflexive address, netcheck's hints).
        self.stun = UdpStunSocket(clock)

    def bind(self, host: str, port: int) -> None:
        """Bind the main socket (port 0: any free port)."""
        self.main = self._open(host, port)
        self.stun.connection_made(StunTransport(self.main))

    @property
    def local_endpoint(self) -> Endpoint:
        """The (host, port) the main socket is bound to."""
        if self.main is None or self.main.closed:
            raise errors.LocalError("node is not started")
        return self.main.local

    def send(self, data: bytes, addr: Endpoint) -> None:
        """Send from the main socket."""
        if self.main is not None:
            self.main.sendto(data, addr)

    def extra(self) -> UdpSocket:
        """Another socket on the main one's address, read like it (birthday rounds open many)."""
        return self._open(self.local_endpoint[0], 0)

    def _open(self, host: str, port: int) -> UdpSocket:
        return UdpSocket(self.net, host, port, self._on_datagram, self._counters)

    def path(self, remote: Endpoint, via: UdpSocket | None = None) -> Path:
        """A direct UDP path to ``remote`` from ``via`` (default: the main socket)."""
        udp = via or self.main
        if udp is None:
            raise errors.LocalError("node is not started")

        def send(datagram: bytes) -> None:
            udp.sendto(datagram, remote)

        def probe(datagram: bytes) -> None:
            udp.sendto_unfragmented(datagram, remote)

        path = Path(PathKind.DIRECT_UDP, format_endpoint(remote), send, created=self.clock())
        path.send_probe = probe
        return path

    async def stun_mapped(self, server: str, client: UdpStunSocket | None = None) -> Endpoint | None:
        """Where the STUN server at ``server`` ("host:port") sees the main socket (or the socket
        of ``client``); None without an answer."""
        try:
            response = await (client or self.stun).request(
                TransportAddress(*parse_endpoint(server)), timeout=2.0, rto=0.2
            )
        except ValueError:
            return None
        mapped = response.message.mapped_address if response is not None else None
        return (mapped.host, mapped.port) if mapped is not None else None

    async def fresh_mapping(self, stun_servers: list[str]) -> tuple[UdpSocket, int, int] | None:
        """A fresh socket, and the public ports the NAT gave it toward the server's two STUN
        addresses, asked one right after the other. On a NAT that hands out ports in
        sequence, the socket's next new destination gets the second port plus the step
        between them (port prediction). None without two STUN addresses or their answers."""
        if len(stun_servers) < 2:
            return None
        sock = self.extra()
        try:
            sock.stun = UdpStunSocket(self.clock)
            sock.stun.connection_made(StunTransport(sock))
            first = asyncio.ensure_future(self.stun_mapped(stun_servers[0], sock.stun))
            await asyncio.sleep(0)  # the first query leaves first: its mapping is the first one
            second = await self.stun_mapped(stun_servers[1], sock.stun)
            mapped = await first
        except BaseException:
            sock.close()
            raise
        if mapped is None or second is None:
            sock.close()
            return None
        return sock, mapped[1], second[1]

    def close(self) -> None:
        """Close the main socket (extra sockets belong to the rounds that opened them)."""
        if self.main is not None:
            self.main.close()
