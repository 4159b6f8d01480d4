"""Port mapping protocols spoken to the home router (sans-I/O): PCP (RFC 6887) MAP and its
predecessor NAT-PMP (RFC 6886). Both run over UDP port 5351 of the default gateway.

A mapping asks the router to forward an external port to our internal address and port,
for any remote peer and for a lifetime in seconds (0 deletes it). A PCP server that gets a
NAT-PMP request may answer it in NAT-PMP; a NAT-PMP-only server answers a PCP request
with NAT-PMP's "unsupported version", which is how a client learns to fall back.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from peerpath.wire.endpoint import Endpoint

SERVER_PORT = 5351
PCP_VERSION = 2
NATPMP_VERSION = 0
OP_ANNOUNCE = 0
OP_MAP = 1
#: NAT-PMP opcodes: public address, and map UDP / TCP (a response adds 128).
NATPMP_OP_ADDRESS = 0
NATPMP_OP_UDP = 1
NATPMP_OP_TCP = 2
RESPONSE_BIT = 0x80
PROTOCOLS = {"udp": 17, "tcp": 6}

#: PCP result codes (RFC 6887 7.4); NAT-PMP's 0-5 (RFC 6886 3.5) share 0 and 1.
PCP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure",
    8: "no resources",
    9: "unsupported protocol",
    10: "user exceeded quota",
    11: "cannot provide external",
    12: "address mismatch",
    13: "excessive remote peers",
}
NATPMP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}

_PCP_HEADER = struct.Struct("!BBH I 16s")  # version, R|opcode, reserved, lifetime, client IP
_PCP_RESPONSE = struct.Struct("!BBBB I I 12s")  # version, R|opcode, reserved, result, lifetime, epoch
_PCP_MAP = struct.Struct("!12s B 3s H H 16s")  # nonce, protocol, reserved, internal, external, ext IP
_NATPMP_MAP = struct.Struct("!BBH H H I")  # version, opcode, reserved, internal, external, lifetime
_NATPMP_MAP_RESPONSE = struct.Struct("!BBH I H H I")  # ..., result, epoch, internal, external, lifetime
_NATPMP_ADDRESS_RESPONSE = struct.Struct("!BBH I 4s")


class PortMapError(ValueError):
    """A malformed port-mapping message."""


def _ip16(host: str) -> bytes:
    ip = ipaddress.ip_address(host)
    return ip.packed if ip.version == 6 else b"\x00" * 10 + b"\xff\xff" + ip.packed


def _host(packed: bytes) -> str:
    ip = ipaddress.IPv6Address(packed)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)


@dataclass(frozen=True)
class MapRequest:
    """A PCP MAP request (RFC 6887 11.1), or NAT-PMP's equivalent."""

    protocol: str
    internal_port: int
    lifetime: int
    client_ip: str
    nonce: bytes = b"\x00" * 12
    suggested_port: int = 0
    suggested_ip: str = "0.0.0.0"


@dataclass(frozen=True)
class MapResponse:
    """What the router answered: result, and on success the external address it assigned."""

    version: int
    result: int
    lifetime: int
    epoch: int
    protocol: str
    internal_port: int
    external_port: int
    external_ip: str | None
    nonce: bytes = b""

    @property
    def ok(self) -> bool:
        """Whether the mapping was made (or deleted)."""
        return self.result == 0

    @property
    def reason(self) -> str:
        """The result code in words."""
        table = PCP_RESULTS if self.version == PCP_VERSION else NATPMP_RESULTS
        return table.get(self.result, f"result code {self.result}")


def encode_pcp_map(request: MapRequest) -> bytes:
    """A PCP MAP request: 24-byte common header and the 36-byte MAP body."""
    if request.protocol not in PROTOCOLS or len(request.nonce) != 12:
        raise PortMapError("MAP needs protocol udp or tcp and a 12-byte nonce")
    header = _PCP_HEADER.pack(PCP_VERSION, OP_MAP, 0, request.lifetime, _ip16(request.client_ip))
    body = _PCP_MAP.pack(
        request.nonce,
        PROTOCOLS[request.protocol],
        b"\x00" * 3,
        request.internal_port,
        request.suggested_port,
        _ip16(request.suggested_ip),
    )
    return header + body


def encode_natpmp_map(request: MapRequest) -> bytes:
    """A NAT-PMP mapping request (12 bytes)."""
    opcode = NATPMP_OP_UDP if request.protocol == "udp" else NATPMP_OP_TCP
    return _NATPMP_MAP.pack(NATPMP_VERSION, opcode, 0, request.internal_port, request.suggested_port, request.lifetime)


def encode_natpmp_address() -> bytes:
    """A NAT-PMP request for the router's public address."""
    return bytes([NATPMP_VERSION, NATPMP_OP_ADDRESS])


def decode_natpmp_address(data: bytes) -> tuple[int, str | None]:
    """(result, public address) of a NAT-PMP public address response."""
    if len(data) < _NATPMP_ADDRESS_RESPONSE.size or data[0] != NATPMP_VERSION or data[1] != RESPONSE_BIT:
        raise PortMapError("not a NAT-PMP public address response")
    _, _, result, _, packed = _NATPMP_ADDRESS_RESPONSE.unpack_from(data)
    return result, str(ipaddress.IPv4Address(packed)) if result == 0 else None


def decode_response(data: bytes) -> MapResponse:
    """A PCP MAP response or a NAT-PMP mapping response (or NAT-PMP's refusal of PCP)."""
    if len(data) < 2:
        raise PortMapError("response too short")
    version = data[0]
    if version == PCP_VERSION:
        if len(data) < _PCP_RESPONSE.size + _PCP_MAP.size or len(data) % 4:
            raise PortMapError("PCP response of the wrong size")
        _, opcode, _, result, lifetime, epoch, _ = _PCP_RESPONSE.unpack_from(data)
        if opcode != RESPONSE_BIT | OP_MAP:
            raise PortMapError(f"PCP opcode {opcode:#04x} is not a MAP response")
        nonce, proto, _, internal, external, ext_ip = _PCP_MAP.unpack_from(data, _PCP_RESPONSE.size)
        names = {v: k for k, v in PROTOCOLS.items()}
        return MapResponse(
            PCP_VERSION,
            result,
            lifetime,
            epoch,
            names.get(proto, str(proto)),
            internal,
            external,
            _host(ext_ip) if result == 0 else None,
            nonce,
        )
    if version == NATPMP_VERSION:
        if len(data) < 4:
            raise PortMapError("NAT-PMP response too short")
        result = struct.unpack_from("!H", data, 2)[0]
        if result != 0 and len(data) < _NATPMP_MAP_RESPONSE.size:
            # An error, such as a NAT-PMP-only router's "unsupported version" answer to PCP
            # (opcode 0 in RFC 6886, 128 in its errata): 8 bytes, no mapping fields.
            return MapResponse(NATPMP_VERSION, result, 0, 0, "", 0, 0, None)
        opcode = data[1]
        if not opcode & RESPONSE_BIT or opcode & 0x7F not in (NATPMP_OP_UDP, NATPMP_OP_TCP):
            raise PortMapError("not a NAT-PMP mapping response")
        if len(data) < _NATPMP_MAP_RESPONSE.size:
            raise PortMapError("NAT-PMP response too short")
        _, _, result, epoch, internal, external, lifetime = _NATPMP_MAP_RESPONSE.unpack_from(data)
        proto = "tcp" if opcode & 0x7F == NATPMP_OP_TCP else "udp"
        return MapResponse(NATPMP_VERSION, result, lifetime, epoch, proto, internal, external, None)
    raise PortMapError(f"unknown port-mapping version {version}")


def decode_pcp_map_request(data: bytes) -> tuple[MapRequest, str | None]:
    """A PCP MAP request as a server reads it, or (request, error) where error names the
    PCP result to answer with (for routers and tests)."""
    if len(data) < _PCP_HEADER.size + _PCP_MAP.size or len(data) > 1100 or len(data) % 4:
        raise PortMapError("PCP request of the wrong size")
    version, opcode, _, lifetime, client = _PCP_HEADER.unpack_from(data)
    if version != PCP_VERSION or opcode != OP_MAP:
        raise PortMapError("not a PCP MAP request")
    nonce, proto, _, internal, external, ext_ip = _PCP_MAP.unpack_from(data, _PCP_HEADER.size)
    names = {v: k for k, v in PROTOCOLS.items()}
    request = MapRequest(
        names.get(proto, str(proto)), internal, lifetime, _host(client), nonce, external, _host(ext_ip)
    )
    return request, None if proto in names else "unsupported protocol"


def encode_pcp_map_response(request: MapRequest, result: int, lifetime: int, epoch: int, external: Endpoint) -> bytes:
    """A server's answer to ``request``."""
    header = _PCP_RESPONSE.pack(PCP_VERSION, RESPONSE_BIT | OP_MAP, 0, result, lifetime, epoch, b"\x00" * 12)
    body = _PCP_MAP.pack(
        request.nonce,
        PROTOCOLS.get(request.protocol, 0),
        b"\x00" * 3,
        request.internal_port,
        external[1],
        _ip16(external[0]),
    )
    return header + body


def encode_natpmp_map_response(
    opcode: int, result: int, epoch: int, internal: int, external: int, lifetime: int
) -> bytes:
    """A NAT-PMP server's answer to a mapping request."""
    return _NATPMP_MAP_RESPONSE.pack(NATPMP_VERSION, RESPONSE_BIT | opcode, result, epoch, internal, external, lifetime)


def encode_natpmp_address_response(result: int, epoch: int, address: str) -> bytes:
    """A NAT-PMP server's answer to a public address request."""
    return _NATPMP_ADDRESS_RESPONSE.pack(
        NATPMP_VERSION, RESPONSE_BIT, result, epoch, ipaddress.IPv4Address(address).packed
    )
