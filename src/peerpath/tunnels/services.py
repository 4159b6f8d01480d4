"""Services by name: which overlay port a service name stands for, where an exposed service
leads (``HOST:PORT`` or a Unix socket), and ``PEER[:SERVICE]`` as users write it.

A stream to a peer's service goes to an overlay port. Well-known names map to their
conventional ports (``ssh`` 22, ``web`` 80...); any other name maps to a port derived from
the name itself, in 49152-65535, so both ends agree on it without asking; a number is a
port.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from peerpath.wire.endpoint import Endpoint, parse_endpoint

#: Names users say, and the ports they mean.
WELL_KNOWN = {
    "ssh": 22,
    "web": 80,
    "http": 80,
    "https": 443,
    "postgres": 5432,
    "mysql": 3306,
    "redis": 6379,
    "mcp": 8000,
    "grpc": 50051,
}
#: Where names that are not well known land (the dynamic range, RFC 6335).
DERIVED_PORTS = (49152, 65535)
#: A service name: lower-case letters, digits and dashes, starting with a letter.
NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
#: The service a ``PEER`` without one means.
DEFAULT_SERVICE = "web"


class ServiceError(ValueError):
    """A service name, port or target that cannot be used; the message says why."""


def check_name(name: str) -> str:
    """``name`` if it is a valid service name (ServiceError otherwise)."""
    if not NAME.match(name):
        raise ServiceError(f"bad service name {name!r}: lower-case letters, digits and '-', starting with a letter")
    return name


def service_port(service: str) -> int:
    """The overlay port of ``service``: a number as it is, a well-known name's port, or
    the port derived from any other name."""
    if service.isascii() and service.isdigit():
        port = int(service)
        if not 1 <= port <= 0xFFFF:
            raise ServiceError(f"port {service} out of range 1-65535")
        return port
    check_name(service)
    if service in WELL_KNOWN:
        return WELL_KNOWN[service]
    low, high = DERIVED_PORTS
    digest = int.from_bytes(hashlib.sha256(service.encode()).digest()[:4], "big")
    return low + digest % (high - low + 1)


def split_target(text: str) -> tuple[str, str]:
    """``PEER[:SERVICE]`` into the peer and the service (default :data:`DEFAULT_SERVICE`)."""
    peer, sep, service = text.partition(":")
    if not peer:
        raise ServiceError(f"bad target {text!r}: expected PEER[:SERVICE]")
    if sep and not service:
        raise ServiceError(f"bad target {text!r}: no service after ':'")
    return peer, service or DEFAULT_SERVICE


@dataclass(frozen=True)
class Destination:
    """Where an exposed service's streams are connected: a TCP endpoint, or (``endpoint``
    None) the Unix socket at ``text``."""

    text: str
    endpoint: Endpoint | None

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``HOST:PORT`` (``[V6]:PORT``), or a Unix socket path (starting with ``/`` or ``.``)."""
        if text.startswith(("/", ".")):
            return cls(text, None)
        try:
            return cls(text, parse_endpoint(text))
        except ValueError:
            raise ServiceError(f"bad target {text!r}: expected HOST:PORT or a Unix socket path") from None

    def __str__(self) -> str:
        return self.text
