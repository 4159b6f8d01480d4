"""The path set: which path carries the session's datagrams."""

from __future__ import annotations

from peerpath.session.pathset import Path, PathKind, PathSet


def path(kind: PathKind, remote: str, sent: list[tuple[str, bytes]]) -> Path:
    return Path(kind, remote, lambda d: sent.append((remote, d)))


def test_first_path_becomes_current_and_carries_datagrams() -> None:
    sent: list[tuple[str, bytes]] = []
    paths = PathSet()
    assert not paths.send(b"x")
    paths.add(path(PathKind.DIRECT_UDP, "198.51.100.7:41641", sent))
    assert paths.send(b"hello")
    assert sent == [("198.51.100.7:41641", b"hello")]
    assert paths.current is not None and paths.current.describe() == "direct udp 198.51.100.7:41641"
    assert paths.current.bytes_sent == 5 and paths.current.datagrams_sent == 1


def test_direct_is_preferred_over_relay() -> None:
    sent: list[tuple[str, bytes]] = []
    changes: list[tuple[str | None, str]] = []
    paths = PathSet(on_change=lambda old, new: changes.append((old and old.remote, new.remote)))
    relay = paths.add(path(PathKind.RELAY, "relay-1", sent))
    direct = path(PathKind.DIRECT_UDP, "198.51.100.7:1", sent)
    paths.received(direct, 100, now=1.0)
    assert paths.current is not None and paths.current.remote == "198.51.100.7:1"
    assert changes == [(None, "relay-1"), ("relay-1", "198.51.100.7:1")]
    paths.remove(paths.current)
    assert paths.current is relay


def test_same_kind_path_takes_over_only_after_the_current_goes_quiet() -> None:
    sent: list[tuple[str, bytes]] = []
    paths = PathSet()
    first = path(PathKind.DIRECT_UDP, "198.51.100.7:1", sent)
    other = path(PathKind.DIRECT_UDP, "198.51.100.7:2", sent)
    paths.received(first, 10, now=10.0)
    paths.received(other, 10, now=10.5)  # one packet from elsewhere: no move
    assert paths.current is first
    paths.received(first, 10, now=11.0)
    paths.received(other, 10, now=15.0)  # first silent for 4 s: a rebinding
    assert paths.current is other
    assert first.datagrams_received == 2 and other.bytes_received == 20


def test_direct_path_that_goes_silent_hands_over_to_the_relay_and_comes_back() -> None:
    sent: list[tuple[str, bytes]] = []
    paths = PathSet()
    relay = paths.add(path(PathKind.RELAY, "relay-1", sent))
    direct = paths.add_validated(path(PathKind.DIRECT_UDP, "198.51.100.7:1", sent), now=10.0)
    assert paths.current is direct
    paths.tick(now=12.0)
    assert paths.current is direct  # quiet for 2 s: still fine
    paths.tick(now=13.5)
    assert paths.current is relay  # 3.5 s of silence: the relay takes over
    paths.received(direct, 100, now=20.0)  # heard from again (checks or QUIC)
    assert paths.current is direct
