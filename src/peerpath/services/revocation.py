"""Trust taken back takes effect on live sessions too: a peer removed from the trust store
(``peerpath trust remove``) has its sessions closed within :data:`CHECK_EVERY` seconds.

Streams it opens are refused at once anyway (``Node.stream_handler`` checks trust for each
one); closing the session ends what it had open already (subscriptions, task watches,
tunnels) and stops it from using the node at all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from peerpath import errors
from peerpath.node.node import Node
from peerpath.tasks import cancel_all, spawn

log = logging.getLogger(__name__)

#: Seconds between looks at the trust store (it re-reads its file only when it changed).
CHECK_EVERY = 2.0


class Revocation:
    """Closes the sessions of peers that are no longer trusted."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.closed = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Look at the trust store every :data:`CHECK_EVERY` seconds."""
        spawn(self._watch(), "closing sessions of peers no longer trusted", self._tasks)

    async def close(self) -> None:
        """Stop looking."""
        await cancel_all(self._tasks)

    def check(self) -> int:
        """Close every session whose peer is no longer trusted now; how many were closed."""
        revoked = [c for c in self.node.connections if c.peer is not None and not self.node.is_trusted(c.peer)]
        for conn in revoked:
            log.info("closing the session with %s: it is no longer trusted", conn.peer)
            spawn(conn.close("no longer trusted"), f"closing the session with {conn.peer}", self._tasks)
        self.closed += len(revoked)
        return len(revoked)

    async def _watch(self) -> None:
        said = ""
        while True:
            await asyncio.sleep(CHECK_EVERY)
            try:
                self.check()
                said = ""
            except errors.PeerpathError as exc:  # an unreadable trust file: say so once, look again later
                if str(exc) != said:
                    log.warning("cannot check who is still trusted: %s", exc)
                said = str(exc)
