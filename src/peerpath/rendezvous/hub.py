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

This module is the hub's side; :mod:`.workers` is the workers' (and how they are forked).
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import os
import socket
from pathlib import Path
from typing import Any

from peerpath.net import DatagramHandler, KernelUdp
from peerpath.rendezvous.connection import AgentConnection
from peerpath.rendezvous.limits import CutOff
from peerpath.rendezvous.links import WritableLink
from peerpath.rendezvous.mesh import (
    MeshLink,
    RemoteLink,
    announce_path,
    bind_shared_udp,
    connect_mesh,
    learn_path,
    steer_by_token,
    write_to,
)
from peerpath.rendezvous.presence import Agent, UdpSocket
from peerpath.rendezvous.server import RendezvousServer
from peerpath.rendezvous.tls import Valve

log = logging.getLogger(__name__)

#: Processes at most (a token's first byte names one).
MAX_WORKERS = 64
#: The lock file a hub holds in its state directory.
LOCK_FILE = "server.lock"


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
        self.valve.pressure(backed_up)

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
        elif kind == "goodbye":
            agent = server.agents.get(args[0])
            if agent is not None:
                server._said_goodbye(agent)
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
