"""The node: one identity, one UDP socket serving every peer, and the sessions over it."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable, Generator
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from peerpath import errors
from peerpath.clock import Clock, monotonic
from peerpath.identity import Address, Identity
from peerpath.nat.portmap import PortMappings
from peerpath.net import KernelNet, Net
from peerpath.node.admission import Admission, Source
from peerpath.node.direct import DirectPaths
from peerpath.node.events import Events
from peerpath.node.reachability import Reachability
from peerpath.node.relays import Relays
from peerpath.node.requests import Request, TrustBroker
from peerpath.node.sessions import SessionTable
from peerpath.node.sockets import UdpSocket, UdpSockets
from peerpath.node.state import default_state_dir
from peerpath.node.tcp import TcpLink, TcpLinks
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.client import RendezvousClient
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.session.connection import Connection, MessageHandler, Role, SessionConfig, StreamHandler
from peerpath.session.pathset import Path as NetPath
from peerpath.session.pathset import PathKind, PathSet, format_endpoint
from peerpath.wire import rendezvous as rv
from peerpath.wire.datagram import DatagramKind, classify
from peerpath.wire.endpoint import Endpoint
from peerpath.wire.punch import is_check

log = logging.getLogger(__name__)
#: The letters the node itself acts on (the trust broker); services register the others.
TRUST_LETTERS = ("trust-request", "trust-approval")


N = TypeVar("N", bound="Node")


class Attached(Protocol):
    """A service that runs with a node (:meth:`Node.attach`)."""

    async def start(self) -> None:
        """Start, once the node is up."""
        ...

    async def close(self) -> None:
        """Stop, before the node's sessions close."""
        ...


class Node:
    """A peerpath agent node.

    ``async with Node.start(state_dir=...) as node`` (or ``node = await Node.start(...)``
    and later ``await node.close()``).
    """

    def __init__(
        self,
        identity: Identity,
        trust: TrustStore,
        *,
        config: SessionConfig | None = None,
        direct: bool = True,
        net: Net | None = None,
        clock: Clock = monotonic,
    ) -> None:
        self.identity = identity
        #: The network the node's sockets are on, and the clock of everything it runs.
        self.net = net or KernelNet()
        self.clock = clock
        #: Whether relayed sessions try to move to direct paths (False: relay only).
        self.direct_paths = direct
        self.trust = trust
        self.broker = TrustBroker(identity, trust, trust.path.with_name("trust-requests.json"))
        self.direct = DirectPaths(self)
        #: The TCP listener on the node's port and the direct TCP links (direct paths only).
        self.tcp = TcpLinks(self.net, self._tcp_frame, self.direct.tcp.on_lost, clock)
        #: Ports the home router maps to us on request (PCP / NAT-PMP), when it does.
        self.portmap = PortMappings()
        #: Which Initials may start a responder session (handshake limits, Retry).
        self.admission = Admission()
        self.config = config or SessionConfig()
        self.counters = {
            "datagrams_received": 0,
            "datagrams_dropped": 0,
            "datagrams_failed": 0,
            "sessions_refused": 0,
            "send_dropped": 0,
        }
        #: The node's UDP sockets: the main one, and extra ones that rounds open.
        self.udp = UdpSockets(self.net, self._datagram_received, self.counters, clock)
        #: Every session, by connection ID.
        #: What happens on this node, for whoever listens (``node.events.listen(...)``).
        self.events = Events()
        self.sessions = SessionTable(
            identity, self, self.config, self.admission, self.counters, clock, self._accepted, self._session_event
        )
        self._services: dict[int, tuple[StreamHandler, Callable[[Address], bool] | None]] = {}
        self._message_handler: MessageHandler | None = None
        self._letter_handlers: dict[str, Callable[[rv.Letter], None]] = {}
        self._attached: list[Attached] = []
        self._running = False
        self._connecting: dict[Address, asyncio.Task[Connection]] = {}
        self._closed = False
        #: The rendezvous server's client and the other relays this node uses.
        self.relays = Relays(identity, self.udp.send, self._relay_received, net=self.net, clock=clock)
        #: The node's candidates and what it knows of its NAT.
        self.reachability = Reachability(self.net, self.udp, self.tcp, self.portmap, clock)

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def start(
        cls: type[N],
        state_dir: str | Path | None = None,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        identity: Identity | None = None,
        trust: TrustStore | None = None,
        config: SessionConfig | None = None,
        rendezvous: str | RendezvousUrl | None = None,
        direct: bool = True,
        net: Net | None = None,
        clock: Clock = monotonic,
    ) -> _Starting[N]:
        """Start a node: load (or create) the identity in ``state_dir`` and bind one UDP socket.

        With ``rendezvous`` (a ``pp://ADDRESS@HOST:PORT`` URL) the node registers there, can
        reach peers by address alone, and is reachable through the server's relay. Sessions
        that start on the relay move to a direct path where the NATs allow it, unless
        ``direct`` is False. Give ``identity`` and ``trust`` instead of ``state_dir`` to run
        without files (tests). ``net`` and ``clock`` are the network and the clock the node
        runs on (default: the operating system's; tests run nodes on an in-memory internet
        with a virtual clock).
        """
        url = RendezvousUrl.parse(rendezvous) if isinstance(rendezvous, str) else rendezvous
        node_args = {"config": config, "direct": direct, "net": net, "clock": clock}
        return _Starting(cls, state_dir, host, port, identity, trust, url, node_args)

    async def _register(self, url: RendezvousUrl) -> None:
        client = await self.relays.start(url, self._letter_received, self._on_registered)
        self.reachability.rendezvous = client

    @property
    def rendezvous(self) -> RendezvousClient | None:
        """The client of the rendezvous server, when the node has one."""
        return self.relays.main

    @property
    def home_relay(self) -> str | None:
        """The relay peers reach this node through (chosen among those the server offers)."""
        return self.relays.home

    def _on_registered(self, registered: rv.Registered) -> None:
        """After every registration: choose a home relay among those the server offers, and
        learn again where we are and (at most every ten minutes) what NAT we are behind."""
        self.relays.choose_home(list(registered.relays))
        self.reachability.registered(registered)

    def _session_event(self, conn: Connection, kind: str, details: dict[str, Any]) -> None:
        self.events.emit(kind, peer=str(conn.peer), role=conn.role.value, **details)

    def _letter_received(self, letter: rv.Letter) -> None:
        handler = self._letter_handlers.get(letter.kind)
        if handler is not None:
            handler(letter)  # raising leaves the letter in the server's mailbox, for another try
            return
        if letter.kind not in TRUST_LETTERS:
            # Its service is not running (yet, or any more): leave it in the mailbox for later.
            raise errors.LocalError(f"no service takes {letter.kind!r} letters now")
        outcome = self.broker.receive(letter)
        log.debug("letter %s from the rendezvous: %s", letter.kind, outcome)
        if not outcome.startswith("ignored"):  # checked and acted on: its sender is who it says
            self.events.emit(letter.kind, outcome=outcome, peer=_sender(letter), note=letter.note)

    async def _bind(self, host: str, port: int) -> None:
        self.udp.bind(host, port)
        if self.direct_paths:
            await self.tcp.listen(host, self.local_endpoint[1])

    @property
    def address(self) -> Address:
        """This node's overlay address."""
        return self.identity.address

    @property
    def local_endpoint(self) -> Endpoint:
        """The (host, port) the node's UDP socket is bound to."""
        return self.udp.local_endpoint

    async def close(self) -> None:
        """Close every session and the socket."""
        if self._closed:
            return
        self._closed = True
        for service in reversed(self._attached):
            try:
                await service.close()
            except Exception:
                log.exception("closing %r failed", service)
        for task in self._connecting.values():
            task.cancel()
        self.sessions.closing = True
        await asyncio.gather(*(c.close("node shutting down") for c in list(self.sessions.all)), return_exceptions=True)
        self.reachability.close()
        await self.direct.close()
        await self.broker.close()
        await self.tcp.close()
        await self.portmap.close()
        await self.relays.close()
        self.udp.close()

    async def __aenter__(self) -> Node:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- services (what sessions ask of the node) -----------------------------------------

    def is_trusted(self, address: Address) -> bool:
        """Whether sessions with ``address`` are allowed (deny by default)."""
        return self.trust.is_trusted(address)

    def stream_handler(self, port: int, peer: Address) -> StreamHandler | str:
        """The handler serving ``port`` for ``peer``, or why a stream there is refused (a peer
        no longer trusted gets nothing more, even on a session opened while it was)."""
        if not self.is_trusted(peer):
            return f"{peer} is no longer trusted"
        served = self._services.get(port)
        if served is None:
            return f"no service on port {port}"
        handler, allow = served
        if allow is not None and not allow(peer):
            return f"port {port} is not open to {peer}"
        return handler

    def message_handler(self) -> MessageHandler | None:
        """The handler for incoming messages."""
        return self._message_handler

    async def internal_message(self, connection: Connection, topic: str, data: bytes) -> bytes | None:
        """peerpath's own messages between nodes (path upgrades)."""
        return await self.direct.internal_message(connection, topic, data)

    def serve(self, port: int, handler: StreamHandler, *, allow: Callable[[Address], bool] | None = None) -> None:
        """Serve byte streams that peers open to ``port``: ``await handler(reader, writer)``.
        With ``allow``, only peers it says yes to may open one (the others are refused
        with a reason at once); every peer must be trusted in any case."""
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range 0-65535")
        self._services[port] = (handler, allow)

    def unserve(self, port: int) -> None:
        """Stop serving ``port`` (streams already open are not affected)."""
        self._services.pop(port, None)

    def on_message(self, handler: MessageHandler | None) -> None:
        """Handle incoming messages: ``await handler(connection, data)`` returns the reply (requests)."""
        self._message_handler = handler

    def on_letter(self, kind: str, handler: Callable[[rv.Letter], None] | None) -> None:
        """Handle letters of ``kind`` from the rendezvous mailbox (sealed messages, say):
        ``handler(letter)``, unchecked. A handler that raises leaves the letter in the
        mailbox, and the server delivers it again later."""
        if handler is None:
            self._letter_handlers.pop(kind, None)
        else:
            self._letter_handlers[kind] = handler

    def attach(self, service: Attached) -> None:
        """Run ``service`` with this node: started (in order) once the node is bound and
        registered, and closed (in reverse order) first when the node closes. Attach before
        the node starts (a subclass's ``__init__`` does)."""
        if self._running or self._closed:
            raise errors.LocalError("attach services before the node starts")
        self._attached.append(service)

    async def _start_attached(self) -> None:
        self._running = True
        for service in self._attached:
            await service.start()

    # -- trust requests -------------------------------------------------------------------

    def _mail(self) -> RendezvousClient:
        if self.rendezvous is None:
            raise errors.LocalError("trust requests travel through a rendezvous server; start with one")
        return self.rendezvous

    async def request_trust(self, address: Address, note: str = "") -> None:
        """Ask ``address`` to trust this node (delivered when it is online); it is trusted back on approval."""
        client = self._mail()
        await client.post(self.broker.request(address, note))

    async def approve_trust(self, address: Address) -> None:
        """Trust the peer that asked, and send it a signed approval."""
        client = self._mail()
        pending = self.broker.requests.incoming.get(str(address))
        letter = self.broker.approve(address)
        try:
            await client.post(letter)
        except BaseException:
            if pending is not None:  # keep it pending so that approving again resends the approval
                self.broker.requests.incoming[str(address)] = pending
                self.broker.requests.save()
            raise

    def deny_trust(self, address: Address) -> None:
        """Drop a pending trust request without answering."""
        self.broker.deny(address)

    def pending_trust(self) -> list[Request]:
        """Trust requests waiting for an answer."""
        return self.broker.pending()

    # -- sessions -----------------------------------------------------------------------

    @property
    def connections(self) -> list[Connection]:
        """Every live session."""
        return self.sessions.live

    def connection_to(self, address: Address) -> Connection | None:
        """The established session with ``address``, if any (of two, when both nodes dialled
        each other at once, the one both ends keep)."""
        return self.sessions.connection_to(address)

    async def connect(
        self, address: Address | str, via: Endpoint | None = None, *, timeout: float | None = None
    ) -> Connection:
        """A session with the peer at ``address``.

        With ``via`` the peer is reached at that UDP endpoint; without it the rendezvous
        server is asked whether the peer is online and the session starts over its relay
        at once. Reuses an established session. Raises
        :class:`~peerpath.errors.NotTrustedError` for an address this node does not trust,
        and fails closed if the other end cannot prove it holds ``address``'s key.
        """
        peer = Address.parse(address) if isinstance(address, str) else address
        if self._closed:
            raise errors.LocalError("node is closed")
        if peer == self.address:
            raise errors.LocalError("cannot connect to this node's own address")
        if not self.is_trusted(peer):
            raise errors.NotTrustedError(f"{peer} is not trusted; run: peerpath trust add {peer}")
        existing = self.connection_to(peer)
        if existing is not None:
            return existing
        task = self._connecting.get(peer)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._dial(peer, via, timeout))
            self._connecting[peer] = task
            task.add_done_callback(lambda _t: self._connecting.pop(peer, None))
        return await asyncio.shield(task)

    async def _dial(self, peer: Address, via: Endpoint | None, timeout: float | None) -> Connection:
        paths = PathSet()
        if via is not None:
            paths.add(self.udp.path(await self._resolve(via)))
        else:
            client = self.rendezvous
            if client is None:
                raise errors.LocalError(f"no endpoint for {peer} and no rendezvous server: give ADDR@HOST:PORT")
            found = await client.lookup(peer, timeout=timeout or self.config.connect_timeout)
            if not found.online:
                raise errors.NetworkError(f"{peer} is not online at {client.url.endpoint}")
            relay = await self.relays.client(found.relay) if found.relay else client  # the peer's home relay
            paths.add(self._relay_path(relay, peer.digest))
        conn = self.sessions.new(Role.INITIATOR, paths, expected_peer=peer)
        conn.start()
        try:
            await conn.wait_established(timeout)
        except BaseException:
            await conn.close("connect failed", timeout=0.2)
            raise
        preferred = self.connection_to(peer)
        if preferred is not None and preferred is not conn:
            # The peer dialled us at the same moment and its session is the one both ends
            # keep: ours was never handed out, so it goes quietly.
            log.info("session with %s: both dialled at once; keeping the one %s started", peer, peer)
            await conn.close("duplicate session")
            return preferred
        log.info("session with %s over %s", peer, conn.path and conn.path.describe())
        if self.direct_paths:  # on the relay: rounds find a direct path; direct: probes size it
            self.direct.watch(conn, initiator=True)
        return conn

    async def _resolve(self, via: Endpoint) -> Endpoint:
        host, port = via
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            return (host, int(port))
        except OSError:
            pass
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise errors.NetworkError(f"cannot resolve {host}")
        return (str(infos[0][4][0]), int(infos[0][4][1]))

    def _relay_path(self, client: RendezvousClient, peer: bytes) -> NetPath:
        def send(datagram: bytes) -> None:
            client.send_relay(peer, datagram)

        return NetPath(PathKind.RELAY, client.url.endpoint, send, created=self.clock())

    # -- the socket -----------------------------------------------------------------------

    def _datagram_received(self, data: bytes, remote: Endpoint, sock: UdpSocket) -> None:
        extra = sock is not self.udp.main  # one of a birthday round's sockets
        kind = classify(data)
        if kind is DatagramKind.STUN:
            stun = sock.stun if extra else self.udp.stun
            if stun is not None:
                stun.datagram_received(data, remote)
        elif kind is DatagramKind.CHECK:
            self.direct.on_check(data, remote, sock)
        elif kind is DatagramKind.RELAY and not extra:
            client = self.relays.from_udp(remote)
            if client is not None:
                client.udp_received(data, remote)
            else:
                self.counters["datagrams_dropped"] += 1
        else:
            key = (PathKind.DIRECT_UDP, format_endpoint(remote))
            self.sessions.deliver(data, key, lambda: self.udp.path(remote, sock), Source(remote[0]))

    def _tcp_frame(self, link: TcpLink, data: bytes) -> None:
        """A datagram from a TCP link: a check, or QUIC for the session a check tied it to."""
        if is_check(data):
            self.direct.tcp.on_check(link, data)
            return
        conn = link.conn
        if conn is None:
            # Only checks may cross a link that has not shown which session it carries (a
            # released one may still bring the end of its last session: dropped).
            self.counters["datagrams_dropped"] += 1
            if not link.proved:
                link.close()
            return
        self.counters["datagrams_received"] += 1
        if not self.sessions.owns(conn, data):
            self.counters["datagrams_dropped"] += 1
            return
        path = conn.paths.paths.get((PathKind.DIRECT_TCP, link.name)) or link.path()
        conn.datagram_received(data, path)

    def _relay_received(self, client: RendezvousClient, source: bytes, data: bytes) -> None:
        if is_check(data):  # the peer probing the relay path (its RTT is the yardstick)
            reply = functools.partial(client.send_relay, source)
            self.direct.on_relay_check(data, source, reply, client.url.endpoint)
            return
        # The server vouches for who sent it: a peer we trust is never kept out by strangers.
        sender = Source(source.hex(), authenticated=True, trusted=self.is_trusted(Address(source)))
        key = (PathKind.RELAY, client.url.endpoint)
        self.sessions.deliver(data, key, lambda: self._relay_path(client, source), sender)

    def _accepted(self, conn: Connection) -> None:
        """A peer's session got established: keep it on its best path."""
        log.info("session from %s over %s", conn.peer, conn.path and conn.path.describe())
        if conn.path is not None and conn.path.kind is PathKind.RELAY and self.direct_paths:
            self.direct.watch(conn, initiator=False)

    def status(self) -> dict[str, Any]:
        """A snapshot of the node: address, endpoint, sessions and counters."""
        return {
            "address": str(self.address),
            "endpoint": format_endpoint(self.local_endpoint) if self.udp.main else None,
            "sessions": [c.describe() for c in self.connections],
            "counters": dict(self.counters),
            "admission": dict(self.admission.counters),
            "rendezvous": self.rendezvous.status() if self.rendezvous is not None else None,
            "home_relay": self.home_relay,
            **self.reachability.describe(),
            "direct": self.direct.describe(),
            "port_mapping": self.portmap.describe(),
            "tcp_port": self.tcp.port,
        }


class _Starting(Generic[N]):
    """What :meth:`Node.start` returns: await it, or use it with ``async with``."""

    def __init__(
        self,
        cls: type[N],
        state_dir: str | Path | None,
        host: str,
        port: int,
        identity: Identity | None,
        trust: TrustStore | None,
        rendezvous: RendezvousUrl | None,
        node_args: dict[str, Any],
    ) -> None:
        self._args = (cls, state_dir, host, port, identity, trust)
        self._rendezvous = rendezvous
        self._node_args = node_args
        self._node: N | None = None

    async def _start(self) -> N:
        cls, state_dir, host, port, identity, trust = self._args
        if identity is None or trust is None:
            if state_dir is None:
                state_dir = default_state_dir()
            directory = Path(state_dir)
            identity = identity or Identity.load_or_create(directory)
            trust = trust or TrustStore.in_state_dir(directory)
        node = cls(identity, trust, **self._node_args)
        try:
            await node._bind(host, port)
        except OSError as exc:
            raise errors.LocalError(f"cannot bind UDP {host}:{port}: {exc.strerror or exc}") from exc
        if self._rendezvous is not None:
            if node.direct_paths:
                node.portmap.start(node.local_endpoint[1], node.tcp.port, node.net.default_gateway())
            await node._register(self._rendezvous)
        try:
            await node._start_attached()
        except BaseException:
            await node.close()
            raise
        self._node = node
        return node

    def __await__(self) -> Generator[Any, None, N]:
        return self._start().__await__()

    async def __aenter__(self) -> N:
        return await self._start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._node is not None:
            await self._node.close()


def _sender(letter: rv.Letter) -> str | None:
    try:
        return str(Address.from_public_key(letter.sender_key))
    except ValueError:
        return None
