"""One HTTP/1.1 request to a peer's exposed service, for the MCP server's ``call_http`` tool: the
running node opens a stream to the service (the control socket's ``connect``), and httpcore
speaks HTTP over it, as over a TCP connection. Requests and answers are bounded in size and
time; an answer's body longer than :data:`MAX_BODY` is cut, and says so."""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore

from peerpath import errors
from peerpath.mcp.daemon import Daemon

#: Largest request body, and most of an answer's body returned (bytes).
MAX_BODY = 1024 * 1024
#: Longest path (with its query), header name or value, and most request headers.
MAX_PATH = 8192
MAX_HEADER = 8192
MAX_HEADERS = 64
#: Seconds to get a stream to the service.
CONNECT_TIMEOUT = 20.0
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 5.6.2
_CHARSET = re.compile(r"charset=\"?([A-Za-z0-9._:-]+)", re.IGNORECASE)


class HttpCallError(errors.LocalError):
    """A request that cannot be sent as given; the message says why."""


@dataclass(frozen=True)
class Request:
    """What to send: ``method`` and ``path`` (with its query), headers, and a body."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @classmethod
    def checked(cls, method: str, path: str, headers: dict[str, str] | None, body: str) -> Request:
        """A request from a tool's arguments, or HttpCallError saying what is wrong with them."""
        method = method.upper()
        if not _TOKEN.match(method) or len(method) > 32:
            raise HttpCallError(f"{method!r} is not an HTTP method (GET, POST, PUT, DELETE...)")
        if not path.startswith("/") or len(path) > MAX_PATH or any(c.isspace() or not c.isprintable() for c in path):
            raise HttpCallError(f"the path must start with '/', be at most {MAX_PATH} characters and have no spaces")
        pairs = list((headers or {}).items())
        if len(pairs) > MAX_HEADERS:
            raise HttpCallError(f"at most {MAX_HEADERS} headers")
        for name, value in pairs:
            if not _TOKEN.match(name) or len(name) > MAX_HEADER:
                raise HttpCallError(f"{name!r} is not a header name")
            if len(value) > MAX_HEADER or any(c in value for c in "\r\n\x00"):
                raise HttpCallError(f"the value of header {name!r} is too long or has line breaks")
        data = body.encode()
        if len(data) > MAX_BODY:
            raise HttpCallError(f"the body is {len(data)} bytes; at most {MAX_BODY}")
        return cls(method, path, tuple(pairs), data)


class _Stream(httpcore.AsyncNetworkStream):
    """A stream through the node (the control connection once connected) as httpcore's network stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await asyncio.wait_for(self._reader.read(max_bytes), timeout)
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no answer within {timeout:g} s") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._writer.write(buffer)
            await asyncio.wait_for(self._writer.drain(), timeout)
        except TimeoutError:
            raise httpcore.WriteTimeout(f"the service took nothing within {timeout:g} s") from None
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # a kept connection the service closed
            return self._reader.at_eof()
        return None


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's "TCP connections" are streams to the peer's service, opened by the node
    (the URL's host is the peer's address, its port the service's overlay port)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        reader, writer = await self._daemon.open_stream(host, str(port), timeout or CONNECT_TIMEOUT)
        return _Stream(reader, writer)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("Unix sockets are not reached through the overlay")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def call(daemon: Daemon, address: str, port: int, request: Request, timeout: float) -> dict[str, Any]:
    """Send ``request`` to the HTTP service on ``address``'s overlay ``port``; the answer's
    status, headers and body (text, or base64 if it is not text), cut at :data:`MAX_BODY`."""
    url = f"http://{address}:{port}{request.path}"
    limits = {"connect": CONNECT_TIMEOUT, "read": timeout, "write": timeout, "pool": timeout}
    body = bytearray()
    truncated = False
    try:
        async with (
            asyncio.timeout(timeout + CONNECT_TIMEOUT),
            httpcore.AsyncConnectionPool(network_backend=_Backend(daemon), max_connections=1) as pool,
            pool.stream(
                request.method,
                url,
                headers=[(name.encode(), value.encode()) for name, value in request.headers],
                content=request.body if request.body or request.method not in ("GET", "HEAD") else None,
                extensions={"timeout": limits},
            ) as response,
        ):
            async for chunk in response.aiter_stream():
                body += chunk
                if len(body) > MAX_BODY:
                    del body[MAX_BODY:]
                    truncated = True
                    break
    except TimeoutError:
        raise errors.NetworkError(f"{address}:{port} gave no full answer within {timeout:g} s") from None
    except httpcore.TimeoutException as exc:
        raise errors.NetworkError(f"{address}:{port}: {exc}") from None
    except httpcore.RemoteProtocolError as exc:
        raise errors.RemoteError(f"the service on {address}:{port} does not answer in HTTP/1.1: {exc}") from None
    except httpcore.LocalProtocolError as exc:
        raise HttpCallError(f"the request cannot be sent as given: {exc}") from None
    except httpcore.NetworkError as exc:
        raise errors.NetworkError(f"the stream to {address}:{port} failed: {exc}") from None
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers]
    reason = response.extensions.get("reason_phrase", b"")
    return {
        "status": response.status,
        "reason": reason.decode("latin-1") if isinstance(reason, bytes) else "",
        "headers": _joined(headers),
        **_body(bytes(body), _content_type(headers), truncated),
        "body_bytes": len(body),
        "truncated": truncated,
    }


def _joined(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Headers by lower-case name; repeated ones joined with ", " (RFC 9110 5.3)."""
    joined: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        joined[key] = f"{joined[key]}, {value}" if key in joined else value
    return joined


def _content_type(headers: list[tuple[str, str]]) -> str:
    return next((value for name, value in headers if name.lower() == "content-type"), "")


def _body(data: bytes, content_type: str, truncated: bool) -> dict[str, str]:
    """``{"body": text}`` if ``data`` decodes as text (its charset, else UTF-8), else
    ``{"body_base64": ...}``; a character cut in two at the end of a truncated body is left out."""
    match = _CHARSET.search(content_type)
    charset = match.group(1) if match else "utf-8"
    with contextlib.suppress(LookupError, UnicodeDecodeError):
        decoder = codecs.getincrementaldecoder(charset)(errors="strict")
        return {"body": decoder.decode(data, final=not truncated)}
    return {"body_base64": base64.b64encode(data).decode("ascii")}
