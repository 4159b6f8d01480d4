"""Tasks between agent nodes on loopback: handlers, progress, failures, timeouts, cancelling,
concurrency, restarts of either side, commands as handlers, and malformed frames."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from peerpath import errors
from peerpath.services import ports, tasks
from peerpath.services.frames import encode
from peerpath.services.tasks import Finished, Submit, TaskContext, TaskError, codec, command_handler
from peerpath.services.taskstore import Role, TaskState

from .conftest import Agents, eventually


async def test_a_task_runs_on_the_worker_reports_progress_and_returns_its_result(agents: Agents) -> None:
    planner, worker = await agents.pair()

    @worker.task("summarize")
    async def summarize(data, task: TaskContext):
        task.progress(0.5, "half way")
        await asyncio.sleep(0.2)
        return {"summary": " ".join(data["words"][:2]), "by": str(task.submitter)}

    task_id = await planner.tasks.submit("bob", "summarize", {"words": ["a", "b", "c"]}, timeout=30)
    seen = [(r.state, r.progress, r.note) async for r in planner.tasks.updates(task_id)]
    assert seen[-1] == (TaskState.DONE, 1.0, "half way")
    assert (TaskState.RUNNING, 0.5, "half way") in seen
    assert await planner.tasks.result(task_id) == {"summary": "a b", "by": str(planner.address)}
    on_worker = worker.tasks.get(task_id)
    assert (on_worker.role, on_worker.state, on_worker.peer) == (Role.WORKING, TaskState.DONE, planner.address)


async def test_failures_say_why_unknown_names_are_refused(agents: Agents) -> None:
    planner, worker = await agents.pair()

    @worker.task("divide")
    async def divide(data, task):
        return data["a"] / data["b"]

    failing = await planner.tasks.submit(worker.address, "divide", {"a": 1, "b": 0})
    with pytest.raises(TaskError, match="ZeroDivisionError: division by zero"):
        await planner.tasks.result(failing, timeout=20)
    unknown = await planner.tasks.submit(worker.address, "translate", "hola")
    with pytest.raises(TaskError, match=r"refused: .* runs no task named 'translate' \(it runs: divide\)"):
        await planner.tasks.result(unknown, timeout=20)
    with pytest.raises(errors.LocalError, match="bad task name"):
        await planner.tasks.submit(worker.address, "Not A Name")
    with pytest.raises(errors.LocalError, match="exceeds the limit"):
        await planner.tasks.submit(worker.address, "divide", b"x" * (2 << 20))


async def test_the_worker_enforces_the_timeout(agents: Agents) -> None:
    planner, worker = await agents.pair()
    ended = asyncio.Event()

    @worker.task("slow")
    async def slow(data, task):
        try:
            await asyncio.sleep(60)
        finally:
            ended.set()

    task_id = await planner.tasks.submit(worker.address, "slow", timeout=0.5)
    with pytest.raises(TaskError, match=r"failed: timed out after 0\.5 s"):
        await planner.tasks.result(task_id, timeout=20)
    assert ended.is_set()


async def test_cancelling_stops_the_handler_and_both_sides_say_cancelled(agents: Agents) -> None:
    planner, worker = await agents.pair()
    started, ended = asyncio.Event(), asyncio.Event()

    @worker.task("forever")
    async def forever(data, task):
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            ended.set()

    task_id = await planner.tasks.submit(worker.address, "forever")
    await asyncio.wait_for(started.wait(), 10)
    record = await planner.tasks.cancel(task_id)
    assert record.state is TaskState.CANCELLED
    await asyncio.wait_for(ended.wait(), 5)
    assert worker.tasks.get(task_id).state is TaskState.CANCELLED
    with pytest.raises(TaskError, match="cancelled"):
        await planner.tasks.result(task_id, timeout=5)


async def test_a_handler_runs_no_more_tasks_at_once_than_its_concurrency(agents: Agents) -> None:
    planner, worker = await agents.pair()
    running, most = 0, 0

    @worker.task("one-at-a-time", concurrency=2)
    async def one(data, task):
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.1)
        running -= 1
        return data

    ids = [await planner.tasks.submit(worker.address, "one-at-a-time", i) for i in range(6)]
    assert [await planner.tasks.result(i, timeout=30) for i in ids] == list(range(6))
    assert most == 2


async def test_a_worker_restart_reports_the_running_task_as_interrupted(agents: Agents) -> None:
    planner, worker = await agents.pair()
    started = asyncio.Event()

    @worker.task("long")
    async def long(data, task):
        started.set()
        await asyncio.sleep(3600)

    task_id = await planner.tasks.submit(worker.address, "long")
    await asyncio.wait_for(started.wait(), 10)
    await agents.stop("bob")
    worker = await agents.start("bob")
    with pytest.raises(TaskError, match="interrupted"):
        await planner.tasks.result(task_id, timeout=60)
    assert worker.tasks.get(task_id).state is TaskState.FAILED


async def test_a_task_submitted_while_the_worker_is_offline_runs_when_it_comes_back(agents: Agents) -> None:
    planner, worker = await agents.pair()
    await agents.stop("bob")
    task_id = await planner.tasks.submit("bob", "echo", "hello")
    await agents.stop("alice")  # the submitter restarts too: its record survives
    planner = await agents.start("alice")
    assert planner.tasks.get(task_id).state is TaskState.QUEUED
    worker = await agents.start("bob")

    @worker.task("echo")
    async def echo(data, task):
        return data

    assert await planner.tasks.result(task_id, timeout=60) == "hello"


async def test_a_command_serves_tasks(agents: Agents, tmp_path: Path) -> None:
    planner, worker = await agents.pair()
    script = (
        "import json, sys\n"
        "data = json.load(sys.stdin)\n"
        "print('progress 50% counting', file=sys.stderr, flush=True)\n"
        "if data.get('fail'):\n"
        "    print('something broke', file=sys.stderr); sys.exit(3)\n"
        "print(json.dumps({'words': len(data['text'].split())}))\n"
    )
    worker.tasks.register("count", command_handler([sys.executable, "-c", script]))
    task_id = await planner.tasks.submit(worker.address, "count", {"text": "one two three"})
    assert await planner.tasks.result(task_id, timeout=30) == {"words": 3}
    assert (await planner.tasks.wait(task_id)).note == "counting"
    failing = await planner.tasks.submit(worker.address, "count", {"fail": True})
    with pytest.raises(TaskError, match="exited with status 3: something broke"):
        await planner.tasks.result(failing, timeout=30)


async def test_malformed_frames_close_the_stream_and_the_worker_keeps_serving(agents: Agents) -> None:
    planner, worker = await agents.pair()

    @worker.task("echo")
    async def echo(data, task):
        return data

    conn = await planner.connect(worker.address)
    for garbage in [b"\x00\x00\x00\x03abc", encode(Finished(bytes(16), "done")), b"\xff\xff\xff\xff"]:
        reader, writer = await conn.open_stream(ports.TASKS)
        writer.write(garbage)
        writer.write_eof()
        with pytest.raises((errors.StreamResetError, ConnectionError)):
            while await reader.read(65536):
                pass
            raise ConnectionError("closed")
    # A well-formed submission on a stream of its own is answered with the task's outcome.
    reader, writer = await conn.open_stream(ports.TASKS)
    writer.write(encode(Submit(bytes(16), "echo", b"\xa2hi")))
    frames = [await codec.read(reader, 10) for _ in range(3)]
    finished = [f for f in frames if isinstance(f, Finished)]
    assert finished and finished[0].result == b"\xa2hi"
    await eventually(lambda: worker.tasks.counters["streams_failed"] >= 3)
    assert await planner.tasks.result(await planner.tasks.submit(worker.address, "echo", 1), timeout=20) == 1


async def test_an_untrusted_peer_cannot_submit(agents: Agents, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "GRACE", 0.5)
    planner, worker = await agents.pair()
    worker.trust.remove(planner.address)

    @worker.task("echo")
    async def echo(data, task):
        return data

    task_id = await planner.tasks.submit(worker.address, "echo", 1, timeout=2)
    with pytest.raises(TaskError, match="no outcome"):
        await planner.tasks.result(task_id, timeout=30)
    assert worker.tasks.list() == []


async def test_a_command_that_writes_its_result_in_pieces_and_a_long_stderr_line(agents: Agents) -> None:
    planner, worker = await agents.pair()
    script = (
        "import sys, time\n"
        "sys.stderr.write('x' * 200000 + '\\n'); sys.stderr.flush()\n"
        "sys.stdout.write('[1,'); sys.stdout.flush(); time.sleep(0.2)\n"
        "sys.stdout.write(' 2]\\n')\n"
    )
    worker.tasks.register("pieces", command_handler([sys.executable, "-c", script]))
    task_id = await planner.tasks.submit(worker.address, "pieces")
    assert await planner.tasks.result(task_id, timeout=30) == [1, 2]


async def test_a_handler_that_raises_timeout_itself_fails_the_task(agents: Agents) -> None:
    planner, worker = await agents.pair()

    @worker.task("flaky")
    async def flaky(data, task):
        raise TimeoutError("the database did not answer")

    @worker.task("unsendable")
    async def unsendable(data, task):
        return object()  # nothing msgpack can carry

    for name, words in (("flaky", "TimeoutError: the database did not answer"), ("unsendable", "cannot be sent")):
        task_id = await planner.tasks.submit(worker.address, name)
        with pytest.raises(TaskError, match=words):
            await planner.tasks.result(task_id, timeout=20)
