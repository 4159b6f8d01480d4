"""An in-memory internet with NATs of any RFC 4787 behaviour, for fast tests.

:class:`FakeHost` implements :class:`peerpath.net.Net` (UDP sockets, TCP listeners and
connections, TLS over them), so nodes and servers run here unchanged; with
:mod:`peerpath.testing.vtime` their timers run in virtual time as well.

The model:

* Realms. The internet (:class:`FakeNetwork`) and the inside of each :class:`FakeNat` (its
  LAN) hold members by IP: hosts, and NATs whose outside address is there (a NAT with an
  ``upstream`` NAT, carrier-grade NAT, has its "public" IP on the upstream's inside).
* Routing. A packet whose destination is in the sender's realm is delivered there directly
  (LAN delivery, no translation). Otherwise the realm's NAT translates it (its outbound
  mapping) and it goes on in the realm above, up to the internet. A packet for a NAT's
  address is let in by its filter, translated back and handed to the member inside.
* Time. A delivery takes the network's ``latency`` (one way, sender to receiver; the NATs
  on the way translate instantly), immediately after the current callbacks when it is 0.
* UDP mapping and filtering follow the NAT's RFC 4787 behaviour; hairpinning is optional.
* TCP mapping follows the NAT's mapping behaviour (tables separate from UDP); filtering is
  always address-and-port-dependent, like Linux conntrack: an inbound SYN passes only if
  the host inside sent a SYN from that mapping to exactly that address and port within
  :data:`SYN_SENT_TIMEOUT`. Unsolicited SYNs are dropped (not refused), and the sender
  retransmits them as Linux does. A SYN meeting a connect in progress toward its source is a
  simultaneous open. Established connections are in-order byte pipes between two
  :class:`FakeTcpTransport`; they are not affected by NAT state (:meth:`FakeNat.forget`) or
  loss, and hold their data while the path is cut.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import math
import random
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVarTuple, Unpack, cast

from peerpath.nat.netcheck import Behaviour
from peerpath.nat.stun_client import UdpStunSocket
from peerpath.nat.stun_responder import SocketKey, StunResponder
from peerpath.net import BoundUdp, DatagramHandler, ProtocolFactory, TcpListener
from peerpath.wire.endpoint import Endpoint
from peerpath.wire.stun import Address, StunError

if TYPE_CHECKING:
    from peerpath.net import Net

log = logging.getLogger(__name__)

_Ts = TypeVarTuple("_Ts")
Receiver = Callable[[bytes, Address], None]

#: Linux's SYN retransmission: after 1 s, then doubling, 6 times (net.ipv4.tcp_syn_retries);
#: a connect gives up 127 s after its first SYN.
SYN_RTO = 1.0
SYN_RETRIES = 6
#: How long the hole an outbound SYN opens in a NAT stays open (Linux's conntrack
#: nf_conntrack_tcp_timeout_syn_sent).
SYN_SENT_TIMEOUT = 120.0
#: The ports hosts pick for port 0 (Linux's ip_local_port_range).
EPHEMERAL_PORTS = (32768, 60999)
#: Where a NAT that hands out ports in sequence starts.
FIRST_SEQUENTIAL_PORT = 20000
#: The addresses that mean "any address of this host" to bind and listen.
ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def _address(addr: Endpoint) -> Address:
    try:
        return Address(str(addr[0]), int(addr[1]))
    except (StunError, ValueError) as exc:
        raise OSError(errno.EINVAL, f"not an IP address and port: {addr!r}") from exc


@dataclass
class _Packet:
    """A datagram or a TCP SYN on its way, with its source as translated so far."""

    source: Address
    dest: Address
    data: bytes = b""
    #: The connect whose SYN this is (None: a UDP datagram).
    syn: _Connect | None = None
    #: The two public IPs it travelled between, if it crossed the internet.
    crossed: frozenset[str] | None = None


class FakeNetwork:
    """The public internet: hosts and NATs by public IP, plus bare receivers (STUN servers)
    at public transport addresses.

    ``latency``: one-way delivery time in seconds (0: right after the current callbacks).
    ``rng``: draws the random loss of :meth:`set_loss`.
    """

    def __init__(self, latency: float = 0.0, rng: random.Random | None = None) -> None:
        self.latency = latency
        self.rng = rng if rng is not None else random.Random(0)
        #: Datagrams and SYNs the network lost (no receiver, a NAT filter, a cut, loss).
        self.dropped = 0
        self._members: dict[str, FakeHost | FakeNat] = {}
        self._bound: dict[Address, Receiver] = {}
        self._cuts: set[frozenset[str]] = set()
        self._loss: dict[frozenset[str], float] = {}
        self._held: set[_Pipe] = set()

    def bind(self, address: Address, receiver: Receiver) -> None:
        """Attach a receiver at a public address."""
        if address in self._bound:
            raise OSError(errno.EADDRINUSE, f"address in use: {address}")
        self._bound[address] = receiver

    def unbind(self, address: Address) -> None:
        """Detach whatever is bound at ``address``."""
        self._bound.pop(address, None)

    def add_nat(self, nat: FakeNat) -> None:
        """Attach a NAT at its outside address: on the internet, or on its upstream NAT's inside."""
        members = nat.upstream._members if nat.upstream is not None else self._members
        if nat.public_ip in members:
            raise ValueError(f"{nat.public_ip} is taken")
        members[nat.public_ip] = nat
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
        self._forward(_Packet(source, dest, data), None)

    def cut(self, ip_a: str, ip_b: str) -> None:
        """Cut the path between two public IPs: UDP between them is dropped, SYNs too, and
        data of established TCP connections waits for :meth:`heal`."""
        self._cuts.add(frozenset((ip_a, ip_b)))

    def heal(self, ip_a: str, ip_b: str) -> None:
        """Undo :meth:`cut`; held TCP data is delivered, in order."""
        self._cuts.discard(frozenset((ip_a, ip_b)))
        for pipe in list(self._held):
            if pipe.crossed not in self._cuts:
                self._held.discard(pipe)
                pipe.schedule()

    def set_loss(self, ip_a: str, ip_b: str, fraction: float) -> None:
        """Lose this fraction of the UDP datagrams between two public IPs, both ways (0: none)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"loss fraction out of range: {fraction}")
        pair = frozenset((ip_a, ip_b))
        if fraction:
            self._loss[pair] = fraction
        else:
            self._loss.pop(pair, None)

    def is_cut(self, path: frozenset[str] | None) -> bool:
        """Whether the path between two public IPs (None: inside a LAN) is cut."""
        return path is not None and path in self._cuts

    def _after(self, delay: float, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts) -> None:
        loop = asyncio.get_running_loop()
        if delay > 0:
            loop.call_later(delay, callback, *args)
        else:
            loop.call_soon(callback, *args)

    def _drop(self) -> None:
        self.dropped += 1

    def _forward(self, packet: _Packet, realm: FakeNat | None) -> None:
        """Carry a packet sent inside ``realm`` (None: the internet) toward its destination:
        out through each NAT until the realm the destination is in."""
        while realm is not None:
            target = realm._members.get(packet.dest.host)
            if target is not None:
                self._after(self.latency, target._receive, packet)
                return
            if packet.dest.host == realm.public_ip:
                realm._hairpin(packet)
                return
            realm._translate_out(packet)
            realm = realm.upstream
        path = frozenset((packet.source.host, packet.dest.host))
        loss = self._loss.get(path) if packet.syn is None else None
        if path in self._cuts or (loss and self.rng.random() < loss):
            self._drop()
            return
        packet.crossed = path
        target = self._members.get(packet.dest.host)
        if packet.syn is None and packet.dest in self._bound:
            # A bare receiver (a STUN server) may share its IP with a host: it owns its port.
            self._after(self.latency, self._bound[packet.dest], packet.data, packet.source)
        elif target is not None:
            self._after(self.latency, target._receive, packet)
        elif packet.syn is not None and any(a.host == packet.dest.host for a in self._bound):
            self._after(2 * self.latency, packet.syn.refuse)  # a bare server: nothing listens on TCP
        else:
            self._drop()


@dataclass
class _NatTable:
    """One protocol's mappings in a NAT."""

    #: Mapping key (see :meth:`FakeNat._key`) -> public port.
    mappings: dict[tuple[Any, ...], int] = field(default_factory=dict)
    #: Public port -> the internal address it maps to.
    internal: dict[int, Address] = field(default_factory=dict)
    #: Public port -> remote (host, port) it sent to -> until when inbound from there passes.
    permissions: dict[int, dict[tuple[str, int], float]] = field(default_factory=dict)


@dataclass(eq=False)
class FakeNat:
    """A NAT with RFC 4787 mapping and filtering behaviour for UDP, optional hairpinning,
    and conntrack-like TCP (see the module's description).

    ``upstream``: the NAT this one sits behind (``public_ip`` is then an address on its
    inside); add the upstream NAT to the network first. ``port_range``: where new mappings
    take their ports from.
    """

    public_ip: str
    mapping: Behaviour = Behaviour.ENDPOINT_INDEPENDENT
    filtering: Behaviour = Behaviour.ADDRESS_AND_PORT_DEPENDENT
    hairpinning: bool = False
    port_preserving: bool = True
    #: Hand out new ports in sequence, this far apart (0: random ports).
    port_step: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(4787))
    network: FakeNetwork | None = None
    upstream: FakeNat | None = None
    port_range: tuple[int, int] = (1024, 65535)
    _udp: _NatTable = field(default_factory=_NatTable, init=False, repr=False)
    _tcp: _NatTable = field(default_factory=_NatTable, init=False, repr=False)
    _members: dict[str, FakeHost | FakeNat] = field(default_factory=dict, init=False, repr=False)
    _last_port: int = field(default=FIRST_SEQUENTIAL_PORT, init=False, repr=False)

    def forget(self, port_range: tuple[int, int] | None = None) -> None:
        """Drop every mapping and permission, UDP and TCP (a conntrack flush); with
        ``port_range``, new mappings take their ports from there (a NAT that rebinds)."""
        self._udp, self._tcp = _NatTable(), _NatTable()
        if port_range is not None:
            low, high = port_range
            if not 1 <= low <= high <= 65535:
                raise ValueError(f"bad port range: {port_range}")
            self.port_range = port_range
            self._last_port = low - self.port_step

    @property
    def _network(self) -> FakeNetwork:
        if self.network is None:
            raise RuntimeError("add the NAT to a FakeNetwork first")
        return self.network

    def _key(self, internal: Address, dest: Address) -> tuple[Any, ...]:
        if self.mapping is Behaviour.ENDPOINT_INDEPENDENT:
            return (internal,)
        if self.mapping is Behaviour.ADDRESS_DEPENDENT:
            return (internal, dest.host)
        return (internal, dest.host, dest.port)

    def _new_port(self, internal_port: int, table: _NatTable) -> int:
        low, high = self.port_range
        if self.port_preserving and low <= internal_port <= high and internal_port not in table.internal:
            return internal_port
        for _ in range(high - low + 1):
            if self.port_step:
                port = self._last_port + self.port_step
                self._last_port = port = port if low <= port <= high else low
            else:
                port = self.rng.randint(low, high)
            if port not in table.internal:
                return port
        raise RuntimeError(f"NAT {self.public_ip} is out of ports")

    def _translate_out(self, packet: _Packet) -> None:
        """Map a packet leaving the inside: its source becomes our address and a public port."""
        table = self._udp if packet.syn is None else self._tcp
        key = self._key(packet.source, packet.dest)
        port = table.mappings.get(key)
        if port is None:
            port = self._new_port(packet.source.port, table)
            table.mappings[key] = port
            table.internal[port] = packet.source
        until = math.inf if packet.syn is None else asyncio.get_running_loop().time() + SYN_SENT_TIMEOUT
        table.permissions.setdefault(port, {})[(packet.dest.host, packet.dest.port)] = until
        packet.source = Address(self.public_ip, port)

    def _hairpin(self, packet: _Packet) -> None:
        """A packet from the inside for our own outside address."""
        network = self._network
        if packet.syn is not None:
            network._after(2 * network.latency, packet.syn.refuse)  # the router itself: nothing listens
            return
        self._translate_out(packet)
        if self.hairpinning:
            network._after(network.latency, self._receive, packet, True)
        else:
            network._drop()

    def _admits(self, packet: _Packet, allowed: dict[tuple[str, int], float]) -> bool:
        source = (packet.source.host, packet.source.port)
        if packet.syn is not None:
            return allowed.get(source, -math.inf) >= asyncio.get_running_loop().time()
        if self.filtering is Behaviour.ADDRESS_DEPENDENT:
            return any(host == packet.source.host for host, _ in allowed)
        if self.filtering is Behaviour.ADDRESS_AND_PORT_DEPENDENT:
            return source in allowed
        return True

    def _receive(self, packet: _Packet, hairpin: bool = False) -> None:
        """A packet arriving at our outside address."""
        table = self._udp if packet.syn is None else self._tcp
        internal = table.internal.get(packet.dest.port)
        allowed = table.permissions.get(packet.dest.port, {})
        target = self._members.get(internal.host) if internal is not None else None
        if internal is None or target is None or not (hairpin or self._admits(packet, allowed)):
            self._network._drop()
            return
        packet.dest = internal
        target._receive(packet)


class FakeUdp:
    """A UDP socket of a :class:`FakeHost` (a :class:`peerpath.net.BoundUdp`)."""

    def __init__(self, host: FakeHost, local: Endpoint, on_datagram: DatagramHandler) -> None:
        self._host = host
        self._on_datagram = on_datagram
        self.local = local
        self.closed = False

    def sendto_unfragmented(self, data: bytes, addr: Endpoint) -> None:
        """The fake network has no MTU: a datagram of any size is one packet."""
        self.sendto(data, addr)

    def sendto(self, data: bytes, addr: Endpoint) -> None:
        """Send a datagram from this socket."""
        if self.closed:
            raise OSError(errno.EBADF, "socket is closed")
        self._host._send_udp(bytes(data), self.local[1], _address(addr))

    def close(self) -> None:
        """Stop receiving and release the port."""
        if not self.closed:
            self.closed = True
            self._host._udp.pop(self.local[1], None)

    def _deliver(self, data: bytes, source: Address) -> None:
        self._on_datagram(data, source.as_tuple())


@dataclass(eq=False)
class FakeTcpListener:
    """A listening TCP socket of a :class:`FakeHost` (a :class:`peerpath.net.TcpListener`)."""

    host: FakeHost
    port: int
    factory: ProtocolFactory
    reuse_port: bool = False
    tls: ssl.SSLContext | None = None

    def close(self) -> None:
        """Stop accepting (connections already made stay up)."""
        if self.host._listeners.get(self.port) is self:
            del self.host._listeners[self.port]


class _State(enum.Enum):
    PENDING = "pending"  # SYNs going out
    JOINED = "joined"  # a connection is made (or being handed over)
    CLOSED = "closed"  # refused, timed out or abandoned


class _Connect:
    """One ``connect_tcp`` in progress: its SYN, retransmitted until something answers."""

    def __init__(self, host: FakeHost, port: int, remote: Address) -> None:
        self.host = host
        self.local = Address(host.ip, port)
        self.remote = remote
        self.future: asyncio.Future[FakeTcpTransport] = asyncio.get_running_loop().create_future()
        self.state = _State.PENDING
        self.transport: FakeTcpTransport | None = None
        self._sent = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def key(self) -> tuple[int, Address]:
        """The host's key for it: local port and remote address."""
        return (self.local.port, self.remote)

    def send_syn(self) -> None:
        """Send a SYN and schedule its retransmission."""
        self._sent += 1
        self._timer = asyncio.get_running_loop().call_later(SYN_RTO * 2 ** (self._sent - 1), self._retransmit)
        self.host.network._forward(_Packet(self.local, self.remote, syn=self), self.host.nat)

    def _retransmit(self) -> None:
        self._timer = None
        if self._sent > SYN_RETRIES:
            self._fail(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
        else:
            self.send_syn()

    def joined(self, transport: FakeTcpTransport) -> None:
        """The SYN met a listener or a simultaneous open: the connect completes one trip later."""
        self._stop(_State.JOINED)
        self.transport = transport
        self.host.network._after(self.host.network.latency, self._complete)

    def _complete(self) -> None:
        if self.transport is not None and not self.future.done():
            self.future.set_result(self.transport)

    def refuse(self) -> None:
        """A reset came back."""
        if self.state is _State.PENDING:
            self._fail(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))

    def _fail(self, exc: OSError) -> None:
        self._stop(_State.CLOSED)
        if not self.future.done():
            self.future.set_exception(exc)

    def _stop(self, state: _State) -> None:
        self.state = state
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def finish(self, handed_over: bool) -> None:
        """The connect call is over: forget it; a connection it did not hand over is reset."""
        if self.state is _State.PENDING:
            self._stop(_State.CLOSED)
        if self.host._connecting.get(self.key) is self:
            del self.host._connecting[self.key]
        if self.transport is not None and not handed_over:
            self.transport.abort()


class _Signal(enum.Enum):
    EOF = "eof"  # write_eof: the peer reads no more data
    FIN = "fin"  # close: eof, then the connection is gone
    RESET = "reset"  # abort


_Item = bytes | _Signal


class _Pipe:
    """One direction of a TCP connection: what one side writes reaches the other in order,
    one ``latency`` later, and waits while the path is cut."""

    def __init__(self, network: FakeNetwork, crossed: frozenset[str] | None, to: FakeTcpTransport) -> None:
        self._network = network
        self.crossed = crossed
        self._to = to
        self._queue: deque[tuple[float, _Item]] = deque()
        self._handle: asyncio.Handle | None = None

    def send(self, item: _Item) -> None:
        """Put an item on its way."""
        self._queue.append((asyncio.get_running_loop().time() + self._network.latency, item))
        if self._handle is None and self not in self._network._held:
            self.schedule()

    def schedule(self) -> None:
        """Deliver the first item when it is due."""
        if self._handle is not None or not self._queue:
            return
        loop = asyncio.get_running_loop()
        due = self._queue[0][0]
        self._handle = loop.call_at(due, self._run) if due > loop.time() else loop.call_soon(self._run)

    def _run(self) -> None:
        self._handle = None
        if self._network.is_cut(self.crossed):
            self._network._held.add(self)
            return
        until = max(asyncio.get_running_loop().time(), self._queue[0][0])
        while self._queue and self._queue[0][0] <= until:
            self._to._arrive(self._queue.popleft()[1])
        self.schedule()


class FakeTcpTransport(asyncio.Transport):
    """One end of a TCP connection on the fake network: an :class:`asyncio.Transport` with
    everything asyncio's TLS (:meth:`asyncio.loop.start_tls`) needs.

    Writes go straight onto the wire (the buffer is always empty, writing never pauses);
    the peer receives them in order one ``latency`` later. ``close()``: the peer gets
    ``eof_received()`` then ``connection_lost(None)``; ``abort()``: the peer gets
    ``connection_lost(ConnectionResetError)``.
    """

    _start_tls_compatible = True

    def __init__(self, host: FakeHost, local: Address, peer: Address) -> None:
        super().__init__({"peername": peer.as_tuple(), "sockname": local.as_tuple(), "socket": None})
        self._host = host
        self.key = (local.port, peer)
        self._protocol: asyncio.BaseProtocol = asyncio.Protocol()
        self._pipe: _Pipe | None = None
        self._backlog: deque[_Item] = deque()
        self._started = False  # receiving is held until the connection is handed over
        self._reading = True
        self._closing = False
        self._lost = False  # connection_lost is scheduled
        self._eof = False
        self._high, self._low = 64 * 1024, 16 * 1024

    def __repr__(self) -> str:
        name, port = self.get_extra_info("sockname")
        peer, peer_port = self.get_extra_info("peername")
        state = " closing" if self._closing else ""
        return f"<FakeTcpTransport {name}:{port} -> {peer}:{peer_port}{state}>"

    @staticmethod
    def pair(
        a: FakeHost,
        a_ends: tuple[Address, Address],
        b: FakeHost,
        b_ends: tuple[Address, Address],
        crossed: frozenset[str] | None,
    ) -> tuple[FakeTcpTransport, FakeTcpTransport]:
        """Two connected ends, each given as (local, peer) as that side sees them."""
        ta, tb = FakeTcpTransport(a, *a_ends), FakeTcpTransport(b, *b_ends)
        ta._pipe, tb._pipe = _Pipe(a.network, crossed, tb), _Pipe(a.network, crossed, ta)
        a._connections[ta.key] = ta
        b._connections[tb.key] = tb
        return ta, tb

    def start(self, protocol: asyncio.BaseProtocol | None) -> None:
        """Hand the connection to ``protocol`` (None: leave reading paused for ``start_tls``)."""
        self._started = True
        if protocol is None:
            self._reading = False
            return
        self._protocol = protocol
        protocol.connection_made(self)
        if self._backlog:
            asyncio.get_running_loop().call_soon(self._flush)

    # -- asyncio.Transport

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._closing or self._reading:
            return
        self._reading = True
        if self._backlog:
            asyncio.get_running_loop().call_soon(self._flush)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if data and not self._closing:
            self._send(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        if not (self._closing or self._eof):
            self._eof = True
            self._send(_Signal.EOF)

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._shutdown(_Signal.FIN, None)

    def abort(self) -> None:
        self._shutdown(_Signal.RESET, None)

    def _force_close(self, exc: Exception | None) -> None:
        """Close on a fatal error (asyncio's SSL calls this): the socket closes as usual."""
        self._shutdown(_Signal.FIN, exc)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    # -- the wire

    def _shutdown(self, signal: _Signal, exc: Exception | None) -> None:
        if not self._lost:
            self._closing = True
            self._send(signal)
            self._connection_lost(exc)

    def _send(self, item: _Item) -> None:
        if self._pipe is not None:
            self._pipe.send(item)

    def _arrive(self, item: _Item) -> None:
        if self._closing:
            return
        self._backlog.append(item)
        if self._started and self._reading:
            self._flush()

    def _flush(self) -> None:
        while self._backlog and self._started and self._reading and not self._closing:
            item = self._backlog.popleft()
            protocol = self._protocol
            if isinstance(item, bytes):
                if isinstance(protocol, asyncio.BufferedProtocol):
                    _feed_buffered(protocol, item)
                else:
                    cast(asyncio.Protocol, protocol).data_received(item)
            elif item is _Signal.EOF:
                if not cast(asyncio.Protocol, protocol).eof_received():
                    self.close()
            elif item is _Signal.FIN:
                cast(asyncio.Protocol, protocol).eof_received()
                self._closing = True
                self._connection_lost(None)
            else:
                self._closing = True
                self._connection_lost(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._backlog.clear()
        if self._host._connections.get(self.key) is self:
            del self._host._connections[self.key]
        asyncio.get_running_loop().call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)


def _feed_buffered(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Hand ``data`` to a buffered protocol through the buffers it offers."""
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        if not buffer:
            raise RuntimeError("get_buffer() returned an empty buffer")
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


@dataclass(eq=False)
class FakeHost:
    """A host with one IP, public or behind a :class:`FakeNat`: a :class:`peerpath.net.Net`.

    Bind and listen on its IP or on ``0.0.0.0``; port 0 picks a free port. ``udp_blocked``:
    its firewall drops all outbound UDP.
    """

    network: FakeNetwork
    ip: str
    nat: FakeNat | None = None
    udp_blocked: bool = False
    _udp: dict[int, FakeUdp] = field(default_factory=dict, init=False, repr=False)
    _listeners: dict[int, FakeTcpListener] = field(default_factory=dict, init=False, repr=False)
    _connecting: dict[tuple[int, Address], _Connect] = field(default_factory=dict, init=False, repr=False)
    _connections: dict[tuple[int, Address], FakeTcpTransport] = field(default_factory=dict, init=False, repr=False)
    _next_port: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        members = self.nat._members if self.nat is not None else self.network._members
        if self.ip in members:
            raise ValueError(f"{self.ip} is taken")
        members[self.ip] = self

    # -- Net: addresses

    def route_source(self, toward: Endpoint) -> str:
        """The host's IP (it has one)."""
        return self.ip

    def default_gateway(self) -> str | None:
        """None: fake NATs answer no PCP, NAT-PMP or UPnP."""
        return None

    # -- Net: UDP

    def bind_udp(self, host: str, port: int, on_datagram: DatagramHandler) -> BoundUdp:
        """A UDP socket on ``host:port`` (port 0: a free port); OSError if the port is taken."""
        self._check_local(host)
        if port == 0:
            port = self._free_port("udp", lambda p: p in self._udp)
        elif port in self._udp:
            raise OSError(errno.EADDRINUSE, f"UDP port {port} of {self.ip} is in use")
        sock = FakeUdp(self, (host or "0.0.0.0", port), on_datagram)
        self._udp[port] = sock
        return sock

    async def open_stun_socket(self, toward: Address) -> UdpStunSocket:
        """A real :class:`UdpStunSocket` whose datagrams travel this fake network (for
        netcheck's ``open_socket``)."""
        return await UdpStunSocket.open(toward, (self.ip, 0), net=self)

    def _send_udp(self, data: bytes, port: int, dest: Address) -> None:
        if not self.udp_blocked:
            self.network._forward(_Packet(Address(self.ip, port), dest, data), self.nat)

    # -- Net: TCP

    async def listen_tcp(
        self,
        host: str,
        port: int,
        factory: ProtocolFactory,
        *,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> TcpListener:
        """Accept TCP connections on ``host:port`` (port 0: a free port), each served by a
        fresh ``factory()`` protocol, behind TLS with ``tls``. ``reuse_port``: outbound
        connections may share the port."""
        self._check_local(host)
        if port == 0:
            port = self._free_port("tcp", self._tcp_port_used)
        elif port in self._listeners:
            raise OSError(errno.EADDRINUSE, f"TCP port {port} of {self.ip} is in use")
        listener = FakeTcpListener(self, port, factory, reuse_port, tls)
        self._listeners[port] = listener
        return listener

    async def connect_tcp(
        self,
        remote: Endpoint,
        factory: ProtocolFactory,
        *,
        local: Endpoint | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """A TCP connection to ``remote``, from ``local`` if given (possibly a listener's
        port: a simultaneous open when the peer connects to us at the same moment).
        ConnectionRefusedError when a host answers with a reset; a SYN that is dropped is
        retransmitted until it gets through (TimeoutError after 127 s, as Linux): the caller
        bounds the wait."""
        dest = _address(remote)
        attempt = _Connect(self, self._outbound_port(local, dest), dest)
        self._connecting[attempt.key] = attempt
        handed_over = False
        try:
            attempt.send_syn()
            raw = await attempt.future
            handed_over = True
        finally:
            attempt.finish(handed_over)
        try:
            protocol = factory()
            if tls is None:
                raw.start(protocol)
                return raw, protocol
            raw.start(None)
            hostname = server_hostname if server_hostname is not None else dest.host
            transport = await asyncio.get_running_loop().start_tls(raw, protocol, tls, server_hostname=hostname)
            if transport is None:
                raise ConnectionResetError(errno.ECONNRESET, "TLS handshake failed")
            protocol.connection_made(transport)
            return transport, protocol
        except BaseException:
            raw.abort()
            raise

    def _check_local(self, host: str) -> None:
        if host not in ANY_ADDRESS and host != self.ip:
            raise OSError(errno.EADDRNOTAVAIL, f"{host} is not an address of this host ({self.ip})")

    def _free_port(self, kind: str, taken: Callable[[int], bool]) -> int:
        low, high = EPHEMERAL_PORTS
        for _ in range(high - low + 1):
            # Like Linux, a host's first ephemeral port is a random one (seeded by the
            # network), so hosts behind one NAT do not all use the same port numbers.
            port = self._next_port.get(kind) or self.network.rng.randrange(low, high + 1)
            self._next_port[kind] = port + 1 if port < high else low
            if not taken(port):
                return port
        raise OSError(errno.EADDRNOTAVAIL, f"no free {kind} port on {self.ip}")

    def _tcp_port_used(self, port: int) -> bool:
        return (
            port in self._listeners
            or any(p == port for p, _ in self._connecting)
            or any(p == port for p, _ in self._connections)
        )

    def _outbound_port(self, local: Endpoint | None, dest: Address) -> int:
        host, port = local if local is not None else ("", 0)
        self._check_local(host)
        if port == 0:
            return self._free_port("tcp", self._tcp_port_used)
        listener = self._listeners.get(port)
        if listener is not None and not listener.reuse_port:
            raise OSError(errno.EADDRINUSE, f"TCP port {port} of {self.ip} is in use")
        if (port, dest) in self._connecting or (port, dest) in self._connections:
            raise OSError(errno.EADDRNOTAVAIL, f"already connected from port {port} to {dest}")
        return port

    # -- arrivals

    def _receive(self, packet: _Packet) -> None:
        if packet.syn is not None:
            self._syn_received(packet, packet.syn)
            return
        sock = self._udp.get(packet.dest.port)
        if sock is None:
            self.network._drop()
        else:
            sock._deliver(packet.data, packet.source)

    def _syn_received(self, packet: _Packet, theirs: _Connect) -> None:
        """A SYN from ``theirs``, its source as we see it in ``packet``."""
        network = self.network
        key = (packet.dest.port, packet.source)
        ours = self._connecting.get(key)
        if theirs.state is _State.CLOSED:
            # Their connect is gone: their host resets whatever we answer.
            if ours is not None and ours.state is _State.PENDING:
                network._after(2 * network.latency, ours.refuse)
            return
        if theirs.state is _State.JOINED or key in self._connections:
            return  # a retransmission of a SYN that already got through
        simultaneous = ours is not None and ours.state is _State.PENDING
        listener = self._listeners.get(packet.dest.port)
        if not simultaneous and listener is None:
            network._after(network.latency, theirs.refuse)
            return
        mine, their_end = FakeTcpTransport.pair(
            self, (packet.dest, packet.source), theirs.host, (theirs.local, theirs.remote), packet.crossed
        )
        theirs.joined(their_end)
        if ours is not None and simultaneous:
            ours.joined(mine)
        elif listener is not None:
            self._accept(listener, mine)

    def _accept(self, listener: FakeTcpListener, transport: FakeTcpTransport) -> None:
        try:
            protocol = listener.factory()
        except Exception:
            log.exception("TCP listener on %s:%d failed to make a protocol", self.ip, listener.port)
            transport.abort()
            return
        if listener.tls is None:
            transport.start(protocol)
            return
        transport.start(None)
        task = asyncio.get_running_loop().create_task(self._serve_tls(listener.tls, transport, protocol))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tls(self, tls: ssl.SSLContext, raw: FakeTcpTransport, protocol: asyncio.BaseProtocol) -> None:
        try:
            transport = await asyncio.get_running_loop().start_tls(raw, protocol, tls, server_side=True)
        except OSError as exc:
            log.debug("TLS handshake with %s failed: %s", raw.get_extra_info("peername"), exc)
            raw.abort()
            return
        if transport is None:
            raw.abort()
            return
        protocol.connection_made(transport)


if TYPE_CHECKING:

    def _is_a_net(host: FakeHost) -> Net:
        return host
