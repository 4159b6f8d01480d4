"""Programs as services: each stream a peer opens to an exec exposure starts the exposure's
command with its standard input and output joined to the stream (``peerpath expose --exec
NAME -- COMMAND``), so a stdio program (an MCP server, a REPL, ``sort``) is reachable with
``peerpath connect PEER:NAME``.

A process lives as long as its stream. The opener's EOF closes the process's standard input
only, so a program may still answer after it. When the process exits, what it wrote last is
passed on and the stream ends. When the stream is reset, its session ends, both directions
have ended, or the node closes, the process (its whole process group: it runs in a session of
its own) is sent SIGTERM, and SIGKILL after a grace period. Standard error goes to the node's
log, bounded. At most :data:`MAX_PROCESSES` run per exposure; a stream beyond that is reset at
once, and the reason logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from peerpath import errors
from peerpath.session.splice import Writer, abort
from peerpath.session.streams import ResetReason, StreamWriter
from peerpath.tunnels.registry import Exposure

log = logging.getLogger(__name__)

#: Processes one exposure runs at once; a stream beyond them is reset.
MAX_PROCESSES = 16
#: Seconds a process gets between SIGTERM and SIGKILL.
KILL_AFTER = 3.0
#: Seconds a process that exited gets for its last output (and standard error) to be passed on.
DRAIN_AFTER_EXIT = 5.0
#: Seconds a process whose input and output have both ended gets to exit before it is stopped.
EXIT_GRACE = 2.0
#: Bytes of a process's standard error logged (the rest is read and counted), and of one line.
STDERR_LOGGED = 64 * 1024
STDERR_LINE = 1024
#: Bytes read at a time.
CHUNK = 64 * 1024

StreamHandler = Callable[[asyncio.StreamReader, StreamWriter], Awaitable[None]]


class _StreamGone(Exception):
    """The stream was reset, or its session ended."""


class Programs:
    """The processes of a node's exec exposures: one per stream, each owned here until it
    ends, all terminated at :meth:`close`. ``counters`` (shared with the caller) counts the
    processes started, refused (over the limit) and failed (could not be started)."""

    def __init__(
        self, counters: dict[str, int] | None = None, *, limit: int = MAX_PROCESSES, kill_after: float = KILL_AFTER
    ) -> None:
        self.limit = limit
        self.kill_after = kill_after
        self.counters = counters if counters is not None else {}
        for key in ("processes_started", "processes_refused", "processes_failed"):
            self.counters.setdefault(key, 0)
        self._running: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def running(self, name: str) -> int:
        """How many processes the exposure ``name`` runs now."""
        return self._running.get(name, 0)

    def handler(self, exposure: Exposure) -> StreamHandler:
        """What serves the streams of ``exposure`` (which has a command)."""
        if exposure.command is None:
            raise errors.LocalError(f"service {exposure.name!r} runs no command")
        name, command, cwd = exposure.name, exposure.command, exposure.cwd

        async def serve(reader: asyncio.StreamReader, writer: StreamWriter) -> None:
            peer = str(writer.get_extra_info("peer_address"))
            what = f"service {name} (stream from {peer})"
            if self.running(name) >= self.limit:
                self.counters["processes_refused"] += 1
                log.warning("%s: refused, %d processes run already (the limit)", what, self.limit)
                writer.abort(ResetReason.UNREACHABLE)
                return
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            self._running[name] = self.running(name) + 1
            try:
                env = {**os.environ, "PEERPATH_PEER": peer, "PEERPATH_SERVICE": name}
                try:
                    await join_process(
                        command,
                        reader,
                        writer,
                        cwd=cwd,
                        env=env,
                        what=what,
                        kill_after=self.kill_after,
                        on_started=self._started,
                    )
                except OSError as exc:
                    self.counters["processes_failed"] += 1
                    log.warning("%s: cannot run %s: %s", what, command[0], exc.strerror or exc)
                    writer.abort(ResetReason.UNREACHABLE)
            finally:
                self._running[name] -= 1
                if task is not None:
                    self._tasks.discard(task)

        return serve

    def _started(self) -> None:
        self.counters["processes_started"] += 1

    async def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after the grace period) and end its stream."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def join_process(
    command: Sequence[str],
    reader: asyncio.StreamReader,
    writer: Writer,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    what: str = "process",
    kill_after: float = KILL_AFTER,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Run ``command`` with its standard input and output joined to a stream (``reader``,
    ``writer``) until either ends (see the module's docstring); its exit status (negative: the
    signal that ended it). OSError if it cannot be started."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        start_new_session=True,  # a process group of its own: stopping it stops its children
    )
    stdin, stdout, stderr = process.stdin, process.stdout, process.stderr
    if stdin is None or stdout is None or stderr is None:  # not with PIPE; for the type checker
        await _stop(process, kill_after)
        raise OSError(f"the pipes of {command[0]} could not be opened")
    if on_started is not None:
        on_started()
    log.info("%s: started %s (pid %d)", what, command[0], process.pid)
    up = asyncio.ensure_future(_upstream(reader, stdin))
    down = asyncio.ensure_future(_downstream(stdout, writer))
    logged = asyncio.ensure_future(_log_stderr(stderr, what))
    exited = asyncio.ensure_future(process.wait())
    pumps = [up, down, logged, exited]
    gone = False  # the stream must be reset, not ended with an EOF
    why = ""
    try:
        pending: set[asyncio.Future[Any]] = {up, down, exited}
        while not exited.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(task.exception() is not None for task in done if task is not exited):
                gone, why = True, "the stream was reset or its session ended"
                break
            if up.done() and down.done():  # nothing more can pass: a moment to exit, then it is stopped
                await asyncio.wait([exited], timeout=EXIT_GRACE)
                why = "the stream has ended both ways"
                break
        if exited.done() and not gone:
            await asyncio.wait([down, logged], timeout=DRAIN_AFTER_EXIT)  # its last words
            if not down.done() or down.exception() is not None:  # its output cut short: no EOF for the opener
                gone, why = True, "its last output could not be passed on"
    except asyncio.CancelledError:
        gone, why = True, "the node closes"
        raise
    finally:
        stopped = await _stop(process, kill_after)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await _release(stdin, stdout, stderr)
        with contextlib.suppress(Exception):
            if gone:
                abort(writer)
            else:
                writer.close()
        status = process.returncode
        log.info("%s: %s (pid %d) %s", what, command[0], process.pid, _how_it_ended(status, why if stopped else ""))
    return status if status is not None else -signal.SIGKILL


async def _upstream(reader: asyncio.StreamReader, stdin: asyncio.StreamWriter) -> None:
    """The stream's bytes to the process's standard input, and its EOF as the input's end;
    :class:`_StreamGone` if the stream fails. A process that closes its input just stops it."""
    try:
        while True:
            try:
                data = await reader.read(CHUNK)
            except (errors.PeerpathError, ConnectionError, OSError) as exc:
                raise _StreamGone(str(exc)) from exc
            if not data:
                break
            stdin.write(data)
            await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        return  # the process no longer reads: what the stream still sends waits in its window
    finally:
        with contextlib.suppress(Exception):
            stdin.close()


async def _downstream(stdout: asyncio.StreamReader, writer: Writer) -> None:
    """The process's standard output to the stream, and its end as the stream's EOF;
    :class:`_StreamGone` if the stream fails."""
    while data := await stdout.read(CHUNK):
        try:
            writer.write(data)
            await writer.drain()
        except (errors.PeerpathError, ConnectionError, OSError, RuntimeError) as exc:
            raise _StreamGone(str(exc)) from exc
    if writer.can_write_eof():
        with contextlib.suppress(errors.PeerpathError, ConnectionError, OSError, RuntimeError):
            writer.write_eof()


async def _log_stderr(stderr: asyncio.StreamReader, what: str) -> None:
    """Log the process's standard error line by line: the first :data:`STDERR_LOGGED` bytes,
    each line cut at :data:`STDERR_LINE`; what is beyond is read (so the process never blocks
    on it) and counted."""
    logged = dropped = 0
    pending = b""

    def emit(line: bytes) -> None:
        nonlocal logged, dropped
        if logged >= STDERR_LOGGED:
            dropped += len(line) + 1
            return
        logged += len(line) + 1
        log.info("%s: %s", what, _printable(line[:STDERR_LINE].decode(errors="replace").rstrip()))

    try:
        while chunk := await stderr.read(CHUNK):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > STDERR_LINE:  # a line that never ends: cut it
                lines.append(pending)
                pending = b""
            for line in lines:
                emit(line)
        if pending:
            emit(pending)
    finally:
        if dropped:
            log.info("%s: %d more bytes of standard error not logged", what, dropped)


def _printable(text: str) -> str:
    """``text`` with control characters shown as escapes (a log line stays one line)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


async def _stop(process: asyncio.subprocess.Process, kill_after: float) -> bool:
    """End ``process`` and its process group: SIGTERM, then SIGKILL after ``kill_after`` seconds
    (at once if this is cancelled meanwhile); False if it had ended already."""
    if process.returncode is not None:
        return False
    _signal_group(process, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), kill_after)
    except TimeoutError:
        _signal_group(process, signal.SIGKILL)
        await process.wait()
    except asyncio.CancelledError:
        _signal_group(process, signal.SIGKILL)
        raise
    return True


def _signal_group(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    # The group id is the process's id (start_new_session); it is still alive, so not reused.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


async def _release(stdin: asyncio.StreamWriter, stdout: asyncio.StreamReader, stderr: asyncio.StreamReader) -> None:
    """Read the pipes of an ended process to their end, so that their descriptors are closed."""
    with contextlib.suppress(Exception):
        stdin.close()

    async def drain(pipe: asyncio.StreamReader) -> None:
        while await pipe.read(CHUNK):
            pass

    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(drain(stdout), drain(stderr)), 1.0)


def _how_it_ended(status: int | None, reason: str) -> str:
    why = f" ({reason})" if reason else ""
    if status is None:
        return "did not end" + why
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"ended by {signal.Signals(-status).name}{why}"
        return f"ended by signal {-status}{why}"
    return f"exited with status {status}{why}"
