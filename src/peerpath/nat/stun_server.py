"""The STUN server's asyncio driver: UDP and TCP sockets around :class:`StunResponder`."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from peerpath.nat.stun_responder import Reply, SocketKey, StunResponder
from peerpath.ratelimit import RateLimiter
from peerpath.wire.endpoint import Endpoint
from peerpath.wire.stun import HEADER_LENGTH, MAGIC_COOKIE, Address

log = logging.getLogger(__name__)

DEFAULT_STUN_PORT = 3478
#: TCP connections idle this long are closed.
TCP_IDLE_TIMEOUT = 30.0
MAX_TCP_CONNECTIONS = 1024
#: Times free ports are picked again when their numbers are taken for TCP.
EPHEMERAL_TRIES = 8
MAGIC_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)


class _UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, server: StunServer, key: SocketKey) -> None:
        self.server = server
        self.key = key
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Endpoint) -> None:
        try:
            source = Address.from_tuple(addr)
        except ValueError:
            return
        reply = self.server.responder.handle(data, source, self.key, self.server.clock())
        if reply is not None:
            self.server.send_udp(reply)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable from a client that went away) are normal on UDP.
        log.debug("UDP error on %s: %s", self.key, exc)


@dataclass
class StunServer:
    """A running STUN server: up to four UDP sockets and four TCP listeners.

    Use :meth:`start`, then :meth:`close` (or ``async with``).
    """

    responder: StunResponder
    clock: Callable[[], float] = time.monotonic
    _udp: dict[SocketKey, _UdpEndpoint] = field(default_factory=dict)
    _tcp: list[asyncio.Server] = field(default_factory=list)
    _tcp_tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    async def start(
        cls,
        ips: list[str],
        port: int = DEFAULT_STUN_PORT,
        alternate_port: int | None = None,
        *,
        tcp: bool = True,
        rate: float = 50.0,
        burst: float = 100.0,
    ) -> StunServer:
        """Bind every socket and start answering.

        Each IP is bound explicitly (a wildcard socket on a two-address host could
        answer from the wrong address). ``port`` 0 picks free ports (tests).
        """
        alternate = alternate_port if alternate_port is not None else (port + 1 if port else 0)
        # Free ports are picked for UDP; the same numbers may be taken for TCP: pick again.
        tries = EPHEMERAL_TRIES if (port, alternate) == (0, 0) and tcp else 1
        while True:
            responder = StunResponder(ips, (port, alternate), rate_limiter=RateLimiter(rate=rate, burst=burst))
            server = cls(responder)
            try:
                await server._bind(tcp)
            except OSError as exc:
                await server.close()
                tries -= 1
                if exc.errno != errno.EADDRINUSE or not tries:
                    raise
                continue
            except BaseException:
                await server.close()
                raise
            return server

    async def _bind(self, tcp: bool) -> None:
        loop = asyncio.get_running_loop()
        ports = list(self.responder.ports)
        for key in self.responder.socket_keys():
            host = self.responder.ips[key.ip]
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((host, ports[key.port]))
            except OSError:
                sock.close()
                raise
            if ports[key.port] == 0:
                # Ephemeral ports: the first socket of each port index fixes the number.
                ports[key.port] = sock.getsockname()[1]
                self.responder.ports = (ports[0], ports[1])
            _, proto = await loop.create_datagram_endpoint(functools.partial(_UdpEndpoint, self, key), sock=sock)
            self._udp[key] = proto
            if tcp:
                server = await asyncio.start_server(
                    functools.partial(self._serve_tcp, key=key), host=host, port=ports[key.port], reuse_address=True
                )
                self._tcp.append(server)

    def listening(self) -> list[str]:
        """Human-readable list of what the server listens on."""
        out = []
        for key in self._udp:
            out.append(f"udp {self.responder.address_of(key)}")
        for server in self._tcp:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append(f"tcp {Address(host, port)}")
        return out

    def send_udp(self, reply: Reply) -> None:
        """Send a reply from the socket it names."""
        endpoint = self._udp.get(reply.via)
        if endpoint is not None and endpoint.transport is not None:
            endpoint.transport.sendto(reply.data, reply.to.as_tuple())

    def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: SocketKey) -> None:
        if len(self._tcp_tasks) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._tcp_connection(reader, writer, key))
        self._tcp_tasks.add(task)
        task.add_done_callback(self._tcp_tasks.discard)

    async def _tcp_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: SocketKey) -> None:
        peer = writer.get_extra_info("peername")
        try:
            source = Address.from_tuple(peer)
            while True:
                # RFC 8489 6.2.2: over TCP, messages are framed by their own length field.
                header = await asyncio.wait_for(reader.readexactly(HEADER_LENGTH), TCP_IDLE_TIMEOUT)
                (length,) = struct.unpack("!H", header[2:4])
                if header[0] & 0xC0 or length % 4 or header[4:8] != MAGIC_COOKIE_BYTES:
                    self.responder.counters.dropped_malformed += 1
                    return  # not STUN: a byte stream cannot be resynchronised, so hang up
                body = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                reply = self.responder.handle(header + body, source, key, self.clock(), tcp=True)
                if reply is None:
                    continue
                writer.write(reply.data)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, ValueError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        """Close every socket and TCP connection."""
        for endpoint in self._udp.values():
            if endpoint.transport is not None:
                endpoint.transport.close()
        self._udp.clear()
        for server in self._tcp:
            server.close()
        for task in list(self._tcp_tasks):
            task.cancel()
        for server in self._tcp:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._tcp_tasks:
            await asyncio.gather(*self._tcp_tasks, return_exceptions=True)
        self._tcp.clear()

    async def __aenter__(self) -> StunServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
