"""Direct paths for sessions that started on the relay: candidate exchange over the session,
an RTT-synchronised punch, promotion of validated paths, and liveness probes that hand a
dead direct path back to the relay (and bring the session back when it recovers).

The exchange rides the session itself (authenticated, end-to-end encrypted): the initiator
sends ``punch-offer`` (a fresh check key and its candidates), the responder answers with
its candidates, and the initiator, having measured the round trip, sends ``punch-go`` and
starts half a round trip later, which is when ``punch-go`` reaches the responder, who
starts on arrival (DCUtR's synchronisation). Rounds repeat with backoff while the
session is on the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar

import msgspec

from peerpath import errors
from peerpath.clock import Clock
from peerpath.nat.netcheck import MAX_PORT_STEP, port_step
from peerpath.nat.punch import MAX_CANDIDATES, Addr, Puncher, ReplayWindow
from peerpath.session.connection import Connection
from peerpath.session.pathset import Path, PathKind, format_endpoint, parse_endpoint
from peerpath.tasks import spawn
from peerpath.wire import punch
from peerpath.wire.codec import decode

if TYPE_CHECKING:
    from peerpath.nat.portmap import PortMappings
    from peerpath.node.sockets import UdpSocket, UdpSockets
    from peerpath.node.tcp import TcpLink, TcpLinks
    from peerpath.rendezvous.client import RendezvousClient

log = logging.getLogger(__name__)

#: Seconds between punch rounds while a session stays on the relay (the last repeats).
ROUND_BACKOFF = (0.5, 2.0, 5.0, 15.0, 30.0)
#: Liveness probes on direct paths.
PROBE_INTERVAL = 1.0
#: After a round ends, keep answering the peer's checks this long.
LINGER = 2.0
#: Seconds a round waits for the mapping hint before punching without it.
NAT_WAIT = 1.0
#: Seconds port prediction's STUN queries may take, at most.
PREDICT_WAIT = 2.0


# What a peer says in a round is bounded like any input: even a trusted peer's candidate
# list decides where this node sends checks.
_Key = Annotated[bytes, msgspec.Meta(min_length=punch.KEY_BYTES, max_length=punch.KEY_BYTES)]
_Endpoint = Annotated[str, msgspec.Meta(max_length=64)]
_Candidates = Annotated[list[_Endpoint], msgspec.Meta(max_length=MAX_CANDIDATES)]
_Port = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]


class _Offer(msgspec.Struct, frozen=True):
    key: _Key
    candidates: _Candidates
    reflexive: _Endpoint | None = None
    hard: bool = False
    #: TCP candidates, and whether UDP works from here as far as this side knows.
    tcp: _Candidates = msgspec.field(default_factory=list)
    udp: bool = True
    #: On a hard NAT that hands out ports in sequence: the last public port it gave, and
    #: the step between consecutive ones (0: ports not predictable).
    next_port: _Port = 0
    port_step: _Port = 0


class _Answer(msgspec.Struct, frozen=True):
    candidates: _Candidates
    reflexive: _Endpoint | None = None
    hard: bool = False
    tcp: _Candidates = msgspec.field(default_factory=list)
    udp: bool = True
    #: Seconds the responder held the answer back (waiting for its mapping hint), not part
    #: of the round trip.
    held: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    next_port: _Port = 0
    port_step: _Port = 0


class _Go(msgspec.Struct, frozen=True):
    #: Both sides also open TCP toward each other's TCP candidates this round.
    tcp: bool = False


_Message = TypeVar("_Message", _Offer, _Answer, _Go)


def _decode(data: bytes, kind: type[_Message]) -> _Message:
    """A round's message from the peer; :class:`~peerpath.errors.RemoteError` for anything malformed."""
    # A few per punch round: a decoder made each time costs nothing worth keeping one for.
    return decode(msgspec.msgpack.Decoder(kind), data, errors.RemoteError, kind.__name__.strip("_").lower())


#: Birthday rounds (RFC 4787 address-and-port-dependent mapping against an endpoint-
#: independent one): the hard side opens SPRAY_SOCKETS mappings toward the easy side's
#: reflexive address; the easy side sends checks to SCAN_PORTS random ports of the hard
#: side's public IP. The chance that no probe meets an open mapping is about
#: (1 - 256/64512) ** 1024, under 2 %.
SPRAY_SOCKETS = 256
SCAN_PORTS = 1024
#: Port prediction: when the hard side's NAT gave a fresh socket two ports a small step
#: apart, its spray sockets get the ports after them in turn; the easy side checks the
#: next PREDICTED_PORTS of that sequence before any random port.
PREDICTED_PORTS = 64
BIRTHDAY_DURATION = 4.0
#: Birthday rounds one node runs at once (a spray holds SPRAY_SOCKETS descriptors); a round
#: over the limit punches normally this time and tries again with the next round.
MAX_BIRTHDAY_ROUNDS = 2
BOTH_HARD = "both NATs map per destination with random ports; no direct path is likely"
BOTH_HARD_SEQUENTIAL = (
    "both NATs map per destination; their ports come in sequence, but two predictions "
    "would have to meet exactly, so no direct path is tried"
)
#: Seconds a TCP round keeps trying (the kernel resends an unanswered SYN after 1 and 3 s).
TCP_DURATION = 6.0
#: A direct TCP link not heard from for this long is closed (its path is long stale).
TCP_IDLE = 30.0
#: TCP candidates tried per round, at most.
MAX_TCP_CANDIDATES = 8
#: Round keys remembered per session, for answering checks and probes.
ROUND_KEYS = 4
#: What a probe answer sent back over the relay names as the check's source (it has none).
RELAY_OBSERVED = ("0.0.0.0", 0)


def _mode(mine_hard: bool, theirs_hard: bool) -> str:
    """How this side punches: ``spray`` (our NAT is the hard one), ``scan`` (theirs is), or
    ``normal`` (both easy; both hard has no good odds and stays on the relay)."""
    if mine_hard and not theirs_hard:
        return "spray"
    if theirs_hard and not mine_hard:
        return "scan"
    return "normal"


def _both_hard(mine_step: int, theirs_step: int) -> str:
    """Why a session between two hard NATs stays on the relay."""
    return BOTH_HARD_SEQUENTIAL if mine_step and theirs_step else BOTH_HARD


def _predicted_ports(last: int, step: int) -> list[int]:
    """The ports a NAT that hands them out ``step`` apart gives next after ``last``."""
    if not 0 < step <= MAX_PORT_STEP or not 0 < last < 65536:
        return []
    return [p for p in (last + step * i for i in range(1, PREDICTED_PORTS + 1)) if p < 65536]


def _parse(text: str) -> Addr | None:
    """A candidate from the peer, or None if it is not HOST:PORT (the peer's word only)."""
    try:
        return parse_endpoint(text)
    except ValueError:
        return None


class NodeSide(Protocol):
    """What direct paths need of their node (the node passes itself; this module never imports it)."""

    udp: UdpSockets
    tcp: TcpLinks
    clock: Clock
    portmap: PortMappings
    nat: dict[str, Any] | None
    mapping_hint: str | None
    reflexive: tuple[str, int] | None
    stun_servers: list[str]

    @property
    def rendezvous(self) -> RendezvousClient | None:
        """The rendezvous server's client, if any."""
        ...

    def candidates(self) -> list[str]:
        """Where peers may reach the node over UDP."""
        ...

    def tcp_candidates(self) -> list[str]:
        """Where peers may reach the node over TCP."""
        ...

    async def reflexive_learned(self, timeout: float) -> None:
        """Wait (briefly) for the STUN answers under way."""
        ...


class DirectPaths:
    """Upgrades one node's relayed sessions to direct paths and keeps them alive."""

    def __init__(self, node: NodeSide) -> None:
        self.node = node
        #: The key each session's probes are sent under: its latest round that found a path.
        self._keys: dict[Connection, bytes] = {}
        #: Keys of each session's recent rounds, newest last: checks and probes under any of
        #: them are answered, so a probe never goes unanswered because the two sides have not
        #: yet agreed which round's key is current.
        self._round_keys: dict[Connection, list[bytes]] = {}
        self._offers: dict[Connection, tuple[_Offer, _Answer, UdpSocket | None]] = {}
        self._active: dict[Puncher, tuple[Connection, asyncio.Event, UdpSocket]] = {}
        self._probes: dict[bytes, tuple[Connection, Path]] = {}
        #: Each session's checks answered outside rounds (probes): a copy from elsewhere gets
        #: nothing. One window per session, so other sessions' probes cannot age it out.
        self._replays: dict[Connection, ReplayWindow] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Extra sockets that carry a birthday round's winning path, until the session ends.
        self._kept: dict[Connection, list[UdpSocket]] = {}
        #: The socket each direct UDP path a round validated sends from.
        self._sockets: dict[Path, UdpSocket] = {}
        #: Keys of TCP rounds under way: checks on inbound links are matched against them.
        self._tcp_rounds: dict[bytes, tuple[Connection, asyncio.Event]] = {}
        #: Our checks in flight on TCP links: tid -> (link, connection, key).
        self._tcp_checks: dict[bytes, tuple[TcpLink, Connection, bytes]] = {}
        #: Which transports rounds use: UDP punching and TCP (simultaneous open / connect).
        #: TCP is tried when either side finds UDP blocked, or after a round failed over UDP.
        self.transports = {"udp", "tcp"}
        self.counters = {
            "rounds": 0,
            "rounds_direct": 0,
            "checks_sent": 0,
            "tcp_rounds": 0,
            "tcp_paths": 0,
            "predicted_rounds": 0,
            "predicted_paths": 0,
        }
        self._birthdays = 0

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        spawn(coro, "a direct-path task", self._tasks)

    async def close(self) -> None:
        """Stop every round and probe."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def watch(self, conn: Connection, initiator: bool) -> None:
        """Keep ``conn`` on the best path for its lifetime (only the initiator starts rounds)."""
        self._spawn(self._maintain(conn, initiator))
        conn.closed.add_done_callback(lambda _: self._release_links(conn))

    def _release_links(self, conn: Connection) -> None:
        for link in list(self.node.tcp.links):
            if link.conn is conn:
                link.release()

    # -- rounds ---------------------------------------------------------------------------

    async def _maintain(self, conn: Connection, initiator: bool) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._keep_probing(conn))
                if initiator:
                    group.create_task(self._keep_punching(conn))
        finally:
            self._keys.pop(conn, None)
            self._round_keys.pop(conn, None)
            self._replays.pop(conn, None)
            self._drop_offer(conn)
            for sock in self._kept.pop(conn, []):
                sock.close()
            for path in conn.paths.paths.values():
                self._sockets.pop(path, None)

    async def _keep_probing(self, conn: Connection) -> None:
        """Probe every path once a PROBE_INTERVAL for the session's lifetime, on the relay
        too and while a punch round is under way: a path's loss is judged on a steady
        series of probes, and the relay's RTT is what a direct path is measured against."""
        while not conn.closed.done():
            self._probe(conn)
            await asyncio.sleep(PROBE_INTERVAL)

    async def _keep_punching(self, conn: Connection) -> None:
        """Run punch rounds, with backoff, whenever the session is on the relay and no live
        direct path is only set aside for its quality (a round would just find it again)."""
        failures = 0
        next_round = 0.0
        while not conn.closed.done():
            path = conn.path
            on_relay = path is not None and path.kind is PathKind.RELAY
            due = self.node.clock() >= next_round
            if on_relay and due and conn.is_established and not conn.paths.held_aside(self.node.clock()):
                try:
                    direct = await self._round(conn, failures)
                except (errors.PeerpathError, TimeoutError, ValueError, msgspec.DecodeError) as exc:
                    log.debug("punch round with %s failed: %s", conn.peer, exc)
                    direct = False
                failures = 0 if direct else failures + 1
                if not direct:
                    next_round = self.node.clock() + ROUND_BACKOFF[min(failures - 1, len(ROUND_BACKOFF) - 1)]
            await asyncio.sleep(0.5)

    def _mapped(self) -> Addr | None:
        return self.node.portmap.usable(self.node.portmap.udp)

    def _hard(self) -> bool:
        """Whether our NAT maps per destination (and no port mapping on the router undoes it)."""
        nat = self.node.nat or {}
        if nat.get("mapping"):
            hard = nat["mapping"] in ("address-dependent", "address-and-port-dependent")
        else:
            hard = self.node.mapping_hint == "endpoint-dependent"
        return hard and self._mapped() is None

    async def _predict(self) -> tuple[UdpSocket | None, int, int]:
        """Behind a hard NAT: a fresh socket and, when the NAT hands out ports in sequence,
        the last port it gave that socket and the step (else 0, 0). Not hard: (None, 0, 0)."""
        if not self._hard() or "udp" not in self.transports:
            return None, 0, 0
        try:
            measured = await asyncio.wait_for(self.node.udp.fresh_mapping(self.node.stun_servers), PREDICT_WAIT)
        except (OSError, TimeoutError) as exc:
            log.debug("port prediction: no socket or no answer: %s", exc or "timed out")
            return None, 0, 0
        if measured is None:
            return None, 0, 0
        sock, first, second = measured
        step = port_step([first, second])
        if step:
            log.debug("port prediction: NAT gave %d then %d", first, second)
            return sock, second, step
        return sock, 0, 0

    def _reflexive(self) -> str | None:
        """Where the peer's birthday sockets should aim: our mapped port, else the reflexive one."""
        public = self._mapped() or self.node.reflexive
        return format_endpoint(public) if public else None

    def _udp_works(self) -> bool:
        """Whether UDP is known to get out of here: a STUN answer gave us a reflexive address,
        or the relay acknowledged our UDP. Until then TCP is tried beside UDP."""
        if "udp" not in self.transports:
            return False
        client = self.node.rendezvous
        return self.node.reflexive is not None or (client is not None and client.udp_ready)

    def _udp_candidates(self) -> list[str]:
        return self.node.candidates() if "udp" in self.transports else []

    def _tcp_candidates(self) -> list[str]:
        return self.node.tcp_candidates() if "tcp" in self.transports else []

    async def _nat_known(self) -> None:
        """Wait (briefly) for the mapping hint when UDP evidently works and its second STUN
        answer is on the way: whether our NAT is hard decides the mode. (The session is
        already moving data over the relay; a node whose UDP is blocked does not wait.)"""
        if self.node.reflexive is not None:
            await self.node.reflexive_learned(NAT_WAIT)

    async def _round(self, conn: Connection, failures: int = 0) -> bool:
        await self._nat_known()
        key = os.urandom(punch.KEY_BYTES)
        self._remember(conn, key)
        fresh, next_port, step = await self._predict()
        try:
            return await self._initiate(conn, key, failures, fresh, next_port, step)
        finally:
            if fresh is not None and fresh not in self._kept.get(conn, []):
                fresh.close()  # the round did not get to use it, or it did not win

    async def _initiate(
        self, conn: Connection, key: bytes, failures: int, fresh: UdpSocket | None, next_port: int, step: int
    ) -> bool:
        offer = _Offer(
            key,
            self._udp_candidates(),
            self._reflexive(),
            self._hard(),
            self._tcp_candidates(),
            self._udp_works(),
            next_port,
            step,
        )
        start = self.node.clock()
        reply = await conn.request(msgspec.msgpack.encode(offer), timeout=5, _topic="punch-offer")
        answer = _decode(reply, _Answer)
        rtt = max(0.0, self.node.clock() - start - min(answer.held, NAT_WAIT + PREDICT_WAIT))
        # TCP when UDP is out of the question for either side, or did not work last time.
        tcp = bool(offer.tcp and answer.tcp) and (not offer.udp or not answer.udp or failures > 0)
        await conn.send(msgspec.msgpack.encode(_Go(tcp)), _topic="punch-go")
        self.counters["rounds"] += 1
        remote = [a for a in map(_parse, answer.candidates) if a is not None]
        mode = _mode(offer.hard, answer.hard)
        if offer.hard and answer.hard:
            self._explain(conn, _both_hard(offer.port_step, answer.port_step))
        begin = self.node.clock() + rtt / 2
        attempts = []
        if remote and offer.candidates:
            sequence = (answer.next_port, answer.port_step)
            attempts.append(self._punch(conn, key, remote, begin, mode, answer.reflexive, sequence, fresh))
        if tcp:
            attempts.append(self._tcp_round(conn, key, answer.tcp, begin))
        direct = any(await asyncio.gather(*attempts))
        if direct:
            self.counters["rounds_direct"] += 1
        return direct

    async def internal_message(self, conn: Connection, topic: str, data: bytes) -> bytes | None:
        """The responder's side of a round."""
        if topic == "punch-offer":
            offer = _decode(data, _Offer)
            self._remember(conn, offer.key)
            arrived = self.node.clock()
            await self._nat_known()
            fresh, next_port, step = await self._predict()
            answer = _Answer(
                self._udp_candidates(),
                self._reflexive(),
                self._hard(),
                self._tcp_candidates(),
                self._udp_works(),
                held=self.node.clock() - arrived,
                next_port=next_port,
                port_step=step,
            )
            self._drop_offer(conn)  # an earlier offer that never got its "go"
            self._offers[conn] = (offer, answer, fresh)
            return msgspec.msgpack.encode(answer)
        if topic == "punch-go":
            go = _decode(data, _Go) if data else _Go()
            pending = self._offers.pop(conn, None)
            if pending is not None:
                offer, answer, fresh = pending
                remote = [a for a in map(_parse, offer.candidates) if a is not None]
                mode = _mode(answer.hard, offer.hard)
                if offer.hard and answer.hard:
                    self._explain(conn, _both_hard(answer.port_step, offer.port_step))
                if remote and answer.candidates:
                    sequence = (offer.next_port, offer.port_step)
                    punching = self._punch(
                        conn, offer.key, remote, self.node.clock(), mode, offer.reflexive, sequence, fresh
                    )
                    self._spawn(punching)
                elif fresh is not None:
                    fresh.close()
                if go.tcp and answer.tcp:
                    self._spawn(self._tcp_round(conn, offer.key, offer.tcp, self.node.clock()))
            return None
        raise ValueError(f"unknown internal topic {topic!r}")

    async def _punch(
        self,
        conn: Connection,
        key: bytes,
        candidates: list[Addr],
        start: float,
        mode: str = "normal",
        peer_reflexive: str | None = None,
        peer_sequence: tuple[int, int] = (0, 0),
        fresh: UdpSocket | None = None,
    ) -> bool:
        """One round of checks from our socket to the peer's candidates; against a hard NAT
        (``mode``) also a birthday round: ``spray`` opens many mappings here, starting with
        ``fresh`` (the socket our port prediction measured), ``scan`` checks many ports of
        the peer's public IP, first those ``peer_sequence`` (its last port and step) predicts."""
        main = self.node.udp.main
        if main is None:  # the node is closing
            if fresh is not None:
                fresh.close()
            return False
        rounds: list[tuple[Puncher, UdpSocket]] = [(Puncher(key, candidates, start), main)]
        extra: list[UdpSocket] = []
        target = _parse(peer_reflexive) if peer_reflexive else None
        if mode != "normal" and self._birthdays >= MAX_BIRTHDAY_ROUNDS:
            log.debug("birthday round with %s deferred: %d under way", conn.peer, self._birthdays)
            mode = "normal"
        birthday = mode != "normal" and target is not None
        self._birthdays += birthday
        if fresh is not None:
            extra.append(fresh)  # closed with the others unless it carries the winning path
        predicted = _predicted_ports(*peer_sequence)
        if mode == "spray" and target is not None:
            # Many mappings on our hard NAT, all toward the peer's one reflexive address.
            while len(extra) < SPRAY_SOCKETS:
                try:
                    extra.append(self.node.udp.extra())
                except OSError:
                    break
            for sock in extra:
                rounds.append((Puncher(key, [target], start, duration=BIRTHDAY_DURATION, interval=0.25), sock))
        elif mode == "scan" and target is not None:
            # Probe ports of the peer's public IP until one meets an open mapping: the ones
            # its NAT's sequence predicts first, then random ones.
            if predicted:
                self.counters["predicted_rounds"] += 1
            taken = set(predicted)
            ports = predicted + [p for p in random.sample(range(1024, 65536), SCAN_PORTS) if p not in taken]
            scan = [(target[0], port) for port in ports]
            rounds.append((Puncher(key, scan, start, duration=BIRTHDAY_DURATION, interval=0.004, per_tick=2), main))
        wake = asyncio.Event()
        for puncher, sock in rounds:
            self._active[puncher] = (conn, wake, sock)
        kept: set[UdpSocket] = set()
        try:
            linger_until: float | None = None
            while not conn.closed.done():
                for puncher, sock in rounds:
                    for data, addr in puncher.datagrams_to_send(self.node.clock()):
                        sock.sendto(data, addr)
                if linger_until is None and (any(p.validated for p, _ in rounds) or all(p.done for p, _ in rounds)):
                    linger_until = self.node.clock() + LINGER
                    for puncher, _ in rounds[1:]:
                        puncher.finish()  # a path is found: the birthday search stops sending
                    promoted: set[Addr] = set()
                    for puncher, sock in rounds:
                        # One socket per address: against an open NAT every spray socket may
                        # validate the same one, and only the first is kept to carry it.
                        found = [a for a in puncher.validated if a not in promoted]
                        if found:
                            promoted.update(found)
                            kept.add(sock)
                            self._promote(conn, key, found, sock)
                            if target is not None and any(a[0] == target[0] and a[1] in predicted for a in found):
                                self.counters["predicted_paths"] += 1
                if linger_until is not None and self.node.clock() >= linger_until:
                    break
                times = [t for t in (p.next_time() for p, _ in rounds) if t is not None]
                if linger_until is not None:
                    times.append(linger_until)
                wait = 0.5 if not times else max(0.0, min(times) - self.node.clock())
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
            self.counters["checks_sent"] += sum(p.checks_sent for p, _ in rounds)
            return any(p.validated for p, _ in rounds)
        finally:
            self._birthdays -= birthday
            for puncher, _ in rounds:
                self._active.pop(puncher, None)
            for sock in extra:
                if sock not in kept:
                    sock.close()
                else:
                    self._kept.setdefault(conn, []).append(sock)

    def _drop_offer(self, conn: Connection) -> None:
        """Forget the offer waiting for its "go", closing the socket it measured."""
        pending = self._offers.pop(conn, None)
        if pending is not None and pending[2] is not None:
            pending[2].close()

    def _remember(self, conn: Connection, key: bytes) -> None:
        keys = self._round_keys.setdefault(conn, [])
        keys.append(key)
        del keys[:-ROUND_KEYS]

    def _session_keys(self) -> list[tuple[Connection, bytes]]:
        """Every live session's round keys, the newest first."""
        return [(c, k) for c, keys in self._round_keys.items() if not c.closed.done() for k in reversed(keys)]

    def _explain(self, conn: Connection, reason: str) -> None:
        if conn.relay_reason != reason:
            conn.relay_reason = reason
            log.info("session with %s stays on the relay: %s", conn.peer, reason)

    def _promote(self, conn: Connection, key: bytes, validated: list[Addr], sock: UdpSocket) -> None:
        if not validated:
            return
        self._keys[conn] = key
        conn.relay_reason = None
        now = self.node.clock()
        for addr in validated:
            fresh = self.node.udp.path(addr, sock)
            path = conn.paths.add_validated(fresh, now)
            if path is not fresh and self._sockets.get(path, self.node.udp.main) is not sock:
                # Found again from another socket (an earlier round's mapping is gone): the
                # path now sends from the socket this round proved.
                path.send_datagram = fresh.send_datagram
            self._sockets[path] = sock
            log.info("direct path to %s: %s", conn.peer, path.describe())

    # -- liveness ---------------------------------------------------------------------------

    def _probe(self, conn: Connection) -> None:
        # Under the key of the round that found the current direct path; a session that has
        # none (yet) probes its relay path under its latest round's key, which both sides
        # know from the offer, so its quality shows all the same.
        key = self._keys.get(conn) or next(iter(reversed(self._round_keys.get(conn, []))), None)
        if key is None:
            return
        now = self.node.clock()
        for path in list(conn.paths.paths.values()):
            # The relay path is probed too: its RTT is what a direct path is measured against.
            if path.kind is PathKind.DIRECT_TCP and now - (path.last_received or path.created) > TCP_IDLE:
                for link in list(self.node.tcp.links):
                    if link.conn is conn and link.name == path.remote:
                        link.close()  # stalled for long: let a later round build a fresh one
                continue
            tid = os.urandom(punch.TID_BYTES)
            self._probes[tid] = (conn, path)
            if len(self._probes) > 4096:
                self._probes.pop(next(iter(self._probes)))
            path.probe_sent(tid, now)
            path.send_datagram(punch.encode_check(key, tid))  # from the socket, link or relay the path uses

    def _probe_answered(self, tid: bytes, kind: PathKind, remote: str) -> None:
        probe = self._probes.get(tid)
        if probe is None:
            return
        conn, path = probe
        if path.kind is kind and path.remote == remote:
            del self._probes[tid]
            conn.paths.probe_answered(path, tid, self.node.clock())

    def on_relay_check(self, data: bytes, source: bytes, reply: Callable[[bytes], object], relay: str) -> None:
        """A check or probe answer that came over a relay from the peer whose address digest
        is ``source``: answered back through ``reply`` (the relay's send), or counted."""
        for conn, key in self._session_keys():
            if conn.peer is None or conn.peer.digest != source:
                continue
            try:
                kind, tid, _ = punch.parse(key, data)
            except punch.CheckError:
                continue
            if kind == punch.CHECK:
                if self._first(conn, tid):
                    reply(punch.encode_response(key, tid, RELAY_OBSERVED))
            else:
                self._probe_answered(tid, PathKind.RELAY, relay)
            return

    def _first(self, conn: Connection, tid: bytes) -> bool:
        """Whether ``tid`` is a check of ``conn``'s not seen before."""
        return self._replays.setdefault(conn, ReplayWindow()).first(tid)

    def on_check(self, data: bytes, source: Addr, via: UdpSocket) -> None:
        """A check-range datagram arrived on ``via`` (the node's socket, or a round's extra one)."""
        for puncher, (_, wake, sock) in list(self._active.items()):
            if sock is via and puncher.receive(data, source):
                wake.set()
                return
        for conn, key in self._session_keys():
            try:
                kind, tid, _ = punch.parse(key, data)
            except punch.CheckError:
                continue
            if kind == punch.CHECK:
                if not self._first(conn, tid):
                    return  # a copy: answered once already, and no news of the path
                via.sendto(punch.encode_response(key, tid, source), source)
                path = conn.paths.paths.get((PathKind.DIRECT_UDP, format_endpoint(source)))
                if path is not None:
                    conn.paths.peer_checked(path, self.node.clock())  # the peer's probes get through
            else:
                self._probe_answered(tid, PathKind.DIRECT_UDP, format_endpoint(source))
            return

    # -- TCP ------------------------------------------------------------------------------

    async def _tcp_round(self, conn: Connection, key: bytes, candidates: list[str], start: float) -> bool:
        """Connect to the peer's TCP candidates from our TCP port while it connects to ours
        (simultaneous open through filtering NATs; a plain connect where it listens in the
        open); the first link on which a check is answered becomes a direct TCP path."""
        remote = [a for a in map(_parse, candidates) if a is not None][:MAX_TCP_CANDIDATES]
        if not remote or self.node.tcp.port is None:
            return False
        done = asyncio.Event()
        self._tcp_rounds[key] = (conn, done)
        self.counters["tcp_rounds"] += 1
        deadline = start + TCP_DURATION

        async def attempt(addr: Addr) -> None:
            link = await self.node.tcp.connect(addr, timeout=max(0.1, deadline - self.node.clock()))
            if link is not None and link.conn is not None and link.conn.closed.done():
                link.release()  # still held by a session that just ended
            if link is not None and not link.closed and link.conn in (None, conn):
                self._send_tcp_check(link, conn, key)

        tasks: list[asyncio.Task[None]] = []
        try:
            await asyncio.sleep(max(0.0, start - self.node.clock()))
            tasks = [asyncio.ensure_future(attempt(addr)) for addr in remote]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), max(0.0, deadline + 1.0 - self.node.clock()))
            return done.is_set()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # The peer's checks may still be on their way: accept them a little longer.
            asyncio.get_running_loop().call_later(LINGER, self._tcp_rounds.pop, key, None)

    def _send_tcp_check(self, link: TcpLink, conn: Connection, key: bytes) -> None:
        tid = os.urandom(punch.TID_BYTES)
        self._tcp_checks[tid] = (link, conn, key)
        if len(self._tcp_checks) > 1024:
            self._tcp_checks.pop(next(iter(self._tcp_checks)))
        link.send(punch.encode_check(key, tid))

    def on_tcp_check(self, link: TcpLink, data: bytes) -> None:
        """A check-range frame on a TCP link: answer the peer's checks, validate ours."""
        if link.conn is not None and link.key is not None and not link.conn.closed.done():
            keys = [link.key] + [k for k in reversed(self._round_keys.get(link.conn, [])) if k != link.key]
            owners = [(link.conn, k) for k in keys]
        else:
            owners = [(c, k) for k, (c, _) in reversed(self._tcp_rounds.items())]
            owners += self._session_keys()
        for conn, key in owners:
            try:
                kind, tid, _ = punch.parse(key, data)
            except punch.CheckError:
                continue
            if kind == punch.CHECK:
                link.send(punch.encode_response(key, tid, link.remote))
                if link.conn is not conn:
                    # The peer proved the link is its own; prove it our way too.
                    link.identified(conn, key)
                    self._send_tcp_check(link, conn, key)
                return
            pending = self._tcp_checks.get(tid)
            if pending is not None and pending[0] is link and pending[2] == key:
                del self._tcp_checks[tid]
                self._tcp_validated(link, conn, key)
            else:
                self._probe_answered(tid, PathKind.DIRECT_TCP, link.name)
            return
        if link.conn is None and not link.proved:
            link.close()  # not a check of any session we know: nothing else is allowed here

    def _tcp_validated(self, link: TcpLink, conn: Connection, key: bytes) -> None:
        if conn.closed.done():
            link.close()
            return
        link.identified(conn, key)
        self._keys[conn] = key
        conn.relay_reason = None
        existing = conn.paths.paths.get((PathKind.DIRECT_TCP, link.name))
        if existing is not None and existing.send_datagram != link.send:
            conn.paths.remove(existing)  # an earlier link to the same endpoint
        path = conn.paths.add_validated(link.path(), self.node.clock())
        if path.send_datagram == link.send and existing is not path:
            self.counters["tcp_paths"] += 1
            log.info("direct path to %s: %s", conn.peer, path.describe())
        pending = self._tcp_rounds.get(key)
        if pending is not None:
            pending[1].set()

    def on_tcp_lost(self, link: TcpLink) -> None:
        """A TCP link closed: its path leaves the session (the relay takes over at once)."""
        conn = link.conn
        if conn is None:
            return
        path = conn.paths.paths.get((PathKind.DIRECT_TCP, link.name))
        if path is not None and path.send_datagram == link.send:
            conn.paths.remove(path)
            log.info("direct path to %s closed: %s", conn.peer, path.describe())

    def describe(self) -> dict[str, object]:
        """Counters for status displays."""
        return dict(self.counters)
