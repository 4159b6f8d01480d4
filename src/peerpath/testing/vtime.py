"""Virtual time for asyncio: seconds of protocol timers pass in milliseconds.

:class:`VirtualTimeLoop` is a selector event loop whose clock (:meth:`~VirtualTimeLoop.time`)
is virtual. Whenever the loop would block waiting for its next timer while nothing is
ready, the clock jumps to that timer instead of sleeping. So ``await asyncio.sleep(100)``
returns at once, with ``loop.time()`` 100 s further on, and timeouts, retransmissions and
keepalives run as they would in real time, only without the waiting.

Rules for code under test:

* read time from the loop (``asyncio.get_running_loop().time()``); ``time.monotonic`` and
  ``time.perf_counter`` keep running at real speed and disagree with the loop;
* work handed to threads with ``run_in_executor`` (or ``asyncio.to_thread``) takes no
  virtual time: while some is pending the clock stands still and the loop waits for real;
* real sockets and other file descriptors still work: the loop polls them without blocking
  before it moves the clock, but a real peer's answer that is not there yet is not waited
  for (use an in-memory network such as :mod:`peerpath.testing.fakenet`);
* a turn of the loop that runs callbacks moves the clock by its smallest step only, so a
  task that keeps the loop busy without ever waiting (``sleep(0)`` in a loop) all but
  stops the clock for everyone.

:func:`run` is :func:`asyncio.run` on a fresh loop, with a guard against livelocks (a
program that keeps timers going forever).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import selectors
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar, TypeVarTuple, Unpack

T = TypeVar("T")
_Ts = TypeVarTuple("_Ts")

#: How long the loop waits for real, per turn, while thread work is pending.
REAL_WAIT = 0.01
#: Virtual seconds granted for cleanup (cancelled tasks) after the limit was passed.
CLEANUP_GRACE = 60.0


class VirtualTimeLimitError(RuntimeError):
    """Virtual time passed the limit given to :func:`run` (a livelock, or a test waiting
    for something that never happens)."""


class _VirtualSelector(selectors.BaseSelector):
    """The loop's real selector, except that a wait with nothing ready moves the virtual clock."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._real = real
        self._loop = loop

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._real.select(0)
        if events:
            return events
        if timeout is not None and timeout <= 0:
            # Callbacks are ready: the turn takes the smallest step of time. (The loop runs
            # timers due within its clock's resolution early; without the step, tasks that
            # wait out the rest of a deadline while others keep the loop busy never see it.)
            self._loop.tick()
            return events
        if self._loop.executor_pending:
            return self._real.select(REAL_WAIT if timeout is None else min(timeout, REAL_WAIT))
        if timeout is None:
            # Nothing scheduled: only another thread can wake the loop; wait for it for real.
            return self._real.select(None)
        self._loop.advance(timeout)
        return []

    def close(self) -> None:
        self._real.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop on a virtual clock (see the module's description).

    ``limit``: raise :class:`VirtualTimeLimitError` out of the running loop when the clock
    would pass this many virtual seconds after the loop's creation (None: no limit).
    """

    def __init__(self, limit: float | None = None) -> None:
        self._now = time.monotonic()
        self._limit = limit
        self._deadline = None if limit is None else self._now + limit
        self.executor_pending = 0
        super().__init__(_VirtualSelector(selectors.DefaultSelector(), self))

    def time(self) -> float:
        """The virtual clock."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the virtual clock ``seconds`` forward (the loop does this when it would sleep)."""
        now = self._now + seconds
        if self._deadline is not None and now > self._deadline:
            self._deadline = self._now + CLEANUP_GRACE
            raise VirtualTimeLimitError(
                f"virtual time passed its limit of {self._limit:g} s: "
                "a livelock, or a wait for something that never happens?"
            )
        self._now = now

    def tick(self) -> None:
        """Move the virtual clock by the smallest step there is."""
        self._now = math.nextafter(self._now, math.inf)

    def run_in_executor(
        self, executor: concurrent.futures.Executor | None, func: Callable[[Unpack[_Ts]], T], *args: *_Ts
    ) -> asyncio.Future[T]:
        """As the base loop; the clock stands still until the work is done."""
        future = super().run_in_executor(executor, func, *args)
        self.executor_pending += 1
        future.add_done_callback(self._executor_done)
        return future

    def _executor_done(self, _: asyncio.Future[Any]) -> None:
        self.executor_pending -= 1


def run(main: Coroutine[Any, Any, T], *, limit: float = 3600.0, debug: bool | None = None) -> T:
    """Run ``main`` to completion on a fresh :class:`VirtualTimeLoop` and close the loop, as
    :func:`asyncio.run` does; :class:`VirtualTimeLimitError` when virtual time passes
    ``limit`` seconds."""
    with asyncio.Runner(debug=debug, loop_factory=lambda: VirtualTimeLoop(limit)) as runner:
        return runner.run(main)
