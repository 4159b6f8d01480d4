"""What a rendezvous server lets one agent, one address and everyone together use (the
numbers are listed in docs/security.md), and the token buckets that enforce them. Pure: no
I/O, time comes in as ``now``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    """What one agent, one address and everyone together may use of a server (docs/security.md)."""

    #: Sustained relayed bytes per second an agent may send.
    relay_rate: float = 16 * 1024 * 1024
    #: Relay burst allowance in bytes.
    relay_burst: float = 32 * 1024 * 1024
    #: An agent that keeps exceeding a quota is cut off after this many dropped frames in a row.
    cutoff_drops: int = 5000
    #: Control messages (lookups, letters, pings...) per second an agent may send, and burst.
    control_rate: float = 20.0
    control_burst: float = 200.0
    #: Agents registered at once; connections open at once (registered or not), in all and per IP.
    max_agents: int = 10_000
    max_connections: int = 20_000
    max_connections_per_ip: int = 64
    #: Registrations per second from one client IP (its /64 for IPv6), and burst: identities
    #: cost nothing to make, so what one address may register is what bounds them.
    register_rate: float = 1.0
    register_burst: float = 64.0


#: Client networks whose registration rate is tracked at once; beyond it, those whose
#: bucket has refilled are forgotten (they would start full anyway).
MAX_TRACKED_NETWORKS = 100_000


class CutOff(Exception):
    """An agent broke its limits and is disconnected."""


class TokenBucket:
    """A token bucket: ``take(n, now)`` is True while the rate and burst allow it."""

    __slots__ = ("burst", "level", "rate", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.level, self.updated = rate, burst, burst, now

    def take(self, amount: float, now: float) -> bool:
        """Spend ``amount`` if the bucket holds it."""
        self._refill(now)
        if self.level < amount:
            return False
        self.level -= amount
        return True

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled (it holds nothing a fresh one would not)."""
        self._refill(now)
        return self.level >= self.burst

    def _refill(self, now: float) -> None:
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now


class RegistrationRate:
    """Registrations per client network, each network's own bucket; a bounded table."""

    def __init__(self, limits: ServerLimits) -> None:
        self._limits = limits
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, network: str, now: float) -> bool:
        """Whether ``network`` may register one more identity now."""
        bucket = self._buckets.get(network)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_NETWORKS:
                self._buckets = {key: kept for key, kept in self._buckets.items() if not kept.full(now)}
            bucket = self._buckets[network] = TokenBucket(self._limits.register_rate, self._limits.register_burst, now)
        return bucket.take(1, now)


def client_network(host: str) -> str:
    """What the per-IP limits count by: the address, or its /64 for IPv6 (one subscriber's)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
