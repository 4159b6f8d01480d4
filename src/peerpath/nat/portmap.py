"""Port mapping: ask the home router to forward an external port to the node (PCP, RFC 6887,
falling back to NAT-PMP, RFC 6886, then to UPnP IGD, :mod:`peerpath.nat.upnp`), renew the
mapping before it lapses, and delete it when the node stops.

A mapping turns any NAT into an endpoint-independent, unfiltered one for that port: peers
reach the mapped address whatever their own NAT does, so a host behind a symmetric NAT
whose router maps ports becomes easy to reach, over UDP and TCP alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peerpath.clock import monotonic
from peerpath.wire import portmap as pm
from peerpath.wire.endpoint import Endpoint, format_endpoint

if TYPE_CHECKING:
    from peerpath.nat.upnp import UpnpMapper

log = logging.getLogger(__name__)

clock = monotonic
#: Seconds asked for; renewed at half of what the router grants.
LIFETIME = 7200
#: Retransmissions of one request (RFC 6887 8.1.1 starts at 3 s; a LAN answers in ms).
RETRIES = (0.25, 0.5, 1.0)
#: Environment switch: "0"/"off" disables port mapping (tests on a shared host use it).
ENV_SWITCH = "PEERPATH_PORT_MAPPING"
#: External addresses behind which a further NAT sits (the mapping alone reaches nobody).
_INNER = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")]


class PortMapUnavailable(Exception):
    """No router answered, or it refused: carries the reason in words."""


def enabled() -> bool:
    """Whether port mapping is allowed by the environment (default yes)."""
    return os.environ.get(ENV_SWITCH, "1").lower() not in ("0", "off", "no", "false")


def reaches_internet(host: str) -> bool:
    """Whether an external address is worth offering (not itself behind another NAT)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not any(ip in net for net in _INNER) and not ip.is_unspecified and not ip.is_loopback


@dataclass
class Mapping:
    """A port the router forwards to us."""

    protocol: str
    internal_port: int
    external: Endpoint
    lifetime: int
    method: str
    granted_at: float
    nonce: bytes = b""

    @property
    def renew_at(self) -> float:
        """When to renew (half the granted lifetime)."""
        return self.granted_at + self.lifetime / 2

    def describe(self) -> dict[str, object]:
        """For status displays."""
        return {"external": format_endpoint(self.external), "method": self.method, "lifetime_s": self.lifetime}


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self, gateway: Endpoint) -> None:
        self.gateway = gateway
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Endpoint) -> None:
        if (str(addr[0]), int(addr[1])) == self.gateway:  # anyone else's word is ignored
            self.answers.put_nowait(data)


class PortMapper:
    """Talks to one gateway; remembers whether it speaks PCP or only NAT-PMP."""

    def __init__(self, gateway: str, *, local_ip: str | None = None, port: int = pm.SERVER_PORT) -> None:
        self.gateway = gateway
        self.port = port
        self.local_ip = local_ip
        self.method: str | None = None

    @property
    def answered(self) -> bool:
        """Whether the gateway has answered PCP or NAT-PMP (else asking again is not worth it)."""
        return self.method is not None

    async def _ask(self, request: bytes, accept: type[object] | None = None) -> bytes:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Exchange((self.gateway, self.port)),
            local_addr=(self.local_ip or "0.0.0.0", 0),
        )
        try:
            for wait in RETRIES:
                transport.sendto(request, (self.gateway, self.port))
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(proto.answers.get(), wait)
            raise PortMapUnavailable(f"no answer from {self.gateway}:{self.port} (no PCP or NAT-PMP there)")
        finally:
            transport.close()

    def _local_ip(self) -> str:
        if self.local_ip is None:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.connect((self.gateway, self.port))
                self.local_ip = str(probe.getsockname()[0])
            finally:
                probe.close()
        return self.local_ip

    async def map(
        self, protocol: str, internal_port: int, lifetime: int = LIFETIME, previous: Mapping | None = None
    ) -> Mapping:
        """Create (or renew, with ``previous``) a mapping; lifetime 0 deletes it."""
        if self.method in (None, "pcp"):
            nonce = previous.nonce if previous is not None and previous.nonce else os.urandom(12)
            suggested = previous.external if previous is not None else ("0.0.0.0", 0)
            request = pm.MapRequest(
                protocol, internal_port, lifetime, self._local_ip(), nonce, suggested[1], suggested[0]
            )
            answer = pm.decode_response(await self._ask(pm.encode_pcp_map(request)))
            if answer.version == pm.PCP_VERSION:
                self.method = "pcp"
                if answer.nonce != nonce or answer.internal_port != internal_port:
                    raise PortMapUnavailable("PCP answer is for another request")
                if not answer.ok:
                    raise PortMapUnavailable(f"PCP refused: {answer.reason}")
                external = (answer.external_ip or "0.0.0.0", answer.external_port)
                return Mapping(protocol, internal_port, external, answer.lifetime, "pcp", clock(), nonce)
            if answer.result != 1:  # anything but "unsupported version" from a NAT-PMP router
                raise PortMapUnavailable(f"NAT-PMP refused PCP: {answer.reason}")
            self.method = "nat-pmp"
        return await self._map_natpmp(protocol, internal_port, lifetime, previous)

    async def _map_natpmp(self, protocol: str, internal_port: int, lifetime: int, previous: Mapping | None) -> Mapping:
        result, address = pm.decode_natpmp_address(await self._ask(pm.encode_natpmp_address()))
        if address is None:
            raise PortMapUnavailable(f"NAT-PMP public address: {pm.NATPMP_RESULTS.get(result, result)}")
        suggested = previous.external[1] if previous is not None else internal_port
        request = pm.MapRequest(protocol, internal_port, lifetime, self._local_ip(), suggested_port=suggested)
        answer = pm.decode_response(await self._ask(pm.encode_natpmp_map(request)))
        if not answer.ok:
            raise PortMapUnavailable(f"NAT-PMP refused: {answer.reason}")
        if answer.internal_port != internal_port or answer.protocol != protocol:
            raise PortMapUnavailable("NAT-PMP answer is for another request")
        return Mapping(protocol, internal_port, (address, answer.external_port), answer.lifetime, "nat-pmp", clock())

    async def unmap(self, mapping: Mapping) -> None:
        """Delete a mapping (best effort: the router forgets it at expiry anyway)."""
        with contextlib.suppress(PortMapUnavailable, pm.PortMapError, OSError):
            await self.map(mapping.protocol, mapping.internal_port, 0, mapping)


class PortMappings:
    """The node's mappings for its UDP port (and TCP port), kept alive in the background."""

    def __init__(self) -> None:
        self.udp: Mapping | None = None
        self.tcp: Mapping | None = None
        self.last_error: str | None = None
        self._mapper: PortMapper | UpnpMapper | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, udp_port: int, tcp_port: int | None, gateway: str | None) -> None:
        """Map the ports on ``gateway`` (the host's default gateway) now and keep them mapped
        (no-op when disabled or without a gateway)."""
        if not enabled() or gateway is None:
            self.last_error = "disabled" if not enabled() else "no default gateway"
            return
        from peerpath.nat.upnp import UpnpMapper  # noqa: PLC0415 (it builds on this module)

        self._mapper = PortMapper(gateway)
        mappers: list[PortMapper | UpnpMapper] = [self._mapper, UpnpMapper(gateway)]
        self._task = asyncio.get_running_loop().create_task(self._keep(mappers, udp_port, tcp_port))

    async def _keep(self, mappers: list[PortMapper | UpnpMapper], udp_port: int, tcp_port: int | None) -> None:
        """Map with the first of ``mappers`` that the gateway answers (PCP or NAT-PMP, then
        UPnP), and keep the mappings alive."""
        mapper = mappers.pop(0)
        self._mapper = mapper
        while True:
            try:
                self.udp = await mapper.map("udp", udp_port, previous=self.udp)
                if tcp_port is not None:
                    self.tcp = await mapper.map("tcp", tcp_port, previous=self.tcp)
                self.last_error = None
                log.info(
                    "port mapping (%s via %s): udp %s%s",
                    mapper.method,
                    mapper.gateway,
                    format_endpoint(self.udp.external),
                    f", tcp {format_endpoint(self.tcp.external)}" if self.tcp else "",
                )
                wait = max(30.0, min(m.renew_at for m in (self.udp, self.tcp) if m is not None) - clock())
            except (PortMapUnavailable, pm.PortMapError, OSError) as exc:
                if self.last_error != str(exc):
                    log.info("no port mapping: %s", exc)
                self.last_error = str(exc)
                if self.udp is None and not mapper.answered:
                    if not mappers:
                        return  # nobody there: not worth asking again
                    mapper = mappers.pop(0)  # the gateway may speak another protocol
                    self._mapper = mapper
                    continue
                wait = 60.0
            await asyncio.sleep(wait)

    def usable(self, mapping: Mapping | None) -> Endpoint | None:
        """The external endpoint of ``mapping`` if peers on the internet can reach it."""
        if mapping is None or clock() > mapping.granted_at + mapping.lifetime:
            return None
        return mapping.external if reaches_internet(mapping.external[0]) else None

    def describe(self) -> dict[str, object] | None:
        """For status displays: what is mapped, or why nothing is."""
        if self.udp is None and self.tcp is None:
            return {"error": self.last_error} if self.last_error else None
        return {
            "gateway": self._mapper.gateway if self._mapper else None,
            "udp": self.udp.describe() if self.udp else None,
            "tcp": self.tcp.describe() if self.tcp else None,
        }

    async def close(self) -> None:
        """Stop renewing and delete the mappings."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._mapper is not None:
            for mapping in (self.udp, self.tcp):
                if mapping is not None:
                    await self._mapper.unmap(mapping)
        self.udp = self.tcp = None
