"""Direct paths for sessions that started on the relay: candidate exchange over the session,
an RTT-synchronised punch, promotion of validated paths, and liveness probes that hand a
dead direct path back to the relay (and bring the session back when it recovers).

The exchange rides the session itself (authenticated, end-to-end encrypted): the initiator
sends ``punch-offer`` (a fresh check key and its candidates), the responder answers with
its candidates, and the initiator, having measured the round trip, sends ``punch-go`` and
starts half a round trip later, which is when ``punch-go`` reaches the responder, who
starts on arrival (DCUtR's synchronisation). Rounds repeat with backoff while the
session is on the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from peerpath import errors
from peerpath.nat.punch import Addr, Puncher
from peerpath.session.connection import Connection
from peerpath.session.pathset import PathKind, clock
from peerpath.wire import punch

if TYPE_CHECKING:
    from peerpath.node.node import Node

log = logging.getLogger(__name__)

#: Seconds between punch rounds while a session stays on the relay (the last repeats).
ROUND_BACKOFF = (0.5, 2.0, 5.0, 15.0, 30.0)
#: Liveness probes on direct paths.
PROBE_INTERVAL = 1.0
#: After a round ends, keep answering the peer's checks this long.
LINGER = 2.0


class _Offer(msgspec.Struct, frozen=True):
    key: bytes
    candidates: list[str]


class _Answer(msgspec.Struct, frozen=True):
    candidates: list[str]


def _parse(text: str) -> Addr | None:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return (host, int(port))


def _format(addr: Addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


class DirectPaths:
    """Upgrades one node's relayed sessions to direct paths and keeps them alive."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._keys: dict[Connection, bytes] = {}
        self._offers: dict[Connection, _Offer] = {}
        self._active: dict[Puncher, tuple[Connection, asyncio.Event]] = {}
        self._probes: dict[bytes, tuple[Connection, Addr]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters = {"rounds": 0, "rounds_direct": 0, "checks_sent": 0}

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop every round and probe."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def watch(self, conn: Connection, initiator: bool) -> None:
        """Keep ``conn`` on the best path for its lifetime (only the initiator starts rounds)."""
        self._spawn(self._maintain(conn, initiator))

    # -- rounds ---------------------------------------------------------------------------

    async def _maintain(self, conn: Connection, initiator: bool) -> None:
        failures = 0
        next_probe = 0.0
        while not conn.closed.done():
            path = conn.path
            on_relay = path is not None and path.kind is PathKind.RELAY
            if initiator and on_relay and conn.is_established:
                try:
                    direct = await self._round(conn)
                except (errors.PeerpathError, TimeoutError, ValueError, msgspec.DecodeError) as exc:
                    log.debug("punch round with %s failed: %s", conn.peer, exc)
                    direct = False
                failures = 0 if direct else failures + 1
                if not direct:
                    await asyncio.sleep(ROUND_BACKOFF[min(failures - 1, len(ROUND_BACKOFF) - 1)])
                    continue
            if clock() >= next_probe:
                self._probe(conn)
                next_probe = clock() + PROBE_INTERVAL
            await asyncio.sleep(min(PROBE_INTERVAL, 0.5))
        self._keys.pop(conn, None)
        self._offers.pop(conn, None)

    async def _round(self, conn: Connection) -> bool:
        key = os.urandom(punch.KEY_BYTES)
        offer = _Offer(key, self.node.candidates())
        start = clock()
        reply = await conn.request(msgspec.msgpack.encode(offer), timeout=5, _topic="punch-offer")
        rtt = clock() - start
        answer = msgspec.msgpack.decode(reply, type=_Answer)
        await conn.send(b"", _topic="punch-go")
        self.counters["rounds"] += 1
        remote = [a for a in map(_parse, answer.candidates) if a is not None]
        direct = await self._punch(conn, key, remote, clock() + rtt / 2)
        if direct:
            self.counters["rounds_direct"] += 1
        return direct

    async def internal_message(self, conn: Connection, topic: str, data: bytes) -> bytes | None:
        """The responder's side of a round."""
        if topic == "punch-offer":
            self._offers[conn] = msgspec.msgpack.decode(data, type=_Offer)
            return msgspec.msgpack.encode(_Answer(self.node.candidates()))
        if topic == "punch-go":
            offer = self._offers.pop(conn, None)
            if offer is not None:
                remote = [a for a in map(_parse, offer.candidates) if a is not None]
                self._spawn(self._punch(conn, offer.key, remote, clock()))
            return None
        raise ValueError(f"unknown internal topic {topic!r}")

    async def _punch(self, conn: Connection, key: bytes, candidates: list[Addr], start: float) -> bool:
        puncher = Puncher(key, candidates, start)
        wake = asyncio.Event()
        self._active[puncher] = (conn, wake)
        try:
            linger_until: float | None = None
            while not conn.closed.done():
                for data, addr in puncher.datagrams_to_send(clock()):
                    self.node._send_udp(data, addr)
                if puncher.done and linger_until is None:
                    linger_until = clock() + LINGER
                    self._promote(conn, key, puncher.validated)
                if linger_until is not None and clock() >= linger_until:
                    break
                due = puncher.next_time()
                deadline = min(x for x in (due, linger_until) if x is not None) if (due or linger_until) else None
                wait = 0.5 if deadline is None else max(0.0, deadline - clock())
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
            self.counters["checks_sent"] += puncher.checks_sent
            return bool(puncher.validated)
        finally:
            del self._active[puncher]

    def _promote(self, conn: Connection, key: bytes, validated: list[Addr]) -> None:
        if not validated:
            return
        self._keys[conn] = key
        now = clock()
        for addr in validated:
            path = conn.paths.add_validated(self.node._udp_path(addr), now)
            log.info("direct path to %s: %s", conn.peer, path.describe())

    # -- liveness ---------------------------------------------------------------------------

    def _probe(self, conn: Connection) -> None:
        key = self._keys.get(conn)
        if key is None:
            return
        for path in list(conn.paths.paths.values()):
            if path.kind is not PathKind.DIRECT_UDP:
                continue
            addr = _parse(path.remote)
            if addr is None:
                continue
            tid = os.urandom(punch.TID_BYTES)
            self._probes[tid] = (conn, addr)
            if len(self._probes) > 4096:
                self._probes.pop(next(iter(self._probes)))
            self.node._send_udp(punch.encode_check(key, tid), addr)

    def on_check(self, data: bytes, source: Addr) -> None:
        """A check-range datagram arrived on the node's socket."""
        for puncher, (_, wake) in list(self._active.items()):
            if puncher.receive(data, source):
                wake.set()
                return
        for conn, key in list(self._keys.items()):
            try:
                kind, tid, _ = punch.parse(key, data)
            except punch.CheckError:
                continue
            if kind == punch.CHECK:
                self.node._send_udp(punch.encode_response(key, tid, source), source)
            else:
                probe = self._probes.pop(tid, None)
                if probe is not None and probe[1] == source:
                    path = conn.paths.paths.get((PathKind.DIRECT_UDP, _format(source)))
                    if path is not None:
                        conn.paths.received(path, 0, clock())
            return

    def describe(self) -> dict[str, object]:
        """Counters for status displays."""
        return dict(self.counters)
