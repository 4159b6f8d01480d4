"""The direct-path controller (sans-I/O): every decision about moving one session from the
relay to a direct path, and keeping it there, with no sockets, no tasks and no clock.

One :class:`Traversal` per session holds its state: the keys of its recent punch rounds,
when the next round is due (backoff), the checks it answered, and its liveness probes.
A round is planned from a :class:`LocalSide` snapshot and the peer's :class:`Offer` /
:class:`Answer` (exchanged over the session itself), and carried out by a
:class:`UdpRound`: authenticated checks from the node's socket and, against a NAT that
maps per destination, a birthday round (many sockets here, or many ports there, the
predicted ones first). The driver (``peerpath.node.direct``) carries the outputs out
(session messages, datagrams from numbered sockets, "open N sockets", "promote these
addresses", TCP connects) and feeds the inputs in (answers, datagrams, ``now``).

Synchronisation (DCUtR's): the initiator sends the offer, the responder answers, and the
initiator, having measured the round trip, sends "go" and starts half a round trip later,
which is when "go" reaches the responder, who starts on arrival.
"""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

import msgspec

from peerpath import errors
from peerpath.nat.ports import MAX_PORT_STEP
from peerpath.nat.punch import MAX_CANDIDATES, Puncher, ReplayWindow
from peerpath.ratelimit import TokenBucket
from peerpath.wire import punch
from peerpath.wire.codec import decode
from peerpath.wire.endpoint import Endpoint, parse_endpoint

#: Seconds between punch rounds while a session stays on the relay (the last repeats).
ROUND_BACKOFF = (0.5, 2.0, 5.0, 15.0, 30.0)
#: Liveness probes on every path of a session.
PROBE_INTERVAL = 1.0
#: After a round ends, keep answering the peer's checks this long.
LINGER = 2.0
#: Seconds a round waits for the mapping hint before punching without it.
NAT_WAIT = 1.0
#: Seconds port prediction's STUN queries may take, at most.
PREDICT_WAIT = 2.0
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
#: Probes of one session awaiting their answer, at most (the oldest are forgotten).
MAX_PROBES = 256
#: Outside rounds, the peer's fresh check from a new port of the IP one of its direct paths
#: goes to, while none of those paths has been heard from for REBIND_SILENCE seconds (its
#: NAT rebound, RFC 8445 7.3.1.3 peer-reflexive), is checked in turn: at most
#: TRIGGER_RATE of those checks a second per session (burst TRIGGER_BURST), and at most
#: MAX_TRIGGERED awaited at once.
REBIND_SILENCE = 3.0
TRIGGER_RATE = 1.0
TRIGGER_BURST = 3.0
MAX_TRIGGERED = 8
#: A direct UDP path not heard from for this long leaves the session (a rebound NAT's old
#: port, say): it is no longer probed, and a later round finds what works.
UDP_STALE = 60.0
#: What a probe answer sent back over the relay names as the check's source (it has none).
RELAY_OBSERVED = ("0.0.0.0", 0)


# -- the round's messages ------------------------------------------------------------------

# What a peer says in a round is bounded like any input: even a trusted peer's candidate
# list decides where this node sends checks.
_Key = Annotated[bytes, msgspec.Meta(min_length=punch.KEY_BYTES, max_length=punch.KEY_BYTES)]
_Endpoint = Annotated[str, msgspec.Meta(max_length=64)]
_Candidates = Annotated[list[_Endpoint], msgspec.Meta(max_length=MAX_CANDIDATES)]
_Port = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]


class CheckKey(msgspec.Struct, frozen=True):
    """The initiator's check key for a session no round has keyed (one opened on a known
    endpoint), so that its paths are probed all the same: liveness, RTT, path MTU."""

    key: _Key


class Offer(msgspec.Struct, frozen=True):
    """The initiator's opening: a fresh check key and how to reach it."""

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


class Answer(msgspec.Struct, frozen=True):
    """The responder's side of the same."""

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


class Go(msgspec.Struct, frozen=True):
    """The initiator's signal to start (sent half a round trip before it starts itself)."""

    #: Both sides also open TCP toward each other's TCP candidates this round.
    tcp: bool = False


#: The session topics the messages travel under.
OFFER_TOPIC = "punch-offer"
GO_TOPIC = "punch-go"
KEY_TOPIC = "check-key"

_Message = TypeVar("_Message", Offer, Answer, Go, CheckKey)


def decode_message(data: bytes, kind: type[_Message]) -> _Message:
    """A round's message from the peer; :class:`~peerpath.errors.RemoteError` for anything malformed."""
    # A few per punch round: a decoder made each time costs nothing worth keeping one for.
    return decode(msgspec.msgpack.Decoder(kind), data, errors.RemoteError, kind.__name__.lower())


def encode_message(message: Offer | Answer | Go | CheckKey) -> bytes:
    """The wire form of a round's message."""
    return msgspec.msgpack.encode(message)


# -- planning a round ------------------------------------------------------------------------


class Mode(enum.StrEnum):
    """How this side punches in a round."""

    #: Both NATs easy (or both hard: no good odds, the relay stays): checks to the candidates.
    NORMAL = "normal"
    #: Our NAT maps per destination: many sockets here toward the peer's one address.
    SPRAY = "spray"
    #: Theirs does: many ports of the peer's public IP, from our one socket.
    SCAN = "scan"


def choose_mode(mine_hard: bool, theirs_hard: bool) -> Mode:
    """Which side sprays and which scans."""
    if mine_hard and not theirs_hard:
        return Mode.SPRAY
    if theirs_hard and not mine_hard:
        return Mode.SCAN
    return Mode.NORMAL


def both_hard_reason(mine_step: int, theirs_step: int) -> str:
    """Why a session between two hard NATs stays on the relay."""
    return BOTH_HARD_SEQUENTIAL if mine_step and theirs_step else BOTH_HARD


def predicted_ports(last: int, step: int) -> list[int]:
    """The ports a NAT that hands them out ``step`` apart gives next after ``last``."""
    if not 0 < step <= MAX_PORT_STEP or not 0 < last < 65536:
        return []
    return [p for p in (last + step * i for i in range(1, PREDICTED_PORTS + 1)) if p < 65536]


def endpoints(texts: list[str]) -> list[Endpoint]:
    """The peer's candidates that are HOST:PORT (the rest are dropped: the peer's word only)."""
    out = []
    for text in texts:
        try:
            out.append(parse_endpoint(text))
        except ValueError:
            continue
    return out


def prediction_wanted(hard: bool, udp: bool) -> bool:
    """Whether to measure a fresh mapping before a round: only behind a hard NAT, over UDP."""
    return hard and udp


@dataclass(frozen=True)
class LocalSide:
    """What this node knows about itself when a round starts (the driver's snapshot)."""

    #: UDP candidates ("host:port"; empty when UDP rounds are off) and TCP ones.
    candidates: list[str]
    tcp: list[str]
    #: Where the peer's birthday sockets should aim: our mapped port, else the reflexive one.
    reflexive: str | None
    #: Our NAT maps per destination (and no port mapping on the router undoes it).
    hard: bool
    #: UDP is known to get out of here (a STUN answer, or the relay acknowledged our UDP).
    udp_works: bool
    #: Port prediction's measurement: the last public port and the step (0, 0: none).
    next_port: int = 0
    port_step: int = 0


@dataclass(frozen=True)
class RoundPlan:
    """One side's part of a round, agreed with the peer."""

    key: bytes
    #: When checks start (this side's clock).
    start: float
    mode: Mode
    #: Where the node's socket sends checks (empty: no UDP this round).
    candidates: list[Endpoint]
    #: The peer's public address, which a birthday round sprays toward or scans the ports of.
    target: Endpoint | None
    #: The peer's predicted ports (checked first when scanning).
    predicted: list[int]
    #: The peer's TCP candidates to connect to (empty: no TCP this round).
    tcp: list[Endpoint]
    #: When the session stays on the relay whatever this round does, why.
    relay_reason: str | None = None

    @property
    def udp(self) -> bool:
        """Whether the round punches over UDP (both sides offered UDP candidates)."""
        return bool(self.candidates)

    @property
    def tcp_deadline(self) -> float:
        """When the TCP part of the round gives up."""
        return self.start + TCP_DURATION


def _plan(
    key: bytes, start: float, mine: Offer | Answer, theirs: Offer | Answer, tcp: bool, mine_step: int
) -> RoundPlan:
    remote = endpoints(theirs.candidates)
    target = next(iter(endpoints([theirs.reflexive] if theirs.reflexive else [])), None)
    reason = both_hard_reason(mine_step, theirs.port_step) if mine.hard and theirs.hard else None
    return RoundPlan(
        key=key,
        start=start,
        mode=choose_mode(mine.hard, theirs.hard),
        candidates=remote if remote and mine.candidates else [],
        target=target,
        predicted=predicted_ports(theirs.next_port, theirs.port_step),
        tcp=endpoints(theirs.tcp)[:MAX_TCP_CANDIDATES] if tcp and mine.tcp else [],
        relay_reason=reason,
    )


# -- carrying out the UDP part ------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """Addresses a round validated from one of its sockets (0: the node's main socket)."""

    socket: int
    addresses: list[Endpoint]
    #: Whether one of them is a port the peer's NAT sequence predicted.
    predicted: bool = False


class UdpRound:
    """The UDP part of one round: punchers on numbered sockets (0 is the node's main one,
    1.. the extra sockets a birthday spray asked for), sans-I/O.

    Make it from a plan, open :attr:`sockets_wanted` extra sockets (fewer if the system
    refuses) and tell :meth:`opened`; then send what :meth:`datagrams_to_send` returns,
    feed what arrives to :meth:`receive`, and call :meth:`poll` at :meth:`next_time`.
    """

    def __init__(
        self,
        plan: RoundPlan,
        *,
        birthday_allowed: bool = True,
        fresh_socket: bool = False,
        rng: random.Random | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.plan = plan
        self._rng = rng or random.Random()
        self._random_bytes = random_bytes
        mode = plan.mode
        if mode is not Mode.NORMAL and not birthday_allowed:
            mode = Mode.NORMAL  # over the node's limit: punch normally now, birthday next time
        #: Whether this round is a birthday round (it counts against the node's limit).
        self.birthday = mode is not Mode.NORMAL and plan.target is not None
        self.mode = mode if self.birthday else Mode.NORMAL
        self._fresh = fresh_socket
        self.punchers: list[tuple[Puncher, int]] = []
        if plan.candidates:
            self.punchers.append((Puncher(plan.key, plan.candidates, plan.start, random_bytes=random_bytes), 0))
        self._scan_predicted = self.mode is Mode.SCAN and bool(plan.predicted)
        if self.mode is Mode.SCAN and plan.target is not None:
            taken = set(plan.predicted)
            ports = plan.predicted + [p for p in self._rng.sample(range(1024, 65536), SCAN_PORTS) if p not in taken]
            scan = [(plan.target[0], port) for port in ports]
            puncher = Puncher(
                plan.key, scan, plan.start, BIRTHDAY_DURATION, interval=0.004, per_tick=2, random_bytes=random_bytes
            )
            self.punchers.append((puncher, 0))
        self.linger_until: float | None = None
        self._promoted: set[Endpoint] = set()
        #: Sockets that carry a validated path (the driver keeps them for the session).
        self.kept: set[int] = set()

    @property
    def predicted_scan(self) -> bool:
        """Whether this side scans the peer's predicted ports first."""
        return self._scan_predicted

    @property
    def sockets_wanted(self) -> int:
        """Extra sockets to open for a spray, beyond the fresh one the driver already has."""
        return SPRAY_SOCKETS - self._fresh if self.mode is Mode.SPRAY else 0

    def opened(self, extra: int) -> None:
        """``extra`` sockets (numbered from 1, the fresh socket first) are open for the spray."""
        if self.mode is not Mode.SPRAY or self.plan.target is None:
            return
        for index in range(1, extra + 1):
            puncher = Puncher(
                self.plan.key,
                [self.plan.target],
                self.plan.start,
                BIRTHDAY_DURATION,
                0.25,
                random_bytes=self._random_bytes,
            )
            self.punchers.append((puncher, index))

    def datagrams_to_send(self, now: float) -> list[tuple[int, bytes, Endpoint]]:
        """Checks and answers due at ``now``, each with the socket it leaves from."""
        return [(sock, data, addr) for p, sock in self.punchers for data, addr in p.datagrams_to_send(now)]

    def receive(self, socket: int, data: bytes, source: Endpoint) -> bool:
        """A check-range datagram arrived on ``socket``; True if this round took it."""
        return any(p.receive(data, source) for p, sock in self.punchers if sock == socket)

    @property
    def validated(self) -> bool:
        """Whether any path was found."""
        return any(p.validated for p, _ in self.punchers)

    def poll(self, now: float) -> list[Promotion]:
        """What to promote, once a path is found or every puncher is done; the round then
        stops its birthday search and lingers (answering the peer) for :data:`LINGER`."""
        if self.linger_until is not None:
            return []
        if not (self.validated or all(p.done for p, _ in self.punchers)):
            return []
        self.linger_until = now + LINGER
        for puncher, _ in self.punchers[1:]:
            puncher.finish()  # a path is found: the birthday search stops sending
        promotions = []
        predicted = set(self.plan.predicted)
        for puncher, sock in self.punchers:
            # One socket per address: against an open NAT every spray socket may validate
            # the same one, and only the first is kept to carry it.
            found = [a for a in puncher.validated if a not in self._promoted]
            if found:
                self._promoted.update(found)
                self.kept.add(sock)
                target = self.plan.target
                hit = target is not None and any(a[0] == target[0] and a[1] in predicted for a in found)
                promotions.append(Promotion(sock, found, hit))
        return promotions

    def finished(self, now: float) -> bool:
        """Whether the round is over (lingering included)."""
        return self.linger_until is not None and now >= self.linger_until

    def next_time(self) -> float | None:
        """When :meth:`datagrams_to_send` or :meth:`poll` next has something to do."""
        times = [t for t in (p.next_time() for p, _ in self.punchers) if t is not None]
        if self.linger_until is not None:
            times.append(self.linger_until)
        return min(times) if times else None

    @property
    def checks_sent(self) -> int:
        """Checks this round sent so far."""
        return sum(p.checks_sent for p, _ in self.punchers)


# -- one session ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckOutcome:
    """What a check-range datagram outside a round means for a session."""

    #: The answer to send back where it came from (None: nothing to send; when there is
    #: one, the peer's checks get through from there).
    reply: bytes | None = None
    #: The tid of one of our probes this answers.
    answered: bytes | None = None
    #: A check of our own to send back to where the peer's came from (no path leads there
    #: yet: its NAT may have rebound).
    trigger: bytes | None = None
    #: That check came back from there: a direct path, validated under this key.
    validated: bytes | None = None


@dataclass
class Traversal:
    """One session's direct-path state: round keys, backoff, answered checks and probes."""

    initiator: bool
    random_bytes: Callable[[int], bytes] = os.urandom
    #: Keys of recent rounds, newest last: checks and probes under any of them are answered,
    #: so a probe never goes unanswered because the two sides have not yet agreed which
    #: round's key is current.
    keys: list[bytes] = field(default_factory=list)
    #: The key probes go under: the latest round that found a path.
    probe_key: bytes | None = None
    failures: int = 0
    next_round: float = 0.0
    relay_reason: str | None = None
    #: The responder's offer and answer, until the initiator's "go".
    pending: tuple[Offer, Answer] | None = None
    #: Checks answered outside rounds: a copy from elsewhere gets nothing.
    replays: ReplayWindow = field(default_factory=ReplayWindow)
    #: Probes awaiting an answer: tid -> the path's (kind, remote) name.
    probes: dict[bytes, tuple[str, str]] = field(default_factory=dict)
    #: Checks sent to new sources of the peer's checks: tid -> (where, key), and their budget.
    triggered: dict[bytes, tuple[Endpoint, bytes]] = field(default_factory=dict)
    trigger_budget: TokenBucket = field(default_factory=lambda: TokenBucket(TRIGGER_RATE, TRIGGER_BURST, 0.0))
    #: The round the peer's answer settled (initiator), until it begins: offer, answer,
    #: RTT and whether TCP joins.
    _starting: tuple[Offer, Answer, float, bool] | None = field(default=None, init=False, repr=False)

    @property
    def current_key(self) -> bytes | None:
        """The key probes are signed with: the latest round that found a path, else the
        latest round (both sides know its key from the offer)."""
        return self.probe_key or (self.keys[-1] if self.keys else None)

    # rounds

    def round_due(self, now: float, *, on_relay: bool, established: bool, held_aside: bool) -> bool:
        """Whether the initiator should start a round now: the session is on the relay, no
        live direct path is only set aside for its quality (a round would find it again),
        and the backoff has passed."""
        return self.initiator and on_relay and established and not held_aside and now >= self.next_round

    def remember(self, key: bytes) -> None:
        """A round's key: checks and probes under it are answered from now on."""
        self.keys.append(key)
        del self.keys[:-ROUND_KEYS]

    def new_key(self) -> CheckKey:
        """A fresh check key for a session without one (initiator), and what to tell the peer."""
        key = self.random_bytes(punch.KEY_BYTES)
        self.remember(key)
        return CheckKey(key)

    def offer(self, local: LocalSide) -> Offer:
        """Start a round (initiator): a fresh key, and what to tell the peer."""
        key = self.random_bytes(punch.KEY_BYTES)
        self.remember(key)
        return Offer(
            key,
            local.candidates,
            local.reflexive,
            local.hard,
            local.tcp,
            local.udp_works,
            local.next_port,
            local.port_step,
        )

    def answered(self, offer: Offer, answer: Answer, sent: float, now: float) -> Go:
        """The peer's answer arrived (initiator): the "go" to send; :meth:`begin` once it is sent."""
        rtt = max(0.0, now - sent - min(answer.held, NAT_WAIT + PREDICT_WAIT))
        # TCP when UDP is out of the question for either side, or did not work last time.
        tcp = bool(offer.tcp and answer.tcp) and (not offer.udp or not answer.udp or self.failures > 0)
        self._starting = (offer, answer, rtt, tcp)
        return Go(tcp)

    def begin(self, now: float) -> RoundPlan:
        """ "Go" is on its way (initiator): the round, starting half a round trip from now,
        when "go" reaches the peer."""
        if self._starting is None:
            raise RuntimeError("begin() before answered()")
        offer, answer, rtt, tcp = self._starting
        self._starting = None
        plan = _plan(offer.key, now + rtt / 2, offer, answer, tcp, offer.port_step)
        self._explain(plan.relay_reason)
        return plan

    def round_ended(self, direct: bool, now: float) -> None:
        """A round is over (initiator): the next one after a backoff if it found nothing."""
        self.failures = 0 if direct else self.failures + 1
        if not direct:
            self.next_round = now + ROUND_BACKOFF[min(self.failures - 1, len(ROUND_BACKOFF) - 1)]

    def offered(self, offer: Offer, local: LocalSide, held: float) -> Answer:
        """The answer to the peer's offer (responder; :meth:`remember` its key on arrival,
        before gathering ``local``), kept until the peer's "go"."""
        answer = Answer(
            local.candidates,
            local.reflexive,
            local.hard,
            local.tcp,
            local.udp_works,
            held=held,
            next_port=local.next_port,
            port_step=local.port_step,
        )
        self.pending = (offer, answer)
        return answer

    def go(self, go: Go, now: float) -> RoundPlan | None:
        """The peer's "go" (responder): the round, starting now (None: no offer was pending)."""
        if self.pending is None:
            return None
        offer, answer = self.pending
        self.pending = None
        plan = _plan(offer.key, now, answer, offer, go.tcp, answer.port_step)
        self._explain(plan.relay_reason)
        return plan

    def _explain(self, reason: str | None) -> None:
        if reason is not None:
            self.relay_reason = reason

    def found(self, key: bytes) -> None:
        """A round under ``key`` found a direct path: probes go under it from now on."""
        self.probe_key = key
        self.relay_reason = None

    # checks and probes outside rounds

    def check(
        self,
        data: bytes,
        source: Endpoint,
        now: float,
        *,
        known: bool,
        direct: Sequence[tuple[str, float]] = (),
    ) -> CheckOutcome | None:
        """A check-range datagram from ``source`` outside a round, under one of this
        session's keys: what to do (None: not this session's). ``known``: a path of the
        session leads to ``source`` already. ``direct``: (host, when last heard) of each of
        the session's direct UDP paths on a socket the answer could come back to (empty: no
        check in turn). A new port of one of those hosts, while all of them are silent, is
        checked in turn (the peer's NAT rebound), and the answer from there validates it."""
        for key in reversed(self.keys):
            try:
                kind, tid, _ = punch.parse(key, data)
            except punch.CheckError:
                continue
            if kind != punch.CHECK:
                pending = self.triggered.get(tid)
                if pending is not None and pending[0] == source:
                    del self.triggered[tid]
                    return CheckOutcome(validated=pending[1])
                return CheckOutcome(answered=tid)
            if not self.replays.first(tid):
                return CheckOutcome()  # a copy: answered once already, and no news of the path
            rebound = not known and self._rebound(source, now, direct)
            trigger = self._trigger(source, key) if rebound and self.trigger_budget.take(1, now) else None
            return CheckOutcome(reply=punch.encode_response(key, tid, source), trigger=trigger)
        return None

    @staticmethod
    def _rebound(source: Endpoint, now: float, direct: Sequence[tuple[str, float]]) -> bool:
        """Whether ``source`` looks like the peer's NAT rebinding: a new port of an IP a
        direct path goes to, none of which has been heard from lately."""
        return (
            source != RELAY_OBSERVED
            and any(host == source[0] for host, _ in direct)
            and all(now - heard >= REBIND_SILENCE for _, heard in direct)
        )

    def _trigger(self, source: Endpoint, key: bytes) -> bytes:
        """A check to ``source`` under the key the peer's check came under."""
        tid = self.random_bytes(punch.TID_BYTES)
        self.triggered[tid] = (source, key)
        while len(self.triggered) > MAX_TRIGGERED:
            del self.triggered[next(iter(self.triggered))]
        return punch.encode_check(key, tid)

    def probe(self, path: tuple[str, str], size: int = punch.SIZE) -> tuple[bytes, bytes] | None:
        """A probe (its tid and datagram, padded to ``size`` bytes for a path MTU probe) for
        the path named ``path`` (kind, remote); None before any round, with nothing to sign
        it with. The relay path is probed too: its RTT is what a direct path is measured
        against."""
        key = self.current_key
        if key is None:
            return None
        tid = self.random_bytes(punch.TID_BYTES)
        self.probes[tid] = path
        if len(self.probes) > MAX_PROBES:
            del self.probes[next(iter(self.probes))]
        return tid, punch.encode_check(key, tid, size)

    def probe_answered(self, tid: bytes, path: tuple[str, str]) -> bool:
        """Whether ``tid`` answers our probe of ``path`` (and forget it if so)."""
        if self.probes.get(tid) != path:
            return False
        del self.probes[tid]
        return True


def stale(kind: str, last_heard: float, now: float) -> bool:
    """Whether a direct path has been silent long enough to drop it (a TCP path's link is
    closed; a later round builds what works then). The relay path never is."""
    if kind == "direct tcp":
        return now - last_heard > TCP_IDLE
    if kind == "direct udp":
        return now - last_heard > UDP_STALE
    return False
