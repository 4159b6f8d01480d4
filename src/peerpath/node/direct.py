"""Direct paths for sessions that started on the relay: the asyncio side of the direct-path
controller (:mod:`peerpath.nat.traversal`).

Every decision (when a round is due, the mode, prediction, the birthday spray and scan,
TCP rounds, backoff, which key answers a check, when a path is stale) is the controller's;
this module carries its outputs out and its inputs in: it takes the local side's snapshot
from :mod:`~peerpath.node.reachability`, exchanges the round's messages over the session,
opens the sockets a spray asks for, sends the round's datagrams, hands arriving checks to
the round or session they belong to, promotes validated paths into the session's path set,
and probes every path once a second. A round's TCP part is :mod:`~peerpath.node.tcp_paths`'s
(checks on a TCP link are matched there: a link is a connection, not a source that could
be spoofed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from peerpath import errors
from peerpath.clock import Clock
from peerpath.nat.traversal import (
    GO_TOPIC,
    KEY_TOPIC,
    MAX_BIRTHDAY_ROUNDS,
    OFFER_TOPIC,
    PROBE_INTERVAL,
    RELAY_OBSERVED,
    Answer,
    CheckKey,
    Go,
    LocalSide,
    Mode,
    Offer,
    RoundPlan,
    Traversal,
    UdpRound,
    decode_message,
    encode_message,
    stale,
)
from peerpath.node.tcp_paths import Session, TcpPaths
from peerpath.session.connection import Connection
from peerpath.session.pathset import Path, PathKind, format_endpoint, parse_endpoint
from peerpath.session.pmtu import MtuSearch
from peerpath.tasks import spawn
from peerpath.wire.endpoint import Endpoint

if TYPE_CHECKING:
    from peerpath.node.reachability import Reachability
    from peerpath.node.sockets import UdpSocket, UdpSockets
    from peerpath.node.tcp import TcpLinks

log = logging.getLogger(__name__)

#: How often a session's punching loop looks whether a round is due.
ROUND_POLL = 0.5


class NodeSide(Protocol):
    """What direct paths need of their node (the node passes itself; this module never imports it)."""

    udp: UdpSockets
    tcp: TcpLinks
    clock: Clock
    reachability: Reachability


@dataclass(eq=False)
class Watched:
    """One watched session: its controller state and the sockets it holds."""

    conn: Connection
    traversal: Traversal
    #: Extra sockets that carry a birthday round's winning path, until the session ends.
    kept: list[UdpSocket] = field(default_factory=list)
    #: The responder's port-prediction socket, until the initiator's "go".
    fresh: UdpSocket | None = None

    @property
    def live(self) -> bool:
        return not self.conn.closed.done()

    def drop_fresh(self) -> None:
        if self.fresh is not None:
            self.fresh.close()
            self.fresh = None


@dataclass(eq=False)
class _ActiveRound:
    """A UDP round under way, with the sockets its numbers stand for."""

    session: Watched
    round: UdpRound
    sockets: list[UdpSocket]
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def index(self, sock: UdpSocket) -> int | None:
        for number, candidate in enumerate(self.sockets):
            if candidate is sock:
                return number
        return None


class DirectPaths:
    """Upgrades one node's relayed sessions to direct paths and keeps them alive."""

    def __init__(self, node: NodeSide) -> None:
        self.node = node
        self._sessions: dict[Connection, Watched] = {}
        self._rounds: list[_ActiveRound] = []
        #: The socket each direct UDP path a round validated sends from.
        self._sockets: dict[Path, UdpSocket] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
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
        #: Direct TCP paths: rounds' connects and the checks on TCP links.
        self.tcp = TcpPaths(node, self, self.counters)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        spawn(coro, "a direct-path task", self._tasks)

    async def close(self) -> None:
        """Stop every round and probe."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def watch(self, conn: Connection, initiator: bool) -> None:
        """Keep ``conn`` on the best path for its lifetime (only the initiator starts rounds)."""
        session = self._session(conn, initiator)
        session.traversal.initiator = initiator  # a peer's offer may have made the entry first
        self._spawn(self._maintain(session))

    def _session(self, conn: Connection, initiator: bool = False) -> Watched:
        session = self._sessions.get(conn)
        if session is None:
            session = self._sessions[conn] = Watched(conn, Traversal(initiator))
            conn.closed.add_done_callback(lambda _: self._ended(session))
        return session

    def _ended(self, session: Watched) -> None:
        """The session is over: its sockets close, its links wait for a next session."""
        self._sessions.pop(session.conn, None)
        session.drop_fresh()
        for sock in session.kept:
            sock.close()
        session.kept.clear()
        for path in session.conn.paths.paths.values():
            self._sockets.pop(path, None)
        for link in list(self.node.tcp.links):
            if link.conn is session.conn:
                link.release()

    def open_sessions(self) -> list[Watched]:
        """Every open session that is kept on its best path."""
        return [s for s in self._sessions.values() if s.live]

    def session_of(self, conn: Connection) -> Watched | None:
        """The kept session of ``conn``, if any."""
        return self._sessions.get(conn)

    # -- rounds ---------------------------------------------------------------------------

    async def _maintain(self, session: Watched) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._keep_probing(session))
            if session.traversal.initiator:
                group.create_task(self._keep_punching(session))

    async def _keep_probing(self, session: Watched) -> None:
        """Probe every path once a PROBE_INTERVAL for the session's lifetime, on the relay
        too and while a punch round is under way: a path's loss is judged on a steady
        series of probes, and the relay's RTT is what a direct path is measured against."""
        traversal = session.traversal
        if traversal.initiator and traversal.current_key is None:  # opened on a known endpoint
            with contextlib.suppress(errors.PeerpathError):  # answered once the peer has it
                await session.conn.request(encode_message(traversal.new_key()), timeout=5, _topic=KEY_TOPIC)
        while session.live:
            self._probe(session)
            await asyncio.sleep(PROBE_INTERVAL)

    async def _keep_punching(self, session: Watched) -> None:
        """Run punch rounds whenever the controller says one is due."""
        conn, traversal = session.conn, session.traversal
        while session.live:
            now = self.node.clock()
            path = conn.path
            on_relay = path is not None and path.kind is PathKind.RELAY
            if traversal.round_due(
                now, on_relay=on_relay, established=conn.is_established, held_aside=conn.paths.held_aside(now)
            ):
                try:
                    direct = await self._round(session)
                except (errors.PeerpathError, TimeoutError, ValueError, msgspec.DecodeError) as exc:
                    log.debug("punch round with %s failed: %s", conn.peer, exc)
                    direct = False
                traversal.round_ended(direct, self.node.clock())
            await asyncio.sleep(ROUND_POLL)

    async def _round(self, session: Watched) -> bool:
        """One round, the initiator's side: offer, answer, go, punch."""
        conn, traversal = session.conn, session.traversal
        local, fresh = await self._local()
        try:
            offer = traversal.offer(local)
            sent = self.node.clock()
            reply = await conn.request(encode_message(offer), timeout=5, _topic=OFFER_TOPIC)
            answer = decode_message(reply, Answer)
            go = traversal.answered(offer, answer, sent, self.node.clock())
            await conn.send(encode_message(go), _topic=GO_TOPIC)
            plan = traversal.begin(self.node.clock())
            self.counters["rounds"] += 1
            self._explain(session)
            attempts = []
            if plan.udp:
                attempts.append(self._punch(session, plan, fresh))
            if plan.tcp:
                attempts.append(self.tcp.round(session, plan))
            direct = any(await asyncio.gather(*attempts))
            if direct:
                self.counters["rounds_direct"] += 1
            return direct
        finally:
            if fresh is not None and fresh not in session.kept:
                fresh.close()  # the round did not get to use it, or it did not win

    async def internal_message(self, conn: Connection, topic: str, data: bytes) -> bytes | None:
        """The responder's side of a round."""
        session = self._session(conn)
        traversal = session.traversal
        if topic == OFFER_TOPIC:
            offer = decode_message(data, Offer)
            traversal.remember(offer.key)  # checks under it are answered from now on
            arrived = self.node.clock()
            local, fresh = await self._local()
            answer = traversal.offered(offer, local, held=self.node.clock() - arrived)
            session.drop_fresh()  # an earlier offer's, that never got its "go"
            if fresh is not None and not session.live:
                fresh.close()  # the session ended while the socket was measured
                fresh = None
            session.fresh = fresh
            return encode_message(answer)
        if topic == GO_TOPIC:
            go = decode_message(data, Go) if data else Go()
            plan = traversal.go(go, self.node.clock())
            fresh, session.fresh = session.fresh, None
            if plan is not None:
                self._explain(session)
                if plan.udp:
                    self._spawn(self._punch(session, plan, fresh))
                    fresh = None  # the round owns it now
                if plan.tcp:
                    self._spawn(self.tcp.round(session, plan))
            if fresh is not None:
                fresh.close()
            return None
        if topic == KEY_TOPIC:
            traversal.remember(decode_message(data, CheckKey).key)
            return None
        raise ValueError(f"unknown internal topic {topic!r}")

    async def _local(self) -> tuple[LocalSide, UdpSocket | None]:
        """The snapshot a round starts from, with the transports rounds may use."""
        return await self.node.reachability.snapshot("udp" in self.transports, "tcp" in self.transports)

    # -- UDP ------------------------------------------------------------------------------

    async def _punch(self, session: Watched, plan: RoundPlan, fresh: UdpSocket | None) -> bool:
        """Carry out a round's UDP part: the controller's datagrams out of the sockets they
        name (the spray's opened here), arriving checks in, validated paths promoted."""
        main = self.node.udp.main
        if main is None:  # the node is closing
            if fresh is not None:
                fresh.close()
            return False
        allowed = self._birthdays < MAX_BIRTHDAY_ROUNDS
        udp = UdpRound(plan, birthday_allowed=allowed, fresh_socket=fresh is not None)
        if not allowed and plan.mode is not Mode.NORMAL:
            log.debug("birthday round with %s deferred: %d under way", session.conn.peer, self._birthdays)
        self._birthdays += udp.birthday
        sockets = [main, *([fresh] if fresh is not None else [])]
        for _ in range(udp.sockets_wanted):
            try:
                sockets.append(self.node.udp.extra())
            except OSError:
                break
        udp.opened(len(sockets) - 1)
        if udp.predicted_scan:
            self.counters["predicted_rounds"] += 1
        active = _ActiveRound(session, udp, sockets)
        self._rounds.append(active)
        clock = self.node.clock
        try:
            while session.live:
                for number, data, addr in udp.datagrams_to_send(clock()):
                    sockets[number].sendto(data, addr)
                for promotion in udp.poll(clock()):
                    self._promote(session, plan.key, promotion.addresses, sockets[promotion.socket])
                    self.counters["predicted_paths"] += promotion.predicted
                if udp.finished(clock()):
                    break
                wake = udp.next_time()
                active.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(active.wake.wait(), 0.5 if wake is None else max(0.0, wake - clock()))
            self.counters["checks_sent"] += udp.checks_sent
            return udp.validated
        finally:
            self._birthdays -= udp.birthday
            self._rounds.remove(active)
            for number, sock in enumerate(sockets[1:], 1):
                if number in udp.kept and session.live:
                    session.kept.append(sock)
                else:
                    sock.close()

    def _explain(self, session: Watched) -> None:
        reason = session.traversal.relay_reason
        if reason is not None and session.conn.relay_reason != reason:
            session.conn.relay_reason = reason
            log.info("session with %s stays on the relay: %s", session.conn.peer, reason)

    def _promote(self, session: Watched, key: bytes, validated: list[Endpoint], sock: UdpSocket) -> None:
        if not validated:
            return
        conn = session.conn
        session.traversal.found(key)
        conn.relay_reason = None
        now = self.node.clock()
        for addr in validated:
            proved = self.node.udp.path(addr, sock)
            path = conn.paths.add_validated(proved, now)
            if path is not proved and self._sockets.get(path, self.node.udp.main) is not sock:
                # Found again from another socket (an earlier round's mapping is gone): the
                # path now sends from the socket this round proved.
                path.send_datagram, path.send_probe = proved.send_datagram, proved.send_probe
            self._sockets[path] = sock
            log.info("direct path to %s: %s", conn.peer, path.describe())

    def on_check(self, data: bytes, source: Endpoint, via: UdpSocket) -> None:
        """A check-range datagram arrived on ``via`` (the node's socket, or a round's extra one)."""
        for active in list(self._rounds):
            number = active.index(via)
            if number is not None and active.round.receive(number, data, source):
                active.wake.set()
                return
        remote = format_endpoint(source)
        for session in self.open_sessions():
            paths = session.conn.paths
            path = paths.paths.get((PathKind.DIRECT_UDP, remote))
            # Checked in turn only from a socket the session keeps, so the path can stay on it.
            direct = self._direct_udp(session) if via is self.node.udp.main or via in session.kept else []
            outcome = session.traversal.check(data, source, self.node.clock(), known=path is not None, direct=direct)
            if outcome is None:
                continue
            if outcome.reply is not None:
                via.sendto(outcome.reply, source)
                if path is not None:
                    paths.peer_checked(path, self.node.clock())  # the peer's probes get through
            if outcome.trigger is not None:
                via.sendto(outcome.trigger, source)  # the peer's NAT may have rebound: check there
            if outcome.validated is not None:
                self._promote(session, outcome.validated, [source], via)
            elif outcome.answered is not None:
                self.probe_answered(session, outcome.answered, PathKind.DIRECT_UDP, remote)
            return

    @staticmethod
    def _direct_udp(session: Watched) -> list[tuple[str, float]]:
        """(host, when last heard) of the session's direct UDP paths."""
        return [
            (parse_endpoint(p.remote)[0], p.last_received or p.created)
            for p in session.conn.paths.paths.values()
            if p.kind is PathKind.DIRECT_UDP
        ]

    # -- liveness ---------------------------------------------------------------------------

    def _probe(self, session: Watched) -> None:
        conn = session.conn
        now = self.node.clock()
        for path in list(conn.paths.paths.values()):
            if stale(path.kind, path.last_received or path.created, now):
                self._drop(session, path)
                continue
            probe = session.traversal.probe((path.kind, path.remote))
            if probe is None:
                return
            tid, datagram = probe
            path.probe_sent(tid, now)
            path.send_datagram(datagram)  # from the socket, link or relay the path uses
            if path.send_probe is not None:  # a direct UDP path: its MTU is searched too
                if path.mtu is None:  # made here, not with every Path a datagram from anywhere makes
                    path.mtu = MtuSearch.for_host(parse_endpoint(path.remote)[0])
                self._probe_mtu(session, path, path.mtu, now)

    def _probe_mtu(self, session: Session, path: Path, mtu: MtuSearch, now: float) -> None:
        """A direct UDP path's path MTU search (:mod:`peerpath.session.pmtu`): a probe padded
        to the size it tries next, if one is due."""
        size = mtu.due(now)
        path.max_datagram = mtu.size  # back to the base size if the current one stopped fitting
        if size is None:
            return
        probe = session.traversal.probe((path.kind, path.remote), size)
        if probe is not None:
            tid, datagram = probe
            mtu.sent(tid, size, now)
            (path.send_probe or path.send_datagram)(datagram)

    def _drop(self, session: Watched, path: Path) -> None:
        """A direct path silent for long leaves the session (a later round finds what works)."""
        conn = session.conn
        if path.kind is PathKind.DIRECT_TCP:
            for link in list(self.node.tcp.links):
                if link.conn is conn and link.name == path.remote:
                    link.close()  # its path leaves with it (TcpPaths.on_lost)
            return
        conn.paths.remove(path)
        self._sockets.pop(path, None)
        log.info("direct path to %s dropped, silent for long: %s", conn.peer, path.describe())

    def probe_answered(self, session: Session, tid: bytes, kind: PathKind, remote: str) -> None:
        """A probe answer came back over a path: its quality is credited."""
        if session.traversal.probe_answered(tid, (kind, remote)):
            path = session.conn.paths.paths.get((kind, remote))
            if path is None:
                return
            now = self.node.clock()
            session.conn.paths.probe_answered(path, tid, now)
            if path.mtu is not None and path.mtu.answered(tid, now):
                path.max_datagram = path.mtu.size
                log.info("path to %s carries %d-byte datagrams: %s", session.conn.peer, path.max_datagram, path.remote)
                self._probe_mtu(session, path, path.mtu, now)  # the next size at once

    def on_relay_check(self, data: bytes, source: bytes, reply: Callable[[bytes], object], relay: str) -> None:
        """A check or probe answer that came over a relay from the peer whose address digest
        is ``source``: answered back through ``reply`` (the relay's send), or counted."""
        for session in self.open_sessions():
            peer = session.conn.peer
            if peer is None or peer.digest != source:
                continue
            outcome = session.traversal.check(data, RELAY_OBSERVED, self.node.clock(), known=True)
            if outcome is None:
                continue
            if outcome.reply is not None:
                reply(outcome.reply)
            elif outcome.answered is not None:
                self.probe_answered(session, outcome.answered, PathKind.RELAY, relay)
            return

    def describe(self) -> dict[str, object]:
        """Counters for status displays."""
        return dict(self.counters)
