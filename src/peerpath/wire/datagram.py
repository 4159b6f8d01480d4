"""What a datagram on a node's socket is, told from its first bytes in one place (RFC 7983's
way of sharing a port): STUN (top two bits clear, the magic cookie, a length that fits), a UDP
relay frame (0x90-0x9F), a connectivity check (0xA0-0xAF), QUIC (the fixed bit 0x40 set, RFC
9000 17), or nothing of ours. The relay and check ranges have the long-header bit set and the
fixed bit clear, which no QUIC packet of ours has (we never negotiate RFC 9287's greased bit).
"""

from __future__ import annotations

import enum

from peerpath.quic import CID_LENGTH, PacketHeader, parse_header
from peerpath.wire.punch import is_check
from peerpath.wire.rendezvous import is_udp_relay
from peerpath.wire.stun import is_stun

__all__ = ["CID_LENGTH", "DatagramKind", "classify", "quic_header"]


class DatagramKind(enum.Enum):
    """Who a datagram is for."""

    STUN = "stun"
    RELAY = "relay"
    CHECK = "check"
    QUIC = "quic"
    UNKNOWN = "unknown"


def classify(data: bytes) -> DatagramKind:
    """The kind of ``data``, from its first bytes only (nothing is authenticated yet)."""
    if is_stun(data):
        return DatagramKind.STUN
    if is_udp_relay(data):
        return DatagramKind.RELAY
    if is_check(data):
        return DatagramKind.CHECK
    if data and data[0] & 0x40:
        return DatagramKind.QUIC
    return DatagramKind.UNKNOWN


def quic_header(data: bytes) -> PacketHeader | None:
    """The header of a QUIC packet (to route it by destination connection ID), or None if
    ``data`` is not one."""
    return parse_header(data)
