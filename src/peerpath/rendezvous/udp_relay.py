"""The server's side of the UDP relay transport (frames in wire/rendezvous.py): which
registration a frame belongs to, its MAC, challenges to new endpoints, and relayed data
accepted only from the endpoint that answered one.

Relayed data (most of what arrives) takes a short path: its kind, size and token are checked
in place, its MAC under the registration's keyed state, and its datagram goes on as a view of
the frame, never decoded nor copied until it is sealed for the receiver."""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import os
import socket
import struct
from collections.abc import Callable

from peerpath.net import BoundUdp, DatagramHandler, Net
from peerpath.rendezvous.limits import CutOff
from peerpath.rendezvous.presence import Agent, UdpSocket
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint

#: Relays a datagram from an agent: (source, destination digest, datagram, now).
Relay = Callable[[Agent, bytes, memoryview, float], None]

log = logging.getLogger(__name__)

#: A new UDP endpoint of an agent is challenged at most this often, and at most this many
#: endpoints of one agent have a challenge outstanding.
UDP_CHALLENGE_INTERVAL = 1.0
UDP_CHALLENGES = 4
#: An agent's confirmed UDP endpoint is told to the server's other processes again (that it
#: is still fresh) at most this often.
PATH_REFRESH = 5.0
_DATA = bytes([rv.UDP_TO_SERVER])
_DELIVERY = bytes([rv.UDP_FROM_SERVER])
_TOKEN_END = 1 + rv.TOKEN_BYTES
#: Linux UDP GSO (udp(7), UDP_SEGMENT; Python 3.11's socket module lacks the names): at most
#: this many datagrams, and this many bytes, in one train.
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
GSO_SEGMENTS = 64
GSO_BYTES = 65000
#: What sendmsg fails with where the kernel or the interface cannot segment.
#: The kernel has no UDP GSO at all: trains stop for good.
_NO_GSO = {errno.ENOPROTOOPT, errno.EOPNOTSUPP}
#: This train could not go as one (a segment too large for the route's MTU, a device without
#: checksum offload): it goes one datagram at a time, and the next train is tried again.
_NOT_THIS_TRAIN = {errno.EINVAL, errno.EIO, errno.EMSGSIZE}


class RelayUdp:
    """One UDP relay socket of the server (read in batches); hands what it reads to ``received``.

    Deliveries (relayed datagrams going out) wait until the batch being read is handled, then
    go out together: those for one endpoint in trains of one system call each where the
    kernel segments them (Linux UDP GSO), each on its own elsewhere. Everything else goes at once.
    """

    def __init__(
        self,
        net: Net,
        host: str,
        port: int,
        received: Callable[[bytes, Endpoint, RelayUdp], None],
        *,
        bind: Callable[[str, int, DatagramHandler], BoundUdp] | None = None,
    ) -> None:
        self._received = received
        self.closed = False
        #: The server's address this socket is bound to.
        self.host = host
        self._sock = (bind or net.bind_udp)(host, port, self._datagram)
        kernel = getattr(self._sock, "sock", None)  # the Net's kernel socket, if it is one
        self._gso: socket.socket | None = kernel if isinstance(kernel, socket.socket) else None
        self._deliveries: dict[Endpoint, list[bytes]] = {}
        self._flush_due = False

    def _datagram(self, data: bytes, addr: Endpoint) -> None:
        try:
            self._received(data, addr, self)
        except Exception:
            # Whatever a datagram does, the relay keeps reading.
            log.exception("UDP relay datagram from %s could not be handled", addr)

    def sendto(self, data: bytes, addr: Endpoint) -> bool:
        """Send a datagram (a full socket buffer drops it, as the network may); False if the
        socket is closed. A delivery waits for the end of the batch (:meth:`flush`)."""
        if self.closed:
            return False
        if data[:1] != _DELIVERY:
            self._send(data, addr)
            return True
        waiting = self._deliveries.get(addr)
        if waiting is None:
            self._deliveries[addr] = [data]
        else:
            waiting.append(data)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Send the deliveries waiting: per endpoint, in order, as trains of equal-sized
        datagrams (the last may be shorter) where GSO works."""
        self._flush_due = False
        deliveries, self._deliveries = self._deliveries, {}
        if self.closed:
            return
        for addr, datagrams in deliveries.items():
            first, count = 0, len(datagrams)
            while first < count:
                size = len(datagrams[first])
                end = first + 1
                if self._gso is not None:
                    limit = first + min(GSO_SEGMENTS, GSO_BYTES // size)
                    while end < count and end < limit and len(datagrams[end]) == size:
                        end += 1
                    if end < count and end < limit and len(datagrams[end]) < size:
                        end += 1  # a shorter datagram may end a train
                if end - first == 1:
                    self._send(datagrams[first], addr)
                else:
                    self._send_train(datagrams[first:end], size, addr)
                first = end

    def _send(self, data: bytes, addr: Endpoint) -> None:
        try:
            self._sock.sendto(data, addr)
        except OSError as exc:
            log.debug("UDP relay send to %s failed: %s", addr, exc)

    def _send_train(self, datagrams: list[bytes], size: int, addr: Endpoint) -> None:
        """One system call for ``datagrams`` to one endpoint, cut into ``size``-byte datagrams by
        the kernel (or the NIC); each on its own if the kernel cannot."""
        sock = self._gso
        if sock is None:
            for data in datagrams:
                self._send(data, addr)
            return
        try:
            sock.sendmsg(datagrams, [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, addr)
        except BlockingIOError:
            pass  # the socket buffer is full: dropped, as the network may
        except OSError as exc:
            if exc.errno in _NO_GSO:
                log.info("no UDP GSO on this host (%s): relayed datagrams go one by one", exc.strerror or exc)
                self._gso = None
            elif exc.errno not in _NOT_THIS_TRAIN:
                log.debug("UDP relay send to %s failed: %s", addr, exc)
                return
            for data in datagrams:  # an agent's choice of sizes never turns GSO off for everyone
                self._send(data, addr)

    def close(self) -> None:
        """Stop reading and close the socket."""
        if not self.closed:
            self.closed = True
            self._deliveries.clear()
            self._sock.close()


class UdpRelay:
    """Registrations by UDP token, and what each UDP frame of theirs does."""

    def __init__(
        self,
        counters: dict[str, int],
        relay: Relay,
        cut_off: Callable[[Agent, CutOff], None],
    ) -> None:
        self.counters = counters
        self._relay = relay
        self._cut_off = cut_off
        #: Agents by the token that names their registration on UDP.
        self.tokens: dict[bytes, Agent] = {}
        #: Told when an agent's UDP endpoint is confirmed, and again (at most every
        #: PATH_REFRESH seconds) when a hello from it says it is still there.
        self.on_path: Callable[[Agent, UdpSocket], None] | None = None
        #: Told when a resting agent says goodbye from its confirmed endpoint (it goes offline).
        self.on_goodbye: Callable[[Agent], None] | None = None
        #: With several processes (:mod:`.workers`): this one's number, which the first byte of
        #: the token of every agent whose quota it holds names. Frames of other processes'
        #: agents are dropped, so an agent's quota is spent in one place even where the
        #: kernel does not steer datagrams (every process keeps a replica of every agent).
        self.process: int | None = None

    def received(self, data: bytes, addr: Endpoint, sock: UdpSocket, now: float) -> None:
        """A datagram on one of the server's UDP relay sockets."""
        if self.process is not None and len(data) > 1 and data[1] != self.process:
            self.counters["udp_other_process"] = self.counters.get("udp_other_process", 0) + 1
            return
        if data[:1] == _DATA and rv.UDP_DATA_MIN <= len(data) <= rv.UDP_DATA_MAX:
            self._data(data, addr, sock, now)
            return
        try:
            frame = rv.parse_udp_relay(data)
        except rv.FrameError:
            self.counters["udp_malformed"] += 1
            return
        agent = self.tokens.get(frame.token)
        # (Relayed data went the short way above: parse_udp_relay takes no other data frame.)
        if agent is None or frame.kind not in (rv.UDP_HELLO, rv.UDP_RESPONSE, rv.UDP_GOODBYE):
            self.counters["udp_unknown_token"] += 1
            return
        if not rv.udp_authentic(agent.udp_key, data):
            self.counters["udp_unauthentic"] += 1
            return
        self.counters["udp_frames"] += 1
        confirmed = addr == agent.udp_endpoint and sock is agent.udp_socket
        if frame.kind == rv.UDP_GOODBYE:
            if confirmed and agent.rests and self.on_goodbye is not None:
                self.on_goodbye(agent)  # (a connected agent goes offline by closing its connection)
        elif frame.kind == rv.UDP_HELLO:
            sequence = rv.hello_sequence(frame)
            if sequence and sequence <= agent.hello_sequence:
                self.counters["udp_replayed"] = self.counters.get("udp_replayed", 0) + 1
                return  # a copy of an old hello: it proves nothing
            if confirmed:
                # (Only here: a copy that raced the agent's hello from elsewhere draws a
                # challenge there, and leaves the real one to count.)
                agent.hello_sequence = max(agent.hello_sequence, sequence)
                agent.udp_seen = agent.hello_seen = now
                sock.sendto(rv.encode_udp_ack(agent.token, agent.udp_key), addr)
                if self.on_path is not None and now - agent.udp_told >= PATH_REFRESH:
                    agent.udp_told = now
                    self.on_path(agent, sock)
            else:
                self._challenge(agent, addr, sock, now, sequence)
        else:
            pending = agent.udp_challenges.get(addr)
            if pending is not None and pending[1] is sock and hmac.compare_digest(pending[0], frame.payload):
                # The agent holds the key and receives at this address: deliver there from now on.
                agent.udp_challenges.clear()
                agent.udp_endpoint, agent.udp_socket, agent.udp_seen = addr, sock, now
                agent.hello_seen = now
                agent.hello_sequence = max(agent.hello_sequence, pending[3])  # the hello it answered
                sock.sendto(rv.encode_udp_ack(agent.token, agent.udp_key), addr)
                if self.on_path is not None:
                    agent.udp_told = now
                    self.on_path(agent, sock)

    def _data(self, data: bytes, addr: Endpoint, sock: UdpSocket, now: float) -> None:
        """An agent's relayed datagram (0x90, of a size one may have)."""
        agent = self.tokens.get(data[1:_TOKEN_END])
        if agent is None:
            self.counters["udp_unknown_token"] += 1
            return
        if not rv.udp_authentic_under(agent.mac, data):
            self.counters["udp_unauthentic"] += 1
            return
        self.counters["udp_frames"] += 1
        if addr != agent.udp_endpoint or sock is not agent.udp_socket:
            # Relayed data only from the endpoint that answered a challenge (else a copy of an
            # agent's frame from anywhere would spend its quota and move its UDP liveness);
            # a NAT that rebound the agent to a new port is asked to prove it at once (a
            # challenge is smaller than the smallest data frame).
            self.counters["udp_unconfirmed"] += 1
            self._challenge(agent, addr, sock, now)
            return
        agent.udp_seen = now
        try:
            datagram = memoryview(data)[rv.UDP_DATA_HEAD : -rv.MAC_BYTES]
            self._relay(agent, data[_TOKEN_END : rv.UDP_DATA_HEAD], datagram, now)
        except CutOff as exc:
            self._cut_off(agent, exc)

    def _challenge(self, agent: Agent, addr: Endpoint, sock: UdpSocket, now: float, sequence: int = 0) -> None:
        """Ask a new endpoint to prove it is the agent's: one challenge per endpoint per
        interval, to at most UDP_CHALLENGES endpoints at once (the oldest is forgotten)."""
        pending = agent.udp_challenges.get(addr)
        if pending is not None and now - pending[2] < UDP_CHALLENGE_INTERVAL:
            return
        nonce = os.urandom(rv.UDP_NONCE_BYTES)
        agent.udp_challenges.pop(addr, None)
        agent.udp_challenges[addr] = (nonce, sock, now, sequence)
        while len(agent.udp_challenges) > UDP_CHALLENGES:
            del agent.udp_challenges[next(iter(agent.udp_challenges))]
        sock.sendto(rv.encode_udp_challenge(agent.token, agent.udp_key, nonce), addr)
