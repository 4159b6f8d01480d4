"""The server's side of the UDP relay transport (frames in wire/rendezvous.py): which
registration a frame belongs to, its MAC, challenges to new endpoints, and relayed data
accepted only from the endpoint that answered one."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable

from peerpath.net import Net
from peerpath.rendezvous.limits import CutOff
from peerpath.rendezvous.presence import Agent, UdpSocket
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint

log = logging.getLogger(__name__)

#: A new UDP endpoint of an agent is challenged at most this often, and at most this many
#: endpoints of one agent have a challenge outstanding.
UDP_CHALLENGE_INTERVAL = 1.0
UDP_CHALLENGES = 4


class RelayUdp:
    """One UDP relay socket of the server (read in batches); hands what it reads to ``received``."""

    def __init__(self, net: Net, host: str, port: int, received: Callable[[bytes, Endpoint, RelayUdp], None]) -> None:
        self._received = received
        self.closed = False
        self._sock = net.bind_udp(host, port, self._datagram)

    def _datagram(self, data: bytes, addr: Endpoint) -> None:
        try:
            self._received(data, addr, self)
        except Exception:
            # Whatever a datagram does, the relay keeps reading.
            log.exception("UDP relay datagram from %s could not be handled", addr)

    def sendto(self, data: bytes, addr: Endpoint) -> bool:
        """Send a datagram (a full socket buffer drops it, as the network may); False if the
        socket is closed."""
        if self.closed:
            return False
        try:
            self._sock.sendto(data, addr)
        except OSError as exc:
            log.debug("UDP relay send to %s failed: %s", addr, exc)
        return True

    def close(self) -> None:
        """Stop reading and close the socket."""
        if not self.closed:
            self.closed = True
            self._sock.close()


class UdpRelay:
    """Registrations by UDP token, and what each UDP frame of theirs does."""

    def __init__(
        self,
        counters: dict[str, int],
        relay: Callable[[Agent, bytes, bytes], None],
        cut_off: Callable[[Agent, CutOff], None],
    ) -> None:
        self.counters = counters
        self._relay = relay
        self._cut_off = cut_off
        #: Agents by the token that names their registration on UDP.
        self.tokens: dict[bytes, Agent] = {}

    def received(self, data: bytes, addr: Endpoint, sock: UdpSocket, now: float) -> None:
        """A datagram on one of the server's UDP relay sockets."""
        try:
            frame = rv.parse_udp_relay(data)
        except rv.FrameError:
            self.counters["udp_malformed"] += 1
            return
        agent = self.tokens.get(frame.token)
        if agent is None or frame.kind not in (rv.UDP_TO_SERVER, rv.UDP_HELLO, rv.UDP_RESPONSE):
            self.counters["udp_unknown_token"] += 1
            return
        if not rv.udp_authentic(agent.udp_key, data):
            self.counters["udp_unauthentic"] += 1
            return
        self.counters["udp_frames"] += 1
        confirmed = addr == agent.udp_endpoint and sock is agent.udp_socket
        if frame.kind == rv.UDP_HELLO:
            if confirmed:
                agent.udp_seen = now
                sock.sendto(rv.encode_udp_ack(agent.token, agent.udp_key), addr)
            else:
                self._challenge(agent, addr, sock, now)
        elif frame.kind == rv.UDP_RESPONSE:
            pending = agent.udp_challenges.get(addr)
            if pending is not None and pending[1] is sock and hmac.compare_digest(pending[0], frame.payload):
                # The agent holds the key and receives at this address: deliver there from now on.
                agent.udp_challenges.clear()
                agent.udp_endpoint, agent.udp_socket, agent.udp_seen = addr, sock, now
                sock.sendto(rv.encode_udp_ack(agent.token, agent.udp_key), addr)
        elif not confirmed:
            # Relayed data only from the endpoint that answered a challenge (else a copy of an
            # agent's frame from anywhere would spend its quota and move its UDP liveness);
            # a NAT that rebound the agent to a new port is asked to prove it at once (a
            # challenge is smaller than the smallest data frame).
            self.counters["udp_unconfirmed"] += 1
            self._challenge(agent, addr, sock, now)
        else:
            agent.udp_seen = now
            try:
                self._relay(agent, frame.address, frame.payload)
            except CutOff as exc:
                self._cut_off(agent, exc)

    def _challenge(self, agent: Agent, addr: Endpoint, sock: UdpSocket, now: float) -> None:
        """Ask a new endpoint to prove it is the agent's: one challenge per endpoint per
        interval, to at most UDP_CHALLENGES endpoints at once (the oldest is forgotten)."""
        pending = agent.udp_challenges.get(addr)
        if pending is not None and now - pending[2] < UDP_CHALLENGE_INTERVAL:
            return
        nonce = os.urandom(rv.UDP_NONCE_BYTES)
        agent.udp_challenges.pop(addr, None)
        agent.udp_challenges[addr] = (nonce, sock, now)
        while len(agent.udp_challenges) > UDP_CHALLENGES:
            del agent.udp_challenges[next(iter(agent.udp_challenges))]
        sock.sendto(rv.encode_udp_challenge(agent.token, agent.udp_key, nonce), addr)
