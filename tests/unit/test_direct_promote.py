"""Which socket carries a direct UDP path a round proved (DirectPaths._promote), against a
stand-in node and session: only the driver's bookkeeping is under test."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from peerpath.clock import monotonic
from peerpath.nat.traversal import Traversal
from peerpath.node.direct import DirectPaths, Watched
from peerpath.session.pathset import Path, PathKind, PathSet, format_endpoint


class Sock:
    """Records what is sent from it."""

    def __init__(self, name: str) -> None:
        self.name, self.sent = name, []  # type: ignore[var-annotated]

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


class Session:
    """The part of a Connection a round's promotion touches."""

    def __init__(self) -> None:
        self.paths, self.relay_reason, self.peer = PathSet(), "not yet", "peer"


def setup() -> tuple[DirectPaths, Any, Sock]:
    main = Sock("main")

    def udp_path(addr: tuple[str, int], via: Sock | None = None) -> Path:
        sock = via or main
        return Path(PathKind.DIRECT_UDP, format_endpoint(addr), lambda d: sock.sendto(d, addr))

    node = SimpleNamespace(udp=SimpleNamespace(main=main, path=udp_path), clock=monotonic)
    conn = Session()
    conn.paths.add(Path(PathKind.RELAY, "relay", lambda d: None))
    return DirectPaths(node), Watched(conn, Traversal(initiator=True)), main  # type: ignore[arg-type]


def test_a_path_found_again_from_another_socket_sends_from_that_socket() -> None:
    direct, session, main = setup()
    conn = session.conn
    addr = ("198.51.100.7", 4000)
    direct._promote(session, b"k1", [addr], main)
    path = conn.paths.current
    assert path is not None and path.kind is PathKind.DIRECT_UDP and conn.relay_reason is None
    conn.paths.send(b"one")
    spray = Sock("spray")  # the main socket's mapping died; a birthday socket found the peer again
    direct._promote(session, b"k2", [addr], spray)
    assert conn.paths.current is path  # the same path (its record kept), now from the new socket
    conn.paths.send(b"two")
    assert [d for d, _ in main.sent] == [b"one"] and [d for d, _ in spray.sent] == [b"two"]
    direct._promote(session, b"k3", [addr], spray)  # the same socket again changes nothing
    conn.paths.send(b"three")
    assert [d for d, _ in spray.sent] == [b"two", b"three"]
