"""Background tasks: a failure is logged with what the task was doing; cancellation is quiet."""

from __future__ import annotations

import asyncio
import logging

from peerpath.tasks import spawn


async def test_a_failing_task_is_logged_with_what_it_did_and_leaves_its_owner(caplog) -> None:
    owner: set[asyncio.Task[object]] = set()

    async def broken() -> None:
        raise KeyError("a bug")

    async def forever() -> None:
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR, logger="peerpath"):
        failing = spawn(broken(), "choosing a home relay", owner)
        waiting = spawn(forever(), "a loop", owner)
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.sleep(0.01)
    assert failing.done() and not owner
    assert [r.getMessage() for r in caplog.records] == ["choosing a home relay failed: KeyError: 'a bug'"]
