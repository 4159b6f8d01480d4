"""An agent online at a rendezvous server: its link, quotas, relay counters and UDP state."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

from peerpath.identity import Address
from peerpath.ratelimit import TokenBucket
from peerpath.rendezvous.links import Link
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint

#: Relayed frames queued for a slow agent beyond this many bytes are dropped (UDP-like).
SEND_HIGH_WATER = 1 << 20
#: The server delivers over UDP only to agents heard from over UDP this recently.
UDP_FRESH = 30.0


class UdpSocket(Protocol):
    """One of the server's UDP relay sockets, as an agent's state refers to it."""

    def sendto(self, data: bytes, addr: Endpoint) -> bool:
        """Send a datagram; False if the socket is closed."""
        ...


@dataclass(eq=False)
class Agent:
    """A registered agent."""

    address: Address
    link: Link
    observed: str
    connected: float
    relay_quota: TokenBucket
    control_quota: TokenBucket
    last_seen: float
    #: Messages dropped in a row for each quota ("relay", "control"); one spent resets its own.
    overquota: dict[str, int] = field(default_factory=dict)
    #: Letters handed over and not yet acknowledged: when none are left, the next batch goes.
    letters_out: set[int] = field(default_factory=set)
    relayed_in: int = 0
    relayed_out: int = 0
    #: Names this registration on UDP (in the clear); ``udp_key`` authenticates its frames.
    token: bytes = field(default_factory=lambda: os.urandom(rv.TOKEN_BYTES))
    udp_key: bytes = field(default_factory=lambda: os.urandom(rv.UDP_KEY_BYTES))
    home_relay: str | None = None
    udp_ready: bool = False
    #: Where relayed datagrams go over UDP: only an endpoint that answered a challenge.
    udp_endpoint: Endpoint | None = None
    udp_socket: UdpSocket | None = None
    udp_seen: float = 0.0
    #: Challenges outstanding, by the endpoint they went to: (nonce, socket, when sent). A
    #: few at once, so copies of a hello replayed from one address cannot hold the agent's
    #: real new endpoint back.
    udp_challenges: dict[Endpoint, tuple[bytes, UdpSocket, float]] = field(default_factory=dict)

    def send(self, frame: bytes) -> bool:
        """Queue a frame on the agent's link; False (dropped) if it is closing or backed up."""
        if self.link.is_closing() or self.link.buffered() > SEND_HIGH_WATER:
            return False
        self.link.write(frame)
        return True

    def deliver(self, source: bytes, datagram: bytes, now: float) -> bool:
        """Hand a relayed datagram to this agent: over UDP when it asked for that, else TLS."""
        if (
            self.udp_ready
            and self.udp_socket is not None
            and self.udp_endpoint is not None
            and now - self.udp_seen < UDP_FRESH
        ):
            return self.udp_socket.sendto(rv.encode_udp_delivery(self.udp_key, source, datagram), self.udp_endpoint)
        return self.send(rv.encode_relay(source, datagram))
