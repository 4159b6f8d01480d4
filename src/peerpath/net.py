"""The network a node or server runs on: UDP sockets, TCP listeners and connections, and
where the host's routes lead. :class:`KernelNet` is the operating system's network;
:mod:`peerpath.testing.fakenet` offers the same interface over an in-memory internet with
NATs, so whole nodes and servers run there unchanged (tests, the lab's twin).

Everything above this module reaches the network through a :class:`Net` it was given;
nothing else opens a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from peerpath.wire.endpoint import Endpoint

log = logging.getLogger(__name__)

#: Called with each datagram a UDP socket receives and where it came from.
DatagramHandler = Callable[[bytes, Endpoint], None]
ProtocolFactory = Callable[[], asyncio.Protocol]

#: Datagrams read per socket wakeup (see :class:`KernelUdp`).
RECV_BATCH = 64
#: Connections a TCP listener queues before they are accepted (a forward may get hundreds
#: at once; the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 1024


class BoundUdp(Protocol):
    """A bound UDP socket; what it receives goes to the handler it was bound with."""

    @property
    def local(self) -> Endpoint:
        """The (host, port) it is bound to."""
        ...

    def sendto(self, data: bytes, addr: Endpoint) -> None:
        """Send a datagram; raises BlockingIOError when the buffer is full, OSError on failure."""
        ...

    def sendto_unfragmented(self, data: bytes, addr: Endpoint) -> None:
        """:meth:`sendto` with the don't-fragment bit set and no fragmenting here either (a
        path MTU probe: too large for a link on the way, it is lost rather than split)."""
        ...

    def close(self) -> None:
        """Stop receiving and release the port."""
        ...


class TcpListener(Protocol):
    """A listening TCP socket."""

    @property
    def port(self) -> int:
        """The port it listens on."""
        ...

    def close(self) -> None:
        """Stop accepting (connections already made stay up)."""
        ...


class Net(Protocol):
    """What peerpath needs of a network."""

    def bind_udp(self, host: str, port: int, on_datagram: DatagramHandler) -> BoundUdp:
        """A UDP socket on ``host:port`` (port 0: any free port); OSError if it cannot be bound."""
        ...

    async def listen_tcp(
        self,
        host: str,
        port: int,
        factory: ProtocolFactory,
        *,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> TcpListener:
        """Accept TCP connections on ``host:port``, each served by a fresh ``factory()`` protocol
        (behind TLS with ``tls``). ``reuse_port``: outbound connections may share the port."""
        ...

    async def connect_tcp(
        self,
        remote: Endpoint,
        factory: ProtocolFactory,
        *,
        local: Endpoint | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """A TCP connection to ``remote``, from ``local`` if given (sharing that port with a
        listener: a simultaneous open when the peer connects at the same moment); OSError if
        it is refused or unreachable. The caller bounds the wait."""
        ...

    def route_source(self, toward: Endpoint) -> str:
        """The local IP address this host sends from toward ``toward``."""
        ...

    def default_gateway(self) -> str | None:
        """The IPv4 default gateway (where PCP, NAT-PMP and UPnP are asked), if any."""
        ...


class DatagramTransport(asyncio.DatagramTransport):
    """A :class:`BoundUdp` as an asyncio datagram transport, for protocols written against
    asyncio (the STUN client)."""

    def __init__(self, sock: BoundUdp) -> None:
        super().__init__()
        self._sock = sock
        self._closing = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        if not self._closing:
            self._sock.sendto(bytes(data), (str(addr[0]), int(addr[1])))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._sock.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._sock.local if name == "sockname" else default


async def open_stream(
    net: Net, remote: Endpoint, *, tls: ssl.SSLContext | None = None, server_hostname: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`asyncio.open_connection` over ``net``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16, loop=loop)
    transport, protocol = await net.connect_tcp(
        remote, lambda: asyncio.StreamReaderProtocol(reader, loop=loop), tls=tls, server_hostname=server_hostname
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


async def serve_streams(
    net: Net, handler: StreamHandler, host: str, port: int, *, tls: ssl.SSLContext | None = None
) -> TcpListener:
    """:func:`asyncio.start_server` over ``net``."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.Protocol:
        reader = asyncio.StreamReader(limit=2**16, loop=loop)
        return asyncio.StreamReaderProtocol(reader, handler, loop=loop)  # type: ignore[arg-type]

    return await net.listen_tcp(host, port, factory, tls=tls)


# -- the operating system's network ------------------------------------------------------


def large_buffers(sock: socket.socket) -> None:
    """Socket buffers for bursts at full speed (the kernel may cap them lower)."""
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)


#: Linux's IP_MTU_DISCOVER / IPV6_MTU_DISCOVER and their PROBE mode (linux/in.h, in6.h),
#: which Python's socket module does not name.
_IP_MTU_DISCOVER, _IPV6_MTU_DISCOVER, _PMTUDISC_PROBE = 10, 23, 3


def send_unfragmented(sock: socket.socket, data: bytes, addr: Endpoint) -> None:
    """Send one datagram with the don't-fragment bit set and no local fragmenting (Linux's
    PROBE mode, for this datagram only), as a path MTU probe needs. The socket keeps its own
    mode for everything else: the kernel's default, which fragments a datagram larger than
    the first link rather than fail, so a 1350-byte QUIC packet still leaves over a
    1280-byte tunnel. Elsewhere the datagram goes as any other."""
    if not sys.platform.startswith("linux"):
        sock.sendto(data, addr)
        return
    ipv6 = sock.family == socket.AF_INET6
    level, option = (socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER) if ipv6 else (socket.IPPROTO_IP, _IP_MTU_DISCOVER)
    try:
        mode = sock.getsockopt(level, option)
        sock.setsockopt(level, option, _PMTUDISC_PROBE)
    except OSError:
        sock.sendto(data, addr)
        return
    try:
        sock.sendto(data, addr)
    finally:
        sock.setsockopt(level, option, mode)


def _reusable(sock: socket.socket) -> None:
    """Let a listener and outbound sockets share one local port (simultaneous open)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class KernelUdp:
    """A kernel UDP socket read in batches straight from the event loop's selector: asyncio's
    datagram transport delivers one datagram per loop turn, while reading up to
    :data:`RECV_BATCH` per wakeup lets a session process a burst and answer it with one
    transmit (one ACK instead of one per packet)."""

    def __init__(self, sock: socket.socket, on_datagram: DatagramHandler) -> None:
        self.sock = sock
        self._on_datagram = on_datagram
        self._closed = False
        sock.setblocking(False)
        sockname = sock.getsockname()
        self.local: Endpoint = (str(sockname[0]), int(sockname[1]))
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors surface here on Linux; the next read goes on
                log.debug("UDP receive error: %s", exc)
                continue
            self._on_datagram(data, (str(addr[0]), int(addr[1])))

    def sendto(self, data: bytes, addr: Endpoint) -> None:
        self.sock.sendto(data, addr)

    def sendto_unfragmented(self, data: bytes, addr: Endpoint) -> None:
        send_unfragmented(self.sock, data, addr)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


class _KernelListener:
    def __init__(self, server: asyncio.Server, port: int) -> None:
        self._server = server
        self.port = port

    def close(self) -> None:
        self._server.close()


def bind_kernel_udp(host: str, port: int, on_datagram: DatagramHandler, *, reuse_port: bool = False) -> KernelUdp:
    """A kernel UDP socket on ``host:port`` with large buffers, read in batches; ``reuse_port``:
    in the port's SO_REUSEPORT group (processes sharing one port)."""
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        large_buffers(sock)
        return KernelUdp(sock, on_datagram)
    except BaseException:
        sock.close()
        raise


class KernelNet:
    """The operating system's network."""

    def bind_udp(self, host: str, port: int, on_datagram: DatagramHandler) -> BoundUdp:
        return bind_kernel_udp(host, port, on_datagram)

    async def listen_tcp(
        self,
        host: str,
        port: int,
        factory: ProtocolFactory,
        *,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> TcpListener:
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        try:
            if reuse_port:
                _reusable(sock)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            server = await asyncio.get_running_loop().create_server(factory, sock=sock, ssl=tls, backlog=LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        return _KernelListener(server, int(sock.getsockname()[1]))

    async def connect_tcp(
        self,
        remote: Endpoint,
        factory: ProtocolFactory,
        *,
        local: Endpoint | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        hostname = server_hostname if tls is not None else None
        if local is None:
            return await loop.create_connection(factory, remote[0], remote[1], ssl=tls, server_hostname=hostname)
        if _family(local[0]) != _family(remote[0]):
            raise OSError(f"cannot reach {remote[0]} from {local[0]}")
        sock = socket.socket(_family(local[0]), socket.SOCK_STREAM)
        try:
            _reusable(sock)
            sock.setblocking(False)
            sock.bind(local)
            await loop.sock_connect(sock, remote)
            return await loop.create_connection(factory, sock=sock, ssl=tls, server_hostname=hostname)
        except BaseException:
            sock.close()
            raise

    def route_source(self, toward: Endpoint) -> str:
        return route_source(toward)

    def default_gateway(self) -> str | None:
        return default_gateway()


def route_source(toward: Endpoint) -> str:
    """The local IP the kernel would use toward ``toward`` (connect() on UDP sends nothing)."""
    family = _family(toward[0])
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.connect(toward)
        return str(probe.getsockname()[0])
    except OSError:
        return "::" if family == socket.AF_INET6 else "0.0.0.0"
    finally:
        probe.close()


def default_gateway(route_table: Path = Path("/proc/net/route")) -> str | None:
    """The IPv4 default gateway from the kernel's routing table (Linux), or None."""
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[1] == "00000000" and int(fields[3], 16) & 0x2:  # RTF_GATEWAY
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None
