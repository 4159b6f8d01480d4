"""An in-memory UDP network with NATs of any RFC 4787 behaviour, for fast tests.

Real protocol code runs on it unchanged: :meth:`FakeHost.open_stun_socket` hands a
:class:`~peerpath.nat.stun_client.UdpStunSocket` a fake datagram transport, and
:meth:`FakeNetwork.add_stun_server` wires a real :class:`StunResponder`. Delivery
goes through the event loop (``call_soon``), so ordering is as on a real network.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peerpath.nat.netcheck import Behaviour
from peerpath.nat.stun_client import UdpStunSocket
from peerpath.nat.stun_responder import SocketKey, StunResponder
from peerpath.wire.stun import Address

Receiver = Callable[[bytes, Address], None]


class FakeNetwork:
    """The public internet: a flat map from public transport addresses to receivers."""

    def __init__(self) -> None:
        self._bound: dict[Address, Receiver] = {}
        self._nats: dict[str, FakeNat] = {}
        self.blocked_udp: set[str] = set()  # hosts whose firewall drops all outbound UDP
        self.dropped = 0

    def bind(self, address: Address, receiver: Receiver) -> None:
        """Attach a receiver at a public address."""
        if address in self._bound:
            raise OSError(f"address in use: {address}")
        self._bound[address] = receiver

    def unbind(self, address: Address) -> None:
        """Detach whatever is bound at ``address``."""
        self._bound.pop(address, None)

    def add_nat(self, nat: FakeNat) -> None:
        """Register a NAT that owns a public IP."""
        self._nats[nat.public_ip] = nat
        nat.network = self

    def add_stun_server(self, responder: StunResponder) -> None:
        """Bind a STUN responder at each of its transport addresses."""
        for key in responder.socket_keys():
            self.bind(responder.address_of(key), self._stun_receiver(responder, key))

    def _stun_receiver(self, responder: StunResponder, key: SocketKey) -> Receiver:
        def receive(data: bytes, source: Address) -> None:
            reply = responder.handle(data, source, key, asyncio.get_running_loop().time())
            if reply is not None:
                self.send(reply.data, responder.address_of(reply.via), reply.to)

        return receive

    def send(self, data: bytes, source: Address, dest: Address) -> None:
        """Route a datagram that left ``source`` (a public address) for ``dest``."""
        asyncio.get_running_loop().call_soon(self._deliver, data, source, dest)

    def _deliver(self, data: bytes, source: Address, dest: Address) -> None:
        nat = self._nats.get(dest.host)
        if nat is not None:
            nat.inbound(data, source, dest)
            return
        receiver = self._bound.get(dest)
        if receiver is None:
            self.dropped += 1
            return
        receiver(data, source)


@dataclass
class FakeNat:
    """A NAT with RFC 4787 mapping and filtering behaviour, and optional hairpinning."""

    public_ip: str
    mapping: Behaviour = Behaviour.ENDPOINT_INDEPENDENT
    filtering: Behaviour = Behaviour.ADDRESS_AND_PORT_DEPENDENT
    hairpinning: bool = False
    port_preserving: bool = True
    #: Hand out new ports in sequence, this far apart (0: random ports).
    port_step: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(4787))
    network: FakeNetwork | None = None
    _mappings: dict[tuple[Any, ...], int] = field(default_factory=dict)
    _internal: dict[int, Address] = field(default_factory=dict)
    _permissions: dict[int, set[tuple[str, int]]] = field(default_factory=dict)
    _hosts: dict[Address, Receiver] = field(default_factory=dict)

    def _key(self, internal: Address, dest: Address) -> tuple[Any, ...]:
        if self.mapping is Behaviour.ENDPOINT_INDEPENDENT:
            return (internal,)
        if self.mapping is Behaviour.ADDRESS_DEPENDENT:
            return (internal, dest.host)
        return (internal, dest.host, dest.port)

    def outbound(self, data: bytes, internal: Address, dest: Address) -> None:
        """A datagram from a host behind this NAT."""
        if self.network is None:
            raise RuntimeError("add the NAT to a FakeNetwork first")
        key = self._key(internal, dest)
        port = self._mappings.get(key)
        if port is None:
            port = internal.port if self.port_preserving and internal.port not in self._internal else 0
            if port == 0 and self.port_step:
                port = max(self._internal, default=20000) + self.port_step
            while port == 0 or port in self._internal:
                port = self.rng.randrange(1024, 65536)
            self._mappings[key] = port
            self._internal[port] = internal
        self._permissions.setdefault(port, set()).add((dest.host, dest.port))
        public = Address(self.public_ip, port)
        if dest.host == self.public_ip:
            if self.hairpinning:
                asyncio.get_running_loop().call_soon(self.inbound, data, public, dest, True)
            return
        self.network.send(data, public, dest)

    def inbound(self, data: bytes, source: Address, dest: Address, hairpin: bool = False) -> None:
        """A datagram arriving at this NAT's public IP."""
        internal = self._internal.get(dest.port)
        if internal is None:
            return
        allowed = self._permissions.get(dest.port, set())
        if not hairpin:
            if self.filtering is Behaviour.ADDRESS_DEPENDENT and source.host not in {h for h, _ in allowed}:
                return
            if self.filtering is Behaviour.ADDRESS_AND_PORT_DEPENDENT and (source.host, source.port) not in allowed:
                return
        receiver = self._hosts.get(internal)
        if receiver is not None:
            receiver(data, source)


class _FakeDatagramTransport(asyncio.DatagramTransport):
    def __init__(self, host: FakeHost, local: Address, protocol: asyncio.DatagramProtocol) -> None:
        super().__init__()
        self._host = host
        self._local = local
        self._protocol = protocol
        self._closing = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return
        self._host.send(bytes(data), self._local, Address.from_tuple(addr))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._host.unbind(self._local)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._local.as_tuple() if name == "sockname" else default


_ports = itertools.count(40000)


@dataclass
class FakeHost:
    """A host with one IP, either public or behind a :class:`FakeNat`."""

    network: FakeNetwork
    ip: str
    nat: FakeNat | None = None
    udp_blocked: bool = False

    def send(self, data: bytes, local: Address, dest: Address) -> None:
        """Send from one of this host's sockets."""
        if self.udp_blocked:
            return
        if self.nat is not None:
            self.nat.outbound(data, local, dest)
        else:
            self.network.send(data, local, dest)

    def bind(self, local: Address, receiver: Receiver) -> None:
        """Attach a socket's receiver."""
        if self.nat is not None:
            self.nat._hosts[local] = receiver
        else:
            self.network.bind(local, receiver)

    def unbind(self, local: Address) -> None:
        """Detach a socket."""
        if self.nat is not None:
            self.nat._hosts.pop(local, None)
        else:
            self.network.unbind(local)

    async def open_stun_socket(self, toward: Address) -> UdpStunSocket:
        """A real :class:`UdpStunSocket` whose datagrams travel this fake network."""
        proto = UdpStunSocket()
        local = Address(self.ip, next(_ports))
        transport = _FakeDatagramTransport(self, local, proto)
        self.bind(local, lambda data, source: proto.datagram_received(data, source.as_tuple()))
        proto.connection_made(transport)
        proto._local = local
        return proto
