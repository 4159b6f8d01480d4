"""Events: what happens on agent nodes, watched from Python and from `peerpath events`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from peerpath.node.events import Events
from peerpath.services.events import watch

from .conftest import Agents
from .test_cli_messages import pair  # noqa: F401
from .test_cli_node import PEERPATH, private_local_rendezvous, run  # noqa: F401


async def _collect(stream: AsyncIterator[dict[str, Any]], kinds: set[str], timeout: float = 20) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        async for event in stream:
            seen.append(event)
            if kinds <= {e["event"] for e in seen}:
                return seen
    return seen


async def test_sessions_messages_tasks_and_files_are_events(agents: Agents, tmp_path: Path) -> None:
    alice, bob = await agents.pair()
    on_alice, on_bob = alice.watch_events(), bob.watch_events()
    alice_seen = asyncio.ensure_future(
        _collect(on_alice, {"session-up", "message-delivered", "task-done", "file-sent"})
    )
    bob_seen = asyncio.ensure_future(_collect(on_bob, {"session-up", "message", "task-done", "file-received"}))
    await asyncio.sleep(0)

    @bob.task("echo")
    async def echo(data, task):
        return data

    await alice.messages.send(bob.address, "hi", wait=True, timeout=10)
    await alice.tasks.result(await alice.tasks.submit(bob.address, "echo", 1), timeout=10)
    (tmp_path / "f.txt").write_text("x")
    await alice.files.wait(await alice.files.send(bob.address, tmp_path / "f.txt"), timeout=20)
    alice_events, bob_events = await alice_seen, await bob_seen
    up = next(e for e in alice_events if e["event"] == "session-up")
    assert up["peer"] == str(bob.address) and up["role"] == "initiator" and up["path"].startswith("relay")
    message = next(e for e in bob_events if e["event"] == "message")
    assert message["from"] == str(alice.address) and message["via"] == "direct"
    received = next(e for e in bob_events if e["event"] == "file-received")
    assert received["from"] == str(alice.address) and received["path"].endswith("f.txt")
    await bob.close()
    down = await _collect(on_alice, {"session-down"})
    assert down[-1]["peer"] == str(bob.address) and down[-1]["reason"]
    agents.running.pop("bob")
    await on_alice.aclose()
    await on_bob.aclose()


async def test_a_watcher_that_falls_behind_is_told_how_many_it_missed() -> None:
    events = Events()
    stream = watch(events, queue=3)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    for i in range(10):
        events.emit("tick", n=i)
    assert (await first) == {"event": "tick", "n": 0, "time": pytest.approx(time.time(), abs=60), "missed": 7}
    rest = [await anext(stream) for _ in range(2)]  # what fitted the queue: the rest were missed
    assert [e["n"] for e in rest] == [1, 2] and "missed" not in rest[0]
    events.emit("tick", n=10)
    assert await anext(stream) == {"event": "tick", "n": 10, "time": pytest.approx(rest[0]["time"], abs=60)}
    await stream.aclose()


class _Hook(BaseHTTPRequestHandler):
    got: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        _Hook.got.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.usefixtures("private_local_rendezvous")
def test_events_prints_and_posts_to_a_webhook(pair) -> None:  # noqa: F811
    (one, _, _), (two, two_address, _) = pair[0]
    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_address[1]}/hook"
    watcher = subprocess.Popen(
        [*PEERPATH, "events", "--json", "--webhook", url, "--state-dir", str(two)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)
        assert run("send", two_address, "hello", "--wait", "--state-dir", str(one)).returncode == 0
        deadline = time.monotonic() + 30
        while not any(e["event"] == "message" for e in list(_Hook.got)):  # posted once printed
            assert time.monotonic() < deadline, "the webhook never got the message event"
            time.sleep(0.1)
    finally:
        watcher.terminate()
        out, err = watcher.communicate(timeout=30)
        hook.shutdown()
    printed = [json.loads(line) for line in out.splitlines()]
    kinds = [e["event"] for e in printed]
    # The session came up, then the message arrived (a path change may come between them).
    assert kinds[0] == "session-up" and "message" in kinds, (kinds, err)
    assert _Hook.got == printed
    bad = run("events", "--webhook", "ftp://x", "--state-dir", str(two))
    assert bad.returncode == 2 and "http:// or https://" in bad.stderr


async def test_the_event_stream_outlives_quiet_periods(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keepalives while nothing happens, and events after them (the stream is not ended by them)."""
    from peerpath.services import events as events_module

    monkeypatch.setattr(events_module, "KEEPALIVE", 0.05)
    bus = Events()
    stream = events_module.EventsControl(bus)._stream(events_module.EventsOp())
    assert await anext(stream) == {"watching": True}
    assert await anext(stream) == {"keepalive": True}
    assert await anext(stream) == {"keepalive": True}
    bus.emit("session-up", peer="x")
    seen = [await anext(stream) for _ in range(2)]
    assert {"event": "session-up", "peer": "x"}.items() <= next(e for e in seen if "event" in e).items()
    await stream.aclose()
