"""The relay data plane: relayed datagrams from one registered agent to another, within the
sender's relay quota, over the receiver's UDP path or its link.

A relay frame is routed by its header and its 16-byte address alone; the datagram after them
is never decoded (it is end-to-end encrypted anyway) and is copied once, into what goes out.
Frames read together from one link are written together to each receiver's link (one TLS
record and one send for many datagrams, :meth:`DataPlane.flush`).
"""

from __future__ import annotations

import asyncio
import logging
import struct

from peerpath.rendezvous.presence import SEND_HIGH_WATER, Agent, UdpSocket
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint

log = logging.getLogger(__name__)

_RELAY = rv.FrameType.RELAY
_HEAD = rv.RELAY_HEAD
# A RELAY frame's header (rv.frame_at reads it the same way), and the lengths it may give:
# what is not a RELAY frame of such a length goes to rv.frame_at, which says what it is.
_WORD = struct.Struct("!I")
_SMALLEST = rv.ADDRESS_BYTES + 1
_LARGEST = rv.ADDRESS_BYTES + rv.MAX_DATAGRAM


class DataPlane:
    """Forwards relayed datagrams between the agents online (``agents``, by address digest),
    counting in ``counters``; an agent over its relay quota ``cutoff`` times in a row is cut off
    (:class:`~peerpath.rendezvous.limits.CutOff` raised to whoever read its frame)."""

    def __init__(self, agents: dict[bytes, Agent], counters: dict[str, int], cutoff: int) -> None:
        self.agents = agents
        self.counters = counters
        self.cutoff = cutoff
        #: Agents whose outbox holds frames not yet written to their link.
        self._pending: list[Agent] = []
        self._flush_due = False

    def relay(self, source: Agent, destination: bytes, datagram: bytes | memoryview, now: float) -> None:
        """One datagram from ``source`` for the agent whose address digest is ``destination``."""
        size = len(datagram)
        if not source.relay_quota.take(size, now):
            self.counters["relay_dropped_quota"] += 1
            source.over("relay", self.cutoff)
            return
        if source.overquota is not None:
            source.within("relay")
        target = self.agents.get(destination)
        if target is None:
            self.counters["relay_dropped_offline"] += 1
            return
        origin = source.address.digest
        path = target.udp_path(now)
        if path is not None:
            sent = path[0].sendto(rv.seal_udp_delivery(target.mac, origin, datagram), path[1])
        else:
            sent = self._to_link(target, origin, datagram)
        if not sent:
            self.counters["relay_dropped_backpressure"] += 1
            return
        source.relayed_out += size
        target.relayed_in += size
        self.counters["relay_frames"] += 1
        self.counters["relay_bytes"] += size

    def relay_frames(self, source: Agent, data: bytes | bytearray | memoryview, offset: int, now: float) -> int:
        """Route the RELAY frames of ``source``'s stream that start at ``offset`` of ``data``, up
        to the first frame of another type or one not all there yet, whose offset is returned.
        Frames for receivers on a link wait in their outboxes, as views of ``data``: the caller
        calls :meth:`flush` before ``data`` changes.

        Raises :class:`~peerpath.wire.rendezvous.FrameError` for a malformed header and
        :class:`~peerpath.rendezvous.limits.CutOff` for a source cut off (the frames before it
        are routed and counted)."""
        agents, pending, counters = self.agents, self._pending, self.counters
        view = memoryview(data)
        size_of = len(view)
        origin = source.address.digest
        quota = source.relay_quota
        # The quota is taken for every byte that may follow at once and what was not relayed
        # given back at the end (the bucket ends where frame-by-frame taking would leave it);
        # only a source near its limit has each frame taken on its own.
        credit = size_of - offset
        if not quota.take(credit, now):
            credit = 0
        elif source.overquota is not None:
            source.within("relay")
        frames = relayed = spent = dropped = offline = 0
        last: bytes | None = None
        target: Agent | None = None
        path: tuple[UdpSocket, Endpoint] | None = None
        out: list[bytes | memoryview] | None = None
        # What each frame out starts with: its header (the same as the frame in) and the source.
        prefixes: dict[int, bytes] = {}
        try:
            while size_of - offset >= _HEAD:
                (word,) = _WORD.unpack_from(view, offset)
                if word >> 24 != _RELAY or not _SMALLEST <= (word & 0xFFFFFF) <= _LARGEST:
                    break  # another frame, or a malformed one: frame_at tells which
                start, end = offset, offset + 4 + (word & 0xFFFFFF)
                if end > size_of:
                    break
                offset = end
                size = end - start - _HEAD
                spent += size
                if not credit:
                    if not quota.take(size, now):
                        counters["relay_dropped_quota"] += 1
                        source.over("relay", self.cutoff)
                        continue
                    if source.overquota is not None:
                        source.within("relay")
                destination = bytes(view[start + 4 : start + _HEAD])
                if destination != last:
                    last, out = destination, None
                    target = agents.get(destination)
                    if target is None:
                        offline += 1
                        continue
                    path = target.udp_path(now)
                    if path is None:
                        out = target.outbox
                        if out is None:
                            link = target.link
                            if not link.is_closing() and link.buffered() <= SEND_HIGH_WATER:
                                out = target.outbox = []
                                pending.append(target)
                elif target is None:
                    offline += 1
                    continue
                if path is not None:
                    if not path[0].sendto(rv.seal_udp_delivery(target.mac, origin, view[start + _HEAD : end]), path[1]):
                        dropped += 1
                        continue
                elif out is None or target.outbox_bytes > SEND_HIGH_WATER:
                    dropped += 1
                    continue
                else:
                    prefix = prefixes.get(word)
                    if prefix is None:
                        prefix = prefixes[word] = _WORD.pack(word) + origin
                    out.append(prefix)
                    out.append(view[start + _HEAD : end])  # a view: flush() copies it out
                    target.outbox_bytes += end - start
                target.relayed_in += size
                frames += 1
                relayed += size
        finally:
            if credit:
                quota.level = min(quota.burst, quota.level + credit - spent)
            source.relayed_out += relayed
            counters["relay_frames"] += frames
            counters["relay_bytes"] += relayed
            if dropped:
                counters["relay_dropped_backpressure"] += dropped
            if offline:
                counters["relay_dropped_offline"] += offline
        return offset

    def _to_link(self, target: Agent, origin: bytes, datagram: bytes | memoryview) -> bool:
        """Put a datagram in ``target``'s outbox, written when what is being read is handled
        (:meth:`flush`, called soon); False if its link is closing or backed up."""
        out = target.outbox
        if out is None:
            link = target.link
            if link.is_closing() or link.buffered() > SEND_HIGH_WATER:
                return False
            out = target.outbox = []
            self._pending.append(target)
        elif target.outbox_bytes > SEND_HIGH_WATER:
            return False
        out.append(rv.encode_relay_header(len(datagram)) + origin)
        out.append(datagram)
        target.outbox_bytes += rv.RELAY_HEAD + len(datagram)
        if not self._flush_due:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._flush_due = True
            except RuntimeError:  # no loop (a test driving the plane by hand): at once
                self.flush()
        return True

    def flush(self) -> None:
        """Write every outbox to its link."""
        self._flush_due = False
        pending, self._pending = self._pending, []
        for target in pending:
            out, target.outbox, target.outbox_bytes = target.outbox, None, 0
            if out and not target.link.is_closing():
                try:
                    target.link.write(b"".join(out))
                except Exception:  # one broken link must not leave the others' outboxes stuck
                    log.exception("relayed frames to %s could not be written", target.address)

    def forget(self, agent: Agent) -> None:
        """``agent`` is offline: what waits for it is dropped."""
        agent.outbox, agent.outbox_bytes = None, 0
