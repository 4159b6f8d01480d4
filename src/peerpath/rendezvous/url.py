"""Rendezvous URLs: ``pp://SERVER-ADDRESS@HOST:PORT[?wss=PORT]``.

The URL names the server's own overlay address, so an agent authenticates the server by
its TLS certificate's key, with no CA and no trust on first use. ``wss`` names the port
of its WebSocket-over-TLS listener (443 in production), tried when TLS to PORT fails.
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
    wss_port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?wss={self.wss_port}" if self.wss_port else ""
        return f"{SCHEME}{self.address}@{host}:{self.port}{query}"

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
        rest, _, query = rest.partition("?")
        wss_port = None
        for item in filter(None, query.split("&")):
            key, _, value = item.partition("=")
            if key != "wss":
                raise ValueError(f"unknown URL parameter {key!r} in {text!r}")
            wss_port = _port(value, text)
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
        return cls(address, host, port, wss_port)


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r} in {url!r}")
    return int(text)
