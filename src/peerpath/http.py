"""HTTP over the overlay, from Python: an httpx transport that reaches peers' web services,
and any ASGI app (FastAPI, Starlette...) served to peers without opening a TCP port.

    async with httpx.AsyncClient(transport=peerpath.http.Transport(node)) as client:
        reply = await client.get(f"http://{peer_address}/status")

    served = await peerpath.http.serve(node, app, name="web")   # on a real ASGI server
    ...
    await served.close()

The host of a URL is a peer's address (or the note it was trusted under); its port is the
overlay port (default 80, the ``web`` service). Connections are kept and reused per peer
and port (httpcore's pool over session streams). An app is served by uvicorn on a Unix
socket that only this process can reach; each stream a trusted peer opens to the
service's overlay port is joined to a connection there.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import httpcore
import httpx
import uvicorn

from peerpath import errors
from peerpath.identity import Address
from peerpath.node.node import Node
from peerpath.session.splice import splice
from peerpath.session.streams import StreamWriter
from peerpath.tunnels.services import check_name, service_port

#: Seconds to get a session and a stream to a peer's service.
CONNECT_TIMEOUT = 20.0


def resolve_peer(node: Node, host: str) -> Address:
    """The peer a URL's host names: an overlay address, or the note a trusted peer was added
    with (``peerpath trust add ADDR --note planner``). ConnectError for anything else."""
    try:
        return Address.parse(host)
    except ValueError:
        pass
    matches = [entry.address for entry in node.trust.entries() if entry.note == host]
    if len(matches) != 1:
        why = "no trusted peer" if not matches else f"{len(matches)} trusted peers"
        raise httpx.ConnectError(f"{host!r} is neither a peer address nor the note of one trusted peer ({why})")
    return matches[0]


class _Stream(httpcore.AsyncNetworkStream):
    """A session stream as httpcore's network stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await asyncio.wait_for(self._reader.read(max_bytes), timeout)
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no data within {timeout} s") from None
        except (errors.PeerpathError, ConnectionError) as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._writer.write(buffer)
            await asyncio.wait_for(self._writer.drain(), timeout)
        except TimeoutError:
            raise httpcore.WriteTimeout(f"no room within {timeout} s") from None
        except (errors.PeerpathError, ConnectionError, RuntimeError) as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # an idle kept connection the peer closed (or sent to)
            return self._reader.at_eof() or bool(getattr(self._reader, "_buffer", b""))
        return self._writer.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's "TCP connections" are streams to peers' overlay ports."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        peer = resolve_peer(self._node, host)
        wait = timeout or CONNECT_TIMEOUT
        try:
            conn = await self._node.connect(peer, timeout=wait)
            reader, writer = await conn.open_stream(port, timeout=wait)
        except errors.ServiceNotFoundError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        except (errors.PeerpathError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"{peer}: {exc}") from exc
        return _Stream(reader, writer)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("Unix sockets are not reached through the overlay")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


class Transport(httpx.AsyncBaseTransport):
    """An httpx transport whose connections are streams through ``node`` to peers' services."""

    def __init__(self, node: Node, *, max_connections: int = 100, keepalive_expiry: float = 30.0) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            network_backend=_Backend(node), max_connections=max_connections, keepalive_expiry=keepalive_expiry
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to the peer its URL names (``http`` only: the session is encrypted)."""
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"{request.url.scheme}:// is not carried (use http://; sessions are end-to-end encrypted already)"
            )
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise TypeError("peerpath.http.Transport needs an async request body")
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            response = await self._pool.handle_async_request(core)
        except httpcore.ConnectError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except httpcore.TimeoutException as exc:
            raise httpx.TimeoutException(str(exc), request=request) from exc
        except httpcore.NetworkError as exc:
            raise httpx.NetworkError(str(exc), request=request) from exc
        except httpcore.ProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close the kept connections."""
        await self._pool.aclose()


class Served:
    """An ASGI app served on a node's overlay port; :meth:`close` stops it."""

    def __init__(self, node: Node, port: int, server: uvicorn.Server, task: asyncio.Task[None], tmp: Path) -> None:
        self.node, self.port = node, port
        self._server, self._task, self._tmp = server, task, tmp

    async def close(self) -> None:
        """Stop serving the port and the app (requests under way finish first)."""
        self.node.unserve(self.port)
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        shutil.rmtree(self._tmp, ignore_errors=True)


async def serve(
    node: Node,
    app: Any,
    name: str = "web",
    *,
    port: int | None = None,
    allow: Callable[[Address], bool] | None = None,
    log_level: str = "warning",
) -> Served:
    """Serve the ASGI ``app`` to trusted peers on the overlay port of service ``name`` (or
    ``port``), through uvicorn on a private Unix socket; no TCP port is opened."""
    overlay_port = port if port is not None else service_port(check_name(name))
    tmp = Path(tempfile.mkdtemp(prefix="peerpath-asgi-"))  # 0700: only this user reaches the socket
    path = tmp / "app.sock"
    server = uvicorn.Server(uvicorn.Config(app, uds=str(path), lifespan="auto", log_level=log_level))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            shutil.rmtree(tmp, ignore_errors=True)
            await task  # raises what stopped it
            raise errors.LocalError(f"the ASGI server for {name} did not start")
        await asyncio.sleep(0.01)

    async def handler(reader: asyncio.StreamReader, writer: StreamWriter) -> None:
        app_reader, app_writer = await asyncio.open_unix_connection(str(path))
        await splice(reader, writer, app_reader, app_writer)

    node.serve(overlay_port, handler, allow=allow)
    return Served(node, overlay_port, server, task, tmp)


__all__ = ["Served", "Transport", "resolve_peer", "serve"]
