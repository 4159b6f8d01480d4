"""Token buckets: one for an agent's quota, and a table of them per source with a bound on its
size (the least recently seen source is forgotten; it would start with a full bucket anyway).
Pure: time comes in as ``now``. Used by the STUN server per IP and by the rendezvous server
per agent and per client network."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class TokenBucket:
    """``take(n, now)`` is True while the rate and burst allow it."""

    __slots__ = ("burst", "level", "rate", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.level, self.updated = rate, burst, burst, now

    def take(self, amount: float, now: float) -> bool:
        """Spend ``amount`` if the bucket holds it."""
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if self.level < amount:
            return False
        self.level -= amount
        return True


@dataclass
class RateLimiter:
    """A token bucket per source, in a table of at most ``max_sources`` (least recently seen
    evicted)."""

    rate: float = 50.0
    burst: float = 100.0
    max_sources: int = 65536
    _buckets: OrderedDict[str, TokenBucket] = field(default_factory=OrderedDict)

    def allow(self, source: str, now: float) -> bool:
        """Take one token for ``source`` at time ``now``; False when it has none left."""
        bucket = self._buckets.pop(source, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
        self._buckets[source] = bucket
        return bucket.take(1.0, now)
