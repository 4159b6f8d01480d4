"""The lab's twin: complete peerpath nodes and a rendezvous server on :mod:`fakenet`, behind
every NAT kind the root lab builds, on a virtual clock (:mod:`vtime`).

The same code runs as in the lab (nodes, sessions, the direct-path controller, the
rendezvous client and server with TLS and the UDP relay, STUN); only the network and the
clock are simulated, so a minute of traversal behaviour takes well under a second and
needs no root. The lab stays the ground truth (real kernels, real NATs); the twin is
where traversal logic is developed.

Use it from inside :func:`peerpath.testing.vtime.run`::

    async def main():
        async with Twin(tmp_path) as twin:
            hosts = twin.every_router_kind()
            nodes = {name: await twin.node(name, host) for name, host in hosts.items()}
    vtime.run(main())
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from peerpath.identity import Identity
from peerpath.nat.netcheck import Behaviour
from peerpath.nat.stun_responder import StunResponder
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.server import RendezvousServer
from peerpath.session.connection import Connection, SessionConfig
from peerpath.session.streams import StreamWriter
from peerpath.testing.fakenet import FakeHost, FakeNat, FakeNetwork

EI, AD, APD = Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT

#: The rendezvous server's two public addresses (its STUN answers from both), as in the lab.
SERVER_IPS = ("203.0.113.10", "203.0.113.11")
RENDEZVOUS_PORT = 7000
STUN_PORTS = (3478, 3479)
#: Where a NAT that hands out ports in sequence starts (the lab's symmetric-sequential router).
SEQUENTIAL_PORTS = (20000, 24095)

#: Router kinds by the lab's names (peerpath.testing.netlab.NatKind values): mapping,
#: filtering, whether the NAT keeps source ports, and the step of ports handed out in order.
KINDS: dict[str, tuple[Behaviour, Behaviour, bool, int]] = {
    "full-cone": (EI, EI, True, 0),
    "address-restricted": (EI, AD, True, 0),
    "port-restricted": (EI, APD, True, 0),
    "symmetric": (APD, APD, False, 0),
    "symmetric-sequential": (APD, APD, False, 1),
    # A port-restricted NAT whose firewall drops outbound UDP (the host is marked so).
    "udp-blocked": (EI, APD, True, 0),
    # Linux masquerade on a carrier's router: keeps ports, filters by connection.
    "carrier": (EI, APD, True, 0),
}


@dataclass
class SoakResult:
    """What a soak saw: requests sent and answered intact, the paths in the order taken,
    and why paths were set aside."""

    sent: int = 0
    ok: int = 0
    paths: list[str] = field(default_factory=list)
    aside: list[str] = field(default_factory=list)
    error: str | None = None


class Twin:
    """A fake internet with a rendezvous server; add routers, hosts and nodes to it."""

    def __init__(self, state_dir: Path, *, latency: float = 0.005, seed: int = 5780) -> None:
        self.state_dir = state_dir
        self.rng = random.Random(seed)
        self.net = FakeNetwork(latency=latency, rng=random.Random(seed + 1))
        self.routers: dict[str, FakeNat] = {}
        self.nodes: dict[str, Node] = {}
        self.server: RendezvousServer | None = None
        self.url: str | None = None
        self._public = (f"198.51.100.{i}" for i in itertools.count(1))
        self._lans = itertools.count(1)

    # -- the network ----------------------------------------------------------------------

    def router(self, name: str, kind: str, *, upstream: FakeNat | None = None, hairpinning: bool = False) -> FakeNat:
        """A NAT of ``kind`` (a :data:`KINDS` name) on the internet, or behind ``upstream``."""
        mapping, filtering, keeps_ports, step = KINDS[kind]
        # Behind a carrier: an address on its inside (RFC 6598 space).
        public = next(self._public) if upstream is None else f"100.64.{next(self._lans)}.2"
        nat = FakeNat(
            public,
            mapping=mapping,
            filtering=filtering,
            hairpinning=hairpinning,
            port_preserving=keeps_ports,
            port_step=step,
            rng=random.Random(self.rng.random()),
            upstream=upstream,
            port_range=SEQUENTIAL_PORTS if step else (1024, 65535),
        )
        self.net.add_nat(nat)
        self.routers[name] = nat
        return nat

    def host(self, behind: FakeNat | None = None, *, udp_blocked: bool = False) -> FakeHost:
        """A host on the internet, or on the LAN of ``behind``."""
        ip = next(self._public) if behind is None else f"10.{next(self._lans)}.0.2"
        return FakeHost(self.net, ip, behind, udp_blocked=udp_blocked)

    def every_router_kind(self) -> dict[str, FakeHost]:
        """One host behind each router kind of the lab's matrix, keyed like the lab's
        :func:`~peerpath.testing.netlab.every_router_kind`: ``public``, ``full-cone``,
        ``address-restricted``, ``port-restricted``, ``symmetric``, ``udp-blocked``,
        ``cgnat`` (a port-restricted home router behind a carrier NAT), and ``same-nat-1``
        / ``same-nat-2`` (two hosts behind one hairpinning port-restricted router)."""
        hosts = {"public": self.host()}
        for kind in ("full-cone", "address-restricted", "port-restricted", "symmetric", "udp-blocked"):
            hosts[kind] = self.host(self.router(kind, kind), udp_blocked=kind == "udp-blocked")
        carrier = self.router("carrier", "carrier")
        hosts["cgnat"] = self.host(self.router("cg-home", "port-restricted", upstream=carrier))
        shared = self.router("shared", "port-restricted", hairpinning=True)
        hosts["same-nat-1"] = self.host(shared)
        hosts["same-nat-2"] = self.host(shared)
        return hosts

    def lossy(self, ips: list[str], fraction: float) -> None:
        """Lose ``fraction`` of the UDP between every two of these public addresses."""
        for a, b in itertools.combinations(ips, 2):
            self.net.set_loss(a, b, fraction)

    def public_ips(self) -> list[str]:
        """Every public address in use: the server's and each router's on the internet."""
        return [*SERVER_IPS, *(nat.public_ip for nat in self.routers.values() if nat.upstream is None)]

    # -- the server and nodes --------------------------------------------------------------

    async def start_server(self) -> str:
        """The rendezvous server (TLS and UDP relay on :data:`RENDEZVOUS_PORT`) and STUN on
        its two addresses; returns its URL."""
        self.net.add_stun_server(StunResponder(list(SERVER_IPS), STUN_PORTS))
        host = FakeHost(self.net, SERVER_IPS[0])
        loop = asyncio.get_running_loop()
        stun = [f"{ip}:{STUN_PORTS[0]}" for ip in SERVER_IPS]
        self.server = RendezvousServer(
            Identity.generate(), self.state_dir / "server", stun=stun, net=host, clock=loop.time
        )
        await self.server.start([SERVER_IPS[0]], RENDEZVOUS_PORT)
        self.url = str(self.server.url())
        return self.url

    async def node(self, name: str, host: FakeHost, *, config: SessionConfig | None = None) -> Node:
        """A node on ``host``, registered with the server and trusting every other node."""
        if self.url is None:
            await self.start_server()
        trust = TrustStore(self.state_dir / f"{name}-trust.json")
        node = await Node.start(
            identity=Identity.generate(),
            trust=trust,
            host=host.ip,
            rendezvous=self.url,
            config=config,
            net=host,
            clock=asyncio.get_running_loop().time,
        )
        node.serve(7, _echo)
        node.on_message(_digest)
        for other in self.nodes.values():
            node.trust.add(other.address)
            other.trust.add(node.address)
        self.nodes[name] = node
        if node.rendezvous is not None:
            await node.rendezvous.wait_registered(30)
        return node

    async def close(self) -> None:
        """Close every node and the server."""
        await asyncio.gather(*(node.close() for node in self.nodes.values()), return_exceptions=True)
        if self.server is not None:
            await self.server.close()

    async def __aenter__(self) -> Twin:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def _echo(reader: asyncio.StreamReader, writer: StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _digest(conn: Connection, data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def request_ok(conn: Connection, size: int = 16 * 1024, timeout: float = 30.0) -> bool:
    """One request through the session, its answer checked."""
    blob = os.urandom(size)
    return await conn.request(blob, timeout=timeout) == hashlib.sha256(blob).digest()


async def wait_direct(conn: Connection, seconds: float = 10.0) -> str:
    """Wait up to ``seconds`` for the session to leave the relay; its path then."""
    for _ in range(round(seconds / 0.1)):  # the path set has no event to wait on: look
        if conn.path is not None and not conn.path.describe().startswith("relay"):
            break
        await asyncio.sleep(0.1)
    return conn.path.describe() if conn.path else "none"


async def soak(conn: Connection, seconds: float, *, size: int = 16 * 1024, gap: float = 0.05) -> SoakResult:
    """Requests back to back for ``seconds`` (virtual): which path each took, and any loss."""
    loop = asyncio.get_running_loop()
    result = SoakResult()
    end = loop.time() + seconds
    while loop.time() < end:
        result.sent += 1
        try:
            result.ok += await request_ok(conn, size)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            return result
        path = conn.path.describe() if conn.path else "none"
        if not result.paths or result.paths[-1] != path:
            result.paths.append(path)
        for p in conn.paths.paths.values():
            note = f"{p.describe()}: {p.degraded}"
            if p.degraded and note not in result.aside:
                result.aside.append(note)
        await asyncio.sleep(gap)
    return result
