"""A port-mapping server for lab routers: PCP (RFC 6887) MAP and NAT-PMP (RFC 6886), the
way a home router offers them. Every mapping becomes real nftables rules in the router's
``lab`` table (DNAT of the external port to the host, SNAT of the host's port to the
external one, so the mapping is endpoint-independent both ways), removed on deletion or
expiry. For tests; it trusts its LAN as home routers do.

    python -m peerpath.testing.pcpd --wan-ip 198.51.100.5 --lan-ip 10.3.0.1 [--protocols pcp,nat-pmp]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peerpath.wire import portmap as pm

#: Longest lifetime granted (seconds).
MAX_LIFETIME = 3600
_NATPMP_UNSUPPORTED = 1
_PCP = {name: code for code, name in pm.PCP_RESULTS.items()}

Install = Callable[[str, int, str, int], Any]
Remove = Callable[[Any], None]


@dataclass
class _Mapping:
    external_port: int
    expires: float
    handle: Any
    nonce: bytes


class PortMapServer:
    """The protocol side: answers requests, keeps the mapping table, calls install/remove."""

    def __init__(
        self,
        wan_ip: str,
        install: Install,
        remove: Remove,
        *,
        protocols: frozenset[str] = frozenset({"pcp", "nat-pmp"}),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wan_ip = wan_ip
        self.install, self.remove = install, remove
        self.protocols = protocols
        self.clock = clock
        self.started = clock()
        self.mappings: dict[tuple[str, str, int], _Mapping] = {}

    def _epoch(self) -> int:
        return int(self.clock() - self.started)

    def _taken(self, protocol: str, port: int) -> bool:
        return self.holder(protocol, port) is not None

    def _map(self, protocol: str, host: str, port: int, suggested: int, lifetime: int, nonce: bytes) -> _Mapping:
        key = (protocol, host, port)
        existing = self.mappings.get(key)
        if existing is not None:
            existing.expires = self.clock() + lifetime
            existing.nonce = nonce
            return existing
        external = next(
            (p for p in (suggested, port) if p >= 1024 and not self._taken(protocol, p)),
            0,
        )
        while not external or self._taken(protocol, external):
            external = random.randint(1024, 65535)
        mapping = _Mapping(external, self.clock() + lifetime, self.install(protocol, external, host, port), nonce)
        self.mappings[key] = mapping
        return mapping

    def holder(self, protocol: str, external: int) -> tuple[str, int] | None:
        """Which (host, port) the external port is mapped to, if any."""
        return next(
            ((h, p) for (pr, h, p), m in self.mappings.items() if pr == protocol and m.external_port == external), None
        )

    def map_exactly(self, protocol: str, host: str, port: int, external: int, lifetime: int) -> None:
        """Map exactly ``external`` to ``host:port`` (UPnP's way: the caller checked it is
        free), or renew that mapping."""
        existing = self.mappings.get((protocol, host, port))
        if existing is not None and existing.external_port != external:
            self.unmap(protocol, host, port)
            existing = None
        if existing is not None:
            existing.expires = self.clock() + lifetime
            return
        handle = self.install(protocol, external, host, port)
        self.mappings[(protocol, host, port)] = _Mapping(external, self.clock() + lifetime, handle, b"")

    def unmap(self, protocol: str, host: str, port: int) -> None:
        """Remove the mapping of ``host:port``, if there is one."""
        mapping = self.mappings.pop((protocol, host, port), None)
        if mapping is not None:
            self.remove(mapping.handle)

    def expire(self) -> None:
        """Drop mappings whose lifetime ran out."""
        now = self.clock()
        for key, mapping in list(self.mappings.items()):
            if mapping.expires <= now:
                self.unmap(*key)

    def handle(self, data: bytes, source: tuple[str, int]) -> bytes | None:
        """The answer to one request from ``source`` (None: not worth an answer)."""
        if not data:
            return None
        if data[0] == pm.PCP_VERSION and "pcp" in self.protocols:
            return self._pcp(data, source)
        if "nat-pmp" in self.protocols and (data[0] == pm.NATPMP_VERSION or "pcp" not in self.protocols):
            return self._natpmp(data, source)
        return None

    def _pcp(self, data: bytes, source: tuple[str, int]) -> bytes | None:
        try:
            request, error = pm.decode_pcp_map_request(data)
        except pm.PortMapError:
            return None
        if error is None and request.client_ip != source[0]:
            error = "address mismatch"  # RFC 6887 8.3: the header must name the sender
        if error is not None:
            return pm.encode_pcp_map_response(request, _PCP[error], 0, self._epoch(), ("0.0.0.0", 0))
        if request.lifetime == 0:
            self.unmap(request.protocol, source[0], request.internal_port)
            return pm.encode_pcp_map_response(request, 0, 0, self._epoch(), ("0.0.0.0", 0))
        lifetime = min(request.lifetime, MAX_LIFETIME)
        mapping = self._map(
            request.protocol, source[0], request.internal_port, request.suggested_port, lifetime, request.nonce
        )
        return pm.encode_pcp_map_response(request, 0, lifetime, self._epoch(), (self.wan_ip, mapping.external_port))

    def _natpmp(self, data: bytes, source: tuple[str, int]) -> bytes | None:
        epoch = self._epoch()
        if data[0] != pm.NATPMP_VERSION:
            return bytes([0, pm.RESPONSE_BIT]) + _NATPMP_UNSUPPORTED.to_bytes(2, "big") + epoch.to_bytes(4, "big")
        if len(data) == 2 and data[1] == pm.NATPMP_OP_ADDRESS:
            return pm.encode_natpmp_address_response(0, epoch, self.wan_ip)
        if len(data) != 12 or data[1] not in (pm.NATPMP_OP_UDP, pm.NATPMP_OP_TCP):
            return None
        opcode = data[1]
        internal, suggested, lifetime = int.from_bytes(data[4:6]), int.from_bytes(data[6:8]), int.from_bytes(data[8:12])
        protocol = "udp" if opcode == pm.NATPMP_OP_UDP else "tcp"
        if lifetime == 0:
            self.unmap(protocol, source[0], internal)
            return pm.encode_natpmp_map_response(opcode, 0, epoch, internal, 0, 0)
        lifetime = min(lifetime, MAX_LIFETIME)
        mapping = self._map(protocol, source[0], internal, suggested, lifetime, b"")
        return pm.encode_natpmp_map_response(opcode, 0, epoch, internal, mapping.external_port, lifetime)


def nft_rules(wan_ip: str) -> tuple[Install, Remove]:
    """install/remove callables that add and delete the lab router's rules for a mapping."""

    def nft(*args: str) -> str:
        return subprocess.run(["nft", "-e", "-a", *args], check=True, capture_output=True, text=True).stdout

    def handle(out: str) -> int:
        found = re.search(r"# handle (\d+)", out)
        if found is None:
            raise RuntimeError(f"nft did not echo a handle: {out!r}")
        return int(found.group(1))

    def install(protocol: str, external: int, host: str, port: int) -> Any:
        dnat = nft(
            "add", "rule", "ip", "lab", "dstnat", "iifname", "wan", "ip", "daddr", wan_ip,
            protocol, "dport", str(external), "dnat", "ip", "to", f"{host}:{port}",
        )  # fmt: skip
        snat = nft(
            "insert", "rule", "ip", "lab", "srcnat", "oifname", "wan", "ip", "saddr", host,
            protocol, "sport", str(port), "snat", "ip", "to", f"{wan_ip}:{external}",
        )  # fmt: skip
        return [("dstnat", handle(dnat)), ("srcnat", handle(snat))]

    def remove(rules: Any) -> None:
        for chain, number in rules:
            subprocess.run(["nft", "delete", "rule", "ip", "lab", chain, "handle", str(number)], check=False)

    return install, remove


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: PortMapServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.expire()
        answer = self.server.handle(data, (str(addr[0]), int(addr[1])))
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


async def serve(wan_ip: str, lan_ip: str, protocols: frozenset[str]) -> None:
    """Serve until killed."""
    install, remove = nft_rules(wan_ip)
    server = PortMapServer(wan_ip, install, remove, protocols=protocols)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: _Protocol(server), local_addr=(lan_ip, pm.SERVER_PORT))
    print(f"port mapping ({', '.join(sorted(protocols))}) on {lan_ip}:{pm.SERVER_PORT}", flush=True)
    while True:
        await asyncio.sleep(1.0)
        server.expire()


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wan-ip", required=True)
    parser.add_argument("--lan-ip", required=True)
    parser.add_argument("--protocols", default="pcp,nat-pmp", help="comma-separated: pcp, nat-pmp")
    args = parser.parse_args()
    asyncio.run(serve(args.wan_ip, args.lan_ip, frozenset(args.protocols.split(","))))


if __name__ == "__main__":
    main()
