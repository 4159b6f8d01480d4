"""What a rendezvous server lets one agent, one address and everyone together use (the
numbers are listed in docs/security.md). Enforced with the token buckets of
:mod:`peerpath.ratelimit`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from peerpath.ratelimit import RateLimiter


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
    #: Directory writes per agent (name claims and releases, tag profiles; one of each is sent at
    #: every registration), and burst; searches per agent, and burst.
    name_rate: float = 1 / 60
    name_burst: float = 10.0
    find_rate: float = 1.0
    find_burst: float = 20.0
    #: Names claimed in all, and public tag profiles kept in all (online agents' and those of
    #: agents gone for less than ``directory.PROFILE_KEEP``).
    max_names: int = 100_000
    max_profiles: int = 20_000


#: Client networks whose registration rate is tracked at once; beyond it, the least recently
#: seen is forgotten (it would start with a full bucket anyway).
MAX_TRACKED_NETWORKS = 100_000


class CutOff(Exception):
    """An agent broke its limits and is disconnected."""


def registration_rate(limits: ServerLimits) -> RateLimiter:
    """Registrations per client network (:func:`client_network`), within ``limits``."""
    return RateLimiter(limits.register_rate, limits.register_burst, MAX_TRACKED_NETWORKS)


def client_network(host: str) -> str:
    """What the per-IP limits count by: the address, or its /64 for IPv6 (one subscriber's)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
