"""The STUN server's core (sans-I/O): a Binding request in, the response and where to send it out.

With two public IPs and two ports the server offers the RFC 5780 behaviour-discovery
set: four transport addresses, CHANGE-REQUEST honoured, OTHER-ADDRESS and
RESPONSE-ORIGIN set. RFC 3489 ("classic") clients get MAPPED-ADDRESS, SOURCE-ADDRESS
and CHANGED-ADDRESS. The driver (:mod:`peerpath.nat.stun_server`) owns the sockets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from peerpath.ratelimit import RateLimiter
from peerpath.wire import stun
from peerpath.wire.stun import Address, Attr, Class, ErrorCode, Message, StunError

SOFTWARE = b"peerpath"
#: A response is never more than this many bytes larger than the request it answers.
MAX_AMPLIFICATION_BYTES = 128


class SocketKey(NamedTuple):
    """Which of the server's (up to) four transport addresses: IP index and port index, 0 or 1."""

    ip: int
    port: int


class Reply(NamedTuple):
    """A response to send: its bytes, from which server socket, and to where."""

    data: bytes
    via: SocketKey
    to: Address
    error: bool = False


@dataclass
class Counters:
    """What the server has seen, for logs and metrics."""

    received: int = 0
    answered: int = 0
    errors_sent: int = 0
    dropped_malformed: int = 0
    dropped_not_request: int = 0
    dropped_rate_limited: int = 0
    dropped_oversized_reply: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return dict(self.__dict__)


class StunResponder:
    """Answers STUN Binding requests for a server with one or two IPs and two ports."""

    def __init__(
        self,
        ips: list[str],
        ports: tuple[int, int],
        *,
        rate_limiter: RateLimiter | None = None,
        software: bytes = SOFTWARE,
    ) -> None:
        if not 1 <= len(ips) <= 2:
            raise ValueError("a STUN server has one or two public IPs")
        if len(ips) == 2 and ips[0] == ips[1]:
            raise ValueError("the two public IPs must differ")
        self.ips = [str(Address(ip, 0).host) for ip in ips]
        self.ports = ports
        self.rate_limiter = rate_limiter or RateLimiter()
        self.software = software
        self.counters = Counters()

    @property
    def full(self) -> bool:
        """True when the server can honour CHANGE-REQUEST (two IPs; RFC 5780 behaviour discovery)."""
        return len(self.ips) == 2

    def address_of(self, key: SocketKey) -> Address:
        """The transport address of one of the server's sockets."""
        return Address(self.ips[key.ip], self.ports[key.port])

    def socket_keys(self) -> list[SocketKey]:
        """The sockets the driver should open."""
        if self.full:
            return [SocketKey(i, p) for i in (0, 1) for p in (0, 1)]
        return [SocketKey(0, 0)]

    def handle(self, data: bytes, source: Address, local: SocketKey, now: float, *, tcp: bool = False) -> Reply | None:
        """Answer one datagram (or one TCP-framed message) that arrived on ``local`` from ``source``.

        Returns None for anything that gets no answer: not STUN, malformed, not a
        request, or over the source's rate limit. Never raises for bad input.
        """
        self.counters.received += 1
        try:
            request = stun.parse(data)
        except StunError:
            self.counters.dropped_malformed += 1
            return None
        if request.cls is not Class.REQUEST:
            self.counters.dropped_not_request += 1
            return None
        if not self.rate_limiter.allow(source.host, now):
            self.counters.dropped_rate_limited += 1
            return None
        try:
            reply = self._answer(request, data, source, local, tcp=tcp)
        except StunError as exc:
            reply = self._error(request, source, local, ErrorCode(400, f"Bad Request: {exc}"))
        if len(reply.data) > max(len(data), stun.HEADER_LENGTH) + MAX_AMPLIFICATION_BYTES:
            self.counters.dropped_oversized_reply += 1
            return None
        if reply.error:
            self.counters.errors_sent += 1
        else:
            self.counters.answered += 1
        return reply

    def _error(
        self, request: Message, source: Address, local: SocketKey, error: ErrorCode, *extra: tuple[int, bytes]
    ) -> Reply:
        response = request.error_response(error, [*extra, (Attr.SOFTWARE, self.software)])
        return Reply(response.serialize(fingerprint=not request.classic), local, source, error=True)

    def _answer(self, request: Message, data: bytes, source: Address, local: SocketKey, *, tcp: bool) -> Reply:
        if request.method != stun.Method.BINDING:
            return self._error(request, source, local, ErrorCode(400, "Bad Request: only Binding is served"))
        unknown = request.unknown_required()
        if unknown:
            listed = b"".join(struct.pack("!H", t) for t in unknown[:16])
            return self._error(
                request, source, local, ErrorCode(420, "Unknown Attribute"), (Attr.UNKNOWN_ATTRIBUTES, listed)
            )
        change = request.change_request
        if (change.change_ip or change.change_port) and (tcp or not self.full):
            reason = "CHANGE-REQUEST is not served over TCP" if tcp else "this server has no alternate address"
            # RFC 5780 6.1: a server without an alternate address answers 420.
            return self._error(request, source, local, ErrorCode(420, reason), (Attr.UNKNOWN_ATTRIBUTES, b"\x00\x03"))
        via = SocketKey(local.ip ^ int(change.change_ip), local.port ^ int(change.change_port))
        origin = self.address_of(via)
        destination = source
        response_port = request.response_port
        if response_port is not None:
            if tcp:
                return self._error(request, source, local, ErrorCode(400, "RESPONSE-PORT is not served over TCP"))
            destination = Address(source.host, response_port)
        attrs: list[tuple[int, bytes]] = []
        if request.classic:
            attrs.append(request.encode_address(Attr.MAPPED_ADDRESS, source))
            attrs.append(request.encode_address(Attr.SOURCE_ADDRESS, origin))
            if self.full:
                other = self.address_of(SocketKey(local.ip ^ 1, local.port ^ 1))
                attrs.append(request.encode_address(Attr.CHANGED_ADDRESS, other))
        else:
            attrs.append(request.encode_address(Attr.XOR_MAPPED_ADDRESS, source))
            attrs.append(request.encode_address(Attr.RESPONSE_ORIGIN, origin))
            if self.full:
                other = self.address_of(SocketKey(local.ip ^ 1, local.port ^ 1))
                attrs.append(request.encode_address(Attr.OTHER_ADDRESS, other))
            padding = request.get(Attr.PADDING)
            if padding is not None:
                # RFC 5780 7.6: echo PADDING of the same size (bounded by the request's own size).
                attrs.append((Attr.PADDING, bytes(len(padding))))
        attrs.append((Attr.SOFTWARE, self.software))
        response = request.response(attrs)
        return Reply(response.serialize(fingerprint=not request.classic), via, destination)
