"""The daemon's local control API: JSON lines over a Unix socket in the state directory.

The socket is mode 0600 inside a 0700 state directory: only the node's owner can use it.
Each request is one JSON object with an ``op``; the answer is one or more JSON objects,
the last of which has ``"done": true`` (or ``"error": "..."``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from peerpath import errors
from peerpath.identity import Address
from peerpath.node.node import Node
from peerpath.session.pathset import parse_endpoint

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
_MAX_LINE = 64 * 1024


class ControlError(errors.LocalError):
    """The control socket could not be reached, or the daemon reported an error."""


def socket_path(state_dir: Path) -> Path:
    """Where the daemon of ``state_dir`` listens."""
    return state_dir / SOCKET_NAME


class ControlServer:
    """Serves the control API of one node."""

    def __init__(self, node: Node, path: Path) -> None:
        self.node = node
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen; refuse if another daemon is alive on the socket, remove a stale one."""
        if self.path.exists():
            try:
                _, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError:
                self.path.unlink()
            else:
                writer.close()
                raise ControlError(f"a node is already running for {self.path.parent} (its socket answers)")
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=_MAX_LINE)
        finally:
            os.umask(old_umask)

    async def close(self) -> None:
        """Stop listening and end client connections."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = msgspec.json.decode(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    async for answer in self._handle(request):
                        writer.write(msgspec.json.encode(answer) + b"\n")
                        await writer.drain()
                    writer.write(msgspec.json.encode({"done": True}) + b"\n")
                except (errors.PeerpathError, ValueError, msgspec.DecodeError) as exc:
                    writer.write(msgspec.json.encode({"error": str(exc)}) + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def _handle(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        op = request.get("op")
        if op == "status":
            yield self.node.status()
        elif op == "ping":
            async for answer in self._ping(request):
                yield answer
        elif op == "trust-request":
            await self.node.request_trust(Address.parse(str(request.get("address", ""))), str(request.get("note", "")))
            yield {"sent": True}
        elif op == "trust-approve":
            await self.node.approve_trust(Address.parse(str(request.get("address", ""))))
            yield {"approved": True}
        elif op == "trust-deny":
            self.node.deny_trust(Address.parse(str(request.get("address", ""))))
            yield {"denied": True}
        elif op == "trust-pending":
            for pending in self.node.pending_trust():
                yield {"address": pending.address, "note": pending.note, "created": pending.created}
        else:
            raise ValueError(f"unknown op {op!r}")

    async def _ping(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        address = Address.parse(str(request.get("address", "")))
        count = int(request.get("count", 4))
        interval = float(request.get("interval", 1.0))
        timeout = float(request.get("timeout", 5.0))
        via = request.get("via")
        conn = await self.node.connect(address, parse_endpoint(str(via)) if via else None, timeout=timeout)
        for seq in range(1, count + 1):
            if seq > 1:
                await asyncio.sleep(interval)
            try:
                rtt = await conn.ping(timeout=timeout)
            except errors.RequestTimeoutError:
                yield {"seq": seq, "timeout": True}
                continue
            path = conn.path
            yield {"seq": seq, "rtt_ms": round(rtt * 1000, 3), "path": path.describe() if path else None}


async def call(state_dir: Path, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Send one request to the daemon of ``state_dir``; yield its answers."""
    path = socket_path(state_dir)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=_MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(f"no node is running for {state_dir}; start one with: peerpath up") from exc
    except OSError as exc:
        raise ControlError(f"cannot reach the node at {path}: {exc.strerror or exc}") from exc
    try:
        writer.write(msgspec.json.encode(request) + b"\n")
        await writer.drain()
        while line := await reader.readline():
            answer = msgspec.json.decode(line)
            if "error" in answer:
                raise ControlError(answer["error"])
            if answer.get("done"):
                return
            yield answer
        raise ControlError("the node closed the control connection")
    finally:
        writer.close()
