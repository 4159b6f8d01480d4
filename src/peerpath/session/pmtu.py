"""How large a datagram a direct UDP path carries: packetization-layer path MTU discovery
(RFC 8899, DPLPMTUD), sans-I/O.

Every path starts at :data:`BASE_DATAGRAM`, the size QUIC uses where nothing is known. On a
direct UDP path the node sends probes: connectivity checks padded to a candidate size, with
the don't-fragment bit set on the socket, so a probe that is too large for any link on the
way is lost instead of fragmented. The peer answers each with a small response, so an
answer proves the size gets through in our direction. Candidates go up a short ladder (a
1500-byte Ethernet MTU, a 9000-byte jumbo MTU, and the largest datagram the QUIC engine
builds, which loopback carries); a candidate lost :data:`MAX_PROBES` times in a row ends the
search at the size before it.

A path that was fine can shrink (a route change): the current size is confirmed every
:data:`CONFIRM_INTERVAL` seconds, and if that probe is lost :data:`MAX_PROBES` times the path
drops back to the base size and searches again (RFC 8899 4.3, black hole detection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: What every path carries until a probe proves more (the QUIC packets of a session's start).
BASE_DATAGRAM = 1350
#: The largest datagram the QUIC engine builds (aioquic encodes packet lengths in 2 bytes).
MAX_DATAGRAM = 16384
#: UDP payloads that fill a 1500-byte and a 9000-byte MTU (IPv4: 20 + 8 bytes of headers;
#: IPv6: 40 + 8), then the engine's maximum.
LADDER_IPV4 = (1472, 8972, MAX_DATAGRAM)
LADDER_IPV6 = (1452, 8952, MAX_DATAGRAM)
#: Unanswered probes of one size after which that size is taken not to fit (RFC 8899 5.1.2).
MAX_PROBES = 3
#: Seconds after which an unanswered probe counts as lost.
PROBE_TIMEOUT = 2.0
#: Seconds between confirmations that the current size still gets through.
CONFIRM_INTERVAL = 30.0
#: Seconds after a finished search before the sizes above are tried again (RFC 8899 5.1.1).
RAISE_INTERVAL = 600.0


@dataclass(eq=False)
class MtuSearch:
    """The datagram size of one path and the search for a larger one."""

    ladder: tuple[int, ...] = LADDER_IPV4
    #: What the path is known to carry.
    size: int = BASE_DATAGRAM
    #: The next rung to try (``len(ladder)``: none left).
    _rung: int = 0
    #: Unanswered probes in flight: tid -> (size, when sent).
    _pending: dict[bytes, tuple[int, float]] = field(default_factory=dict)
    #: Consecutive probes of the size being tried that were lost.
    _lost: int = 0
    #: When the next confirmation or raise is due (0: searching).
    _idle_until: float = 0.0
    _raise_at: float = 0.0

    @classmethod
    def for_host(cls, host: str) -> MtuSearch:
        """The search for a path to ``host`` (its address family decides the ladder)."""
        return cls(LADDER_IPV6 if ":" in host else LADDER_IPV4)

    @property
    def searching(self) -> bool:
        """Whether a larger size is being tried."""
        return self._idle_until == 0.0

    def due(self, now: float) -> int | None:
        """The size to probe now, or None (a probe is already out, or nothing is due)."""
        self._expire(now)
        if self._pending:
            return None
        if self.searching:
            while self._rung < len(self.ladder) and self.ladder[self._rung] <= self.size:
                self._rung += 1
            if self._rung < len(self.ladder):
                return self.ladder[self._rung]
            self._finish(now)
        if now >= self._raise_at and self._rung < len(self.ladder):
            self._idle_until = 0.0  # try the sizes above again
            return self.ladder[self._rung]
        if self.size > BASE_DATAGRAM and now >= self._idle_until:
            return self.size  # confirm it still fits
        return None

    def sent(self, tid: bytes, size: int, now: float) -> None:
        """A probe of ``size`` bytes left with transaction id ``tid``."""
        self._pending[tid] = (size, now)

    def answered(self, tid: bytes, now: float) -> bool:
        """The answer to probe ``tid`` came back: whether the path's size grew."""
        probe = self._pending.pop(tid, None)
        if probe is None:
            return False
        size, _ = probe
        self._lost = 0
        if size > self.size:
            self.size = size
            self._rung += 1
            return True
        if not self.searching:
            self._idle_until = now + CONFIRM_INTERVAL
        return False

    def _expire(self, now: float) -> None:
        for tid, (size, sent) in list(self._pending.items()):
            if now - sent < PROBE_TIMEOUT:
                continue
            del self._pending[tid]
            self._lost += 1
            if self._lost < MAX_PROBES:
                continue
            self._lost = 0
            if size > self.size:  # this rung does not fit: the search ends below it
                self._finish(now)
            elif size == self.size and size > BASE_DATAGRAM:  # a black hole: start over
                self.size, self._rung, self._idle_until = BASE_DATAGRAM, 0, 0.0

    def _finish(self, now: float) -> None:
        self._idle_until = now + CONFIRM_INTERVAL
        self._raise_at = now + RAISE_INTERVAL
