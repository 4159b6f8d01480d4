"""The hole-punching engine (sans-I/O): authenticated connectivity checks to every candidate
address of the peer, on a schedule that starts at an agreed moment.

Feed it time and datagrams; take datagrams to send. A path is valid once a response to
our check came back *from the address we sent the check to* (ICE's symmetric rule), so a
replayed or redirected response cannot make a wrong address valid. A check arriving from
an address we do not know (the peer's NAT chose a new port for us: a peer-reflexive
candidate, RFC 8445 7.3.1.3) is answered and then checked in turn ("triggered check"),
which is how a peer behind a symmetric NAT reaches an endpoint-independent one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from peerpath.wire import punch
from peerpath.wire.endpoint import Endpoint

#: Checks go out every INTERVAL seconds, round-robin over the candidates, for DURATION.
INTERVAL = 0.02
DURATION = 2.0
#: Candidates a peer may offer (each checked every INTERVAL for the round's DURATION), and
#: peer-reflexive sources a round answers with checks of its own, each at most
#: TRIGGERED_PER_SOURCE times (for its first TRIGGER_FIRST fresh checks, then every
#: TRIGGER_EVERY-th, so a loss burst does not take them all; never on a schedule): what a
#: round sends to addresses it has not validated is bounded whatever arrives.
MAX_CANDIDATES = 16
MAX_PEER_REFLEXIVE = 8
TRIGGERED_PER_SOURCE = 16
TRIGGER_FIRST = 4
TRIGGER_EVERY = 5
#: Transaction ids remembered to refuse replays.
REPLAY_WINDOW = 4096


class ReplayWindow:
    """The transaction ids of checks already answered: each is answered once (a copy sent
    again from elsewhere, a spoofed source say, gets nothing)."""

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self._size = size
        self._seen: dict[bytes, None] = {}

    def first(self, tid: bytes) -> bool:
        """True the first time ``tid`` is seen (and remember it)."""
        if tid in self._seen:
            return False
        self._seen[tid] = None
        if len(self._seen) > self._size:
            del self._seen[next(iter(self._seen))]
        return True


@dataclass(eq=False)
class Puncher:
    """One round of checks toward one peer."""

    key: bytes
    candidates: list[Endpoint]
    start: float
    duration: float = DURATION
    interval: float = INTERVAL
    #: Check only this many candidates per interval, round-robin (a port scan), instead of all.
    per_tick: int | None = None
    random_bytes: Callable[[int], bytes] = os.urandom
    validated: list[Endpoint] = field(default_factory=list)
    checks_sent: int = 0
    _next: float = 0.0
    _cursor: int = 0
    replays: ReplayWindow = field(default_factory=ReplayWindow)
    #: Peer-reflexive sources: the fresh checks each sent us, and the triggered checks it got.
    triggered: dict[Endpoint, tuple[int, int]] = field(default_factory=dict)
    _sent: dict[bytes, Endpoint] = field(default_factory=dict)
    _outbox: list[tuple[bytes, Endpoint]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._next = self.start
        self.candidates = list(dict.fromkeys(self.candidates))

    @property
    def done(self) -> bool:
        """True once a path is valid, or the round is over."""
        return bool(self.validated) or self._next > self.start + self.duration

    def finish(self) -> None:
        """Send no more scheduled checks (answers to the peer's checks still go out)."""
        self._next = float("inf")

    def next_time(self) -> float | None:
        """When :meth:`datagrams_to_send` next has something (None: nothing more to send)."""
        if self._outbox:
            return float("-inf")  # responses and triggered checks go at once
        if self.done:
            return None
        if not self.candidates:
            return self.start + self.duration + self.interval  # nothing to check: wake when it ends
        return self._next

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """Checks (and responses) due at ``now``: every interval, one check to each candidate."""
        out, self._outbox = self._outbox, []
        if not self.candidates:
            self._next = max(self._next, now)  # the round's time passes all the same
        while not self.done and self.candidates and self._next <= now:
            if self.per_tick is None:
                targets = self.candidates
            else:
                count = min(self.per_tick, len(self.candidates))
                targets = [self.candidates[(self._cursor + i) % len(self.candidates)] for i in range(count)]
                self._cursor += count
            for target in targets:
                tid = self.random_bytes(punch.TID_BYTES)
                self._sent[tid] = target
                self.checks_sent += 1
                out.append((punch.encode_check(self.key, tid), target))
            self._next += self.interval
        return out

    def receive(self, data: bytes, source: Endpoint) -> bool:
        """A check-range datagram arrived from ``source``; True if this round took it (an
        authentic check, or the answer to one of this round's checks)."""
        try:
            kind, tid, _ = punch.parse(self.key, data)
        except punch.CheckError:
            return False
        if kind == punch.CHECK:
            if not self.replays.first(tid):
                return True  # a copy of a check answered already: taken, and dropped
            self._outbox.append((punch.encode_response(self.key, tid, source), source))
            if source not in self.candidates:
                self._trigger(source)
            return True
        target = self._sent.get(tid)
        if target is None:
            return False  # not one of this round's checks: a liveness probe's answer, say
        if target == source and source not in self.validated:
            self.validated.append(source)
        return True

    def _trigger(self, source: Endpoint) -> None:
        """A peer-reflexive candidate (RFC 8445 7.3.1.3): check it in turn (a triggered check),
        within the round's bounds on such sources."""
        if source not in self.triggered and len(self.triggered) >= MAX_PEER_REFLEXIVE:
            return
        checks, sent = self.triggered.get(source, (0, 0))
        checks += 1
        due = checks <= TRIGGER_FIRST or checks % TRIGGER_EVERY == 0
        if due and sent < TRIGGERED_PER_SOURCE:
            sent += 1
            tid = self.random_bytes(punch.TID_BYTES)
            self._sent[tid] = source
            self.checks_sent += 1
            self._outbox.append((punch.encode_check(self.key, tid), source))
        self.triggered[source] = (checks, sent)
