"""``peerpath mcp``: the overlay as MCP tools, over standard input and output (the official SDK's
``MCPServer``). Each tool is a request to the running node (:class:`~peerpath.mcp.daemon.Daemon`);
what fails becomes a tool error with peerpath's own one-line message (no node running, peer
not trusted, no such task...), which the model reads and can act on.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from peerpath import __version__, errors
from peerpath.identity import Address
from peerpath.mcp import web
from peerpath.mcp.daemon import CALL_TIMEOUT, Daemon
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.directory import is_name
from peerpath.services.names import Names, UnknownNameError
from peerpath.tunnels.services import service_port

#: Most messages one read_inbox returns, and most bytes of their data in all (more wait for the next call).
MAX_INBOX = 100
MAX_INBOX_BYTES = 1024 * 1024
#: Longest wait (seconds) a tool may be asked for: for a delivery, a task's end, an HTTP answer.
MAX_WAIT = 600.0

INSTRUCTIONS = """\
peerpath connects this agent to other agents (peers) over a secure peer-to-peer network. A peer is \
named by its overlay address (pp1...) or by the name this node trusts it as; only trusted peers can \
be reached, and every exchange is end-to-end encrypted. Start with list_peers. send_message puts a \
message in a peer's inbox (it waits there while the peer is offline) and read_inbox reads this \
node's; submit_task gives a peer a named job and returns its result; publish sends an event to the \
subscribers of a topic; call_http calls a web service a peer exposes."""

P = ParamSpec("P")
T = TypeVar("T")

_READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_SENDS = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=True)

Peer = Annotated[
    str, Field(description="The peer: its overlay address (pp1...) or the name it is trusted as.", max_length=256)
]
Wait = Annotated[float, Field(description="Seconds to wait at most.", gt=0, le=MAX_WAIT)]


def tool_errors(tool: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``tool`` with peerpath's expected failures turned into MCP tool errors carrying their
    message (the model reads it); anything else is a bug, which the SDK reports as such."""

    @functools.wraps(tool)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await tool(*args, **kwargs)
        except ToolError:
            raise
        except (errors.PeerpathError, ValueError, OSError) as exc:
            raise ToolError(str(exc) or type(exc).__name__) from None

    return wrapped


class Tools:
    """The tools, each a request (or a few) to the node running for ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.daemon = Daemon(state_dir)

    def _trust(self) -> TrustStore:
        return TrustStore.in_state_dir(self.state_dir)

    async def list_peers(self) -> dict[str, Any]:
        """List this node's trusted peers: each one's address, the note and names it is known by,
        and whether a session is up now, over which path (direct or relay) and with what round-trip
        time. Peers are reached by address or name in the other tools."""
        status = await self.daemon.one({"op": "status"})
        sessions = {s["peer"]: s for s in status.get("sessions", []) if s.get("peer")}
        trust = self._trust()
        names: dict[str, list[str]] = {}
        for name, pinned in trust.pins().items():
            names.setdefault(str(pinned), []).append(name)
        peers = []
        for entry in trust.entries():
            address = str(entry.address)
            session = sessions.get(address)
            route = session.get("path") if session else None
            peers.append(
                {
                    "address": address,
                    "note": entry.note or None,
                    "names": names.get(address, []),
                    "session_up": bool(session and session.get("established")),
                    "path": None if not route else "relay" if route.startswith("relay") else "direct",
                    "route": route,
                    "rtt_ms": session.get("rtt_ms") if session else None,
                }
            )
        return {"this_node": status.get("address"), "peers": peers}

    async def send_message(
        self,
        peer: Peer,
        message: Annotated[
            Any,
            Field(
                description="The message: a text (string) or any JSON value (object, list...); an object or list "
                "given as a JSON string is sent as that object or list."
            ),
        ],
        wait: Annotated[
            bool, Field(description="Return only once the peer has stored it (else: once it is queued).")
        ] = False,
        timeout: Wait = 30.0,
    ) -> dict[str, Any]:
        """Send a message to a peer's inbox. It is kept and retried until delivered: if the peer is
        offline, it waits for it (sealed at the rendezvous server, which cannot read it). Returns
        the message's id and whether it was delivered or queued."""
        request = {"op": "send", "peer": peer, "data": message, "wait": wait, "timeout": timeout}
        return await self.daemon.one(request, timeout + CALL_TIMEOUT if wait else CALL_TIMEOUT)

    async def read_inbox(
        self,
        limit: Annotated[int, Field(description="How many messages at most, oldest first.", ge=1, le=MAX_INBOX)] = 20,
        ack: Annotated[
            bool, Field(description="Acknowledge the messages returned, so that they are not returned again.")
        ] = False,
    ) -> dict[str, Any]:
        """Read the messages peers sent this node, oldest first, until they are acknowledged: each
        with its id, sender (address and the name it is trusted as), when it arrived and its data
        (text or JSON). With ack, the messages returned are acknowledged (removed from the inbox)."""
        listed = await self.daemon.ask({"op": "inbox", "limit": limit + 1})  # one more: are there more?
        notes = {str(entry.address): entry.note for entry in self._trust().entries()}
        messages: list[dict[str, Any]] = []
        size = 0
        for item in listed[:limit]:
            data = item.get("data")
            weight = len(json.dumps(data, ensure_ascii=False).encode())
            if messages and size + weight > MAX_INBOX_BYTES:
                break
            if weight > MAX_INBOX_BYTES:
                data = f"(a message of {weight} bytes, too large to show here: read it with peerpath inbox --json)"
            size += weight
            messages.append(
                {
                    "id": item["id"],
                    "from": item["from"],
                    "from_name": notes.get(item["from"]) or None,
                    "received": _when(item.get("received")),
                    "data": data,
                }
            )
        if ack:
            for shown in messages:
                await self.daemon.one({"op": "inbox-ack", "id": shown["id"]})
        return {"messages": messages, "acknowledged": ack, "more": len(listed) > len(messages)}

    async def submit_task(
        self,
        peer: Peer,
        name: Annotated[str, Field(description="The task's name: what the peer serves (e.g. summarize).")],
        input: Annotated[Any, Field(description="The task's input: any JSON value.")] = None,
        timeout: Annotated[
            float | None, Field(description="Seconds after which the task fails, if given.", gt=0, le=86400)
        ] = None,
        wait: Annotated[bool, Field(description="Wait for the task to end and return its outcome.")] = False,
        wait_timeout: Wait = 120.0,
    ) -> dict[str, Any]:
        """Give a named task to a peer that serves it (with an input). Returns the task's id and
        state; with wait, waits until the task ends (at most wait_timeout seconds) and returns its
        result, or why it failed. A task still running can be followed with task_status."""
        request = {"op": "task-submit", "peer": peer, "name": name, "input": input, "timeout": timeout}
        if not wait:
            return _task(await self.daemon.one(request))
        last, ended = await self.daemon.last(request | {"wait": True}, wait_timeout)
        return _task(last, still_running=not ended)

    async def task_status(
        self,
        task_id: Annotated[str, Field(description="The task's id (or its first 6 digits at least).", max_length=64)],
        wait: Annotated[bool, Field(description="Wait for the task to end.")] = False,
        wait_timeout: Wait = 120.0,
    ) -> dict[str, Any]:
        """Where a task is (queued, running with its progress, done with its result, failed with
        the reason, or cancelled): one this node submitted, or one it runs for a peer."""
        request = {"op": "task-status", "id": task_id}
        if not wait:
            return _task(await self.daemon.one(request))
        last, ended = await self.daemon.last(request | {"wait": True}, wait_timeout)
        return _task(last, still_running=not ended)

    async def publish(
        self,
        target: Annotated[
            str,
            Field(
                description="PEER/TOPIC for a topic a peer hosts (e.g. planner/jobs.new), or TOPIC for one of "
                "this node's own topics.",
                max_length=512,
            ),
        ],
        data: Annotated[Any, Field(description="The event: any JSON value.")] = None,
    ) -> dict[str, Any]:
        """Publish an event to a topic: every current subscriber of the topic gets it (nothing is
        kept for later ones). Returns how many subscribers it reached."""
        answer = await self.daemon.one({"op": "publish", "target": target, "data": data})
        return {"target": target, "subscribers": answer.get("subscribers")}

    async def call_http(
        self,
        peer: Peer,
        service: Annotated[
            str, Field(description="The name the peer exposes the service as (web, api...), or its overlay port.")
        ] = "web",
        method: Annotated[str, Field(description="GET, POST, PUT, DELETE...")] = "GET",
        path: Annotated[str, Field(description="The path, with its query (e.g. /v1/items?limit=5).")] = "/",
        body: Annotated[str, Field(description="The request's body (text, up to 1 MiB; none if empty).")] = "",
        headers: Annotated[
            dict[str, str] | None, Field(description="Request headers (e.g. content-type: application/json).")
        ] = None,
        timeout: Annotated[float, Field(description="Seconds to wait for the answer.", gt=0, le=MAX_WAIT)] = 30.0,
    ) -> dict[str, Any]:
        """Call an HTTP service a peer exposes (peerpath expose ... --name SERVICE on its side),
        through the overlay. Returns the status, the headers and the body (text, or body_base64
        for binary data; cut at 1 MiB, with truncated true)."""
        request = web.Request.checked(method, path, headers, body)
        port = service_port(service)
        address = await self._resolve(peer)
        return await web.call(self.daemon, str(address), port, request, timeout)

    async def _resolve(self, peer: str) -> Address:
        """The address ``peer`` stands for: an address, a pinned name or a trusted peer's note
        (here), or a name the rendezvous server knows for a trusted peer (asked through the node)."""
        try:
            return await Names(self._trust()).resolve(peer)
        except UnknownNameError as exc:
            if not is_name(peer.strip().lower()):
                raise
            try:
                claimed = await self.daemon.one({"op": "name-lookup", "name": peer.strip().lower()})
            except errors.PeerpathError as lookup:
                raise UnknownNameError(f"{exc} ({lookup})") from None
            if not claimed.get("trusted"):
                raise errors.NotTrustedError(
                    f"{peer!r} is {claimed.get('address')} at the rendezvous server, and this node does not trust it"
                ) from None
            return Address.parse(str(claimed["address"]))


def _when(stamp: Any) -> str | None:
    if not isinstance(stamp, int | float):
        return None
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat(timespec="seconds")


def _task(task: dict[str, Any], *, still_running: bool = False) -> dict[str, Any]:
    """A task as a tool returns it: what a model needs, without the bookkeeping."""
    shown = {
        key: task.get(key) for key in ("id", "name", "peer", "role", "state", "progress", "note", "result", "failure")
    }
    shown |= {"created": _when(task.get("created")), "updated": _when(task.get("updated"))}
    if still_running:
        shown["waited"] = "the task had not ended when the wait ran out; follow it with task_status"
    return shown


def build_server(state_dir: Path) -> MCPServer[Any]:
    """The MCP server of the node running for ``state_dir``, with its tools."""
    server: MCPServer[Any] = MCPServer(
        name="peerpath", title="peerpath", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING"
    )
    tools = Tools(state_dir)
    for tool, hints in (
        (tools.list_peers, _READ_ONLY),
        (tools.send_message, _SENDS),
        (tools.read_inbox, ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)),
        (tools.submit_task, _SENDS),
        (tools.task_status, _READ_ONLY),
        (tools.publish, _SENDS),
        (tools.call_http, _SENDS),
    ):
        server.add_tool(tool_errors(tool), annotations=hints, structured_output=True)
    return server


async def serve_stdio(state_dir: Path) -> None:
    """Serve the tools over standard input and output until the client closes them."""
    await build_server(state_dir).run_stdio_async()


__all__ = ["INSTRUCTIONS", "Tools", "build_server", "serve_stdio", "tool_errors"]
