"""Several processes behind one URL (``peerpath server --workers N``), so that the relay uses
every core.

Every process, the hub (number 0) and the workers (1 to N-1), listens on the same TLS and UDP
port (SO_REUSEPORT). The kernel spreads TLS connections over them; a classic BPF program on the
UDP port sends each relay datagram to the process that holds its agent's TLS connection (the
first byte of the registration's token is that process's number), so an agent's quota and UDP
state live in one place. A worker terminates its connections and cuts their frames itself:
relay frames it routes, control frames it hands to the hub as they came.

The hub is the server of :mod:`.server`: registrations and every limit, lookups, letters,
names and tags, pings and status (and the WebSocket listener) stay in one process and behave
as with one. To the hub, a worker's connection is an :class:`~.connection.AgentConnection` on
a :class:`RemoteLink`.

The shared state is small and pushed, never asked for: the hub tells every process who is
online where (process, connection, UDP token and key) and who wants UDP; the process that
confirms an agent's UDP endpoint tells the others. So any process routes any relay frame: over
UDP from its own socket (same address, same port), or to the process holding the receiver's
connection, which writes it. Every two processes share a stream socketpair, made before the
workers are forked (:mod:`.mesh`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from peerpath.certs import tls_server_context
from peerpath.clock import Clock, monotonic
from peerpath.identity import Address, Identity
from peerpath.net import DatagramHandler, KernelNet, KernelUdp, TcpListener
from peerpath.ratelimit import TokenBucket
from peerpath.rendezvous.connection import AgentConnection, FrameStream
from peerpath.rendezvous.dataplane import DataPlane
from peerpath.rendezvous.limits import CutOff, ServerLimits
from peerpath.rendezvous.links import WritableLink
from peerpath.rendezvous.mesh import (
    MeshLink,
    RemoteLink,
    bind_shared_udp,
    connect_mesh,
    mesh_sockets,
    steer_by_token,
    write_to,
)
from peerpath.rendezvous.presence import RESTING, Agent, UdpSocket
from peerpath.rendezvous.server import REGISTER_TIMEOUT, RendezvousServer
from peerpath.rendezvous.tls import Receiver, TlsLink, Valve
from peerpath.rendezvous.udp_relay import RelayUdp, UdpRelay
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint

log = logging.getLogger(__name__)

#: Processes at most (a token's first byte names one).
MAX_WORKERS = 64
#: The lock file a hub holds in its state directory.
LOCK_FILE = "server.lock"
#: How often a worker reports its counters to the hub.
COUNTERS_INTERVAL = 5.0
#: The counters a worker keeps (the data plane's); the hub adds them to its own.
WORKER_COUNTERS = (
    "malformed",
    "handler_errors",
    "agents_cut_off",
    "relay_frames",
    "relay_bytes",
    "relay_dropped_offline",
    "relay_dropped_quota",
    "relay_dropped_backpressure",
    "udp_frames",
    "udp_malformed",
    "udp_unknown_token",
    "udp_unauthentic",
    "udp_unconfirmed",
)


def _lock(path: Path) -> int:
    """An exclusive lock on ``path`` for as long as the returned descriptor is open."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OSError(f"another server uses {path.parent}") from None
    return fd


def _steered_token(owner: int, token: bytes) -> bytes:
    return bytes([owner]) + token[1:]


def _udp_socket_for(sockets: list[RelayUdp], host: str) -> RelayUdp | None:
    for udp in sockets:
        if udp.host == host:
            return udp
    return None


# -- the hub ---------------------------------------------------------------------------------------


class Cluster:
    """The hub's side (process 0): the workers' connections as :class:`RemoteLink` agents of
    ``server``, and what every process must know of who is online."""

    def __init__(self, server: RendezvousServer, count: int, ends: dict[tuple[int, int], socket.socket]) -> None:
        self.server = server
        self.count = count
        self._ends = ends
        self.mesh: dict[int, MeshLink] = {}
        #: Connections of the workers, by (worker, its number for the connection).
        self._remote: dict[tuple[int, int], AgentConnection] = {}
        #: The hub's own links of agents online, by the number the others write to them by.
        self._local: dict[int, WritableLink] = {}
        self._local_ident: dict[bytes, int] = {}
        self._idents = itertools.count(1)
        self._bound: asyncio.Future[None] | None = None
        self.worker_counters: dict[int, dict[str, int]] = {}
        self.agents_at: dict[int, int] = dict.fromkeys(range(count), 0)
        #: Set when a worker is gone (the server then stops: see :mod:`.workers`).
        self.gone: asyncio.Event = asyncio.Event()
        #: Pauses the hub's readers while a worker falls behind.
        self.valve = Valve()
        self._closing = False
        self._lock: int | None = None
        #: Whether UDP relay frames go to their agent's process (else wherever the kernel hashes them).
        self.steered = True

    async def connect(self) -> None:
        """Take the state directory (SO_REUSEPORT would let a second server share the port
        unnoticed) and connect to the workers."""
        self._lock = _lock(self.server.state_dir / LOCK_FILE)
        self.mesh = await connect_mesh(0, self._ends, self)
        self.server.valve = self.valve

    async def start_workers(self, port: int) -> None:
        """Have the workers join the port, one after the other (the order the UDP steering counts in)."""
        for worker in range(1, self.count):
            self._bound = asyncio.get_running_loop().create_future()
            self.mesh[worker].send("bind", port)
            await asyncio.wait_for(self._bound, 30)

    def close(self) -> None:
        """Stop the workers (they end once their socketpair to the hub closes)."""
        self._closing = True
        for link in self.mesh.values():
            link.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def bind_udp(self, host: str, port: int, on_datagram: DatagramHandler) -> KernelUdp:
        bound = bind_shared_udp(host, port, on_datagram)
        self.steered = steer_by_token(bound.sock, self.count) and self.steered
        return bound

    # -- what the server tells ----------------------------------------------------------------------

    def admitted(self, agent: Agent) -> None:
        """``agent`` is registering: its token names its process, and every process learns of it
        (before the agent learns it is registered, so its first frames find it)."""
        link = agent.link
        if isinstance(link, RemoteLink):
            owner, ident = link.owner, link.ident
        else:
            owner, ident = 0, next(self._idents)
            self._local[ident] = link
            self._local_ident[agent.address.digest] = ident
        agent.token = _steered_token(owner, agent.token)
        self.agents_at[owner] += 1
        self._broadcast("online", agent.address.digest, owner, ident, agent.token, agent.udp_key, agent.udp_ready)

    def forgotten(self, agent: Agent) -> None:
        self._drop_local(agent)
        self.agents_at[agent.token[0]] -= 1  # its token names its process (admitted)
        self._broadcast("offline", agent.address.digest)

    def rested(self, agent: Agent) -> None:
        """``agent`` rests on UDP: its connection (the hub's own, if it was) is gone. Its
        replicas elsewhere keep writing to a connection that is no more, which drops it."""
        self._drop_local(agent)

    def _drop_local(self, agent: Agent) -> None:
        ident = self._local_ident.pop(agent.address.digest, None)
        if ident is not None:
            self._local.pop(ident, None)

    def udp_ready(self, agent: Agent) -> None:
        self._broadcast("udp-ready", agent.address.digest, agent.udp_ready)

    def path_changed(self, agent: Agent, sock: UdpSocket) -> None:
        """The hub confirmed (or heard again from) ``agent``'s UDP endpoint."""
        announce_path(self.mesh.values(), agent, sock)

    # -- what the workers send -----------------------------------------------------------------------

    def deliver(self, ident: int, data: memoryview) -> None:
        write_to(self._local.get(ident), data, self.server.counters)

    def pressure(self, backed_up: bool) -> None:
        if backed_up:
            self.valve.shut()
        else:
            self.valve.open()

    def handle(self, worker: int, message: list[Any]) -> None:
        kind, *args = message
        server = self.server
        if kind == "frames":
            connection = self._remote.get((worker, args[0]))
            if connection is not None and not connection.received(args[1]):
                self._end(worker, args[0])
        elif kind == "open":
            link = RemoteLink(self.mesh[worker], args[0], (args[1], args[2]))
            connection = AgentConnection(server, link)
            self._remote[worker, args[0]] = connection
            if not connection.open():
                self._end(worker, args[0])
        elif kind == "lost":
            self._end(worker, args[0], failed=len(args) > 1 and bool(args[1]))
        elif kind == "close":
            local = self._local.get(args[0])
            if local is not None:
                local.close()
        elif kind == "udp-path":
            learn_path(server.agents.get(args[0]), args, server._udp)
        elif kind == "cut-off":
            agent = server.agents.get(args[0])
            if agent is not None:
                server._cut_off(agent, CutOff(args[1]))
        elif kind == "counters":
            self.worker_counters[worker] = dict(args[0])
        elif kind == "bound" and self._bound is not None and not self._bound.done():
            self._bound.set_result(None)

    def _end(self, worker: int, ident: int, failed: bool = False) -> None:
        """A worker's connection is over; ``failed``: for what the agent sent (not a rest)."""
        connection = self._remote.pop((worker, ident), None)
        if connection is not None:
            if failed and connection.agent is not None:
                connection.agent.resting = False
            connection.end()

    def lost(self, worker: int) -> None:
        if self._bound is not None and not self._bound.done():
            self._bound.set_exception(OSError(f"worker {worker} could not listen"))
        if not self._closing:
            log.error("worker %d is gone: the server stops", worker)
        for key in [key for key in self._remote if key[0] == worker]:
            self._end(*key)
        self.gone.set()

    def _broadcast(self, *message: Any) -> None:
        for link in self.mesh.values():
            link.send(*message)


def announce_path(mesh: Any, agent: Agent, sock: UdpSocket) -> None:
    """Tell every other process where ``agent``'s relayed datagrams go over UDP, and from which
    of the server's addresses."""
    endpoint = agent.udp_endpoint
    host = getattr(sock, "host", None)
    if endpoint is None or host is None:
        return
    for link in mesh:
        link.send("udp-path", agent.address.digest, endpoint[0], endpoint[1], agent.udp_seen, host)


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


# -- a worker --------------------------------------------------------------------------------------


class WorkerConnection(FrameStream):
    """A TLS connection a worker holds: relay frames are routed here once the hub has said whose
    it is; every other frame (all of them before that) goes to the hub as it came."""

    __slots__ = ("agent", "failed", "ident", "worker")

    def __init__(self, worker: Worker, link: TlsLink) -> None:
        super().__init__(link)
        self.worker = worker
        self.ident = link.ident
        self.agent: Agent | None = None
        #: It ended for what the agent sent (the hub then keeps no rest of it).
        self.failed = False

    @property
    def registered(self) -> bool:
        return self.agent is not None

    def end(self) -> None:
        self.worker.ended(self)

    def _frames(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        worker = self.worker
        view = memoryview(data)
        start = offset
        while (found := rv.frame_at(view, offset)) is not None:
            if found[0] == rv.FrameType.RELAY and self.agent is not None:
                if offset > start:
                    worker.hub.send("frames", self.ident, bytes(view[start:offset]))
                offset = start = worker.plane.relay_frames(self.agent, view, offset, worker.clock())
            else:
                offset = found[1]
        if offset > start:
            worker.hub.send("frames", self.ident, bytes(view[start:offset]))
        return offset

    def _counters(self) -> dict[str, int]:
        return self.worker.counters

    def _failed(self) -> None:
        self.failed = True

    def _flush(self) -> None:
        self.worker.plane.flush()

    def _who(self) -> str:
        where = super()._who()
        return f"{self.agent.address} at {where}" if self.agent is not None else where


class Worker:
    """Process ``index`` of ``count``: TLS and UDP on the shared port, the data plane, and
    replicas of every agent online (from the hub's messages)."""

    def __init__(
        self,
        index: int,
        count: int,
        identity: Identity,
        state_dir: Path,
        limits: ServerLimits,
        ends: dict[tuple[int, int], socket.socket],
        *,
        clock: Clock = monotonic,
    ) -> None:
        self.index, self.count = index, count
        self.identity, self.state_dir, self.limits = identity, state_dir, limits
        self.clock = clock
        self._ends = ends
        self.counters = dict.fromkeys(WORKER_COUNTERS, 0)
        self.agents: dict[bytes, Agent] = {}
        self.plane = DataPlane(self.agents, self.counters, limits.cutoff_drops)
        self.udp_relay = UdpRelay(self.counters, self.plane.relay, self._cut_off)
        self.udp_relay.on_path = self._path_changed
        self.udp_relay.process = index
        self.udp: list[RelayUdp] = []
        self.links: dict[int, TlsLink] = {}
        self._connections: dict[int, WorkerConnection] = {}
        self._listeners: list[TcpListener] = []
        self._idents = itertools.count(1)
        self.mesh: dict[int, MeshLink] = {}
        self._hosts: list[str] = []
        self._tls: ssl.SSLContext | None = None
        self.valve = Valve()
        self.done = asyncio.Event()

    @property
    def hub(self) -> MeshLink:
        return self.mesh[0]

    async def run(self, hosts: list[str]) -> None:
        """Serve until the hub goes away (or asks the worker to bind and that fails)."""
        self._hosts = list(hosts)
        self._tls = tls_server_context(self.identity, self.state_dir)
        self._tls.num_tickets = 0
        self.mesh = await connect_mesh(self.index, self._ends, self)
        reporter = asyncio.get_running_loop().create_task(self._report())
        try:
            await self.done.wait()
        finally:
            reporter.cancel()
            await self.close()

    async def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        for link in list(self.links.values()):
            link.close()
        for udp in self.udp:
            udp.close()
        for mesh in self.mesh.values():
            mesh.close()

    async def _bind(self, port: int) -> None:
        context = self._tls
        if context is None:
            raise RuntimeError("the worker is not running")
        net = KernelNet()
        for host in self._hosts:
            self._listeners.append(await net.listen_tcp(host, port, lambda: self._tls_link(context), reuse_port=True))
            self.udp.append(RelayUdp(net, host, port, self._udp_received, bind=bind_shared_udp))
        self.hub.send("bound")

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(COUNTERS_INTERVAL)
            self.hub.send("counters", self.counters)

    # -- connections ---------------------------------------------------------------------------

    def _tls_link(self, context: ssl.SSLContext) -> TlsLink:
        return TlsLink(context, self._opened, self.links, next(self._idents), self.valve, REGISTER_TIMEOUT)

    def _opened(self, link: TlsLink) -> Receiver:
        connection = WorkerConnection(self, link)
        self._connections[link.ident] = connection
        peer = link.peername() or ("unknown", 0)
        self.hub.send("open", link.ident, str(peer[0]), int(peer[1]))
        return connection

    def ended(self, connection: WorkerConnection) -> None:
        if self._connections.pop(connection.ident, None) is not None:
            self.hub.send("lost", connection.ident, connection.failed)
        if connection.agent is not None:
            # Resting on UDP, or offline as soon as the hub says so: either way no connection.
            connection.agent.link = RESTING
        connection.agent = None
        connection.link.close()

    def _udp_received(self, data: bytes, addr: Endpoint, sock: RelayUdp) -> None:
        self.udp_relay.received(data, addr, sock, self.clock())

    def _cut_off(self, agent: Agent, exc: CutOff) -> None:
        """An agent's UDP frames broke its quota: its connection ends, wherever it is."""
        self.counters["agents_cut_off"] += 1
        log.warning("cutting off %s: %s", agent.address, exc)
        if self.udp_relay.tokens.get(agent.token) is agent:
            del self.udp_relay.tokens[agent.token]  # its next UDP frames are strangers'
        if isinstance(agent.link, RemoteLink) or agent.rests:
            self.hub.send("cut-off", agent.address.digest, str(exc))
            return
        with contextlib.suppress(Exception):
            agent.link.write(rv.encode_control(rv.Refused(str(exc))))
        agent.link.close()

    def _path_changed(self, agent: Agent, sock: UdpSocket) -> None:
        announce_path(self.mesh.values(), agent, sock)

    # -- what the others send -------------------------------------------------------------------

    def deliver(self, ident: int, data: memoryview) -> None:
        write_to(self.links.get(ident), data, self.counters)

    def pressure(self, backed_up: bool) -> None:
        if backed_up:
            self.valve.shut()
        else:
            self.valve.open()

    def handle(self, source: int, message: list[Any]) -> None:
        kind, *args = message
        if kind == "online":
            self._online(*args)
        elif kind == "offline":
            self._offline(args[0])
        elif kind == "udp-ready":
            agent = self.agents.get(args[0])
            if agent is not None:
                agent.udp_ready = args[1]
        elif kind == "udp-path":
            learn_path(self.agents.get(args[0]), args, self.udp)
        elif kind == "close":
            link = self.links.get(args[0])
            if link is not None:
                link.close()
        elif kind == "bind":
            task = asyncio.get_running_loop().create_task(self._bind(args[0]))
            task.add_done_callback(self._bound)

    def _bound(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %d cannot listen: %s", self.index, task.exception())
            self.done.set()

    def _online(self, digest: bytes, owner: int, ident: int, token: bytes, key: bytes, udp_ready: bool) -> None:
        link: WritableLink | None
        if owner == self.index:
            link = self.links.get(ident)
            connection = self._connections.get(ident)
        else:
            link, connection = RemoteLink(self.mesh[owner], ident), None
        if link is None:
            return  # the connection ended meanwhile: the hub hears of it
        self._offline(digest)
        now = self.clock()
        limits = self.limits
        agent = Agent(
            Address(digest),
            link,
            "",
            connected=now,
            relay_quota=TokenBucket(limits.relay_rate, limits.relay_burst, now),
            control_quota=TokenBucket(0, 0, now),
            last_seen=now,
        )
        agent.token, agent.udp_key, agent.udp_ready = token, key, udp_ready
        self.agents[digest] = agent
        self.udp_relay.tokens[token] = agent
        if connection is not None:
            connection.agent = agent

    def _offline(self, digest: bytes) -> None:
        agent = self.agents.pop(digest, None)
        if agent is None:
            return
        if self.udp_relay.tokens.get(agent.token) is agent:
            del self.udp_relay.tokens[agent.token]
        self.plane.forget(agent)
        for connection in self._connections.values():  # cut off: relays nothing more, at once
            if connection.agent is agent:
                connection.agent = None

    def lost(self, source: int) -> None:
        if source == 0:
            self.done.set()  # the hub is gone: so is the server


# -- processes -------------------------------------------------------------------------------------


def fork_workers(
    count: int,
    identity: Identity,
    state_dir: Path,
    limits: ServerLimits,
    hosts: list[str],
    run_loop: Callable[[Coroutine[Any, Any, None]], None],
) -> tuple[dict[tuple[int, int], socket.socket], list[int]]:
    """Fork workers 1 to ``count``-1 (before any event loop runs); the hub's ends of the
    socketpairs and the workers' process ids. A worker serves until the hub goes away."""
    if not 1 < count <= MAX_WORKERS:
        raise ValueError(f"workers: 2 to {MAX_WORKERS}")
    ends = mesh_sockets(count)
    pids = []
    for index in range(1, count):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the hub stops on ^C, and the workers with it
                mine = {key: sock for key, sock in ends.items() if key[0] == index}
                for key, sock in ends.items():
                    if key[0] != index:
                        sock.close()
                worker = Worker(index, count, identity, state_dir, limits, mine)
                run_loop(worker.run(hosts))
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    hub = {key: sock for key, sock in ends.items() if key[0] == 0}
    for key, sock in ends.items():
        if key[0] != 0:
            sock.close()
    return hub, pids


def stop_workers(pids: list[int], timeout: float = 5.0) -> None:
    """Wait for the workers to end (they do once the hub's socketpairs close), then kill the rest."""
    loop_deadline = monotonic() + timeout
    waiting = set(pids)
    while waiting and monotonic() < loop_deadline:
        for pid in list(waiting):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
            waiting.discard(pid)
        if waiting:
            time.sleep(0.05)
    for pid in waiting:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
