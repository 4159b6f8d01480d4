"""The QUIC engine adapter (peerpath.quic): what the session relies on from the QUIC library.

These fail if a library upgrade (or a new engine behind the adapter) stops giving one of the
behaviours: datagrams that decrypted are told apart, windows are held before authentication,
credit follows reads, and the peer's certificate and the stream events come through.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

from peerpath import quic
from peerpath.certs import certificate_address, self_signed_certificate
from peerpath.identity import Identity

WINDOW = 64 * 1024


class Pair:
    """An initiator and a responder engine joined in memory, with a clock of our own."""

    def __init__(self, max_stream_data: int = WINDOW) -> None:
        self.identity = Identity.generate()
        self.now = 0.0
        common = {"alpn": "test/1", "idle_timeout": 30.0, "max_datagram_size": 1350, "max_stream_data": max_stream_data}
        self.client = quic.QuicEngine(is_client=True, **common)
        self.client.connect(self.now)
        first = next(iter(self.client.datagrams(self.now)))
        header = quic.parse_header(first)
        assert header is not None and header.initial
        self.server = quic.QuicEngine(
            is_client=False,
            certificate=self_signed_certificate(self.identity),
            private_key=self.identity.private_key,
            original_destination_connection_id=header.destination_cid,
            **common,
        )
        self.server.hold_windows(16 * 1024)
        self.authentic: list[bool] = [self.server.receive(first, self.now)]
        self.events: dict[str, list[quic.Event]] = {"client": [], "server": []}
        self.pump()

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = False
            for datagram in self.client.datagrams(self.now):
                self.authentic.append(self.server.receive(datagram, self.now))
                moved = True
            for datagram in self.server.datagrams(self.now):
                self.client.receive(datagram, self.now)
                moved = True
            self.events["client"] += self.client.events()
            self.events["server"] += self.server.events()
            self.now += 0.001
            if not moved:
                break

    def received(self, side: str, stream_id: int) -> int:
        events = self.events[side]
        return sum(len(e.data) for e in events if isinstance(e, quic.StreamData) and e.stream_id == stream_id)


def test_the_installed_engine_is_the_version_pinned_in_pyproject() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("aioquic")]
    assert len(pins) == 1 and (match := re.fullmatch(r"aioquic==([\d.]+)", pins[0])), pins
    assert importlib.metadata.version("aioquic") == match.group(1)
    assert quic.ENGINE.split() == ["aioquic", match.group(1)]


def test_the_handshake_gives_the_peer_certificate_and_the_protocol() -> None:
    pair = Pair()
    done = [e for e in pair.events["client"] if isinstance(e, quic.HandshakeDone)]
    assert done == [quic.HandshakeDone("test/1")]
    certificate = pair.client.peer_certificate()
    assert certificate is not None and certificate_address(certificate) == pair.identity.address
    assert pair.server.peer_certificate() is None  # the initiator proves itself in-band
    assert pair.client.rtt is not None


def test_the_key_exchange_is_x25519_alone() -> None:
    """The initiator makes one key share (X25519), not one for each of aioquic's four groups,
    and the responder agrees on it: the handshake's costliest work, done once."""
    pair = Pair()
    client_tls = pair.client._quic.tls
    assert client_tls._x25519_private_key is not None
    assert client_tls._x448_private_key is None and not client_tls._ec_private_keys
    assert pair.server._quic.tls.key_schedule is not None
    assert pair.server._quic.tls._x25519_private_key is not None


def test_only_datagrams_that_decrypt_count_as_authentic() -> None:
    pair = Pair()
    assert all(pair.authentic) and len(pair.authentic) >= 2
    stream_id = pair.client.new_stream(unidirectional=True)
    pair.client.send(stream_id, b"hello")
    real = list(pair.client.datagrams(pair.now))
    assert real
    forged = bytearray(real[0])
    forged[-1] ^= 0x01  # one bit of the AEAD tag
    assert pair.server.receive(bytes(forged), pair.now) is False
    assert pair.server.receive(b"\x40" + bytes(60), pair.now) is False
    assert pair.server.receive(real[0], pair.now) is True


def test_before_open_windows_the_peer_may_open_no_bidirectional_stream() -> None:
    pair = Pair()
    stream_id = pair.client.new_stream()
    pair.client.send(stream_id, b"early")
    pair.pump()
    assert pair.received("server", stream_id) == 0
    pair.server.open_windows(1 << 20, 8)
    pair.pump()
    assert pair.received("server", stream_id) == len(b"early")


def test_before_open_windows_the_connection_window_stays_small() -> None:
    pair = Pair()
    control = pair.client.new_stream(unidirectional=True)
    pair.client.send(control, bytes(256 * 1024))
    pair.pump(200)
    assert pair.received("server", control) <= 16 * 1024


def test_credit_follows_what_the_reader_consumed() -> None:
    pair = Pair()
    pair.server.open_windows(64 << 20, 8)
    consumed = 0
    stream_id = pair.client.new_stream()
    pair.server.follow_reads(stream_id, lambda: consumed)
    pair.client.send(stream_id, bytes(8 * WINDOW))
    pair.pump(400)
    first = pair.received("server", stream_id)
    assert WINDOW // 2 <= first <= 2 * WINDOW  # held at about one window: nothing was read
    assert pair.client.unacked(stream_id) >= 6 * WINDOW
    consumed = first  # the application reads all of it
    pair.pump(400)
    assert pair.received("server", stream_id) > first


def test_stream_resets_and_closes_come_through_with_their_codes() -> None:
    pair = Pair()
    pair.server.open_windows(1 << 20, 8)
    stream_id = pair.client.new_stream()
    pair.client.send(stream_id, b"x")
    pair.pump()
    pair.client.reset(stream_id, 0x112)
    pair.pump()
    assert quic.StreamReset(stream_id, 0x112) in pair.events["server"]
    with pytest.raises(quic.StreamFinished):
        pair.client.send(stream_id, b"more")
    pair.server.close(0x101, "not welcome")
    pair.pump()
    pair.now += 1.0  # past the draining period
    pair.client.handle_timer(pair.now)
    pair.events["client"] += pair.client.events()
    assert quic.Terminated(0x101, "not welcome") in pair.events["client"]


def test_parse_header_refuses_what_is_not_quic() -> None:
    assert quic.parse_header(b"") is None
    assert quic.parse_header(b"\x00\x01\x02") is None
    assert quic.parse_header(b"\xc0\x00") is None  # a long header cut short
