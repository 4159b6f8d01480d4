"""The running node of a state directory, as the MCP server reaches it: requests on its control
socket with a deadline each, and streams it opens to peers' services."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

from peerpath import errors
from peerpath.node import control

#: Seconds a request waits for the node's answers unless told otherwise (a session to a peer
#: may have to be made first: that takes up to 20 s through a relay).
CALL_TIMEOUT = 30.0


class Daemon:
    """The node running for ``state_dir`` (``peerpath up``), through its control socket."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def _call(self, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        # control.call is an async generator (typed as an iterator): closed at once when left
        return cast(AsyncGenerator[dict[str, Any], None], control.call(self.state_dir, request))

    async def ask(self, request: dict[str, Any], timeout: float = CALL_TIMEOUT) -> list[dict[str, Any]]:
        """Every answer to ``request``; NetworkError if they take longer than ``timeout`` seconds,
        ControlError for what the node refused (or if none is running)."""
        try:
            async with asyncio.timeout(timeout):
                async with contextlib.aclosing(self._call(request)) as answers:
                    return [answer async for answer in answers]
        except TimeoutError:
            raise errors.NetworkError(f"the node did not answer {request['op']!r} within {timeout:g} s") from None

    async def one(self, request: dict[str, Any], timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """The (first) answer to ``request``."""
        answers = await self.ask(request, timeout)
        if not answers:
            raise control.ControlError(f"the node gave no answer to {request['op']!r}")
        return answers[0]

    async def last(self, request: dict[str, Any], timeout: float) -> tuple[dict[str, Any], bool]:
        """The last answer to a request that streams updates (a task's), and whether the answers
        ended within ``timeout`` seconds (if not, the last one so far)."""
        last: dict[str, Any] = {}
        try:
            async with asyncio.timeout(timeout):
                async with contextlib.aclosing(self._call(request)) as answers:
                    async for answer in answers:
                        if not answer.get("keepalive"):
                            last = answer
        except TimeoutError:
            if not last:
                raise errors.NetworkError(f"the node did not answer {request['op']!r} within {timeout:g} s") from None
            return last, False
        return last, True

    async def open_stream(
        self, address: str, service: str, timeout: float = CALL_TIMEOUT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to ``address``'s ``service`` (a name or an overlay port), through the node: once
        it answers that it is connected, the control connection carries the stream's bytes."""
        return await control.open_stream(self.state_dir, address, service, timeout)
