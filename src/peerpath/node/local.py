"""The embedded default rendezvous: one per user and machine, on 127.0.0.1.

``peerpath up`` without ``--rendezvous`` uses it: the first node to start hosts it in its
own process; the others register with it. If the host goes away, the next node that
notices takes over (the key lives in a shared, 0600 directory, so every node of this user
can prove the same server address). Agents on one machine find each other with no setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from pathlib import Path

from peerpath.identity import Identity
from peerpath.node.state import default_state_dir
from peerpath.rendezvous.server import RendezvousServer
from peerpath.rendezvous.url import RendezvousUrl

log = logging.getLogger(__name__)

LOCAL_PORT = 7878
#: How often a node checks whether the local rendezvous needs a host.
TAKEOVER_INTERVAL = 1.0


def local_dir() -> Path:
    """Where the local rendezvous keeps its key (``PEERPATH_LOCAL_RENDEZVOUS_DIR`` overrides)."""
    override = os.environ.get("PEERPATH_LOCAL_RENDEZVOUS_DIR")
    return Path(override) if override else default_state_dir() / "local-rendezvous"


def local_port() -> int:
    """The local rendezvous port (``PEERPATH_LOCAL_RENDEZVOUS_PORT`` overrides)."""
    return int(os.environ.get("PEERPATH_LOCAL_RENDEZVOUS_PORT", LOCAL_PORT))


class LocalRendezvous:
    """Hosts the local rendezvous whenever nobody else does."""

    def __init__(self, directory: Path | None = None, port: int | None = None) -> None:
        self.directory = directory or local_dir()
        self.port = port or local_port()
        self.identity = Identity.load_or_create(self.directory)
        self.server: RendezvousServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> RendezvousUrl:
        """The URL every local node uses."""
        return RendezvousUrl(self.identity.address, "127.0.0.1", self.port)

    async def start(self) -> None:
        """Host it now if the port is free, and keep checking in the background."""
        await self._try_host()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _try_host(self) -> None:
        if self.server is not None:
            return
        server = RendezvousServer(self.identity, self.directory / "state")
        try:
            await server.start(["127.0.0.1"], self.port)
        except (OSError, sqlite3.Error):
            await server.close()
            return  # another node hosts it
        self.server = server
        log.info("hosting the local rendezvous on 127.0.0.1:%d", self.port)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(TAKEOVER_INTERVAL)
            if self.server is None and not await self._answers():
                await self._try_host()

    async def _answers(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True

    async def close(self) -> None:
        """Stop hosting (other nodes take over) and stop watching."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.server is not None:
            await self.server.close()
            self.server = None
