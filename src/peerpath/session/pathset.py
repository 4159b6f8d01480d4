"""The path set: QUIC sees one stable peer; the path set moves its datagrams.

Every path carries the same already-encrypted QUIC datagrams, so a path adds no
security of its own and needs none. Paths send through a callable their owner
supplies, and time comes in as ``now`` (read from :data:`clock` by the driver).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from peerpath.wire.endpoint import format_endpoint, parse_endpoint

__all__ = ["VIRTUAL_PEER", "Path", "PathKind", "PathSet", "clock", "format_endpoint", "parse_endpoint"]

#: The address QUIC believes its peer has; the real one is the path set's business.
VIRTUAL_PEER = ("peerpath-peer", 0)
#: The session layer's clock (seconds). High resolution whatever the event loop's own
#: clock is: aioquic's pacing spins on a millisecond clock such as uvloop's.
clock = time.perf_counter


class PathKind(enum.StrEnum):
    """How a path reaches the peer. Order of preference: direct first."""

    DIRECT_UDP = "direct udp"
    DIRECT_TCP = "direct tcp"
    RELAY = "relay"


_PREFERENCE = {PathKind.DIRECT_UDP: 0, PathKind.DIRECT_TCP: 1, PathKind.RELAY: 2}


@dataclass(eq=False)
class Path:
    """One way to reach the peer, with its counters."""

    kind: PathKind
    remote: str
    send_datagram: Callable[[bytes], None]
    created: float = 0.0
    last_received: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    #: Liveness probes on this path, and how many were answered (direct paths).
    probes_sent: int = 0
    probes_answered: int = 0

    @property
    def key(self) -> tuple[PathKind, str]:
        """What identifies the path within its set."""
        return (self.kind, self.remote)

    def describe(self) -> str:
        """Human form, e.g. ``direct udp 198.51.100.7:41641``."""
        return f"{self.kind.value} {self.remote}"

    def quality(self, now: float) -> dict[str, object]:
        """Counters, age, when last heard from, and probe loss (None until probed)."""
        return {
            "path": self.describe(),
            "age_s": round(now - self.created, 1),
            "heard_s_ago": round(now - self.last_received, 1) if self.last_received is not None else None,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "loss": round(1 - self.probes_answered / self.probes_sent, 3) if self.probes_sent else None,
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
        path = self.add(path)
        path.last_received = now
        self.tick(now)
        return path

    def tick(self, now: float) -> None:
        """Re-evaluate the choice as time passes: a direct path that has gone silent for
        ``stale_after`` seconds while a relay path exists hands the traffic to the relay."""
        best = self._best(now)
        if best is not None and best is not self.current:
            self._switch(best)

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
        path.bytes_received += size
        path.datagrams_received += 1
        path.last_received = now
        best = self._best(now)
        if best is not None and best is not self.current:
            self._switch(best)

    def _best(self, now: float | None = None) -> Path | None:
        if not self.paths:
            return None
        candidates = list(self.paths.values())
        if now is not None:
            # A direct path silent for stale_after loses to any path that is not. The relay
            # counts as alive while it is there: its own connection is kept up separately.
            fresh = [
                p
                for p in candidates
                if p.kind is PathKind.RELAY or now - (p.last_received or p.created) <= self.stale_after
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
