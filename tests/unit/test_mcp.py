"""MCP both ways, with the official SDK's own client (stdio + ClientSession) against two running
daemons: `peerpath mcp` as an agent's tools over the overlay, and a stdio MCP server exposed with
`peerpath expose --exec` that a client on the other node runs as `peerpath connect PEER:NAME`."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from .test_cli_messages import pair  # noqa: F401
from .test_cli_node import PEERPATH, private_local_rendezvous, run  # noqa: F401
from .test_cli_tasks import SCRIPT as COUNT_WORDS

pytestmark = pytest.mark.usefixtures("private_local_rendezvous")

#: `peerpath` with its mcp command loaded (the same as PEERPATH once peerpath.cli imports it).
TOOLS = {"list_peers", "send_message", "read_inbox", "submit_task", "task_status", "publish", "call_http"}
#: A stdio MCP server written with the SDK, with one tool.
CALC = """\
from mcp.server.mcpserver import MCPServer

server = MCPServer("calc")


@server.tool()
def add(a: int, b: int) -> int:
    \"\"\"Add two integers.\"\"\"
    return a + b


server.run("stdio")
"""


@contextlib.asynccontextmanager
async def mcp_client(args: list[str], log: Path) -> AsyncIterator[ClientSession]:
    """An initialized SDK client session with the stdio server ``args`` runs (its stderr in ``log``)."""
    params = StdioServerParameters(command=args[0], args=args[1:])
    with log.open("a") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> Any:
    """A tool's structured result; the test fails with the tool's message if it is an error."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    return result.structured_content


async def tool_error(session: ClientSession, tool: str, **arguments: Any) -> str:
    """The message of a tool call that must fail."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return "".join(getattr(block, "text", "") for block in result.content)


def mcp_of(state: Path) -> list[str]:
    return [*PEERPATH, "mcp", "--state-dir", str(state)]


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers with what it got as JSON (201), or 2 MiB of text at /big."""

    def answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
        if self.path == "/big":
            data, kind = b"x" * (2 * 1024 * 1024), "text/plain"
        else:
            got = {"method": self.command, "path": self.path, "body": body, "x-agent": self.headers.get("x-agent")}
            data, kind = json.dumps(got).encode(), "application/json"
        self.send_response(200 if self.path == "/big" else 201)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web_server() -> Iterator[int]:
    """A small HTTP server on a loopback port, in a thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def run_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`peerpath ARGS` run in the directory ``cwd``."""
    return subprocess.run([*PEERPATH, *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


def inbox_of(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in run("inbox", "--json", "--state-dir", str(state)).stdout.splitlines()]


def no_traceback(log: Path) -> None:
    text = log.read_text() if log.exists() else ""
    assert "Traceback" not in text, text


async def test_the_tools_reach_peers_send_messages_and_list_sessions(pair, tmp_path: Path) -> None:  # noqa: F811
    (one, one_address, _), (two, two_address, _) = pair[0]
    log = tmp_path / "mcp.log"
    async with mcp_client(mcp_of(one), log) as session:
        listed = await session.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS
        assert all(len(tool.description or "") > 80 for tool in listed.tools)  # a model reads them
        peers = await call(session, "list_peers")
        assert peers["this_node"] == one_address
        assert [(p["address"], p["note"], p["names"]) for p in peers["peers"]] == [
            (two_address, "planner", ["planner"])
        ]
        sent = await call(session, "send_message", peer="planner", message={"task": "summarize", "n": 2}, wait=True)
        assert (sent["to"], sent["state"]) == (two_address, "delivered")
        await call(session, "send_message", peer=two_address, message="plain text too")
        [up] = (await call(session, "list_peers"))["peers"]
        assert up["session_up"] is True and up["path"] in ("direct", "relay") and up["rtt_ms"] > 0
        assert up["route"].startswith(up["path"])
    deadline = time.monotonic() + 20
    while len(inbox := inbox_of(two)) < 2:
        assert time.monotonic() < deadline, inbox
        await asyncio.sleep(0.2)
    assert [(m["id"], m["from"], m["data"]) for m in inbox] == [
        (sent["id"], one_address, {"task": "summarize", "n": 2}),
        (inbox[1]["id"], one_address, "plain text too"),
    ]
    # The other side reads its inbox through its own MCP server, and acknowledges what it read.
    async with mcp_client(mcp_of(two), log) as session:
        first = await call(session, "read_inbox", limit=1, ack=True)
        assert [(m["id"], m["from"], m["data"]) for m in first["messages"]] == [
            (sent["id"], one_address, {"task": "summarize", "n": 2})
        ]
        assert first["more"] is True
        rest = await call(session, "read_inbox")
        assert [m["data"] for m in rest["messages"]] == ["plain text too"] and rest["more"] is False
    assert [m["id"] for m in inbox_of(two)] == [inbox[1]["id"]]
    no_traceback(log)


@pytest.fixture
def count_worker(pair) -> Iterator[None]:  # noqa: F811
    """Node two runs tasks named "count" (they count the words of their input's text)."""
    two = pair[0][1][0]
    worker = subprocess.Popen(
        [*PEERPATH, "task", "serve", "count", "--state-dir", str(two), "--", sys.executable, "-c", COUNT_WORDS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while "count" not in json.loads(run("status", "--json", "--state-dir", str(two)).stdout)["tasks"]["serves"]:
            assert time.monotonic() < deadline, "task serve did not register"
            time.sleep(0.2)
        yield
    finally:
        worker.terminate()
        worker.wait(10)


async def test_submit_task_waits_for_the_workers_result(pair, count_worker, tmp_path: Path) -> None:  # noqa: F811
    (one, _, _), (_, two_address, _) = pair[0]
    async with mcp_client(mcp_of(one), tmp_path / "mcp.log") as session:
        done = await call(session, "submit_task", peer="planner", name="count", input={"text": "a b c"}, wait=True)
        assert (done["state"], done["result"], done["peer"]) == ("done", {"words": 3}, two_address)
        queued = await call(session, "submit_task", peer=two_address, name="count", input={"text": "x y"})
        assert len(queued["id"]) == 32 and queued["state"] in ("queued", "running", "done")
        ended = await call(session, "task_status", task_id=queued["id"][:8], wait=True, wait_timeout=30)
        assert (ended["state"], ended["result"]) == ("done", {"words": 2})
        slow = await call(session, "submit_task", peer="planner", name="count", input={"text": "z", "sleep": 30},
                          wait=True, wait_timeout=1)  # fmt: skip
        assert slow["state"] in ("queued", "running") and "task_status" in slow["waited"]
    no_traceback(tmp_path / "mcp.log")


async def test_call_http_reaches_a_web_server_a_peer_exposes(pair, web_server: int, tmp_path: Path) -> None:  # noqa: F811
    (one, _, _), (two, _, _) = pair[0]
    assert run("expose", f"127.0.0.1:{web_server}", "--name", "web", "--state-dir", str(two)).returncode == 0
    async with mcp_client(mcp_of(one), tmp_path / "mcp.log") as session:
        answer = await call(session, "call_http", peer="planner", method="POST", path="/jobs?limit=5",
                            body='{"job": 1}', headers={"x-agent": "one"})  # fmt: skip
        assert (answer["status"], answer["reason"], answer["truncated"]) == (201, "Created", False)
        assert answer["headers"]["content-type"] == "application/json"
        assert json.loads(answer["body"]) == {"method": "POST", "path": "/jobs?limit=5", "body": '{"job": 1}',
                                              "x-agent": "one"}  # fmt: skip
        big = await call(session, "call_http", peer="planner", path="/big")
        assert big["status"] == 200 and big["truncated"] is True
        assert big["body"] == "x" * big["body_bytes"] and big["body_bytes"] == 1024 * 1024
        assert big["headers"]["content-length"] == str(2 * 1024 * 1024)
    no_traceback(tmp_path / "mcp.log")


async def test_tool_errors_are_peerpaths_one_line_messages(pair, tmp_path: Path) -> None:  # noqa: F811
    (one, _, _), (_, two_address, _) = pair[0]
    async with mcp_client(mcp_of(one), tmp_path / "mcp.log") as session:
        unknown = await tool_error(session, "send_message", peer="nobody", message="hi")
        assert "'nobody' is neither an address nor the name of a trusted peer" in unknown
        assert "neither an address" in await tool_error(session, "call_http", peer="nobody")
        assert "no service on port" in await tool_error(session, "call_http", peer=two_address, service="nosuch")
        assert "must start with '/'" in await tool_error(session, "call_http", peer="planner", path="jobs")
        assert "no task" in await tool_error(session, "task_status", task_id="abcdef12")
    no_traceback(tmp_path / "mcp.log")


async def test_without_a_node_every_tool_says_how_to_start_one(tmp_path: Path) -> None:
    log = tmp_path / "mcp.log"
    async with mcp_client(mcp_of(tmp_path / "nowhere"), log) as session:
        assert {tool.name for tool in (await session.list_tools()).tools} == TOOLS  # it starts all the same
        for tool, arguments in [
            ("list_peers", {}),
            ("send_message", {"peer": "planner", "message": "hi"}),
            ("read_inbox", {}),
            ("submit_task", {"peer": "planner", "name": "count"}),
            ("publish", {"target": "news", "data": 1}),
            ("call_http", {"peer": "planner"}),
        ]:
            message = await tool_error(session, tool, **arguments)
            assert f"no node is running for {tmp_path / 'nowhere'}; start one with: peerpath up" in message, tool
    no_traceback(log)
    assert not (tmp_path / "nowhere").exists()  # nothing was created


def test_print_config_prints_the_client_entry_and_writes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    proc = subprocess.run(
        [*PEERPATH, "mcp", "--print-config", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(proc.stdout)["mcpServers"].values()
    assert entry["command"].endswith("peerpath") and entry["args"] == ["mcp", "--state-dir", str(state)]
    assert list(tmp_path.iterdir()) == []


async def test_a_remote_stdio_mcp_server_through_expose_exec_and_connect(pair, tmp_path: Path) -> None:  # noqa: F811
    (one, _, _), (two, two_address, _) = pair[0]
    (tmp_path / "calc.py").write_text(CALC)
    exposed = run_in(tmp_path, "expose", "--exec", "calc", "--state-dir", str(two), "--", sys.executable, "calc.py")
    assert exposed.returncode == 0 and "for each stream as calc" in exposed.stdout, exposed.stderr
    # What an MCP client's configuration says: {"command": "peerpath", "args": ["connect", "PEER:calc"]}.
    connect = [*PEERPATH, "connect", f"{two_address}:calc", "--state-dir", str(one)]
    for _ in range(2):  # each client gets a server process of its own
        async with mcp_client(connect, tmp_path / "connect.log") as session:
            [tool] = (await session.list_tools()).tools
            assert tool.name == "add"
            result = await session.call_tool("add", {"a": 2, "b": 3})
            assert not result.is_error and result.structured_content == {"result": 5}
    deadline = time.monotonic() + 20
    while True:  # the server processes ended with their clients
        [shown] = json.loads(run("status", "--json", "--state-dir", str(two)).stdout)["tunnels"]["exposed"]
        if shown["processes"] == 0:
            break
        assert time.monotonic() < deadline, shown
        await asyncio.sleep(0.2)
    assert (
        json.loads(run("status", "--json", "--state-dir", str(two)).stdout)["tunnels"]["counters"]["processes_started"]
        == 2
    )
    no_traceback(tmp_path / "connect.log")
