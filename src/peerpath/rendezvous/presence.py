"""An agent online at a rendezvous server: its link, quotas, relay counters and UDP state.

A server keeps ten thousand of these, so an agent is a slotted object whose rarely used parts
(letters in flight, quota overruns, relayed bytes waiting for its link) exist only while used.
An idle agent may rest on UDP (:class:`~peerpath.wire.rendezvous.Rest`): its connection closes,
its link is :data:`RESTING`, and what is left of it here is this object.
"""

from __future__ import annotations

import os
import ssl
from typing import Any, Protocol

from peerpath.identity import Address
from peerpath.ratelimit import TokenBucket
from peerpath.rendezvous.limits import CutOff
from peerpath.rendezvous.links import WritableLink
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


class _Resting:
    """The link of an agent resting on UDP: it has no connection, so nothing is written to it."""

    __slots__ = ()

    def peername(self) -> Any:
        return None

    def ssl_object(self) -> ssl.SSLObject | None:
        return None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def buffered(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return True

    def close(self) -> None:
        pass


#: The link of every agent resting on UDP.
RESTING: WritableLink = _Resting()


class Agent:
    """A registered agent."""

    __slots__ = (
        "_mac",
        "_udp_key",
        "address",
        "connected",
        "control_quota",
        "hello_seen",
        "hello_sequence",
        "home_relay",
        "last_seen",
        "letters_out",
        "link",
        "observed",
        "outbox",
        "outbox_bytes",
        "overquota",
        "relay_quota",
        "relayed_in",
        "relayed_out",
        "resting",
        "token",
        "udp_challenges",
        "udp_endpoint",
        "udp_ready",
        "udp_seen",
        "udp_socket",
        "udp_told",
        "wake",
    )

    def __init__(
        self,
        address: Address,
        link: WritableLink,
        observed: str,
        *,
        connected: float,
        relay_quota: TokenBucket,
        control_quota: TokenBucket,
        last_seen: float,
    ) -> None:
        self.address = address
        self.link = link
        self.observed = observed
        self.connected = connected
        self.relay_quota = relay_quota
        self.control_quota = control_quota
        self.last_seen = last_seen
        #: Messages dropped in a row for each quota ("relay", "control", ...) that has any.
        self.overquota: dict[str, int] | None = None
        #: Letters handed over and not yet acknowledged: when none are left, the next batch goes.
        self.letters_out: set[int] | None = None
        self.relayed_in = 0
        self.relayed_out = 0
        #: Names this registration on UDP (in the clear); ``udp_key`` authenticates its frames.
        self.token = os.urandom(rv.TOKEN_BYTES)
        self._udp_key = os.urandom(rv.UDP_KEY_BYTES)
        self._mac: rv.UdpMac | None = None
        self.home_relay: str | None = None
        self.udp_ready = False
        #: Where relayed datagrams go over UDP: only an endpoint that answered a challenge.
        self.udp_endpoint: Endpoint | None = None
        self.udp_socket: UdpSocket | None = None
        self.udp_seen = 0.0
        #: The last hello's sequence number, and when the agent last proved itself alive over
        #: UDP (a hello numbered higher than any before, or an answered challenge): what keeps
        #: a resting agent registered (a replayed frame does not).
        self.hello_sequence = 0
        self.hello_seen = 0.0
        #: When the server's other processes were last told of the UDP endpoint (mesh.py).
        self.udp_told = 0.0
        #: Challenges outstanding, by the endpoint they went to: (nonce, socket, when sent, the
        #: sequence number of the hello that drew it). A few at once, so copies of a hello
        #: replayed from one address cannot hold the agent's real new endpoint back.
        self.udp_challenges: dict[Endpoint, tuple[bytes, UdpSocket, float, int]] = {}
        #: Relayed frames for the link (their parts, and how many bytes), gathered while the
        #: frames that bring them are read and written together (one TLS record and one send
        #: for many datagrams); None when empty.
        self.outbox: list[bytes | memoryview] | None = None
        self.outbox_bytes = 0
        #: The agent asked to rest on UDP and was told yes (its link is RESTING once its
        #: connection is over); ``wake``: something waits for it that needs a connection.
        self.resting = False
        self.wake = False

    @property
    def rests(self) -> bool:
        """Whether the agent rests on UDP: registered, with no connection."""
        return self.link is RESTING

    @property
    def udp_key(self) -> bytes:
        """The key of this registration's UDP frames (handed to the agent over TLS)."""
        return self._udp_key

    @udp_key.setter
    def udp_key(self, key: bytes) -> None:
        self._udp_key, self._mac = key, None

    @property
    def mac(self) -> rv.UdpMac:
        """The keyed MAC of this registration's UDP frames (made at first use)."""
        if self._mac is None:
            self._mac = rv.udp_mac(self._udp_key)
        return self._mac

    def send(self, frame: bytes) -> bool:
        """Write a frame to the agent's link; False (dropped) if it is closing or backed up."""
        link = self.link
        if link.is_closing() or link.buffered() > SEND_HIGH_WATER:
            return False
        link.write(frame)
        return True

    def udp_path(self, now: float) -> tuple[UdpSocket, Endpoint] | None:
        """Where relayed datagrams go over UDP, if the agent asked for that and was heard from
        there lately; None: over its link."""
        if not self.udp_ready or now - self.udp_seen >= UDP_FRESH:
            return None
        if self.udp_socket is None or self.udp_endpoint is None:
            return None
        return self.udp_socket, self.udp_endpoint

    def over(self, quota: str, cutoff: int) -> None:
        """One more message dropped for ``quota``; an agent that keeps at it is cut off."""
        runs = self.overquota
        if runs is None:
            runs = self.overquota = {}
        run = runs[quota] = runs.get(quota, 0) + 1
        if run >= cutoff:
            raise CutOff(f"{quota} quota exceeded {run} times in a row")

    def within(self, quota: str) -> None:
        """A message within ``quota``: its run of drops is over."""
        if self.overquota is not None:
            self.overquota.pop(quota, None)

    def letter_out(self, letter_id: int) -> None:
        """A letter was handed over and waits for its acknowledgement."""
        if self.letters_out is None:
            self.letters_out = set()
        self.letters_out.add(letter_id)

    def letter_acknowledged(self, letter_id: int) -> bool:
        """A letter was acknowledged; True if it was the last of the batch."""
        if not self.letters_out:
            return False
        self.letters_out.discard(letter_id)
        if self.letters_out:
            return False
        self.letters_out = None
        return True
