"""Endpoints in text: ``host:port``, with brackets around an IPv6 host (how paths, candidates
and logs name an address)."""

from __future__ import annotations


def format_endpoint(addr: tuple[str, int]) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """The inverse of :func:`format_endpoint`; ValueError with a useful message."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"bad endpoint {text!r}: expected HOST:PORT")
    return host, int(port)
