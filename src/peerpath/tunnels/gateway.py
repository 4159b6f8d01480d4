"""The gateway: every trusted peer at a stable address of its own on this machine's
loopback (all of 127.0.0.0/8 is loopback on Linux), listening there on the peer's service
ports, so unmodified clients reach it with no configuration: ``curl http://127.x.y.z/``,
``psql -h 127.x.y.z``, ``ssh 127.x.y.z``. A hosts-file fragment names the addresses.

An address is derived from the peer's overlay address and kept once given (``gateway.json``
in the state directory), so it does not move when other peers are trusted; two peers that
would get the same one are told apart, the later taking the next free address. Ports below
1024 need root, or ``sysctl net.ipv4.ip_unprivileged_port_start``; those that cannot be
listened on are reported, with the reason. On macOS only 127.0.0.1 is configured: each
address needs ``sudo ifconfig lo0 alias 127.x.y.z`` first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peerpath.identity import Address
from peerpath.net import Net, TcpListener, serve_streams
from peerpath.tunnels.registry import read_json, write_json
from peerpath.tunnels.services import WELL_KNOWN, ServiceError

log = logging.getLogger(__name__)

FILE = "gateway.json"
#: The ports the gateway listens on for each peer unless told otherwise.
DEFAULT_PORTS = tuple(sorted(set(WELL_KNOWN.values())))
#: Peers and ports the gateway serves at most.
MAX_PEERS = 1024
MAX_PORTS = 32
#: A name fit for a hosts file (a DNS label).
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def derived_address(peer: Address, attempt: int = 0) -> str:
    """The loopback address ``peer`` gets (``attempt`` > 0: the next ones, for a collision):
    127.A.B.C with A in 1-254 and C in 1-254, never 127.0.0.x (where local services are)."""
    digest = peer.digest
    a = 1 + digest[0] % 254
    b = digest[1]
    c = 1 + (digest[2] + attempt) % 254
    return f"127.{a}.{b}.{c}"


@dataclass
class GatewayConfig:
    """Whether the gateway is on, its ports, and the addresses given out so far."""

    path: Path
    enabled: bool = False
    ports: tuple[int, ...] = DEFAULT_PORTS
    addresses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path) -> GatewayConfig:
        """The gateway settings of ``state_dir`` (off, if there are none)."""
        config = cls(state_dir / FILE)
        raw = read_json(config.path)
        if raw is None:
            return config
        try:
            config.enabled = bool(raw.get("enabled", False))
            config.ports = check_ports(int(p) for p in raw.get("ports", DEFAULT_PORTS))
            for peer, ip in list(raw.get("addresses", {}).items())[:MAX_PEERS]:
                Address.parse(peer)
                if ipaddress.ip_address(ip) not in ipaddress.ip_network("127.0.0.0/8"):
                    raise ValueError(f"{ip} is not a loopback address")
                config.addresses[peer] = ip
        except (TypeError, ValueError, AttributeError) as exc:
            raise ServiceError(f"{config.path} is malformed: {exc}") from None
        return config

    def save(self) -> None:
        """Write atomically, readable by the owner only."""
        write_json(self.path, {"enabled": self.enabled, "ports": list(self.ports), "addresses": self.addresses})

    def assign(self, peers: Iterable[Address]) -> dict[str, str]:
        """Every peer's address, giving new peers theirs (kept from then on)."""
        taken = set(self.addresses.values())
        for peer in peers:
            key = str(peer)
            if key in self.addresses:
                continue
            for attempt in range(254):
                ip = derived_address(peer, attempt)
                if ip not in taken:
                    self.addresses[key] = ip
                    taken.add(ip)
                    break
        return dict(self.addresses)


def check_ports(ports: Iterable[int]) -> tuple[int, ...]:
    """Ports the gateway may listen on (ServiceError for a bad one, or too many)."""
    out = sorted(set(ports))
    if not out or len(out) > MAX_PORTS or not all(1 <= p <= 0xFFFF for p in out):
        raise ServiceError(f"give 1 to {MAX_PORTS} ports in 1-65535")
    return tuple(out)


def hosts_fragment(addresses: dict[str, str], notes: dict[str, str]) -> str:
    """Lines for /etc/hosts: each address with the peer's overlay address and, when it is a
    usable host name, the note the peer was trusted under."""
    lines = ["# peerpath gateway (peerpath gateway hosts)"]
    for peer, ip in sorted(addresses.items(), key=lambda item: ipaddress.ip_address(item[1])):
        names = [peer]
        note = notes.get(peer, "").strip().lower()
        if _HOSTNAME.match(note) and note not in names:
            names.append(note)
        lines.append(f"{ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


class Gateway:
    """The gateway's listeners: one per trusted peer and port, while it is on."""

    def __init__(
        self, net: Net, connect: Callable[[Address, int, asyncio.StreamReader, asyncio.StreamWriter], Any]
    ) -> None:
        self._net = net
        self._connect = connect
        self._listeners: dict[tuple[str, int], TcpListener] = {}
        #: Why a peer's port is not listened on, by "ip:port".
        self.errors: dict[str, str] = {}

    async def update(self, config: GatewayConfig, trusted: list[Address]) -> None:
        """Listen for every trusted peer (on), or nowhere (off)."""
        wanted: dict[tuple[str, int], Address] = {}
        if config.enabled:
            addresses = config.assign(trusted[:MAX_PEERS])
            for peer in trusted[:MAX_PEERS]:
                for port in config.ports:
                    wanted[(addresses[str(peer)], port)] = peer
        for key in [k for k in self._listeners if k not in wanted]:
            self._listeners.pop(key).close()
        self.errors = {k: v for k, v in self.errors.items() if tuple_key(k) in wanted}
        for (ip, port), peer in wanted.items():
            if (ip, port) in self._listeners:
                continue
            handler = self._handler(peer, port)
            try:
                self._listeners[(ip, port)] = await serve_streams(self._net, handler, ip, port)
                self.errors.pop(f"{ip}:{port}", None)
            except OSError as exc:
                hint = " (below 1024: needs root or a lower net.ipv4.ip_unprivileged_port_start)" if port < 1024 else ""
                self.errors[f"{ip}:{port}"] = f"{exc.strerror or exc}{hint}"

    def _handler(self, peer: Address, port: int) -> Any:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._connect(peer, port, reader, writer)

        return accepted

    def close(self) -> None:
        """Stop listening everywhere."""
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()

    def listening(self) -> list[str]:
        """Where it listens, "ip:port"."""
        return [f"{ip}:{port}" for ip, port in sorted(self._listeners)]


def tuple_key(text: str) -> tuple[str, int]:
    """ "ip:port" as (ip, port)."""
    ip, _, port = text.rpartition(":")
    return ip, int(port)
