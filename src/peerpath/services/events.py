"""A node's events as a stream: ``peerpath events`` and ``async for e in node.watch_events()``.

Every event is a dict with ``event`` (its kind), ``time`` and the details its emitter gave:
``session-up`` / ``session-down`` (peer, path, reason), ``path-changed`` (old, new, reason),
``trust-request`` / ``trust-approval``, ``message`` / ``message-delivered`` / ``message-failed``,
``file-received`` / ``file-sent`` / ``file-failed``, and ``task-queued`` ... ``task-done``.
A watcher that falls behind loses events rather than slowing the node, and is told how many.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from peerpath.node import control
from peerpath.node.events import Events

#: Events kept for a watcher that has not taken them yet.
QUEUE = 1000
#: Seconds between the lines of a quiet event stream on the control socket (so that it notices a client gone).
KEEPALIVE = 5.0


async def watch(events: Events, *, queue: int = QUEUE) -> AsyncGenerator[dict[str, Any], None]:
    """Every event from now on, as ``{"event": kind, ...details}``; when the watcher falls more
    than ``queue`` behind, the next event it gets says how many it missed (``missed``)."""
    pending: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue)
    missed = 0

    def listener(kind: str, details: dict[str, Any]) -> None:
        nonlocal missed
        try:
            pending.put_nowait({"event": kind, **details})
        except asyncio.QueueFull:
            missed += 1

    events.listen(listener)
    try:
        while True:
            event = await pending.get()
            if missed:
                event, missed = {**event, "missed": missed}, 0
            yield event
    finally:
        events.unlisten(listener)


class EventsOp(control.Op, tag="events", frozen=True):
    """Stream the node's events until the client leaves."""


class EventsControl:
    """The events stream on the daemon's control socket."""

    def __init__(self, events: Events) -> None:
        self.events = events

    def control_ops(self) -> dict[type[control.Op], control.OpHandler]:
        """The op and its handler."""
        return {EventsOp: self._stream}

    def describe(self) -> dict[str, Any]:
        """Nothing to show in status."""
        return {}

    async def _stream(self, op: EventsOp) -> AsyncGenerator[dict[str, Any], None]:
        stream = watch(self.events)
        # One pending read, kept across keepalives: cancelling a read of the generator would end it.
        pending: asyncio.Future[dict[str, Any]] | None = None
        try:
            yield {"watching": True}
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(stream))
                done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE)
                if not done:
                    yield {"keepalive": True}
                    continue
                event, pending = pending.result(), None
                yield event
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
            await stream.aclose()
