"""A STUN client on one UDP socket: Binding transactions with retransmission (RFC 8489 6.2.1)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, cast

from peerpath.clock import Clock, monotonic
from peerpath.net import DatagramTransport, KernelNet, Net
from peerpath.wire import stun
from peerpath.wire.endpoint import Endpoint
from peerpath.wire.stun import Address, Class, Message, StunError


@dataclass(frozen=True)
class StunResponse:
    """A response to one of our requests: the message, where it came from, and the round trip."""

    message: Message
    source: Address
    rtt: float


class StunTransport(Protocol):
    """What behaviour discovery needs from a socket; a fake network implements it in tests."""

    @property
    def local_address(self) -> Address:
        """This socket's own address, as its host sees it."""
        ...

    async def request(
        self, server: Address, attributes: Iterable[tuple[int, bytes]] = (), *, timeout: float, rto: float
    ) -> StunResponse | None:
        """Send a Binding request (retransmitted every ``rto``, doubling) and await its response."""
        ...

    def send_probe(self, dest: Address, transaction_id: bytes) -> None:
        """Send one Binding request and expect no response (the hairpinning test)."""
        ...

    async def probe_received(self, transaction_id: bytes, timeout: float) -> bool:
        """Whether a Binding request with this transaction ID arrived at this socket."""
        ...

    def close(self) -> None:
        """Release the socket."""
        ...


def new_transaction_id() -> bytes:
    """96 random bits (RFC 8489 5)."""
    return os.urandom(12)


class UdpStunSocket(asyncio.DatagramProtocol):
    """A UDP socket that runs STUN transactions; see :class:`StunTransport`."""

    def __init__(self, clock: Clock = monotonic) -> None:
        #: What round trips are measured with (the node's clock; the deadline is the loop's).
        self.clock = clock
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[bytes, asyncio.Future[tuple[Message, Address]]] = {}
        self._probes: dict[bytes, asyncio.Event] = {}
        self._local: Address | None = None
        self.malformed = 0

    @classmethod
    async def open(
        cls, toward: Address, bind: Endpoint | None = None, *, net: Net | None = None, clock: Clock = monotonic
    ) -> UdpStunSocket:
        """Bind a socket (``bind`` or any port) on ``net`` (default: the kernel's) whose traffic
        will go ``toward`` a server."""
        net = net or KernelNet()
        proto = cls(clock)
        host, port = bind or (("::" if toward.family == 2 else "0.0.0.0"), 0)
        sock = net.bind_udp(host, port, proto.datagram_received)
        proto.connection_made(DatagramTransport(sock))
        proto._local = Address(net.route_source(toward.as_tuple()), sock.local[1])
        return proto

    @property
    def local_address(self) -> Address:
        """The source IP the kernel routes toward the server, and our port."""
        if self._local is None:
            raise RuntimeError("socket not opened; use UdpStunSocket.open()")
        return self._local

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector datagram transport does not subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Endpoint) -> None:
        try:
            message = stun.parse(data)
            source = Address.from_tuple(addr)
        except (StunError, ValueError):
            self.malformed += 1
            return
        if message.cls is Class.REQUEST:
            event = self._probes.get(message.transaction_id)
            if event is not None:
                event.set()
            return
        future = self._pending.get(message.transaction_id)
        if future is not None and not future.done():
            future.set_result((message, source))

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable and the like: the transaction simply times out.
        pass

    def _send(self, data: bytes, dest: Address) -> None:
        if self._transport is not None and not self._transport.is_closing():
            with contextlib.suppress(OSError):
                self._transport.sendto(data, dest.as_tuple())

    async def request(
        self, server: Address, attributes: Iterable[tuple[int, bytes]] = (), *, timeout: float, rto: float
    ) -> StunResponse | None:
        """Run one Binding transaction; None if nothing answered within ``timeout``."""
        loop = asyncio.get_running_loop()
        message = Message.request(new_transaction_id(), attributes)
        data = message.serialize(fingerprint=True)
        future: asyncio.Future[tuple[Message, Address]] = loop.create_future()
        self._pending[message.transaction_id] = future
        start = self.clock()
        deadline = loop.time() + timeout
        try:
            interval = rto
            while True:
                self._send(data, server)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    response, source = await asyncio.wait_for(asyncio.shield(future), min(interval, remaining))
                    return StunResponse(response, source, self.clock() - start)
                interval *= 2
        finally:
            self._pending.pop(message.transaction_id, None)
            future.cancel()

    def send_probe(self, dest: Address, transaction_id: bytes) -> None:
        """Send one Binding request that nobody needs to answer."""
        self._send(Message.request(transaction_id).serialize(fingerprint=True), dest)

    async def probe_received(self, transaction_id: bytes, timeout: float) -> bool:
        """Wait up to ``timeout`` for a request with ``transaction_id`` to arrive here."""
        event = self._probes.setdefault(transaction_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._probes.pop(transaction_id, None)

    def expect_probe(self, transaction_id: bytes) -> None:
        """Start listening for a probe before it is sent, so an early arrival is not lost."""
        self._probes.setdefault(transaction_id, asyncio.Event())

    def close(self) -> None:
        """Close the socket; pending transactions end as timeouts."""
        if self._transport is not None:
            self._transport.close()
