"""The daemon's local control API: JSON lines over a Unix socket in the state directory.

The socket is mode 0600 inside a 0700 state directory: only the node's owner can use it.
Each request is one JSON object with an ``op``; the answer is one or more JSON objects,
the last of which has ``"done": true`` (or ``"error": "..."``). Requests are parsed strictly
(one typed struct per op, no unknown fields, bounded lengths and numbers): anything else,
and a line over :data:`MAX_REQUEST_LINE`, is answered with one error line, and the connection
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Protocol, Union, get_args

import msgspec

from peerpath import errors
from peerpath.identity import Address
from peerpath.node.node import Node
from peerpath.session.pathset import parse_endpoint
from peerpath.session.splice import splice
from peerpath.session.streams import StreamWriter
from peerpath.wire.rendezvous import MAX_NOTE

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
#: Longest request line the daemon reads (bytes, newline included); a longer one is answered with an error.
#: A message sent with ``peerpath send`` travels in one (as JSON: up to 6 bytes a byte in the worst case).
MAX_REQUEST_LINE = 8 * 1024 * 1024
#: Longest answer line the client reads (bytes): a status with many sessions is long, and the daemon is ours.
MAX_ANSWER_LINE = 16 * 1024 * 1024
#: Longest address or endpoint text in a request (an address is 40 characters; an endpoint a host and port).
MAX_ADDRESS_TEXT = 256
#: Most pings one request may ask for (the CLI's --count allows as many).
MAX_PING_COUNT = 100_000
#: Longest wait (seconds) a request may ask for: between pings, or for a session or a pong.
MAX_PING_WAIT = 3600.0

_Text = Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS_TEXT)]


class Op(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, frozen=True):
    """A request; its ``op`` names its type. Unknown fields are refused rather than skipped (skipping a
    deeply nested value would recurse). Services define ops of their own as subclasses
    (``class SendOp(Op, tag="send", frozen=True)``) and hand them to :class:`ControlServer`."""


class StatusOp(Op, tag="status", frozen=True):
    """The node's status."""


class PingOp(Op, tag="ping", frozen=True):
    """Ping a peer ``count`` times, over ``via`` if given."""

    address: _Text
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_PING_COUNT)] = 4
    interval: Annotated[float, msgspec.Meta(ge=0, le=MAX_PING_WAIT)] = 1.0
    timeout: Annotated[float, msgspec.Meta(gt=0, le=MAX_PING_WAIT)] = 5.0
    via: _Text | None = None


class TrustRequestOp(Op, tag="trust-request", frozen=True):
    """Ask a peer to trust this node."""

    address: _Text
    note: Annotated[str, msgspec.Meta(max_length=MAX_NOTE)] = ""


class TrustApproveOp(Op, tag="trust-approve", frozen=True):
    """Approve a pending trust request."""

    address: _Text


class TrustDenyOp(Op, tag="trust-deny", frozen=True):
    """Drop a pending trust request."""

    address: _Text


class TrustPendingOp(Op, tag="trust-pending", frozen=True):
    """List pending trust requests."""


class TunnelsReloadOp(Op, tag="tunnels-reload", frozen=True):
    """Make the running tunnels match the state directory's tunnels.json again."""


class ConnectOp(Op, tag="connect", frozen=True):
    """Open a stream to a peer's service; after the answer, the control connection carries
    the stream's bytes both ways (``peerpath connect``)."""

    address: _Text
    service: Annotated[str, msgspec.Meta(max_length=32)]


ControlRequest = (
    StatusOp | PingOp | TrustRequestOp | TrustApproveOp | TrustDenyOp | TrustPendingOp | TunnelsReloadOp | ConnectOp
)
_answer_decoder = msgspec.json.Decoder(dict[str, Any])
#: What answers an op of a service's: an async iterator of answer objects (the last one is
#: followed by ``{"done": true}``); errors of peerpath's own, and ValueError, become ``{"error": ...}``.
OpHandler = Callable[[Any], AsyncGenerator[dict[str, Any], None]]


class RequestParser:
    """Parses request lines into the built-in ops and those of ``extra`` (strictly typed)."""

    def __init__(self, extra: Iterable[type[Op]] = ()) -> None:
        kinds = [*get_args(ControlRequest), *extra]
        self._decoder: msgspec.json.Decoder[Op] = msgspec.json.Decoder(Union[tuple(kinds)])  # noqa: UP007
        self.ops = ", ".join(sorted(str(op.__struct_config__.tag) for op in kinds))

    def parse(self, line: bytes) -> Op:
        """One request line; raise :class:`RequestError` for anything but a well-formed op."""
        try:
            return self._decoder.decode(line)
        except msgspec.ValidationError as exc:
            message = str(exc)
            if message.startswith("Invalid value") and message.endswith("at `$.op`"):
                raise RequestError(f"unknown op (the ops are: {self.ops})") from None
            raise RequestError(f"malformed request: {message}") from None
        except msgspec.DecodeError as exc:
            raise RequestError(f"malformed request: {exc}") from None
        except RecursionError:  # msgspec recurses into nested values before it sees they are unwanted
            raise RequestError("malformed request: nested too deeply") from None


class ControlExtension(Protocol):
    """A service's part of the control API: its ops and what answers each."""

    def control_ops(self) -> Mapping[type[Op], OpHandler]:
        """The ops, each with its handler."""
        ...

    def describe(self) -> dict[str, Any]:
        """What ``status`` shows of the service."""
        ...


class TunnelOps(Protocol):
    """What the control API needs of a node's tunnels (``peerpath.tunnels.runtime.Tunnels``)."""

    async def reload(self) -> dict[str, str]:
        """Match tunnels.json again; what failed."""
        ...

    async def open(self, peer: str, service: str) -> tuple[asyncio.StreamReader, StreamWriter]:
        """A stream to a peer's service."""
        ...

    def describe(self) -> dict[str, Any]:
        """For status."""
        ...


class ControlError(errors.LocalError):
    """The control socket could not be reached, or the daemon reported an error."""


class RequestError(ControlError):
    """A request the daemon cannot parse; the message says what is wrong with it."""


_builtin = RequestParser()


def parse_request(line: bytes) -> Op:
    """One request line of the built-in ops, strictly typed; raise :class:`RequestError` for anything else."""
    return _builtin.parse(line)


def socket_path(state_dir: Path) -> Path:
    """Where the daemon of ``state_dir`` listens."""
    return state_dir / SOCKET_NAME


class _LineTooLong(Exception):
    """A line longer than the reader's limit."""


class _ClientGone(Exception):
    """The client closed its end while we answered."""


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    """The next line (b"" at the end); raise :class:`_LineTooLong` for a line over the reader's limit,
    leaving the rest of it unread."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial  # a last line without its newline, or b"" at the end
    except asyncio.LimitOverrunError:
        raise _LineTooLong from None


async def _skip_line(reader: asyncio.StreamReader) -> None:
    """Discard the rest of an overlong line, up to and including its newline, without buffering it."""
    while True:
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
        except asyncio.IncompleteReadError:
            return


class ControlServer:
    """Serves the control API of one node."""

    def __init__(
        self,
        node: Node,
        path: Path,
        tunnels: TunnelOps | None = None,
        extensions: Mapping[str, ControlExtension] | None = None,
    ) -> None:
        self.node = node
        self.path = path
        self.tunnels = tunnels
        #: The services' parts of the API, by the name their status goes under.
        self.extensions = dict(extensions or {})
        self._handlers: dict[type[Op], OpHandler] = {}
        for extension in self.extensions.values():
            self._handlers.update(extension.control_ops())
        self._parser = RequestParser(self._handlers)
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
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_REQUEST_LINE)
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
        """Answer requests until the client leaves. Nothing a client sends ends this task with an
        exception: each bad line gets one error line, and the next line is served."""
        try:
            while True:
                try:
                    line = await _read_line(reader)
                except _LineTooLong:
                    await self._answer(writer, {"error": f"request line longer than {MAX_REQUEST_LINE} bytes"})
                    await _skip_line(reader)
                    continue
                if not line:
                    return
                if not line.strip():
                    continue  # a blank line asks nothing
                if await self._answer_request(line, reader, writer):
                    return  # the connection carried a stream and is over
        except (_ClientGone, ConnectionError):
            pass  # the client left
        finally:
            writer.close()

    async def _answer_request(self, line: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True if the connection was handed to a stream (and is over)."""
        try:
            request = self._parser.parse(line)
            if isinstance(request, ConnectOp):
                await self._connect(request, reader, writer)
                return True
            handler: OpHandler = self._handlers.get(type(request), self._handle)
            async with contextlib.aclosing(handler(request)) as answers:  # a client gone ends the op at once
                async for answer in answers:
                    await self._answer(writer, answer)
            await self._answer(writer, {"done": True})
        except _ClientGone:
            raise
        except (errors.PeerpathError, ValueError) as exc:
            await self._answer(writer, {"error": str(exc) or type(exc).__name__})
        except Exception as exc:
            # A bug of ours, not the client's: say so, keep the traceback, and keep serving.
            log.exception("control request %.200r failed", line)
            await self._answer(writer, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        return False

    def _tunnels(self) -> TunnelOps:
        if self.tunnels is None:
            raise ControlError("this node runs without tunnels")
        return self.tunnels

    async def _connect(self, request: ConnectOp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The stream's bytes over the control connection, both ways, once it is open."""
        stream_reader, stream_writer = await self._tunnels().open(request.address, request.service)
        await self._answer(writer, {"connected": True})
        await splice(reader, writer, stream_reader, stream_writer)

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        try:
            writer.write(msgspec.json.encode(answer) + b"\n")
            await writer.drain()
        except ConnectionError as exc:
            raise _ClientGone from exc

    async def _handle(self, request: Op) -> AsyncGenerator[dict[str, Any], None]:
        match request:
            case StatusOp():
                status = self.node.status() | ({"tunnels": self.tunnels.describe()} if self.tunnels else {})
                yield status | {name: extension.describe() for name, extension in self.extensions.items()}
            case TunnelsReloadOp():
                yield {"errors": await self._tunnels().reload()}
            case PingOp():
                async for answer in self._ping(request):
                    yield answer
            case TrustRequestOp(address=address, note=note):
                await self.node.request_trust(Address.parse(address), note)
                yield {"sent": True}
            case TrustApproveOp(address=address):
                await self.node.approve_trust(Address.parse(address))
                yield {"approved": True}
            case TrustDenyOp(address=address):
                self.node.deny_trust(Address.parse(address))
                yield {"denied": True}
            case TrustPendingOp():
                for pending in self.node.pending_trust():
                    yield {"address": pending.address, "note": pending.note, "created": pending.created}

    async def _ping(self, request: PingOp) -> AsyncIterator[dict[str, Any]]:
        via = parse_endpoint(request.via) if request.via else None
        conn = await self.node.connect(request.address, via, timeout=request.timeout)  # an agent node takes names
        for seq in range(1, request.count + 1):
            if seq > 1:
                await asyncio.sleep(request.interval)
            try:
                rtt = await conn.ping(timeout=request.timeout)
            except errors.RequestTimeoutError:
                yield {"seq": seq, "timeout": True}
                continue
            path = conn.path
            path_text = path.describe() if path else None
            yield {"seq": seq, "peer": str(conn.peer), "rtt_ms": round(rtt * 1000, 3), "path": path_text}


async def _dial(state_dir: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the control socket of ``state_dir``'s daemon, or a ControlError saying why not."""
    path = socket_path(state_dir)
    try:
        return await asyncio.open_unix_connection(str(path), limit=MAX_ANSWER_LINE)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(f"no node is running for {state_dir}; start one with: peerpath up") from exc
    except OSError as exc:
        raise ControlError(f"cannot reach the node at {path}: {exc.strerror or exc}") from exc


async def call(state_dir: Path, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Send one request to the daemon of ``state_dir``; yield its answers."""
    reader, writer = await _dial(state_dir)
    try:
        writer.write(msgspec.json.encode(request) + b"\n")
        await writer.drain()
        while True:
            try:
                line = await _read_line(reader)
                answer = _answer_decoder.decode(line) if line else None
            except (_LineTooLong, msgspec.DecodeError, RecursionError) as exc:
                raise ControlError(f"the node sent an answer this client cannot read: {exc}") from None
            if answer is None:
                raise ControlError("the node closed the control connection")
            if "error" in answer:
                raise ControlError(str(answer["error"]))
            if answer.get("done"):
                return
            yield answer
    except ConnectionError as exc:
        raise ControlError(f"the control connection to the node broke: {exc}") from exc
    finally:
        writer.close()


async def open_stream(
    state_dir: Path, address: str, service: str, timeout: float = 30.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to ``address``'s ``service`` through the daemon of ``state_dir``: once the daemon
    answers that it is connected, the control connection carries the stream's bytes both ways
    (``peerpath connect``, and the MCP server's HTTP calls)."""
    reader, writer = await _dial(state_dir)
    try:
        writer.write(msgspec.json.encode({"op": "connect", "address": address, "service": service}) + b"\n")
        async with asyncio.timeout(timeout):
            await writer.drain()
            line = await _read_line(reader)
        answer = _answer_decoder.decode(line) if line else {"error": "the node closed the control connection"}
        if not answer.get("connected"):
            raise ControlError(str(answer.get("error") or "the node did not connect"))
    except TimeoutError:
        writer.close()
        raise errors.NetworkError(f"no stream to {address}:{service} within {timeout:g} s") from None
    except (msgspec.DecodeError, RecursionError, _LineTooLong) as exc:
        writer.close()
        raise ControlError(f"the node sent an answer this client cannot read: {exc}") from None
    except OSError as exc:
        writer.close()
        raise ControlError(f"the control connection to the node broke: {exc}") from None
    except BaseException:
        writer.close()
        raise
    return reader, writer
