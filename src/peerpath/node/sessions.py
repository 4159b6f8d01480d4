"""A node's session table: every session by its connection IDs, the demux that hands a QUIC
datagram to its session, and the responder sessions that Initials start (when
:class:`~peerpath.node.admission.Admission` lets them in)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from peerpath.clock import Clock
from peerpath.identity import Address, Identity
from peerpath.node.admission import Admission, Source, Verdict
from peerpath.quic import PacketHeader
from peerpath.session.connection import Connection, Role, Services, SessionConfig
from peerpath.session.pathset import Path, PathKind, PathSet
from peerpath.wire.datagram import quic_header

log = logging.getLogger(__name__)

#: Seconds a session that never got established stays in the table (its last datagrams
#: still find it, and are dropped there instead of starting another).
REFUSED_LINGER = 5.0
#: A client's Initial is padded to at least this many bytes (RFC 9000 14.1).
MIN_INITIAL = 1200


class SessionTable:
    """Every session of one node."""

    def __init__(
        self,
        identity: Identity,
        services: Services,
        config: SessionConfig,
        admission: Admission,
        counters: dict[str, int],
        clock: Clock,
        on_accepted: Callable[[Connection], None],
        on_event: Callable[[Connection, str, dict[str, Any]], None] | None = None,
    ) -> None:
        self._identity = identity
        self._services = services
        self._config = config
        self._admission = admission
        self._counters = counters
        self._clock = clock
        self._on_accepted = on_accepted
        self._on_event = on_event
        self._by_cid: dict[bytes, Connection] = {}
        #: Every session, open or closing.
        self.all: set[Connection] = set()
        #: Set when the node closes: no Initial starts a session any more.
        self.closing = False

    @property
    def live(self) -> list[Connection]:
        """Every session not yet closed."""
        return [c for c in self.all if not c.closed.done()]

    def connection_to(self, address: Address) -> Connection | None:
        """The established session with ``address``, if any. When both nodes dialled each
        other at once there are two; the one the lower address started is preferred, by
        both ends alike."""
        sessions = [c for c in self.all if c.peer == address and c.is_established]
        if not sessions:
            return None
        return min(sessions, key=lambda c: not self._canonical(c))

    def _canonical(self, conn: Connection) -> bool:
        """Whether ``conn`` is the one to keep of two sessions between the same two nodes."""
        if conn.peer is None:
            return False
        ours = self._identity.address
        started_by = ours if conn.role is Role.INITIATOR else conn.peer
        return started_by.digest == min(ours.digest, conn.peer.digest)

    def new(
        self,
        role: Role,
        paths: PathSet,
        *,
        expected_peer: Address | None = None,
        original_dcid: bytes | None = None,
        retry_scid: bytes | None = None,
    ) -> Connection:
        """A new session in the table (its connection IDs are registered as QUIC issues them)."""
        conn = Connection(
            self._identity,
            role,
            paths,
            self._services,
            self._config,
            expected_peer=expected_peer,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
            on_connection_id=self.register_cid,
            on_closed=self.forget,
            on_event=self._on_event,
            clock=self._clock,
        )
        self.all.add(conn)
        self.register_cid(conn, conn.quic.host_cid, True)
        return conn

    def register_cid(self, conn: Connection, cid: bytes, issued: bool) -> None:
        """A connection ID of ``conn`` issued (or retired)."""
        if issued:
            self._by_cid[cid] = conn
        elif self._by_cid.get(cid) is conn:
            del self._by_cid[cid]

    def forget(self, conn: Connection) -> None:
        """``conn`` is over: out of the table."""
        self.all.discard(conn)
        for cid in [cid for cid, c in self._by_cid.items() if c is conn]:
            del self._by_cid[cid]

    def owns(self, conn: Connection, datagram: bytes) -> bool:
        """Whether ``datagram`` is QUIC addressed to ``conn`` (by destination connection ID)."""
        header = quic_header(datagram)
        return header is not None and self._by_cid.get(header.destination_cid) is conn

    def deliver(self, data: bytes, key: tuple[PathKind, str], make_path: Callable[[], Path], source: Source) -> None:
        """Hand a datagram that arrived over the path named ``key`` to its session by
        destination connection ID; an Initial may start one."""
        self._counters["datagrams_received"] += 1
        header = quic_header(data)
        if header is None:
            self._counters["datagrams_dropped"] += 1
            return
        conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            conn = self._accept(header, len(data), make_path, source)
            if conn is None:
                self._counters["datagrams_dropped"] += 1
                return
        path = conn.paths.paths.get(key)
        if path is not None:
            conn.datagram_received(data, path)
        else:
            # A path no check has validated is not adopted while the relay is there to fall
            # back on (an on-path attacker could race a copy of a packet from elsewhere);
            # without a relay, follow the peer as QUIC itself would (a NAT rebinding).
            conn.datagram_received(data, make_path(), known=not conn.paths.has_kind(PathKind.RELAY))

    def _accept(
        self, header: PacketHeader, size: int, make_path: Callable[[], Path], source: Source
    ) -> Connection | None:
        """A responder session for an Initial, if :class:`Admission` lets it in (or a Retry)."""
        if self.closing or not header.initial or size < MIN_INITIAL or header.version is None:
            return None
        decision = self._admission.decide(
            source, header.version, header.destination_cid, header.source_cid, header.token, self._clock()
        )
        if decision.verdict is Verdict.RETRY:
            make_path().send_datagram(decision.retry_packet)
        if decision.verdict is not Verdict.ADMIT:
            return None
        paths = PathSet()
        paths.add(make_path())
        conn = self.new(Role.RESPONDER, paths, original_dcid=decision.original_dcid, retry_scid=decision.retry_scid)
        self.register_cid(conn, header.destination_cid, True)
        # Established or not, by the connect timeout at the latest: the slot is free again.
        conn.established.add_done_callback(lambda _: self._admission.finished(decision.slot))
        conn.established.add_done_callback(lambda f: self._settled(conn, f))
        return conn

    def _settled(self, conn: Connection, future: asyncio.Future[None]) -> None:
        if future.cancelled() or future.exception() is not None:
            self._counters["sessions_refused"] += 1
            asyncio.get_running_loop().call_later(REFUSED_LINGER, self.forget, conn)
        else:
            self._on_accepted(conn)
