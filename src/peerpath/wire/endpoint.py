"""Endpoints in text: ``host:port``, with brackets around an IPv6 host (how paths, candidates
and logs name an address)."""

from __future__ import annotations

#: An endpoint: (host, port). Every module passes endpoints as this one type (sockets take
#: it as it is); text is for the wire, logs and users.
Endpoint = tuple[str, int]


def format_endpoint(addr: Endpoint) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str, default_port: int | None = None) -> Endpoint:
    """The inverse of :func:`format_endpoint`; ValueError with a useful message.

    With ``default_port``, what a user types is taken too: ``HOST``, ``HOST:PORT``, a bare
    IPv6 address, ``[IPv6]`` or ``[IPv6]:PORT``.
    """
    if default_port is not None:
        return _parse_loose(text, default_port)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"bad endpoint {text!r}: expected HOST:PORT")
    return host, int(port)


def _parse_loose(text: str, default_port: int) -> Endpoint:
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':PORT' after ']' in {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {text!r} (expected 1-65535)")
    return host, int(port_text)
