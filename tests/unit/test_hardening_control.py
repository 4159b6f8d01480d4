"""The control socket answers every malformed request with one error line and keeps serving."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerpath.identity import Identity
from peerpath.node import control
from peerpath.node.control import MAX_REQUEST_LINE, ControlServer, RequestError, parse_request


@pytest.fixture
async def control_socket(make_node) -> AsyncIterator[Path]:
    """A control server for a started node, on a short socket path (Unix paths are limited to 108 bytes)."""
    node = await make_node("owner")
    with tempfile.TemporaryDirectory(prefix="pp-") as directory:
        server = ControlServer(node, control.socket_path(Path(directory)))
        await server.start()
        try:
            yield server.path
        finally:
            await server.close()


class Client:
    """A raw client of the control socket: sends bytes, reads answer lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Client:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> dict[str, object]:
        line = await asyncio.wait_for(self.reader.readline(), 5)
        assert line.endswith(b"\n"), f"no answer line (got {line!r})"
        answer = json.loads(line)
        assert isinstance(answer, dict)
        return answer

    async def status_works(self) -> None:
        await self.send(b'{"op": "status"}\n')
        assert "address" in await self.answer()
        assert await self.answer() == {"done": True}

    def close(self) -> None:
        self.writer.close()


#: A well-formed address, so that the request fails on the field under test and nothing earlier.
ADDRESS = str(Identity.generate().address).encode()

MALFORMED = [
    (b'{"op": "ping", "address": "' + ADDRESS + b'", "timeout": null}', "timeout"),
    (b'{"op": "ping", "address": "' + ADDRESS + b'", "count": "4"}', "count"),
    (b'{"op": "ping", "address": "' + ADDRESS + b'", "count": 0}', "count"),
    (b'{"op": "ping", "address": "' + ADDRESS + b'", "count": 1e300}', "count"),
    (b'{"op": "ping", "address": "' + ADDRESS + b'", "interval": -1}', "interval"),
    (b'{"op": "ping", "address": "' + ADDRESS + b'", "timeout": 1e999}', "timeout"),
    (b'{"op": "ping", "address": "' + ADDRESS + b'", "via": 7}', "via"),
    (b'{"op": "ping"}', "address"),
    (b'{"op": "ping", "address": ["pp1x"]}', "address"),
    (b'{"op": "ping", "address": "' + b"a" * 1000 + b'"}', "address"),
    (b'{"op": "trust-request", "address": 1}', "address"),
    (b'{"op": "trust-request", "address": "' + ADDRESS + b'", "note": {"a": 1}}', "note"),
    (b'{"op": "trust-request", "address": "' + ADDRESS + b'", "note": "' + b"n" * 1001 + b'"}', "note"),
    (b'{"op": "trust-approve"}', "address"),
    (b'{"op": "trust-deny", "address": null}', "address"),
    (b'{"op": "status", "extra": ' + b"[" * 60_000 + b"}", "unknown field"),
    (b'{"op": "launch-missiles"}', "unknown op"),
    (b'{"op": 7}', "op"),
    (b"{}", "op"),
    (b'"status"', "object"),
    (b"[" * 60_000, "object"),
    (b"null", "object"),
    (b'{"op": "status"', "malformed"),
    (b'{"op": "status"} trailing', "malformed"),
    (b'{"op": "st\xffatus"}', "UTF-8"),
    (b"\xff\xfe\x00", "malformed"),
]


@pytest.mark.parametrize(("line", "complaint"), MALFORMED)
def test_every_malformed_request_is_our_error(line: bytes, complaint: str) -> None:
    with pytest.raises(RequestError, match=complaint):
        parse_request(line)


async def test_malformed_requests_get_one_error_line_and_the_connection_keeps_serving(control_socket) -> None:
    client = await Client.open(control_socket)
    try:
        for line, complaint in MALFORMED:
            await client.send(line + b"\n")
            answer = await client.answer()
            assert set(answer) == {"error"} and complaint in str(answer["error"]), (line[:60], answer)
        await client.status_works()
    finally:
        client.close()


async def test_well_formed_requests_with_bad_values_are_answered_too(control_socket) -> None:
    stranger = str(Identity.generate().address)
    client = await Client.open(control_socket)
    try:
        for request in [
            {"op": "ping", "address": "not an address"},
            {"op": "ping", "address": stranger, "count": 1, "timeout": 0.2},  # not trusted
            {"op": "ping", "address": stranger, "via": "no endpoint"},
            {"op": "trust-approve", "address": stranger},  # nothing pending
            {"op": "trust-deny", "address": stranger},
            {"op": "trust-request", "address": stranger},  # no rendezvous
        ]:
            await client.send(json.dumps(request).encode() + b"\n")
            answer = await client.answer()
            assert set(answer) == {"error"}, (request, answer)
        await client.send(b'{"op": "trust-pending"}\n')
        assert await client.answer() == {"done": True}
        await client.status_works()
    finally:
        client.close()


async def test_an_overlong_line_gets_an_error_not_a_hang(control_socket) -> None:
    client = await Client.open(control_socket)
    try:
        await client.send(b'{"op": "status", "note": "' + b"x" * (4 * MAX_REQUEST_LINE))
        answer = await client.answer()  # answered before the line even ends
        assert "longer than" in str(answer["error"])
        await client.send(b'"}\n')  # the rest of the long line is skipped, not read as a request
        await client.status_works()
    finally:
        client.close()


async def test_garbage_from_one_client_never_disturbs_another(control_socket) -> None:
    honest = await Client.open(control_socket)
    try:
        for garbage in [b"[" * 100_000 + b"\n", b"\xff" * 10 + b"\n", b"x" * (2 * MAX_REQUEST_LINE) + b"\n"]:
            rude = await Client.open(control_socket)
            await rude.send(garbage)
            assert "error" in await rude.answer()
            rude.close()  # and leaves without reading the rest
            await honest.status_works()
        fresh = await Client.open(control_socket)
        await fresh.status_works()
        fresh.close()
    finally:
        honest.close()


async def test_a_client_that_leaves_mid_answer_does_not_break_the_server(control_socket) -> None:
    for _ in range(20):
        rude = await Client.open(control_socket)
        await rude.send(b'{"op": "status"}\n{"op": "bogus"}\n' * 50)
        rude.close()
    client = await Client.open(control_socket)
    await client.status_works()
    client.close()


async def test_call_reports_the_daemons_error_as_a_control_error(control_socket) -> None:
    with pytest.raises(control.ControlError, match="timeout"):
        async for _ in control.call(
            control_socket.parent, {"op": "ping", "address": ADDRESS.decode(), "timeout": None}
        ):
            pass
    answers = [answer async for answer in control.call(control_socket.parent, {"op": "status"})]
    assert "address" in answers[0]


async def test_a_failure_of_ours_is_answered_and_logged_not_fatal(make_node, caplog) -> None:
    node = await make_node("buggy")
    with tempfile.TemporaryDirectory(prefix="pp-") as directory:
        server = ControlServer(node, control.socket_path(Path(directory)))
        await server.start()
        try:
            client = await Client.open(server.path)
            real_status = node.status
            node.status = lambda: {}["missing"]  # type: ignore[method-assign]
            await client.send(b'{"op": "status"}\n')
            assert "internal error: KeyError" in str((await client.answer())["error"])
            assert "control request" in caplog.text
            node.status = real_status  # type: ignore[method-assign]
            await client.status_works()
            client.close()
        finally:
            await server.close()
