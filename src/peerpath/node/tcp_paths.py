"""Direct TCP paths: a round's connects to the peer's TCP candidates (simultaneous open
through NATs that filter, a plain connect to a listener in the open), the connectivity
checks on TCP links that prove which session a link carries, and the path each proved
link becomes. The links themselves are :mod:`peerpath.node.tcp`'s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from peerpath.clock import Clock
from peerpath.nat.traversal import LINGER, RoundPlan, Traversal
from peerpath.session.connection import Connection
from peerpath.session.pathset import PathKind
from peerpath.wire import punch
from peerpath.wire.endpoint import Endpoint

if TYPE_CHECKING:
    from peerpath.node.tcp import TcpLink, TcpLinks

log = logging.getLogger(__name__)

#: Our checks in flight on TCP links, at most (the oldest are forgotten).
MAX_CHECKS = 1024


class Session(Protocol):
    """A session whose direct paths are kept (:class:`peerpath.node.direct.DirectPaths`'s)."""

    conn: Connection
    traversal: Traversal

    @property
    def live(self) -> bool:
        """Whether the session is still open."""
        ...


class Sessions(Protocol):
    """The sessions TCP paths serve."""

    def session_of(self, conn: Connection) -> Session | None:
        """The kept session of ``conn``, if any."""
        ...

    def open_sessions(self) -> Sequence[Session]:
        """Every open session."""
        ...

    def probe_answered(self, session: Session, tid: bytes, kind: PathKind, remote: str) -> None:
        """A probe answer came back over a path."""
        ...


class TcpSide(Protocol):
    """What TCP paths need of the node."""

    tcp: TcpLinks
    clock: Clock


class TcpPaths:
    """One node's direct TCP paths."""

    def __init__(self, node: TcpSide, sessions: Sessions, counters: dict[str, int]) -> None:
        self.node = node
        self._sessions = sessions
        self.counters = counters
        #: Keys of TCP rounds under way: checks on inbound links are matched against them.
        self._rounds: dict[bytes, tuple[Session, asyncio.Event]] = {}
        #: Our checks in flight on TCP links: tid -> (link, session, key).
        self._checks: dict[bytes, tuple[TcpLink, Session, bytes]] = {}

    async def round(self, session: Session, plan: RoundPlan) -> bool:
        """Connect to the peer's TCP candidates from our TCP port while it connects to ours
        (simultaneous open through filtering NATs; a plain connect where it listens in the
        open); the first link on which a check is answered becomes a direct TCP path."""
        if self.node.tcp.port is None:
            return False
        clock = self.node.clock
        done = asyncio.Event()
        self._rounds[plan.key] = (session, done)
        self.counters["tcp_rounds"] += 1
        deadline = plan.tcp_deadline

        async def attempt(addr: Endpoint) -> None:
            link = await self.node.tcp.connect(addr, timeout=max(0.1, deadline - clock()))
            if link is not None and link.conn is not None and link.conn.closed.done():
                link.release()  # still held by a session that just ended
            if link is not None and not link.closed and link.conn in (None, session.conn):
                self._send_check(link, session, plan.key)

        tasks: list[asyncio.Task[None]] = []
        try:
            await asyncio.sleep(max(0.0, plan.start - clock()))
            tasks = [asyncio.ensure_future(attempt(addr)) for addr in plan.tcp]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), max(0.0, deadline + 1.0 - clock()))
            return done.is_set()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # The peer's checks may still be on their way: accept them a little longer.
            asyncio.get_running_loop().call_later(LINGER, self._rounds.pop, plan.key, None)

    def _send_check(self, link: TcpLink, session: Session, key: bytes) -> None:
        tid = os.urandom(punch.TID_BYTES)
        self._checks[tid] = (link, session, key)
        if len(self._checks) > MAX_CHECKS:
            self._checks.pop(next(iter(self._checks)))
        link.send(punch.encode_check(key, tid))

    def _owners(self, link: TcpLink) -> list[tuple[Session, bytes]]:
        """Whose keys a check on ``link`` may be under: the session the link carries (the key
        that proved it first), else TCP rounds under way and every live session."""
        session = self._sessions.session_of(link.conn) if link.conn is not None else None
        if session is not None and session.live and link.key is not None:
            keys = [link.key] + [k for k in reversed(session.traversal.keys) if k != link.key]
            return [(session, k) for k in keys]
        owners = [(s, k) for k, (s, _) in reversed(self._rounds.items())]
        return owners + [(s, k) for s in self._sessions.open_sessions() for k in reversed(s.traversal.keys)]

    def on_check(self, link: TcpLink, data: bytes) -> None:
        """A check-range frame on a TCP link: answer the peer's checks, validate ours."""
        for session, key in self._owners(link):
            try:
                kind, tid, _ = punch.parse(key, data)
            except punch.CheckError:
                continue
            if kind == punch.CHECK:
                link.send(punch.encode_response(key, tid, link.remote))
                if link.conn is not session.conn:
                    # The peer proved the link is its own; prove it our way too.
                    link.identified(session.conn, key)
                    self._send_check(link, session, key)
                return
            pending = self._checks.get(tid)
            if pending is not None and pending[0] is link and pending[2] == key:
                del self._checks[tid]
                self._validated(link, session, key)
            else:
                self._sessions.probe_answered(session, tid, PathKind.DIRECT_TCP, link.name)
            return
        if link.conn is None and not link.proved:
            link.close()  # not a check of any session we know: nothing else is allowed here

    def _validated(self, link: TcpLink, session: Session, key: bytes) -> None:
        conn = session.conn
        if not session.live:
            link.close()
            return
        link.identified(conn, key)
        session.traversal.found(key)
        conn.relay_reason = None
        existing = conn.paths.paths.get((PathKind.DIRECT_TCP, link.name))
        if existing is not None and existing.send_datagram != link.send:
            conn.paths.remove(existing)  # an earlier link to the same endpoint
        path = conn.paths.add_validated(link.path(), self.node.clock())
        if path.send_datagram == link.send and existing is not path:
            self.counters["tcp_paths"] += 1
            log.info("direct path to %s: %s", conn.peer, path.describe())
        pending = self._rounds.get(key)
        if pending is not None:
            pending[1].set()

    def on_lost(self, link: TcpLink) -> None:
        """A TCP link closed: its path leaves the session (the relay takes over at once)."""
        conn = link.conn
        if conn is None:
            return
        path = conn.paths.paths.get((PathKind.DIRECT_TCP, link.name))
        if path is not None and path.send_datagram == link.send:
            conn.paths.remove(path)
            log.info("direct path to %s closed: %s", conn.peer, path.describe())
