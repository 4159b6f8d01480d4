"""One pattern for the background tasks of a node or a server: every task has an owner that
keeps it in a set (and cancels and awaits it at close), and a task that fails is logged with
what it was doing, so one bad input or one bug never ends silently in a task nobody awaits.
The owner decides what failing means: a per-input task (a punch round, a stream handler, a
connection) just ends; a loop that must keep running catches per iteration instead."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

log = logging.getLogger("peerpath")

T = TypeVar("T")


def spawn(coro: Coroutine[Any, Any, T], what: str, owner: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[T]:
    """Run ``coro`` as a task that logs its failure as ``what`` failed (cancellation is not
    one); kept in ``owner`` until it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    if owner is not None:
        owner.add(task)
        task.add_done_callback(owner.discard)
    task.add_done_callback(lambda done: _report(done, what))
    return task


def _report(task: asyncio.Task[Any], what: str) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("%s failed: %s: %s", what, type(exc).__name__, exc, exc_info=exc)


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended (what an owner does at close)."""
    ending = list(tasks)
    for task in ending:
        task.cancel()
    await asyncio.gather(*ending, return_exceptions=True)
