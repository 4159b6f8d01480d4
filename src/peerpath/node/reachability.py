"""Where and how a node can be reached: its candidates (local, port-mapped, server-reflexive;
UDP and TCP), what it knows of its NAT (the mapping hint from two STUN answers, then the
full netcheck), and the snapshot a punch round starts from (port prediction included).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from peerpath import errors
from peerpath.clock import Clock
from peerpath.nat.netcheck import netcheck
from peerpath.nat.portmap import PortMappings
from peerpath.nat.ports import port_step
from peerpath.nat.stun_client import UdpStunSocket
from peerpath.nat.traversal import NAT_WAIT, PREDICT_WAIT, LocalSide, prediction_wanted
from peerpath.net import Net
from peerpath.node.sockets import UdpSocket, UdpSockets
from peerpath.node.tcp import TcpLinks
from peerpath.rendezvous.client import RendezvousClient
from peerpath.tasks import spawn
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint, format_endpoint, parse_endpoint
from peerpath.wire.stun import Address as TransportAddress

log = logging.getLogger(__name__)

#: netcheck runs again after a re-registration only if its last result is older than this.
NAT_RECHECK = 600.0
#: What of a netcheck result the node keeps (and offers peers in punch rounds).
NAT_REPORT = frozenset(
    {"udp", "nat", "public_address", "mapping", "filtering", "hairpinning", "port_preserving", "port_step"}
)


class Reachability:
    """One node's candidates and NAT knowledge, learned anew at every registration."""

    def __init__(self, net: Net, udp: UdpSockets, tcp: TcpLinks, portmap: PortMappings, clock: Clock) -> None:
        self._net = net
        self._udp = udp
        self._tcp = tcp
        self._portmap = portmap
        self._clock = clock
        #: The rendezvous server's client (the node sets it when it registers).
        self.rendezvous: RendezvousClient | None = None
        #: Where the server's STUN port sees the node's socket.
        self.reflexive: Endpoint | None = None
        #: Mapping behaviour from two STUN answers on the node's own socket (before netcheck).
        self.mapping_hint: str | None = None
        #: What netcheck found about the NAT (told only to peers, inside sessions).
        self.nat: dict[str, Any] | None = None
        #: The server's STUN addresses from the last registration.
        self.stun_servers: list[str] = []
        self._nat_checked = float("-inf")
        self._nat_task: asyncio.Task[None] | None = None
        self._reflexive_task: asyncio.Task[None] | None = None

    # -- learning -----------------------------------------------------------------------------

    def registered(self, registered: rv.Registered) -> None:
        """After every registration: ask the server's STUN where we are, and (at most every
        :data:`NAT_RECHECK` seconds) run netcheck against it."""
        stun = list(registered.stun)
        self.stun_servers = stun
        if not stun:
            return
        if self._clock() - self._nat_checked > NAT_RECHECK and self._nat_task is None:
            self._nat_task = spawn(self._check_nat(stun), "netcheck")
        if self._reflexive_task is not None:
            self._reflexive_task.cancel()  # a re-registration's answers replace the last ones
        self._reflexive_task = spawn(self._learn_reflexive(stun), "learning the reflexive address")

    async def learned(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the STUN answers of the last registration (the reflexive
        address and the mapping hint), if they are on the way."""
        task = self._reflexive_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)

    async def _learn_reflexive(self, stun: list[str]) -> None:
        """The address the server's STUN port sees this node's socket at (a punch candidate),
        then the one its second address sees: the same port means the NAT maps independently
        of the destination (RFC 5780 mapping test II), a first hint of how to punch that
        arrives well before the full netcheck."""
        self.reflexive = await self._udp.stun_mapped(stun[0]) or self.reflexive
        if self.reflexive is not None and len(stun) > 1:
            other = await self._udp.stun_mapped(stun[1])
            if other is not None:
                self.mapping_hint = "endpoint-independent" if other == self.reflexive else "endpoint-dependent"

    async def _check_nat(self, stun: list[str]) -> None:
        try:
            result = await netcheck(
                TransportAddress(*parse_endpoint(stun[0])),
                timeout=2.0,
                open_socket=functools.partial(UdpStunSocket.open, net=self._net, clock=self._clock),
                clock=self._clock,
            )
            self.nat = {key: value for key, value in result.to_json().items() if key in NAT_REPORT}
            self._nat_checked = self._clock()
            log.info("netcheck: %s", result.verdict())
        except (OSError, ValueError, errors.PeerpathError) as exc:
            log.info("netcheck against %s failed: %s", stun[0], exc)
        finally:
            self._nat_task = None

    def close(self) -> None:
        """Stop learning."""
        for task in (self._nat_task, self._reflexive_task):
            if task is not None:
                task.cancel()

    # -- what peers are told -------------------------------------------------------------------

    def candidates(self) -> list[str]:
        """Where peers may reach the node's UDP socket: local addresses, then the mapped and
        reflexive ones."""
        out = []
        host, port = self._udp.local_endpoint
        if host in ("0.0.0.0", "::"):
            host = self._route_source() or host
        if host not in ("0.0.0.0", "::"):
            out.append(format_endpoint((host, port)))
        mapped = self.mapped()
        if mapped is not None:
            out.append(format_endpoint(mapped))
        if self.reflexive is not None:
            out.append(format_endpoint(self.reflexive))
        return list(dict.fromkeys(out))

    def _route_source(self) -> str | None:
        """The local address toward the rendezvous server (a node bound to every address)."""
        if self.rendezvous is None:
            return None
        try:
            return self._net.route_source((self.rendezvous.url.host, self.rendezvous.url.port))
        except (OSError, ValueError):
            return None

    def tcp_candidates(self) -> list[str]:
        """Where peers may reach this node over TCP: the local address at the TCP port, then
        the public address the rendezvous (or STUN) saw, at the same port (NATs that keep
        source ports, as most do for TCP, map it there)."""
        port = self._tcp.port
        if port is None:
            return []
        out = [format_endpoint((parse_endpoint(c)[0], port)) for c in self.candidates()[:1]]
        public = [self.rendezvous.observed if self.rendezvous is not None else None]
        public.append(format_endpoint(self.reflexive) if self.reflexive else None)
        mapped = self._portmap.usable(self._portmap.tcp)
        if mapped is not None:
            out.append(format_endpoint(mapped))
        for text in public:
            if text:
                out.append(format_endpoint((parse_endpoint(text)[0], port)))
        return list(dict.fromkeys(out))

    def mapped(self) -> Endpoint | None:
        """The UDP port the router maps to us on request (PCP, NAT-PMP, UPnP), if any."""
        return self._portmap.usable(self._portmap.udp)

    def hard(self) -> bool:
        """Whether our NAT maps per destination (and no port mapping on the router undoes it)."""
        nat = self.nat or {}
        if nat.get("mapping"):
            hard = nat["mapping"] in ("address-dependent", "address-and-port-dependent")
        else:
            hard = self.mapping_hint == "endpoint-dependent"
        return hard and self.mapped() is None

    def udp_works(self) -> bool:
        """Whether UDP is known to get out of here: a STUN answer gave us a reflexive address,
        or the relay acknowledged our UDP."""
        client = self.rendezvous
        return self.reflexive is not None or (client is not None and client.udp_ready)

    def birthday_target(self) -> str | None:
        """Where the peer's birthday sockets should aim: our mapped port, else the reflexive one."""
        public = self.mapped() or self.reflexive
        return format_endpoint(public) if public else None

    # -- a round's snapshot ----------------------------------------------------------------------

    async def snapshot(self, udp: bool = True, tcp: bool = True) -> tuple[LocalSide, UdpSocket | None]:
        """What a punch round starts from (with UDP and TCP rounds on or off), after waiting
        briefly for the mapping hint when UDP evidently works (whether our NAT is hard decides
        the mode), and behind a hard NAT the socket port prediction measured."""
        if self.reflexive is not None:
            await self.learned(NAT_WAIT)
        fresh, next_port, step = await self._predict(udp)
        local = LocalSide(
            self.candidates() if udp else [],
            self.tcp_candidates() if tcp else [],
            self.birthday_target(),
            self.hard(),
            udp and self.udp_works(),
            next_port,
            step,
        )
        return local, fresh

    async def _predict(self, udp: bool) -> tuple[UdpSocket | None, int, int]:
        """Behind a hard NAT: a fresh socket and, when the NAT hands out ports in sequence,
        the last port it gave that socket and the step (else 0, 0). Not hard: (None, 0, 0)."""
        if not prediction_wanted(self.hard(), udp):
            return None, 0, 0
        try:
            measured = await asyncio.wait_for(self._udp.fresh_mapping(self.stun_servers), PREDICT_WAIT)
        except (OSError, TimeoutError) as exc:
            log.debug("port prediction: no socket or no answer: %s", exc or "timed out")
            return None, 0, 0
        if measured is None:
            return None, 0, 0
        sock, first, second = measured
        step = port_step([first, second])
        if step:
            log.debug("port prediction: NAT gave %d then %d", first, second)
            return sock, second, step
        return sock, 0, 0

    def describe(self) -> dict[str, Any]:
        """For status displays."""
        return {"reflexive": format_endpoint(self.reflexive) if self.reflexive else None, "nat": self.nat}
