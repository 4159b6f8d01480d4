"""Agents resting on UDP: an idle agent closes its connection and stays registered on the
UDP relay alone (:class:`~peerpath.wire.rendezvous.Rest`), so that ten thousand idle agents
cost the server their registrations, not ten thousand TLS connections.

A resting agent is still online: lookups find it, and relayed datagrams reach it over UDP. It
is alive for as long as its UDP hellos arrive (an agent silent there for REST_SILENT seconds is
dropped). What needs its connection, a letter posted for it, is said with a UDP wake, sent again
every few seconds until the agent has registered anew (a wake may be lost, as any datagram).
"""

from __future__ import annotations

import logging

from peerpath.rendezvous.presence import Agent
from peerpath.wire import rendezvous as rv

log = logging.getLogger("peerpath.rendezvous.server")

#: A resting agent not heard from over UDP for this long is dropped (its hellos come every 10 s).
REST_SILENT = 45.0


class Rests:
    """Which agents may rest, and the wakes of those that something waits for."""

    def __init__(self, counters: dict[str, int]) -> None:
        self.counters = counters
        counters.setdefault("rests", 0)
        counters.setdefault("rests_refused", 0)
        counters.setdefault("wakes", 0)
        #: Resting agents woken that have not registered anew yet (their wakes go again).
        self._waking: set[Agent] = set()

    def answer(self, agent: Agent, request: rv.Rest, now: float, letters_waiting: bool) -> rv.Outcome:
        """Whether ``agent`` may rest: only with a UDP path the server confirmed lately (else
        nothing would reach it) and no letters waiting for it, delivered or not."""
        if agent.udp_path(now) is None:
            reason = "no confirmed UDP relay path: stay connected"
        elif not agent.hello_sequence:
            reason = "your UDP hellos are not numbered: stay connected"
        elif agent.letters_out or letters_waiting:
            reason = "letters wait for you"
        else:
            agent.resting = True
            self.counters["rests"] += 1
            return rv.Outcome(request.id, True)
        self.counters["rests_refused"] += 1
        return rv.Outcome(request.id, False, reason)

    def wake(self, agent: Agent) -> None:
        """Something waits for ``agent`` that needs its connection: a wake now, and again with
        every :meth:`retry` until it has registered anew."""
        agent.wake = True
        if agent not in self._waking:  # one wake at a time, however many letters come
            self._waking.add(agent)
            self._send_wake(agent)

    def rested(self, agent: Agent) -> None:
        """``agent``'s connection is over and it rests: a wake at once if one is due (a letter
        came between the yes and the end of its connection)."""
        if agent.wake:
            self._send_wake(agent)

    def retry(self, agents: dict[bytes, Agent]) -> None:
        """Wake again the agents still resting that were woken (one told yes whose connection
        is not over yet waits for it; those that registered anew, stayed, or went offline are
        forgotten here)."""
        for agent in list(self._waking):
            if not agent.resting or agents.get(agent.address.digest) is not agent:
                self._waking.discard(agent)
            elif agent.rests:
                self._send_wake(agent)

    def forget(self, agent: Agent) -> None:
        """``agent`` is offline (or replaced by a new registration)."""
        self._waking.discard(agent)

    def _send_wake(self, agent: Agent) -> None:
        sock, endpoint = agent.udp_socket, agent.udp_endpoint
        if sock is None or endpoint is None:
            return
        self.counters["wakes"] += 1
        sock.sendto(rv.encode_udp_wake(agent.token, agent.udp_key), endpoint)


def silent_too_long(agent: Agent, now: float) -> bool:
    """Whether a resting agent's UDP hellos stopped (it is gone, or its NAT forgot it): only
    fresh ones count, so copies replayed by someone on the path keep nobody registered."""
    return now - agent.hello_seen > REST_SILENT
