"""Tasks: a node submits a named job with an input to a peer; the peer runs it with the handler
it registered for that name, and sends progress and the outcome back.

On the tasks port the submitter opens one stream per task and sends ``Submit`` (or ``Watch``
for a task it submitted before the stream broke, or ``Cancel``); the worker answers with
``Update`` frames while the task is queued or running and one ``Finished`` frame (or
``Rejected``). Both sides record every task in SQLite (:mod:`peerpath.services.taskstore`):
the submitter keeps watching its tasks across broken sessions and restarts, and a worker that
restarts reports the tasks it was running as interrupted, never running one twice silently.
Timeouts hold on both sides: the worker stops a task at its deadline, the submitter gives up
on it a little later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from peerpath import errors
from peerpath.identity import Address
from peerpath.node import control
from peerpath.node.node import Node
from peerpath.services import ports
from peerpath.services.frames import FrameCodec, FrameError, check_data, encode
from peerpath.services.names import Names
from peerpath.services.taskstore import Role, TaskRecord, TaskState, TaskStore
from peerpath.session.streams import StreamWriter
from peerpath.storage import StorageError
from peerpath.tasks import cancel_all, spawn

log = logging.getLogger(__name__)

#: Largest input and largest result (msgpack-encoded).
MAX_INPUT = 1024 * 1024
MAX_RESULT = 1024 * 1024
MAX_FRAME = max(MAX_INPUT, MAX_RESULT) + 1024
#: Longest timeout a task may ask for (seconds): a day.
MAX_TIMEOUT = 86400.0
#: Seconds the submitter waits past a task's timeout for the worker's word before it gives up.
GRACE = 10.0
#: Seconds a worker waits for the first frame; between updates it sends one anyway (so a dead
#: stream is noticed) this often.
HELLO_TIMEOUT = 10.0
HEARTBEAT = 15.0
#: Seconds the submitter waits for a session and a stream; its pause between tries, doubling.
CONNECT_TIMEOUT = 15.0
RETRY = (1.0, 30.0)
#: A task's name: what handlers are registered under.
NAME = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
#: Most tasks a handler runs at once unless told otherwise.
DEFAULT_CONCURRENCY = 4
#: Seconds between sweeps for queued tasks past their deadline, and prunings.
SWEEP_EVERY = 5.0

_Id = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
_Name = Annotated[str, msgspec.Meta(max_length=64)]
_Note = Annotated[str, msgspec.Meta(max_length=1000)]
_Progress = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class Submit(msgspec.Struct, tag="submit", frozen=True):
    """Run task ``name`` on ``input`` (msgpack), within ``timeout`` seconds if given."""

    id: _Id
    name: _Name
    input: Annotated[bytes, msgspec.Meta(max_length=MAX_INPUT)]
    timeout: Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT)] | None = None


class Watch(msgspec.Struct, tag="watch", frozen=True):
    """Send the updates of a task submitted before."""

    id: _Id


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    """Cancel a task submitted before."""

    id: _Id


class Update(msgspec.Struct, tag="update", frozen=True):
    """Where a task is (queued or running), and how far."""

    id: _Id
    state: Literal["queued", "running"]
    progress: _Progress | None = None
    note: _Note = ""


class Finished(msgspec.Struct, tag="finished", frozen=True):
    """How a task ended: its result (``done``) or why not."""

    id: _Id
    state: Literal["done", "failed", "cancelled"]
    result: Annotated[bytes, msgspec.Meta(max_length=MAX_RESULT)] | None = None
    error: _Note = ""


class Rejected(msgspec.Struct, tag="rejected", frozen=True):
    """The worker does not take this request, and why (no such task name, too busy...)."""

    id: _Id
    reason: _Note
    retry: bool = False


Frame = Submit | Watch | Cancel | Update | Finished | Rejected
codec: FrameCodec[Frame] = FrameCodec(Frame, MAX_FRAME)
_encoder = msgspec.msgpack.Encoder()


class TaskError(errors.RemoteError):
    """A task failed, was cancelled, or was refused; the message says which and why."""


@dataclass
class TaskContext:
    """What a handler gets besides the input: who asked, and a way to report progress."""

    id: str
    name: str
    submitter: Address
    _report: Callable[[float | None, str], None] = field(repr=False)

    def progress(self, fraction: float | None, note: str = "") -> None:
        """Tell the submitter how far the task is (0.0 to 1.0), with a short note."""
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        self._report(fraction, note[:1000])


#: A task handler: ``await handler(input, context)`` returns the result (anything msgpack carries).
TaskHandler = Callable[[Any, TaskContext], Awaitable[Any]]


@dataclass
class _Registered:
    handler: TaskHandler
    concurrency: int
    slots: asyncio.Semaphore


def check_name(name: str) -> str:
    """``name`` if it can name a task (LocalError otherwise)."""
    if not NAME.match(name):
        raise errors.LocalError(
            f"bad task name {name!r}: lower-case letters, digits, '.', '_' and '-', starting with a letter"
        )
    return name


class Tasks:
    """The tasks service of one node: the handlers it serves, the tasks it runs, and the tasks
    it submitted to others."""

    def __init__(self, node: Node, path: Path | str, names: Names | None = None) -> None:
        self.node = node
        self.path = path
        self.names = names or Names(node.trust)
        self.store: TaskStore | None = None
        self._handlers: dict[str, _Registered] = {}
        self._running: dict[bytes, asyncio.Task[None]] = {}
        self._watchers: dict[bytes, asyncio.Task[None]] = {}
        self._changed: dict[bytes, set[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.counters = {"submitted": 0, "accepted": 0, "rejected": 0, "streams_failed": 0}

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, report interrupted tasks, serve the tasks port, resume work."""
        self.store = TaskStore(self.path)
        for task in self.store.interrupted():
            log.warning("task %s (%s from %s) was interrupted by a restart", task.id, task.name, task.peer)
        self.node.serve(ports.TASKS, self._serve)
        self._started = True
        for record in self.store.open_tasks(Role.WORKING):
            if record.name in self._handlers:
                self._schedule(record)
        for record in self.store.open_tasks(Role.SUBMITTED):
            self._watch(record)
        spawn(self._sweep(), "sweeping tasks past their deadline", self._tasks)

    async def close(self) -> None:
        """Stop running and watching tasks (running ones are interrupted) and close the database."""
        self.node.unserve(ports.TASKS)
        await cancel_all([*self._running.values(), *self._watchers.values(), *self._tasks])
        if self.store is not None:
            self.store.close()
            self.store = None
        self._started = False

    def _db(self) -> TaskStore:
        if self.store is None:
            raise errors.LocalError("the tasks service is not running (start the node first)")
        return self.store

    def on_event(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call ``listener(kind, details)`` when a task changes state (the node's events get them too)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Stop calling ``listener``."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _changed_now(self, record: TaskRecord | None) -> None:
        if record is None:
            return
        task_id = bytes.fromhex(record.id)
        for waiting in self._changed.pop(task_id, set()):
            if not waiting.done():
                waiting.set_result(None)
        kind = f"task-{record.state.value}"
        details: dict[str, Any] = {"id": record.id, "name": record.name, "role": record.role.value}
        details["peer"] = str(record.peer)
        if record.progress is not None:
            details["progress"] = record.progress
        for listener in self._listeners:
            try:
                listener(kind, details)
            except Exception:
                log.exception("a task event listener failed")
        self.node.events.emit(kind, **details)

    def _change(self, role: Role, task_id: bytes) -> asyncio.Future[None]:
        """A future that is done when the task changes next."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._changed.setdefault(task_id, set()).add(future)
        return future

    def _update(self, role: Role, task_id: bytes, **fields: Any) -> TaskRecord | None:
        before = self._db().get(role, task_id)
        if before is not None and all(getattr(before, k) == v for k, v in fields.items()):
            return before  # nothing changes: no write, no event (a worker's heartbeat, say)
        record = self._db().update(role, task_id, **fields)
        if record is not None and _visible(record) != (None if before is None else _visible(before)):
            self._changed_now(record)
        return record

    # -- the worker's side --------------------------------------------------------------------

    def register(self, name: str, handler: TaskHandler, *, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        """Run ``handler`` for tasks named ``name``, at most ``concurrency`` at once."""
        check_name(name)
        if concurrency < 1:
            raise errors.LocalError("a handler runs at least one task at a time")
        self._handlers[name] = _Registered(handler, concurrency, asyncio.Semaphore(concurrency))
        if self._started:
            for record in self._db().open_tasks(Role.WORKING):
                if record.name == name:
                    self._schedule(record)

    def unregister(self, name: str) -> None:
        """Stop taking tasks named ``name`` (queued ones wait for a handler; running ones finish)."""
        self._handlers.pop(name, None)

    def handler(self, name: str, *, concurrency: int = DEFAULT_CONCURRENCY) -> Callable[[TaskHandler], TaskHandler]:
        """Decorator form of :meth:`register`: ``@node.task("summarize")``."""

        def decorate(handler: TaskHandler) -> TaskHandler:
            self.register(name, handler, concurrency=concurrency)
            return handler

        return decorate

    @property
    def served(self) -> list[str]:
        """The task names this node runs."""
        return sorted(self._handlers)

    def _schedule(self, record: TaskRecord) -> None:
        task_id = bytes.fromhex(record.id)
        if task_id not in self._running:
            task = spawn(self._run(task_id, record.name), f"running task {record.id} ({record.name})")
            self._running[task_id] = task
            task.add_done_callback(lambda done: _forget(self._running, task_id, done))

    async def _run(self, task_id: bytes, name: str) -> None:
        """Run one task when its handler has a free slot; record how it ends. Only its id waits
        for the slot: the input is read from the store when the task starts."""
        registered = self._handlers.get(name)
        if registered is None:
            return
        async with registered.slots:
            record = self._db().get(Role.WORKING, task_id)
            if record is None or record.state is not TaskState.QUEUED:
                return
            if self._handlers.get(name) is not registered:
                return  # its handler went (or was replaced) while it waited: the queue waits for the next
            self._update(Role.WORKING, task_id, state=TaskState.RUNNING)

            def report(fraction: float | None, note: str) -> None:
                self._update(Role.WORKING, task_id, progress=fraction, note=note)

            context = TaskContext(record.id, record.name, record.peer, report)
            remaining = None if record.deadline is None else max(0.0, record.deadline - time.time())
            deadline = asyncio.timeout(remaining)
            try:
                async with deadline:
                    output = await registered.handler(msgspec.msgpack.decode(record.input), context)
            except asyncio.CancelledError:
                current = self._db().get(Role.WORKING, task_id)
                if current is not None and current.state is TaskState.CANCELLED:
                    return  # cancelled on request: recorded already
                raise  # the node is closing: the task stays "running", and is reported interrupted
            except Exception as exc:
                if isinstance(exc, TimeoutError) and deadline.expired():
                    why = f"timed out after {record.timeout:g} s"
                else:
                    log.info("task %s (%s) failed: %s: %s", record.id, name, type(exc).__name__, exc)
                    why = _failure(exc)
                self._update(Role.WORKING, task_id, state=TaskState.FAILED, error=why)
                return
            try:
                result = _encoder.encode(output)
                check_data(result)
            except (TypeError, ValueError, FrameError) as exc:
                self._update(Role.WORKING, task_id, state=TaskState.FAILED,
                             error=f"the handler returned what cannot be sent: {exc}"[:1000])  # fmt: skip
                return
            if len(result) > MAX_RESULT:
                self._update(Role.WORKING, task_id, state=TaskState.FAILED,
                             error=f"the result of {len(result)} bytes exceeds the limit of {MAX_RESULT}")  # fmt: skip
                return
            self._update(Role.WORKING, task_id, state=TaskState.DONE, result=result, progress=1.0)

    def _cancel_working(self, task_id: bytes, why: str = "cancelled by the submitter") -> TaskRecord | None:
        record = self._update(Role.WORKING, task_id, state=TaskState.CANCELLED, error=why)
        running = self._running.get(task_id)
        if running is not None:
            running.cancel()
        return record

    async def _serve(self, reader: asyncio.StreamReader, writer: StreamWriter) -> None:
        """A submitter's stream: one request, then the task's updates until it ends."""
        peer: Address = writer.get_extra_info("peer_address")
        try:
            request = await codec.read(reader, HELLO_TIMEOUT)
            if request is None:
                return
            record = self._take(peer, request)
            if isinstance(record, Rejected):
                self.counters["rejected"] += 1
                writer.write(encode(record))
            else:
                await self._stream_updates(writer, record)
            writer.write_eof()
        except (FrameError, TimeoutError, StorageError) as exc:
            self.counters["streams_failed"] += 1
            log.info("closed a tasks stream from %s: %s", peer, exc)
            writer.abort()
        except (errors.PeerpathError, ConnectionError):
            self.counters["streams_failed"] += 1

    def _take(self, peer: Address, request: Frame) -> TaskRecord | Rejected:
        """The task a submitter's request is about (new, watched or cancelled), or a refusal."""
        store = self._db()
        if isinstance(request, Submit):
            if request.name not in self._handlers:
                served = ", ".join(self.served) or "none"
                return Rejected(request.id, f"{self.node.address} runs no task named {request.name!r} "
                                            f"(it runs: {served})")  # fmt: skip
            known = store.get(Role.WORKING, request.id)
            if known is not None and known.peer != peer:
                return Rejected(request.id, "that task id is taken")
            try:
                check_data(request.input)
            except FrameError as exc:
                return Rejected(request.id, f"the task's input is {exc}")
            try:
                record, fresh = store.add(Role.WORKING, request.id, peer, request.name, request.input, request.timeout)
            except StorageError as exc:
                return Rejected(request.id, str(exc), retry=True)
            if fresh:
                self.counters["accepted"] += 1
                self._changed_now(record)
                self._schedule(record)
            return record
        if isinstance(request, Watch | Cancel):
            known = store.get(Role.WORKING, request.id)
            if known is None or known.peer != peer:
                return Rejected(request.id, "no such task")
            if isinstance(request, Cancel) and not known.state.final:
                return self._cancel_working(request.id) or known
            return known
        raise FrameError(f"unexpected {type(request).__name__} from a submitter")

    async def _stream_updates(self, writer: StreamWriter, record: TaskRecord) -> None:
        task_id = bytes.fromhex(record.id)
        while True:
            current = self._db().get(Role.WORKING, task_id)
            if current is None:
                return
            if current.state.final:
                writer.write(encode(_finished(current)))
                return
            changed = self._change(Role.WORKING, task_id)
            writer.write(encode(Update(task_id, current.state.value, current.progress, current.note)))  # type: ignore[arg-type]
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(changed), HEARTBEAT)

    async def _sweep(self) -> None:
        """Fail queued tasks past their deadline (no handler took them in time); prune old ones."""
        rounds = 0
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                for task_id, timeout in self._db().overdue(Role.WORKING, time.time()):
                    self._update(Role.WORKING, task_id, state=TaskState.FAILED,
                                 error=f"timed out after {timeout:g} s in the queue")  # fmt: skip
                rounds += 1
                if rounds % 720 == 0:
                    self._db().prune()
            except StorageError as exc:
                log.warning("could not sweep the task store: %s", exc)

    # -- the submitter's side -----------------------------------------------------------------

    async def submit(self, peer: Address | str, name: str, data: Any = None, *, timeout: float | None = None) -> str:
        """Submit task ``name`` with input ``data`` to ``peer``; return the task's id at once.
        It is recorded (on disk) and sent as soon as the peer can be reached; follow it with
        :meth:`status`, :meth:`result` or :meth:`updates`."""
        address = await self.names.resolve(peer)
        check_name(name)
        if not self.node.is_trusted(address):
            raise errors.NotTrustedError(f"{address} is not trusted; run: peerpath trust add {address}")
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise errors.LocalError(f"a task's timeout is between 0 and {MAX_TIMEOUT:g} s")
        try:
            body = _encoder.encode(data)
        except (TypeError, ValueError) as exc:
            raise errors.LocalError(f"cannot send this input: {exc}") from None
        if len(body) > MAX_INPUT:
            raise errors.LocalError(f"input of {len(body)} bytes exceeds the limit of {MAX_INPUT}")
        task_id = os.urandom(16)
        record, _ = self._db().add(Role.SUBMITTED, task_id, address, name, body, timeout)
        self.counters["submitted"] += 1
        self._changed_now(record)
        self._watch(record)
        return record.id

    def _watch(self, record: TaskRecord) -> None:
        task_id = bytes.fromhex(record.id)
        if task_id not in self._watchers:
            task = spawn(self._follow(record), f"following task {record.id} on {record.peer}")
            self._watchers[task_id] = task
            task.add_done_callback(lambda done: _forget(self._watchers, task_id, done))

    async def _follow(self, record: TaskRecord) -> None:
        """Send the task (or ask after it) and take its updates until it ends, across broken
        sessions; give up past its deadline."""
        task_id = bytes.fromhex(record.id)
        pause = RETRY[0]
        while True:
            current = self._db().get(Role.SUBMITTED, task_id)
            if current is None or current.state.final:
                return
            left = None if current.deadline is None else current.deadline + GRACE - time.time()
            if left is not None and left <= 0:
                self._update(Role.SUBMITTED, task_id, state=TaskState.FAILED,
                             error=f"no outcome from {current.peer} within {current.timeout:g} s")  # fmt: skip
                return
            try:
                async with asyncio.timeout(left):
                    request: Frame = (
                        Watch(task_id)
                        if current.sent
                        else Submit(task_id, current.name, current.input, current.timeout)
                    )
                    await self._exchange(current.peer, request)
                pause = RETRY[0]
            except (errors.PeerpathError, OSError) as exc:  # before TimeoutError: a network timeout is both
                log.info("task %s: cannot reach %s now (%s)", record.id, record.peer, exc)
                self._update(Role.SUBMITTED, task_id, note=f"waiting for {record.peer}: {exc}"[:1000])
                await asyncio.sleep(pause if left is None else min(pause, max(left, 0.0)))
                pause = min(pause * 2, RETRY[1])
            except TimeoutError:
                continue  # the task's deadline passed: the check above ends it

    async def _exchange(self, peer: Address, request: Frame, *, record: bool = True) -> None:
        """One stream: the request, then the worker's frames until the task ends (recorded
        unless ``record`` is False)."""
        connection = await self.node.connect(peer, timeout=CONNECT_TIMEOUT)
        reader, writer = await connection.open_stream(ports.TASKS, timeout=CONNECT_TIMEOUT)
        task_id = request.id
        try:
            writer.write(encode(request))
            while True:
                frame = await codec.read(reader, HEARTBEAT * 3)
                if frame is None:
                    raise errors.SessionClosedError(f"{peer} closed the task's stream before it ended")
                if getattr(frame, "id", None) != task_id:
                    raise FrameError(f"{peer} sent a frame about another task")
                if not record:
                    if isinstance(frame, Finished | Rejected):
                        return
                    continue
                if isinstance(frame, Update):
                    self._update(Role.SUBMITTED, task_id, state=TaskState(frame.state), progress=frame.progress,
                                 note=frame.note, sent=True)  # fmt: skip
                elif isinstance(frame, Finished):
                    if frame.result is not None:
                        try:
                            check_data(frame.result)
                        except FrameError as exc:
                            self._update(Role.SUBMITTED, task_id, state=TaskState.FAILED,
                                         error=f"the worker's result is {exc}", sent=True)  # fmt: skip
                            return
                    done = {"progress": 1.0} if frame.state == "done" else {}
                    self._update(Role.SUBMITTED, task_id, state=TaskState(frame.state), result=frame.result,
                                 error=frame.error, sent=True, **done)  # fmt: skip
                    return
                elif isinstance(frame, Rejected):
                    if frame.retry:
                        raise errors.NetworkError(f"{peer} is busy: {frame.reason}")
                    self._update(Role.SUBMITTED, task_id, state=TaskState.FAILED, error=f"refused: {frame.reason}")
                    return
                else:
                    raise FrameError(f"unexpected {type(frame).__name__} from a worker")
        except BaseException:
            writer.abort()
            raise
        finally:
            writer.write_eof()

    # -- both sides -------------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord:
        """A task this node submitted or runs, by id (or a unique prefix of 6 hex digits or more)."""
        try:
            return self._db().find(task_id)
        except LookupError as exc:
            raise errors.LocalError(str(exc)) from None

    def list(self, role: Role | None = None, limit: int = 100) -> list[TaskRecord]:
        """Tasks, newest first (submitted ones, run ones, or both)."""
        return self._db().listing(role, limit)

    async def updates(self, task_id: str) -> AsyncIterator[TaskRecord]:
        """The task as it is, then each time it changes, until it ends."""
        record = self.get(task_id)
        raw = bytes.fromhex(record.id)
        shown: tuple[Any, ...] | None = None
        while True:
            changed = self._change(record.role, raw)
            try:
                current = self._db().get(record.role, raw)
                if current is None:
                    return
                visible = (current.state, current.progress, current.note, current.error)
                if visible != shown:  # not for changes of bookkeeping alone (that it was sent)
                    shown = visible
                    yield current
                if current.state.final:
                    return
                await changed
            finally:
                self._changed.get(raw, set()).discard(changed)  # a watcher that stops leaves nothing behind

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """The task once it has ended (TimeoutError if it has not within ``timeout``)."""
        async with asyncio.timeout(timeout):
            async for record in self.updates(task_id):
                if record.state.final:
                    return record
        raise errors.LocalError(f"task {task_id} is gone")

    async def result(self, task_id: str, timeout: float | None = None) -> Any:
        """The task's result once it is done; TaskError if it failed or was cancelled."""
        record = await self.wait(task_id, timeout)
        if record.state is TaskState.DONE:
            return record.output
        raise TaskError(f"task {record.id} ({record.name} on {record.peer}) {record.state.value}: {record.error}")

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a task: one this node runs at once; one it submitted at its worker (or
        here alone if it was never sent)."""
        record = self.get(task_id)
        raw = bytes.fromhex(record.id)
        if record.state.final:
            return record
        if record.role is Role.WORKING:
            return self._cancel_working(raw, "cancelled here") or record
        if not record.sent:
            watcher = self._watchers.get(raw)
            if watcher is not None:
                watcher.cancel()
            # The submission may have reached the worker just before: tell it too, if it can be told.
            spawn(self._tell_cancel(record.peer, raw), f"cancelling task {record.id} at {record.peer}", self._tasks)
            return self._update(Role.SUBMITTED, raw, state=TaskState.CANCELLED, error="cancelled before it was sent") \
                or record  # fmt: skip
        async with asyncio.timeout(CONNECT_TIMEOUT * 2):
            await self._exchange(record.peer, Cancel(raw))
        return self.get(task_id)

    async def _tell_cancel(self, peer: Address, task_id: bytes) -> None:
        with contextlib.suppress(errors.PeerpathError, OSError, TimeoutError):
            async with asyncio.timeout(CONNECT_TIMEOUT * 2):
                await self._exchange(peer, Cancel(task_id), record=False)

    def describe(self) -> dict[str, Any]:
        """For status: handlers, counts, counters."""
        counts = self.store.counts() if self.store is not None else {}
        return {"serves": self.served, "running": len(self._running), **counts, **self.counters}


def _forget(tasks: dict[bytes, asyncio.Task[None]], key: bytes, done: asyncio.Task[None]) -> None:
    """Drop a finished task from its table, unless a newer one has taken its place."""
    if tasks.get(key) is done:
        del tasks[key]


def _visible(record: TaskRecord) -> tuple[Any, ...]:
    """What a watcher of a task sees of it (not when it was last written)."""
    return (record.state, record.progress, record.note, record.error, record.result, record.sent)


def _finished(record: TaskRecord) -> Finished:
    return Finished(bytes.fromhex(record.id), record.state.value, record.result, record.error[:1000])  # type: ignore[arg-type]


def _failure(exc: BaseException) -> str:
    """What a failed task reports: a TaskError's message as it is, any other error with its type."""
    if isinstance(exc, TaskError):
        return str(exc)[:1000]
    return f"{type(exc).__name__}: {exc}"[:1000]


# -- a command as a task handler (``peerpath task serve NAME -- COMMAND``) ----------------------

#: Bytes of a command's standard error kept to say why it failed.
STDERR_TAIL = 4096
#: Seconds a cancelled command gets between SIGTERM and SIGKILL.
KILL_AFTER = 2.0
_PROGRESS = re.compile(r"^progress[: ]\s*([0-9.]+)(%?)\s*(.*)$", re.IGNORECASE)


def command_handler(command: list[str]) -> TaskHandler:
    """A handler that runs ``command`` per task: the input as JSON on its standard input, its
    standard output as the result (JSON if it parses, text otherwise), a non-zero exit a
    failure (with the end of its standard error), and standard error lines such as
    ``progress 0.4 reading files`` (or ``progress 40%``) as progress reports."""
    if not command:
        raise errors.LocalError("no command to run")

    async def run(data: Any, context: TaskContext) -> Any:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PEERPATH_TASK_ID": context.id, "PEERPATH_TASK_SUBMITTER": str(context.submitter)},
            start_new_session=True,  # its own process group: stopping it stops what it started
        )
        try:
            return await _converse(process, command[0], data, context)
        finally:
            await _stop(process)

    return run


async def _converse(process: asyncio.subprocess.Process, name: str, data: Any, context: TaskContext) -> Any:
    """Give a command its input, take its output (at most :data:`MAX_RESULT` bytes) and its
    progress lines, and make its outcome the task's."""
    stdin, output, errors_out = process.stdin, process.stdout, process.stderr
    if stdin is None or output is None or errors_out is None:
        raise TaskError("the command's pipes could not be opened")
    tail = bytearray()

    async def feed() -> None:
        with contextlib.suppress(ConnectionError):
            stdin.write(msgspec.json.encode(data))
            await stdin.drain()
        stdin.close()

    async def collect() -> bytes:
        out = bytearray()
        while chunk := await output.read(65536):
            out.extend(chunk)
            if len(out) > MAX_RESULT:
                raise TaskError(f"{name} wrote more than {MAX_RESULT} bytes")
        return bytes(out)

    async def watch_stderr() -> None:
        pending = b""
        while chunk := await errors_out.read(65536):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()[-STDERR_TAIL:]  # a line without its end yet (a long one is cut)
            for line in lines:
                match = _PROGRESS.match(line[:1000].decode(errors="replace").strip())
                if match:
                    with contextlib.suppress(ValueError):
                        context.progress(float(match.group(1)) / (100 if match.group(2) else 1), match.group(3))
                        continue
                tail.extend(line[-STDERR_TAIL:] + b"\n")
                del tail[:-STDERR_TAIL]
        tail.extend(pending)

    _, stdout, _ = await asyncio.gather(feed(), collect(), watch_stderr())
    status = await process.wait()
    if status != 0:
        last = tail.decode(errors="replace").strip().splitlines()
        raise TaskError(f"{name} exited with status {status}" + (f": {last[-1][:500]}" if last else ""))
    try:
        return msgspec.json.decode(stdout)
    except msgspec.DecodeError:
        return stdout.decode(errors="replace").rstrip("\n")


async def _stop(process: asyncio.subprocess.Process) -> None:
    """End a command and everything it started (its process group): SIGTERM, then SIGKILL."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), KILL_AFTER)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # what it left behind in its group
    await process.wait()


# -- the control API (``peerpath task ...``) ------------------------------------------------------

_Text = Annotated[str, msgspec.Meta(max_length=256)]
_Timeout = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT)]
#: Seconds between the lines a long-running op sends while nothing happens (so that it notices a client gone).
KEEPALIVE = 5.0


class SubmitOp(control.Op, tag="task-submit", frozen=True):
    """Submit a task; with ``wait``, answer its updates until it ends."""

    peer: _Text
    name: _Name
    input: Any = None
    timeout: _Timeout | None = None
    wait: bool = False


class StatusOp(control.Op, tag="task-status", frozen=True):
    """A task as it is now; with ``wait``, each change until it ends."""

    id: _Text
    wait: bool = False


class CancelOp(control.Op, tag="task-cancel", frozen=True):
    """Cancel a task."""

    id: _Text


class ListOp(control.Op, tag="task-list", frozen=True):
    """Tasks, newest first."""

    role: Literal["submitted", "working"] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 50


class ServeOp(control.Op, tag="task-serve", frozen=True):
    """Run ``command`` for every task named ``name`` while this request lasts."""

    name: _Name
    command: Annotated[list[Annotated[str, msgspec.Meta(max_length=4096)]], msgspec.Meta(min_length=1, max_length=256)]
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = DEFAULT_CONCURRENCY


class TasksControl:
    """The tasks service's ops on the daemon's control socket."""

    def __init__(self, tasks: Tasks) -> None:
        self.tasks = tasks

    def control_ops(self) -> dict[type[control.Op], control.OpHandler]:
        """The ops, each with its handler."""
        return {SubmitOp: self._submit, StatusOp: self._status, CancelOp: self._cancel, ListOp: self._list,
                ServeOp: self._serve}  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """What status shows."""
        return self.tasks.describe()

    async def _submit(self, op: SubmitOp) -> AsyncGenerator[dict[str, Any], None]:
        task_id = await self.tasks.submit(op.peer, op.name, op.input, timeout=op.timeout)
        if not op.wait:
            yield self.tasks.get(task_id).describe()
            return
        async for record in self.tasks.updates(task_id):
            yield record.describe()

    async def _status(self, op: StatusOp) -> AsyncGenerator[dict[str, Any], None]:
        if not op.wait:
            yield self.tasks.get(op.id).describe()
            return
        async for record in self.tasks.updates(op.id):
            yield record.describe()

    async def _cancel(self, op: CancelOp) -> AsyncGenerator[dict[str, Any], None]:
        yield (await self.tasks.cancel(op.id)).describe()

    async def _list(self, op: ListOp) -> AsyncGenerator[dict[str, Any], None]:
        for record in self.tasks.list(Role(op.role) if op.role else None, op.limit):
            yield record.describe()

    async def _serve(self, op: ServeOp) -> AsyncGenerator[dict[str, Any], None]:
        check_name(op.name)
        if op.name in self.tasks.served:
            raise errors.LocalError(f"this node runs tasks named {op.name!r} already")
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)

        def listen(kind: str, details: dict[str, Any]) -> None:
            if details.get("name") == op.name and details.get("role") == Role.WORKING and not events.full():
                events.put_nowait({"event": kind, **details})

        self.tasks.register(op.name, command_handler(list(op.command)), concurrency=op.concurrency)
        self.tasks.on_event(listen)
        try:
            yield {"serving": op.name, "command": list(op.command), "concurrency": op.concurrency}
            while True:
                try:
                    yield await asyncio.wait_for(events.get(), KEEPALIVE)
                except TimeoutError:
                    yield {"keepalive": True}
        finally:
            self.tasks.unregister(op.name)
            self.tasks.remove_listener(listen)
