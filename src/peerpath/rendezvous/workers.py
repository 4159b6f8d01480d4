"""The workers of a server that runs as several processes (``peerpath server --workers N``;
:mod:`.hub` says how the processes share the work): each terminates the TLS connections the
kernel gives it, routes their relay frames itself and hands every other frame to the hub, and
keeps replicas of the agents online from what the hub tells it. Also how they are forked
before any event loop runs, and stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from peerpath.net import KernelNet, TcpListener
from peerpath.ratelimit import TokenBucket
from peerpath.rendezvous.connection import FrameStream
from peerpath.rendezvous.dataplane import DataPlane
from peerpath.rendezvous.hub import MAX_WORKERS
from peerpath.rendezvous.limits import CutOff, ServerLimits
from peerpath.rendezvous.links import WritableLink
from peerpath.rendezvous.mesh import (
    MeshLink,
    RemoteLink,
    announce_path,
    bind_shared_udp,
    connect_mesh,
    learn_path,
    mesh_sockets,
    write_to,
)
from peerpath.rendezvous.presence import RESTING, Agent, UdpSocket
from peerpath.rendezvous.server import REGISTER_TIMEOUT
from peerpath.rendezvous.tls import Receiver, TlsLink, Valve
from peerpath.rendezvous.udp_relay import RelayUdp, UdpRelay
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint

log = logging.getLogger(__name__)


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
    "control_dropped_quota",
)


class WorkerConnection(FrameStream):
    """A TLS connection a worker holds: relay frames are routed here once the hub has said whose
    it is; every other frame (all of them before that) goes to the hub as it came, within the
    control quota the hub applies (what the hub would drop is dropped here, before it crosses
    to the hub and fills the socketpair every connection of this worker shares)."""

    __slots__ = ("agent", "control", "drops", "failed", "ident", "worker")

    def __init__(self, worker: Worker, link: TlsLink) -> None:
        super().__init__(link)
        self.worker = worker
        self.ident = link.ident
        self.agent: Agent | None = None
        #: It ended for what the agent sent (the hub then keeps no rest of it).
        self.failed = False
        limits = worker.limits
        self.control = TokenBucket(limits.control_rate, limits.control_burst, worker.clock())
        #: Control frames dropped in a row (so many and the agent is cut off, as at the hub).
        self.drops = 0

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
            elif self._within_quota():
                offset = found[1]
            else:  # dropped: what came before it goes, and the rest after it
                if offset > start:
                    worker.hub.send("frames", self.ident, bytes(view[start:offset]))
                offset = start = found[1]
        if offset > start:
            worker.hub.send("frames", self.ident, bytes(view[start:offset]))
        return offset

    def _within_quota(self) -> bool:
        """One more control frame: within the quota, or dropped (counted; cut off after the
        hub's number of drops in a row)."""
        worker = self.worker
        if self.control.take(1, worker.clock()):
            self.drops = 0
            return True
        worker.counters["control_dropped_quota"] += 1
        self.drops += 1
        if self.drops >= worker.limits.cutoff_drops:
            raise CutOff(f"control quota exceeded {self.drops} times in a row")
        return False

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
        self.udp_relay.on_goodbye = lambda agent: self.hub.send("goodbye", agent.address.digest)
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
        self.valve.pressure(backed_up)

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
