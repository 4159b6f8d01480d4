"""Rendezvous URLs: ``pp://SERVER-ADDRESS@HOST:PORT``.

The URL names the server's own overlay address, so an agent authenticates the server by
its TLS certificate's key, with no CA and no trust on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

from peerpath.identity import Address

SCHEME = "pp://"
DEFAULT_PORT = 7000


@dataclass(frozen=True)
class RendezvousUrl:
    """Where a rendezvous server is, and which key it must prove."""

    address: Address
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{SCHEME}{self.address}@{host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """``host:port``, as paths describe it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> RendezvousUrl:
        """Parse a URL; ValueError saying what is wrong."""
        text = text.strip()
        if not text.startswith(SCHEME):
            raise ValueError(f"{text!r} is not a rendezvous URL (expected {SCHEME}ADDRESS@HOST:PORT)")
        rest = text[len(SCHEME) :].rstrip("/")
        address_text, at, location = rest.partition("@")
        if not at:
            raise ValueError(f"{text!r} names no server address (expected {SCHEME}ADDRESS@HOST:PORT)")
        address = Address.parse(address_text)
        host, port = location, DEFAULT_PORT
        if location.startswith("["):
            end = location.find("]")
            if end < 0:
                raise ValueError(f"unclosed '[' in {text!r}")
            host, tail = location[1:end], location[end + 1 :]
            if tail:
                port = _port(tail.removeprefix(":"), text)
        elif ":" in location:
            host, port_text = location.rsplit(":", 1)
            port = _port(port_text, text)
        if not host:
            raise ValueError(f"{text!r} names no host")
        return cls(address, host, port)


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r} in {url!r}")
    return int(text)
