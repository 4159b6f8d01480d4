"""Connectivity checks for hole punching (sans-I/O).

A check is a small UDP datagram outside QUIC, sent from the node's one socket to a
candidate address of the peer. Both sides of a session agree on a check key over the
already authenticated, encrypted session, so a check proves its sender is the peer:

    check:    0xA0 | transaction id (12) | HMAC-SHA256(key, "check" | tid)[:16] | zero (19)
    response: 0xA1 | transaction id (12) | HMAC-SHA256(key, "response" | tid | observed)[:16]
              | observed address (the check's source as the responder saw it, 1+16+2 bytes)

A check is padded to a response's size, so answering one never sends more bytes than came
in (a replayed check from a spoofed source is no amplifier), and a transaction id is used
once: receivers answer each only the first time (:class:`peerpath.nat.punch.ReplayWindow`).
A check may carry more zero padding, up to :data:`MAX_SIZE` bytes in all: a path MTU probe
(:mod:`peerpath.session.pmtu`), answered like any other check.

The first byte has the long-header bit set and QUIC's fixed bit clear, like the UDP relay
frames (0x90-0x9F), so one socket demultiplexes QUIC, STUN, relay frames and checks.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct

from peerpath.wire.endpoint import Endpoint

CHECK = 0xA0
RESPONSE = 0xA1
TID_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
ADDRESS_BYTES = 19
#: Both kinds have this size (a check padded as a path MTU probe is larger).
SIZE = 1 + TID_BYTES + TAG_BYTES + ADDRESS_BYTES
#: The largest check: a path MTU probe of the largest datagram a session sends.
MAX_SIZE = 16384


class CheckError(ValueError):
    """A datagram that is not a well-formed, authentic check or response."""


def is_check(data: bytes) -> bool:
    """Whether a datagram on the node's socket belongs to the connectivity checks."""
    return bool(data) and 0xA0 <= data[0] <= 0xAF


def _tag(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()[:TAG_BYTES]


def encode_address(host: str, port: int) -> bytes:
    """An address in 19 bytes: family (4 or 6), 16 address bytes (IPv4 mapped), port."""
    ip = ipaddress.ip_address(host)
    packed = ip.packed if ip.version == 6 else b"\x00" * 10 + b"\xff\xff" + ip.packed
    return bytes([ip.version]) + packed + struct.pack("!H", port)


def decode_address(data: bytes) -> Endpoint:
    """The inverse of :func:`encode_address`."""
    if len(data) != ADDRESS_BYTES or data[0] not in (4, 6):
        raise CheckError("malformed address")
    ip = ipaddress.IPv6Address(data[1:17])
    host = str(ip.ipv4_mapped) if data[0] == 4 and ip.ipv4_mapped else str(ip)
    return host, struct.unpack("!H", data[17:19])[0]


def encode_check(key: bytes, tid: bytes, size: int = SIZE) -> bytes:
    """A check with transaction id ``tid``, padded with zeros to ``size`` bytes."""
    if not SIZE <= size <= MAX_SIZE:
        raise ValueError(f"a check has {SIZE} to {MAX_SIZE} bytes, not {size}")
    head = bytes([CHECK]) + tid + _tag(key, b"check", tid)
    return head + bytes(size - len(head))


def encode_response(key: bytes, tid: bytes, observed: Endpoint) -> bytes:
    """The answer to check ``tid`` that arrived from ``observed``."""
    address = encode_address(*observed)
    return bytes([RESPONSE]) + tid + _tag(key, b"response", tid, address) + address


def parse(key: bytes, data: bytes) -> tuple[int, bytes, Endpoint | None]:
    """(kind, tid, observed address or None) of an authentic check or response.

    Raises :class:`CheckError` for anything malformed or not made with ``key``.
    """
    if not is_check(data):
        raise CheckError("not a check")
    kind = data[0]
    head = 1 + TID_BYTES
    if kind not in (CHECK, RESPONSE):
        raise CheckError(f"unknown check kind {kind:#04x}")
    if len(data) != SIZE and not (kind == CHECK and SIZE < len(data) <= MAX_SIZE):
        raise CheckError(f"check or response of the wrong size ({len(data)} bytes)")
    if kind == CHECK:
        tid = data[1:head]
        if not hmac.compare_digest(data[head : head + TAG_BYTES], _tag(key, b"check", tid)):
            raise CheckError("check not made with this session's key")
        if data.count(0, head + TAG_BYTES) != len(data) - head - TAG_BYTES:
            raise CheckError("check with non-zero padding")
        return kind, tid, None
    tid, tag, address = data[1:head], data[head : head + TAG_BYTES], data[head + TAG_BYTES :]
    if not hmac.compare_digest(tag, _tag(key, b"response", tid, address)):
        raise CheckError("response not made with this session's key")
    return kind, tid, decode_address(address)
