"""The path set: QUIC sees one stable peer; the path set moves its datagrams.

Every path carries the same already-encrypted QUIC datagrams, so a path adds no
security of its own and needs none. Paths send through a callable their owner
supplies, and time comes in as ``now`` (read from the driver's :mod:`~peerpath.clock`).
"""

from __future__ import annotations

import bisect
import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from peerpath.session.pmtu import BASE_DATAGRAM, MtuSearch
from peerpath.wire.endpoint import format_endpoint, parse_endpoint

__all__ = ["HOLD_DOWN", "Path", "PathKind", "PathSet", "format_endpoint", "parse_endpoint"]


class PathKind(enum.StrEnum):
    """How a path reaches the peer. Order of preference: direct first."""

    DIRECT_UDP = "direct udp"
    DIRECT_TCP = "direct tcp"
    RELAY = "relay"


_PREFERENCE = {PathKind.DIRECT_UDP: 0, PathKind.DIRECT_TCP: 1, PathKind.RELAY: 2}

#: A probe not answered within this many seconds counts as lost.
PROBE_TIMEOUT = 2.0
#: How many of a path's most recent probe outcomes its recent loss is computed over; a
#: path is judged lossy only once half a window is lost, so a couple of early losses
#: decide nothing.
LOSS_WINDOW = 10
#: Seconds after a path is validated during which its unanswered probes are not held
#: against it: the peer may not have taken up the round's key yet.
PROBE_GRACE = 3.0
#: Probe outcomes that can tell a lossy path from a cut one when it is heard from again.
SILENT_VERDICT_OUTCOMES = 4
#: Seconds a path must be heard from after a forgiven silence before another is forgiven.
FORGIVE_INTERVAL = 10.0
#: Seconds the peer's checks may cross a path that our probes do not before the path's
#: silence is taken for loss, not a cut: longer than one of our probes needs to be answered
#: once a cut ends, so the peer's first check through a restored path does not count.
CHECKED_SILENCE = PROBE_TIMEOUT
#: RTT samples a path needs before its RTT is compared with the relay's.
RTT_MIN_SAMPLES = 5
#: A direct path is clearly worse than the relay when it loses this share of its recent
#: probes, or when its base RTT (see :meth:`Path.base_rtt`; a loaded path's smoothed RTT
#: includes its queue) exceeds the relay's by this factor plus this slack.
DEGRADED_LOSS = 0.5
DEGRADED_RTT_FACTOR = 2.0
DEGRADED_RTT_SLACK = 0.020
#: It is good again at no more than this loss and within this factor of the relay's RTT.
RECOVERED_LOSS = 0.2
RECOVERED_RTT_FACTOR = 1.25
#: Seconds a path set aside for its quality stays aside, at least: the session never flaps.
HOLD_DOWN = 30.0


@dataclass(eq=False)
class Path:
    """One way to reach the peer, with its counters."""

    kind: PathKind
    remote: str
    send_datagram: Callable[[bytes], None]
    created: float = 0.0
    #: The largest datagram the path carries (a direct UDP path's grows as probes prove it).
    max_datagram: int = BASE_DATAGRAM
    #: The path MTU search of a direct UDP path, and how its probes leave (unfragmented).
    mtu: MtuSearch | None = None
    send_probe: Callable[[bytes], None] | None = None
    last_received: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    #: Liveness probes on this path, and how many were answered (direct paths).
    probes_sent: int = 0
    probes_answered: int = 0
    #: Smoothed round-trip time and its variation from probe samples (RFC 6298 2), seconds.
    srtt: float | None = None
    rttvar: float | None = None
    #: Why the path set keeps this path aside for its quality, and until when at least.
    degraded: str | None = None
    held_until: float = 0.0
    #: Probes sent within this interval that go unanswered are not counted as lost: a new
    #: path's first seconds, or the silence of a good path that was cut and came back.
    forgiven: tuple[float, float] = (0.0, 0.0)
    #: When the first of the peer's checks arrived over this path in its current silence
    #: (None: none). A cut path carries nothing either way; a lossy or one-way one lets
    #: the peer's checks through while our probes go unanswered.
    checked_unheard: float | None = None
    _pending: dict[bytes, float] = field(default_factory=dict, repr=False)
    #: (sent, answered) of the most recent probes with an outcome, in the order they left.
    _outcomes: list[tuple[float, bool]] = field(default_factory=list, repr=False)
    _forgave_silence_at: float | None = field(default=None, repr=False)
    _samples: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LOSS_WINDOW), repr=False
    )

    @property
    def key(self) -> tuple[PathKind, str]:
        """What identifies the path within its set."""
        return (self.kind, self.remote)

    def describe(self) -> str:
        """Human form, e.g. ``direct udp 198.51.100.7:41641``."""
        return f"{self.kind.value} {self.remote}"

    def probe_sent(self, tid: bytes, now: float) -> None:
        """A liveness probe with transaction id ``tid`` left over this path."""
        self._expire(now)
        self.probes_sent += 1
        self._pending[tid] = now
        while len(self._pending) > LOSS_WINDOW:  # unanswered long ago: lost
            self._lost(self._pending.pop(next(iter(self._pending))))

    def probe_answered(self, tid: bytes, now: float) -> float | None:
        """The answer to probe ``tid`` came back: its round-trip sample, or None if the
        probe is unknown or already counted lost."""
        sent = self._pending.pop(tid, None)
        if sent is None:
            return None
        self.probes_answered += 1
        self._record(sent, True)
        sample = max(0.0, now - sent)
        self._samples.append(sample)
        if self.srtt is None or self.rttvar is None:
            self.srtt, self.rttvar = sample, sample / 2
        else:  # RFC 6298 2.3: beta 1/4, alpha 1/8
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample
        return sample

    def _expire(self, now: float) -> None:
        for tid, sent in list(self._pending.items()):
            if now - sent <= PROBE_TIMEOUT:
                break
            del self._pending[tid]
            self._lost(sent)

    def _lost(self, sent: float) -> None:
        start, end = self.forgiven
        if not start <= sent < end:
            self._record(sent, False)

    def _record(self, sent: float, answered: bool) -> None:
        bisect.insort(self._outcomes, (sent, answered))
        del self._outcomes[:-LOSS_WINDOW]

    def validated(self, now: float) -> None:
        """A connectivity check just proved the path: its first probes get a grace period."""
        self.forgiven = (now, now + PROBE_GRACE)

    def checked_while_silent(self, now: float) -> bool:
        """Whether the peer's checks have been crossing this path for CHECKED_SILENCE while
        nothing of ours came back: its silence is loss (or a one-way path), not a cut."""
        checked = self.checked_unheard
        return checked is not None and now - checked >= CHECKED_SILENCE

    def revived(self, silent_since: float, now: float) -> str | None:
        """The path is heard from again at ``now`` after a silence since ``silent_since``.

        If it was good until the silence and carried nothing either way in it (a cut, not a
        lossy path), the probes sent in the silence are forgotten and None is returned. If
        it lost much of what it carried before it fell silent, let the peer's checks through
        while silent to us, or falls silent again soon after a silence was forgiven, the
        silence's losses count with the rest, and if they are many, say so: a lossy path
        goes quiet now and then, and must not be taken back each time it speaks."""
        self._expire(now)
        before = [answered for sent, answered in self._outcomes if sent <= silent_since]
        # One silence per FORGIVE_INTERVAL of being heard from is forgiven: the answers
        # between the silences of a path that keeps falling silent would always look good.
        since = self._forgave_silence_at
        calm = since is None or silent_since - since >= FORGIVE_INTERVAL
        cut = not self.checked_while_silent(now)
        if calm and cut and before.count(False) <= RECOVERED_LOSS * len(before):
            self._forgave_silence_at = now
            self.forgiven = (silent_since, now)
            self._outcomes = [(sent, answered) for sent, answered in self._outcomes if sent <= silent_since]
            return None
        record = [answered for _, answered in self._outcomes]
        lost = record.count(False)
        if len(record) >= SILENT_VERDICT_OUTCOMES and lost >= DEGRADED_LOSS * len(record):
            return f"lost {lost / len(record):.0%} of its probes, then fell silent"
        return None

    def recent_outcomes(self, now: float) -> tuple[int, int]:
        """How many of the last :data:`LOSS_WINDOW` probes with an outcome went unanswered,
        and how many have an outcome."""
        self._expire(now)
        return [answered for _, answered in self._outcomes].count(False), len(self._outcomes)

    def recent_loss(self, now: float) -> float | None:
        """The share of the last :data:`LOSS_WINDOW` probes that went unanswered (None
        until that many have an outcome)."""
        lost, count = self.recent_outcomes(now)
        return lost / count if count == LOSS_WINDOW else None

    def base_rtt(self) -> float | None:
        """The lowest of the recent RTT samples: the path's own delay, without the queueing
        that the traffic it carries adds (None until :data:`RTT_MIN_SAMPLES` samples)."""
        if len(self._samples) < RTT_MIN_SAMPLES:
            return None
        return min(self._samples)

    def quality(self, now: float) -> dict[str, object]:
        """Counters, age, when last heard from, smoothed probe RTT, and probe loss overall
        and recently (None until probed)."""
        recent = self.recent_loss(now)
        return {
            "path": self.describe(),
            "age_s": round(now - self.created, 1),
            "heard_s_ago": round(now - self.last_received, 1) if self.last_received is not None else None,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "rtt_ms": round(self.srtt * 1000, 2) if self.srtt is not None else None,
            "loss": round(1 - self.probes_answered / self.probes_sent, 3) if self.probes_sent else None,
            "recent_loss": round(recent, 3) if recent is not None else None,
            "degraded": self.degraded,
            "max_datagram": self.max_datagram,
        }


@dataclass
class PathSet:
    """The paths to one peer and the choice of the current one."""

    paths: dict[tuple[PathKind, str], Path] = field(default_factory=dict)
    current: Path | None = None
    #: Called with (old, new) when the current path changes.
    on_change: Callable[[Path | None, Path], None] | None = None
    #: Seconds of silence on the current path before another path of its kind takes over.
    stale_after: float = 3.0
    #: Seconds a direct path set aside for its quality stays aside, at least.
    hold_down: float = HOLD_DOWN

    def add(self, path: Path) -> Path:
        """Add a path (or return the one already there with the same key)."""
        existing = self.paths.get(path.key)
        if existing is not None:
            return existing
        self.paths[path.key] = path
        if self.current is None:
            self._switch(path)
        return path

    def add_validated(self, path: Path, now: float) -> Path:
        """Add a path that a check just proved, and switch to it if it is better."""
        if path.key not in self.paths:
            path.validated(now)  # a path found again keeps its record, and no grace
        path = self.add(path)
        self._heard(path, now)  # found again after a silence: judged as if it had spoken
        self.tick(now)
        return path

    def tick(self, now: float) -> None:
        """Re-evaluate the choice as time passes: a direct path that has gone silent for
        ``stale_after`` seconds, or whose quality is clearly worse than the relay's, hands
        the traffic to the relay while a relay path exists."""
        self._judge(now)
        best = self._best(now)
        if best is not None and best is not self.current:
            self._switch(best)

    def probe_answered(self, path: Path, tid: bytes, now: float) -> float | None:
        """A liveness probe on ``path`` was answered: the path is alive, and the probe's
        round trip is a sample of its RTT (returned; None for an unknown probe)."""
        self.received(path, 0, now)
        return path.probe_answered(tid, now)

    def peer_checked(self, path: Path, now: float) -> None:
        """An authentic check from the peer arrived over ``path`` (a path in this set). Only
        one that crosses a silent path counts: on an idle session the peer's probe may well
        be the last thing to arrive before a cut."""
        if path.checked_unheard is None and self.silent(path, now):
            path.checked_unheard = now

    def silent(self, path: Path, now: float) -> bool:
        """Whether ``path`` has not been heard from for ``stale_after`` seconds."""
        return now - (path.last_received or path.created) > self.stale_after

    def held_aside(self, now: float) -> bool:
        """Whether a direct path that is alive is set aside for its quality (so the session
        is on the relay by choice, and a new punch round would only find that path again)."""
        return any(p.degraded is not None and not self.silent(p, now) for p in self.paths.values())

    def _judge(self, now: float) -> None:
        """Set direct paths that are clearly worse than the relay aside, for ``hold_down``
        seconds at least, and take them back once they are good again."""
        relay = next((p for p in self.paths.values() if p.kind is PathKind.RELAY), None)
        for path in self.paths.values():
            if path.kind is PathKind.RELAY:
                continue
            if relay is None:
                path.degraded = None  # nothing better to go to
            elif path.degraded is None:
                if self.silent(path, now) and not path.checked_while_silent(now):
                    continue  # cut, not bad: staleness hands it over, and it comes back at once
                verdict = _worse(path, relay, now)
                if verdict is not None:
                    path.degraded, path.held_until = verdict, now + self.hold_down
            elif now >= path.held_until and _recovered(path, relay, now):
                path.degraded = None

    def has_kind(self, kind: PathKind) -> bool:
        """Whether a path of ``kind`` is in the set."""
        return any(p.kind is kind for p in self.paths.values())

    def remove(self, path: Path) -> None:
        """Forget a path; pick another current one if it was current."""
        self.paths.pop(path.key, None)
        if self.current is path:
            self.current = None
            best = self._best()
            if best is not None:
                self._switch(best)

    def send(self, datagram: bytes) -> bool:
        """Send over the current path; False when there is none."""
        path = self.current
        if path is None:
            return False
        path.bytes_sent += len(datagram)
        path.datagrams_sent += 1
        path.send_datagram(datagram)
        return True

    def received(self, path: Path, size: int, now: float) -> None:
        """Account a datagram that arrived over ``path`` (already accepted by QUIC's AEAD)."""
        path = self.add(path)
        self._heard(path, now)
        path.bytes_received += size
        path.datagrams_received += 1
        best = self._best(now)
        if best is not None and best is not self.current:
            self._switch(best)

    def _heard(self, path: Path, now: float) -> None:
        """``path`` proved alive at ``now``; if it was silent, judge the silence first."""
        if path.last_received is not None and now - path.last_received > self.stale_after:
            why = path.revived(path.last_received, now)  # a mere cut's losses are forgotten
            lossy = why is not None and path.kind is not PathKind.RELAY and path.degraded is None
            if lossy and self.has_kind(PathKind.RELAY):
                path.degraded, path.held_until = why, now + self.hold_down
        path.last_received = now
        path.checked_unheard = None

    def _best(self, now: float | None = None) -> Path | None:
        if not self.paths:
            return None
        candidates = list(self.paths.values())
        if now is not None:
            # A direct path silent for stale_after loses to any path that is not. The relay
            # counts as alive while it is there: its own connection is kept up separately.
            fresh = [
                p for p in candidates if p.kind is PathKind.RELAY or (p.degraded is None and not self.silent(p, now))
            ]
            candidates = fresh or candidates
        # Prefer the more direct kind; among equals the one heard from most recently.
        best = min(candidates, key=lambda p: (_PREFERENCE[p.kind], -(p.last_received or p.created)))
        current = self.current
        if current is None or current not in candidates or best is current or best.kind is not current.kind:
            return best
        # Same kind: stay unless the current path has gone quiet (a NAT rebinding), so one
        # packet arriving from elsewhere cannot move the session.
        heard = current.last_received or current.created
        best_heard = best.last_received or best.created
        return best if best_heard - heard > self.stale_after else current

    def _switch(self, path: Path) -> None:
        old, self.current = self.current, path
        if self.on_change is not None:
            self.on_change(old, path)


def _worse(path: Path, relay: Path, now: float) -> str | None:
    """Why ``path`` is clearly worse than ``relay`` right now, or None."""
    # Judged as over a full window, but as soon as its verdict is sure: a young path need
    # not wait for ten outcomes once half of any full window it can have is lost.
    lost, count = path.recent_outcomes(now)
    if lost >= DEGRADED_LOSS * LOSS_WINDOW:
        return f"lost {lost / count:.0%} of recent probes"
    mine, theirs = path.base_rtt(), relay.base_rtt()
    if mine is not None and theirs is not None and mine > theirs * DEGRADED_RTT_FACTOR + DEGRADED_RTT_SLACK:
        return f"rtt {mine * 1000:.1f} ms against the relay's {theirs * 1000:.1f} ms"
    return None


def _recovered(path: Path, relay: Path, now: float) -> bool:
    """Whether a path set aside is good again: little recent loss, an RTT near the relay's."""
    loss = path.recent_loss(now)
    if loss is None or loss > RECOVERED_LOSS:
        return False
    mine, theirs = path.base_rtt(), relay.base_rtt()
    if mine is None or theirs is None:
        return True
    return mine <= theirs * RECOVERED_RTT_FACTOR + DEGRADED_RTT_SLACK
