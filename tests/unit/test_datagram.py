"""One classifier tells every datagram on a node's socket apart by its first bytes."""

from __future__ import annotations

import os

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from peerpath.wire import punch, stun
from peerpath.wire import rendezvous as rv
from peerpath.wire.datagram import DatagramKind, classify, quic_header


def quic_initial() -> bytes:
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["peerpath/1"]))
    quic.connect(("198.51.100.7", 4433), now=0.0)
    return quic.datagrams_to_send(now=0.0)[0][0]


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (stun.Message(stun.Method.BINDING, stun.Class.REQUEST, os.urandom(12)).serialize(), DatagramKind.STUN),
        (rv.encode_udp_hello(bytes(8), bytes(32)), DatagramKind.RELAY),
        (rv.encode_udp_delivery(bytes(32), bytes(16), b"\x40quic"), DatagramKind.RELAY),
        (punch.encode_check(bytes(32), bytes(12)), DatagramKind.CHECK),
        (quic_initial(), DatagramKind.QUIC),
        (b"", DatagramKind.UNKNOWN),
        (b"\x00\x01\x00\x04", DatagramKind.UNKNOWN),  # STUN-like but not STUN: no cookie
        (bytes([0x80]) + os.urandom(40), DatagramKind.UNKNOWN),  # long header, fixed bit clear
    ],
)
def test_every_kind_is_told_apart(data: bytes, kind: DatagramKind) -> None:
    assert classify(data) is kind


def test_quic_headers_route_by_destination_connection_id() -> None:
    initial = quic_initial()
    header = quic_header(initial)
    assert header is not None and len(header.destination_cid) == 8
    assert quic_header(punch.encode_check(bytes(32), bytes(12))) is None
    assert quic_header(initial[:7]) is None  # cut short: not a packet
    assert quic_header(b"") is None
