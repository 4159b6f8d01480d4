"""The rendezvous server: agents register over TLS by signing a challenge; the server keeps
their presence, answers lookups for agents that are online, keeps letters for them, keeps the
names they claim and the tags of those that chose to be listed (:mod:`.directory`), and relays
their end-to-end encrypted session datagrams (over the same connection) within per-agent quotas.
An idle agent may rest on UDP, its connection closed (:mod:`.resting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import ssl
import time
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as serve_websocket
from websockets.http11 import Request, Response

from peerpath.certs import tls_server_context
from peerpath.clock import Clock, monotonic
from peerpath.identity import Address, Identity
from peerpath.net import KernelNet, Net, TcpListener
from peerpath.ratelimit import TokenBucket
from peerpath.rendezvous.connection import AgentConnection, endpoint_text
from peerpath.rendezvous.dataplane import DataPlane
from peerpath.rendezvous.directory import QUOTAS, Directory, DirectoryRequest
from peerpath.rendezvous.letters import LetterError, check_letter
from peerpath.rendezvous.limits import CutOff, ServerLimits, client_network, registration_rate
from peerpath.rendezvous.links import WS_MAX_MESSAGE, WS_PATH, Link, WebSocketLink, WritableLink
from peerpath.rendezvous.mailbox import Mailbox
from peerpath.rendezvous.presence import RESTING, Agent
from peerpath.rendezvous.resting import Rests, silent_too_long
from peerpath.rendezvous.tls import Receiver, TlsLink, Valve
from peerpath.rendezvous.udp_relay import RelayUdp, UdpRelay
from peerpath.rendezvous.url import DEFAULT_PORT, RendezvousUrl
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint

if TYPE_CHECKING:
    from peerpath.rendezvous.hub import Cluster

log = logging.getLogger(__name__)

#: An agent must register this soon after connecting.
REGISTER_TIMEOUT = 10.0
#: The server pings agents silent for this long (a node's keepalives come more often) and
#: drops one silent for three intervals.
PING_INTERVAL = 15.0
#: The server writes its counters to STATE_DIR/status.json this often.
STATUS_INTERVAL = 5.0
STATUS_FILE = "status.json"
#: Letters handed to an agent at each registration (the rest wait for the next one).
DELIVER_BATCH = 64
#: The name claims' database, next to the mailbox's in the state directory.
NAMES_FILE = "names.db"
#: What an agent is told when a directory request is over its quota.
_OVERQUOTA = {"names": "too many name and tag changes; try again later", "find": "too many searches; try again later"}


class RendezvousServer:
    """A running rendezvous + relay server. :meth:`start`, then :meth:`close`."""

    def __init__(
        self,
        identity: Identity,
        state_dir: Path,
        *,
        limits: ServerLimits | None = None,
        relays: list[RendezvousUrl] | None = None,
        stun: list[str] | None = None,
        net: Net | None = None,
        clock: Clock = monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.identity = identity
        #: The network the server listens on, and the clock of its quotas and presence.
        self.net = net or KernelNet()
        self.clock = clock
        #: Seconds since the epoch: the clock of what outlives a restart (letters, names).
        self.wall_clock = wall_clock
        #: STUN endpoints ("ip:port") agents can run netcheck against.
        self.stun = list(stun or [])
        #: Other relays (``peerpath relay``) agents may choose as their home relay.
        self.relays = list(relays or [])
        if len(self.relays) >= rv.MAX_ENDPOINTS:
            raise ValueError(f"at most {rv.MAX_ENDPOINTS - 1} other relays (agents accept {rv.MAX_ENDPOINTS} URLs)")
        self.state_dir = state_dir
        self.limits = limits or ServerLimits()
        self.agents: dict[bytes, Agent] = {}
        self.counters = {
            "connections": 0,
            "connections_refused": 0,
            "registrations_refused": 0,
            "handler_errors": 0,
            "registered": 0,
            "refused": 0,
            "malformed": 0,
            "lookups": 0,
            "relay_frames": 0,
            "relay_bytes": 0,
            "relay_dropped_offline": 0,
            "relay_dropped_quota": 0,
            "relay_dropped_backpressure": 0,
            "agents_cut_off": 0,
            "letters_posted": 0,
            "letters_refused": 0,
            "letters_delivered": 0,
            "udp_frames": 0,
            "udp_malformed": 0,
            "udp_unknown_token": 0,
            "udp_unauthentic": 0,
            "udp_unconfirmed": 0,
            "control_dropped_quota": 0,
            "directory_requests": 0,
            "directory_refused": 0,
            "directory_dropped_quota": 0,
        }
        self._open = 0
        self._per_ip: dict[str, int] = {}
        #: Agents registered (connected or resting) by the network they registered from.
        self._agents_per_ip: dict[str, int] = {}
        self._registrations = registration_rate(self.limits)
        #: Relayed datagrams between the agents online.
        self.plane = DataPlane(self.agents, self.counters, self.limits.cutoff_drops)
        self.udp_relay = UdpRelay(self.counters, self.plane.relay, self._cut_off)
        self.udp_relay.on_goodbye = self._said_goodbye
        #: Agents resting on UDP, and their wakes.
        self.rests = Rests(self.counters)
        self._udp: list[RelayUdp] = []
        self.mailbox: Mailbox | None = None
        #: Names and tags (its names database opens with :meth:`start`).
        self.directory = Directory(identity.address, self.limits)
        self._servers: list[TcpListener] = []
        self._ws_servers: list[WebSocketServer] = []
        self.wss_port: int | None = None
        #: The TLS connections open (registered or not), and the WebSocket connections' tasks.
        self._links: dict[int, TlsLink] = {}
        self._idents = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        #: The other processes behind the same port (``--workers``), if any, and what pauses
        #: this one's readers while one of them falls behind.
        self.cluster: Cluster | None = None
        self.valve: Valve | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._status_error: str | None = None
        self._ping_ids = 0
        self.port = DEFAULT_PORT
        self.hosts: list[str] = []

    @property
    def address(self) -> Address:
        """The server's overlay address (agents check its TLS key against it)."""
        return self.identity.address

    def url(self, host: str | None = None) -> RendezvousUrl:
        """The URL agents use to reach this server at ``host`` (default: its first address)."""
        return RendezvousUrl(self.address, host or self.hosts[0], self.port, self.wss_port)

    async def start(
        self, hosts: list[str], port: int = DEFAULT_PORT, wss_port: int | None = None, *, cluster: Cluster | None = None
    ) -> None:
        """Listen with TLS on ``port`` of every host address (0: a free port, tests), UDP on
        the same port number, and WebSocket over TLS on ``wss_port`` if given. With a
        ``cluster``, this process is the hub of several sharing the port (:mod:`.workers`)."""
        if cluster is not None:
            self.cluster = cluster
            await cluster.connect()
            self.udp_relay.on_path = cluster.path_changed
            self.udp_relay.process = 0
        context = tls_server_context(self.identity, self.state_dir)
        context.num_tickets = 0  # agents never resume a session: tickets would be wasted work
        shared = cluster is not None
        for host in hosts:
            server = await self.net.listen_tcp(host, port, lambda: self._tls_link(context), reuse_port=shared)
            self._servers.append(server)
            port = port or server.port
            try:
                bind = cluster.bind_udp if cluster is not None else None
                self._udp.append(RelayUdp(self.net, host, port, self._udp_received, bind=bind))
            except OSError as exc:
                # Agents fall back to TLS on their own; better a server without the UDP relay
                # than no server.
                log.warning("no UDP relay on %s:%d: %s", host, port, exc.strerror or exc)
            if wss_port is not None:
                ws_server = await serve_websocket(
                    self._serve_websocket,
                    host,
                    wss_port,
                    ssl=context,
                    max_size=WS_MAX_MESSAGE,
                    process_request=_check_path,
                    compression=None,
                )
                self._ws_servers.append(ws_server)
                wss_port = wss_port or ws_server.sockets[0].getsockname()[1]
        self.port, self.hosts, self.wss_port = port, list(hosts), wss_port
        if cluster is not None:
            await cluster.start_workers(port)
        # Opened only once the ports are ours: a second server on the same state directory
        # fails to bind above instead of contending for the database.
        self.mailbox = Mailbox(self.state_dir / "rendezvous.db")
        self.directory.open(self.state_dir / NAMES_FILE)
        self._write_status_logged()  # at once: an operator (or a test) finds one from the start
        self._pinger = asyncio.get_running_loop().create_task(self._ping_loop())

    async def close(self) -> None:
        """Stop listening and drop every agent."""
        for server in self._servers:
            server.close()
        for ws_server in self._ws_servers:
            ws_server.close()
        for udp in self._udp:
            udp.close()
        if self._pinger is not None:
            self._pinger.cancel()
        for agent in list(self.agents.values()):
            agent.link.close()
        for link in list(self._links.values()):
            link.close()
        if self.cluster is not None:
            self.cluster.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *(t for t in [self._pinger] if t), return_exceptions=True)
        for ws_server in self._ws_servers:
            with contextlib.suppress(Exception):
                await ws_server.wait_closed()
        if self.mailbox is not None:
            self.mailbox.close()
            self.mailbox = None
        self.directory.close()
        if self.hosts:
            with contextlib.suppress(OSError):
                self.write_status()

    def status(self) -> dict[str, Any]:
        """Counters and the agents online (with workers, the counters of every process)."""
        counters = dict(self.counters)
        status: dict[str, Any] = {
            "address": str(self.address),
            "url": str(self.url()) if self.hosts else None,
            "agents_online": len(self.agents),
            "agents_on_udp": sum(1 for a in self.agents.values() if a.udp_ready),
            "agents_resting": sum(1 for a in self.agents.values() if a.rests),
            "relays": [str(r) for r in self.relays],
            "directory": self.directory.describe(),
            "counters": counters,
        }
        if self.cluster is not None:
            for reported in self.cluster.worker_counters.values():
                for name, value in reported.items():
                    counters[name] = counters.get(name, 0) + value
            status["workers"] = [{"agents": count} for _, count in sorted(self.cluster.agents_at.items())]
        return status

    def write_status(self) -> None:
        """Write :meth:`status` to ``STATE_DIR/status.json`` (atomically), for operators and monitoring."""
        path = self.state_dir / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.status(), "updated": time.time()}, indent=2) + "\n")
        os.replace(tmp, path)

    def _write_status_logged(self) -> None:
        """:meth:`write_status`; a failure is logged (once per distinct error), never raised."""
        try:
            self.write_status()
        except OSError as exc:
            message = f"cannot write {self.state_dir / STATUS_FILE}: {exc.strerror or exc}"
            if message != self._status_error:
                log.warning("%s", message)
            self._status_error = message
        else:
            self._status_error = None

    # -- one agent ------------------------------------------------------------------------

    def _tls_link(self, context: ssl.SSLContext) -> TlsLink:
        """A TLS connection accepted: it has REGISTER_TIMEOUT to complete the handshake and register."""
        return TlsLink(context, self._tls_opened, self._links, next(self._idents), self.valve, REGISTER_TIMEOUT)

    def _tls_opened(self, link: TlsLink) -> Receiver | None:
        connection = AgentConnection(self, link)
        if not connection.open():
            connection.end()
            return None
        return connection

    async def _serve_websocket(self, ws: ServerConnection) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(WebSocketLink(ws))
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, link: Link) -> None:
        """A connection whose bytes are awaited (WebSocket), from its first byte to its end.
        Whatever it created (an agent, a token) is torn down in ``finally``, however it ends."""
        connection = AgentConnection(self, link)
        try:
            if not connection.open():
                return
            async with asyncio.timeout(REGISTER_TIMEOUT):
                while not connection.registered:
                    data = await link.read()
                    if not data or not connection.received(data):
                        return
            while True:
                data = await asyncio.wait_for(link.read(), PING_INTERVAL * 3)
                if not data or not connection.received(data):
                    return
        except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            connection.end()

    def _connection_opened(self, network: str) -> bool:
        """Count a connection from ``network``; False if it is one too many (it is counted all the same)."""
        self._open += 1
        count = self._per_ip[network] = self._per_ip.get(network, 0) + 1
        return self._open <= self.limits.max_connections and count <= self.limits.max_connections_per_ip

    def _connection_closed(self, network: str) -> None:
        self._open -= 1
        _count_out(self._per_ip, network)

    def _forget(self, agent: Agent) -> None:
        tokens = self.udp_relay.tokens
        if tokens.get(agent.token) is agent:
            del tokens[agent.token]
        self.plane.forget(agent)
        self.rests.forget(agent)
        if self.agents.get(agent.address.digest) is agent:
            del self.agents[agent.address.digest]
            _count_out(self._agents_per_ip, _network_of(agent.observed))
            if self.cluster is not None:
                self.cluster.forgotten(agent)
            self.directory.left(agent.address, self.wall_clock())
            log.info("%s offline", agent.address)

    def _admit(self, link: WritableLink, register: rv.Register, observed: str) -> Agent | None:
        """Make a verified registration an agent online (the caller forgets it at the end)."""
        claimed = Address.from_public_key(register.public_key)
        previous = self.agents.get(claimed.digest)
        if previous is None and len(self.agents) >= self.limits.max_agents:
            self._refuse(link, "the server is full; try again later")
            return None
        now = self.clock()
        network = _network_of(observed)
        if not self._registrations.allow(network, now):
            self.counters["registrations_refused"] += 1
            self._refuse(link, "too many registrations from your address; try again later")
            return None
        # As many agents from one address as it may hold connections, resting ones included
        # (an agent replacing its own registration from there takes no more room).
        replaces = previous is not None and _network_of(previous.observed) == network
        if self._agents_per_ip.get(network, 0) - replaces >= self.limits.max_connections_per_ip:
            self.counters["registrations_refused"] += 1
            self._refuse(link, "too many agents registered from your address; try again later")
            return None
        limits = self.limits
        agent = Agent(
            claimed,
            link,
            observed,
            connected=now,
            relay_quota=TokenBucket(limits.relay_rate, limits.relay_burst, now),
            control_quota=TokenBucket(limits.control_rate, limits.control_burst, now),
            last_seen=now,
        )
        if previous is not None:
            previous.link.close()  # the same agent reconnected: the newest connection wins
            self._forget(previous)
        if self.cluster is not None:
            self.cluster.admitted(agent)
        self.agents[claimed.digest] = agent
        self._agents_per_ip[network] = self._agents_per_ip.get(network, 0) + 1
        self.directory.arrived(claimed, register.public_key, now)
        self.udp_relay.tokens[agent.token] = agent
        self.counters["registered"] += 1
        registered = rv.Registered(
            observed,
            relays=self._relay_urls(),
            udp_relay=[endpoint_text((h, self.port)) for h in self.hosts],
            token=agent.token,
            stun=self.stun,
            udp_key=agent.udp_key,
            rest=True,
        )
        link.write(rv.encode_control(registered))
        log.info("%s online from %s", claimed, observed)
        self._deliver_waiting(agent)
        return agent

    def _rested(self, agent: Agent) -> None:
        """The connection of an agent told it may rest is over: it stays online on UDP."""
        agent.link = RESTING
        self.plane.forget(agent)
        if self.cluster is not None:
            self.cluster.rested(agent)
        self.rests.rested(agent)
        log.info("%s resting on UDP", agent.address)

    def _said_goodbye(self, agent: Agent) -> None:
        """A resting agent closed (its goodbye came from its confirmed endpoint)."""
        if agent.rests and self.agents.get(agent.address.digest) is agent:
            log.info("%s said goodbye", agent.address)
            self._forget(agent)

    def _letters_waiting(self, agent: Agent) -> bool:
        return self.mailbox is not None and bool(self.mailbox.waiting_for(agent.address.digest, 1))

    def _relay_urls(self) -> list[str]:
        """This server's own URL first, then the other relays it knows."""
        return [str(self.url()), *(str(r) for r in self.relays)]

    def _refuse(self, link: WritableLink, reason: str) -> None:
        self.counters["refused"] += 1
        log.info("refused %s: %s", endpoint_text(link.peername()), reason)
        link.write(rv.encode_control(rv.Refused(reason)))

    def _on_control(self, agent: Agent, message: rv.Message) -> None:
        now = self.clock()
        if not agent.control_quota.take(1, now):
            self.counters["control_dropped_quota"] += 1
            agent.over("control", self.limits.cutoff_drops)
            return
        if agent.overquota is not None:
            agent.within("control")
        if agent.resting and not isinstance(message, rv.Ping | rv.Pong):
            self._unrest(agent)  # the agent went on using its connection: it stays connected
        if isinstance(message, rv.Lookup):
            self.counters["lookups"] += 1
            agent.send(rv.encode_control(self._lookup(message)))
        elif isinstance(message, rv.Ping):
            agent.send(rv.encode_control(rv.Pong(message.id)))
        elif isinstance(message, rv.Pong):
            pass  # the agent is alive: any frame from it says so (last_seen)
        elif isinstance(message, rv.Post):
            agent.send(rv.encode_control(self._post(agent, message)))
        elif isinstance(message, rv.Received):
            if self.mailbox is not None:
                self.mailbox.delete(message.letter_id, agent.address.digest)
                if agent.letter_acknowledged(message.letter_id):
                    self._deliver_waiting(agent)  # the batch is handled: the next one
        elif isinstance(message, rv.UdpReady):
            agent.udp_ready = message.ready
            if self.cluster is not None:
                self.cluster.udp_ready(agent)
        elif isinstance(message, rv.Rest):
            waiting = self._letters_waiting(agent)
            agent.send(rv.encode_control(self.rests.answer(agent, message, now, waiting)))
            if waiting and not agent.letters_out:
                self._deliver_waiting(agent)  # (not delivered when posted: its link was backed up)
        elif isinstance(message, rv.Stay):
            pass  # the rest is called off above, as by anything the agent sends
        elif isinstance(message, rv.HomeRelay):
            if message.url not in self._relay_urls():
                raise rv.FrameError(f"{message.url} is not one of this server's relays")
            agent.home_relay = message.url
        elif isinstance(message, DirectoryRequest):
            agent.send(rv.encode_control(self._ask_directory(agent, message)))
        else:
            raise rv.FrameError(f"unexpected {type(message).__name__} from an agent")

    def _unrest(self, agent: Agent) -> None:
        agent.resting = False
        self.rests.forget(agent)
        if agent.wake:
            agent.wake = False
            self._deliver_waiting(agent)  # what its wake was for

    def _ask_directory(self, agent: Agent, request: DirectoryRequest) -> rv.Message:
        """The directory's answer, within the agent's directory quotas (counted like its others:
        an agent that keeps exceeding one is cut off)."""
        spent = self.directory.take(agent.address, request, self.clock())
        if spent is not None:
            self.counters["directory_dropped_quota"] += 1
            agent.over(spent, self.limits.cutoff_drops)
            return rv.Outcome(request.id, False, _OVERQUOTA[spent])
        quota = QUOTAS.get(type(request))
        if quota is not None and agent.overquota is not None:
            agent.within(quota)
        self.counters["directory_requests"] += 1
        answer = self.directory.answer(agent.address, request, self.wall_clock())
        if isinstance(answer, rv.Outcome) and not answer.ok:
            self.counters["directory_refused"] += 1
            log.info("refused a %s of %s: %s", type(request).__name__, agent.address, answer.error)
        return answer

    def _post(self, agent: Agent, request: rv.Post) -> rv.PostResult:
        now = self.wall_clock()
        try:
            if self.mailbox is None:
                raise LetterError("the server is shutting down")
            sender, recipient = check_letter(request.letter, now)
            if sender != agent.address:
                raise LetterError("a letter must be signed by the agent that posts it")
            letter_id = self.mailbox.post(request.letter, sender.digest, recipient.digest, now)
        except LetterError as exc:
            self.counters["letters_refused"] += 1
            log.info("refused a letter from %s: %s", agent.address, exc)
            return rv.PostResult(request.id, ok=False, error=str(exc))
        self.counters["letters_posted"] += 1
        target = self.agents.get(recipient.digest)
        if target is not None and target.resting:
            self.rests.wake(target)  # it gets the letter when it has registered anew
        elif target is not None:
            self._deliver(target, letter_id, request.letter)
        return rv.PostResult(request.id, ok=True)

    def _deliver_waiting(self, agent: Agent) -> None:
        """Hand the agent its oldest waiting letters, a batch at a time (the next batch goes
        when it has acknowledged this one)."""
        if self.mailbox is None:
            return
        for letter_id, letter in self.mailbox.waiting_for(agent.address.digest, DELIVER_BATCH):
            if self._deliver(agent, letter_id, letter):
                agent.letter_out(letter_id)

    def _deliver(self, agent: Agent, letter_id: int, letter: rv.Letter) -> bool:
        try:
            frame = rv.encode_control(rv.Deliver(letter_id, letter))
        except rv.FrameError as exc:
            # Cannot happen for a letter the decoder accepted (its fields are bounded); a letter
            # stored by an older server might: it is dropped, never retried forever.
            log.warning("dropping letter %d for %s: %s", letter_id, agent.address, exc)
            if self.mailbox is not None:
                self.mailbox.drop(letter_id)
            return False
        if agent.send(frame):
            self.counters["letters_delivered"] += 1
            return True
        return False

    def _lookup(self, request: rv.Lookup) -> rv.LookupResult:
        """Whether ``request.address`` is online, and the relay that reaches it: nothing else
        (its endpoints and NAT travel only inside sessions, to peers it trusts)."""
        try:
            target = self.agents.get(Address.parse(request.address).digest)
        except ValueError:
            target = None
        if target is None:
            return rv.LookupResult(request.id, request.address, online=False)
        return rv.LookupResult(request.id, request.address, online=True, relay=target.home_relay or str(self.url()))

    def _relay(self, source: Agent, destination: bytes, datagram: bytes) -> None:
        self.plane.relay(source, destination, datagram, self.clock())

    def _ping(self, agent: Agent) -> None:
        self._ping_ids += 1
        agent.send(rv.encode_control(rv.Ping(self._ping_ids)))

    def _udp_received(self, data: bytes, addr: Endpoint, sock: RelayUdp) -> None:
        self.udp_relay.received(data, addr, sock, self.clock())

    def _cut_off(self, agent: Agent, exc: CutOff) -> None:
        """An agent's UDP frames broke its quota: cut it off, as its connection would be."""
        self.counters["agents_cut_off"] += 1
        log.warning("cutting off %s: %s", agent.address, exc)
        self._forget(agent)  # its next UDP frames are strangers'
        with contextlib.suppress(Exception):
            agent.link.write(rv.encode_control(rv.Refused(str(exc))))
        agent.link.close()

    async def _ping_loop(self) -> None:
        """Status and the wakes still due every few seconds; every PING_INTERVAL, a ping to each
        agent silent that long and the end of those silent for three (one round over every
        agent, no timer of each): a failure is logged and the loop goes on (without it, every
        agent would be dropped as silent)."""
        ticks = 0
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            ticks += 1
            try:
                self._write_status_logged()
                self.rests.retry(self.agents)
                if ticks % round(PING_INTERVAL / STATUS_INTERVAL) == 0:
                    self._ping_silent(self.clock())
            except Exception:
                self.counters["handler_errors"] += 1
                log.exception("the server's status and ping round failed")

    def _ping_silent(self, now: float) -> None:
        # While the valve holds this process's links (another process is backed up), their
        # agents are not heard: silence then says nothing about them, and nobody is dropped.
        held = self.valve is not None and self.valve.is_shut
        for agent in list(self.agents.values()):
            if agent.rests:
                if silent_too_long(agent, now) and not held:  # (its hellos may be told late)
                    log.info("%s resting and silent on UDP: dropped", agent.address)
                    self._forget(agent)
                continue
            silent = now - agent.last_seen
            if silent > PING_INTERVAL * 3 and not held:
                log.info("%s silent for %.0f s: dropped", agent.address, silent)
                self._forget(agent)
                agent.link.close()
            elif silent >= PING_INTERVAL:
                self._ping(agent)


def _count_out(counts: dict[str, int], key: str) -> None:
    """One less of ``key`` in ``counts``; a key counted down to nothing is gone (the tables of
    what each client network holds stay as small as what is open)."""
    if counts.get(key, 0) <= 1:
        counts.pop(key, None)
    else:
        counts[key] -= 1


def _network_of(observed: str) -> str:
    """What the per-address limits count an agent seen at ``observed`` ("host:port") by."""
    return client_network(observed.rpartition(":")[0])


def _check_path(connection: ServerConnection, request: Request) -> Response | None:
    """Answer 404 to anything but the rendezvous WebSocket path."""
    if request.path != WS_PATH:
        return connection.respond(HTTPStatus.NOT_FOUND, "not a peerpath endpoint\n")
    return None
