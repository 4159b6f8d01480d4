"""The tasks service's durable state (``tasks.db``, mode 0600): the tasks this node submitted
to others, and the tasks others submitted to it, each with its state, progress and outcome.

A task's id is chosen by its submitter (16 random bytes), so a submission that is sent twice
(after a broken session) is one task. A worker that restarts finds the tasks it was running
and records them as failed ("interrupted"): a task is never lost, and never run twice
without anybody being told.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from peerpath.identity import Address
from peerpath.services.frames import shown
from peerpath.storage import StorageError, one_by_prefix, open_database, write

#: Days a finished task is kept (its result can be fetched that long).
KEEP_DAYS = 7
#: Tasks a worker keeps queued or running, from one submitter and from everybody.
MAX_OPEN_PER_SUBMITTER = 1000
MAX_OPEN = 10_000
#: Bytes of input the open tasks of a worker hold, all together (they wait on disk, not in memory).
MAX_OPEN_BYTES = 1024 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    role TEXT NOT NULL,
    id BLOB NOT NULL,
    peer TEXT NOT NULL,
    name TEXT NOT NULL,
    input BLOB NOT NULL,
    timeout REAL,
    deadline REAL,
    state TEXT NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    progress REAL,
    note TEXT NOT NULL DEFAULT '',
    result BLOB,
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (role, id)
);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks (role, state);
CREATE VIEW IF NOT EXISTS task_rows AS
    SELECT seq, role, id, peer, name, input, timeout, deadline, state, sent, progress, note, result, error,
           created, updated FROM tasks;
"""


class Role(enum.StrEnum):
    """Whose record of a task: the node that submitted it, or the one that runs it."""

    SUBMITTED = "submitted"
    WORKING = "working"


class TaskState(enum.StrEnum):
    """Where a task is."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """Whether the task is over."""
        return self in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)


@dataclass(frozen=True)
class TaskRecord:
    """One task, as one side knows it."""

    seq: int
    role: Role
    id: str
    peer: Address
    name: str
    input: bytes
    timeout: float | None
    deadline: float | None
    state: TaskState
    sent: bool
    progress: float | None
    note: str
    result: bytes | None
    error: str
    created: float
    updated: float

    @property
    def output(self) -> Any:
        """The task's result (what the handler returned), once it is done."""
        return None if self.result is None else msgspec.msgpack.decode(self.result)

    def describe(self) -> dict[str, Any]:
        """The task as JSON-ready values."""
        return {
            "id": self.id,
            "role": self.role.value,
            "peer": str(self.peer),
            "name": self.name,
            "state": self.state.value,
            "progress": self.progress,
            "note": self.note or None,
            "result": shown(self.result) if self.result is not None else None,
            "failure": self.error or None,
            "created": self.created,
            "updated": self.updated,
            "deadline": self.deadline,
            "input": shown(self.input),
        }


def _record(row: tuple[Any, ...]) -> TaskRecord:
    seq, role, id_, peer, name, input_, timeout, deadline, state, sent, progress, note, result, error = row[:14]
    created, updated = row[14:]
    return TaskRecord(
        seq, Role(role), bytes(id_).hex(), Address.parse(peer), name, bytes(input_), timeout, deadline,
        TaskState(state), bool(sent), progress, note, None if result is None else bytes(result), error, created,
        updated,
    )  # fmt: skip


class TaskStore:
    """Every task this node submitted or runs."""

    def __init__(self, path: Path | str) -> None:
        self._db = open_database(path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        return write(self._db, sql, args, "the task")

    def add(
        self, role: Role, task_id: bytes, peer: Address, name: str, input_: bytes, timeout: float | None
    ) -> tuple[TaskRecord, bool]:
        """Record a new task (queued); if it is known already, return it as it is. True if new.
        A worker refuses (StorageError) when too many tasks are open."""
        existing = self.get(role, task_id)
        if existing is not None:
            return existing, False
        now = time.time()
        if role is Role.WORKING:
            (from_peer,) = self._db.execute(
                "SELECT COUNT(*) FROM tasks WHERE role = ? AND peer = ? AND state IN ('queued', 'running')",
                (role, str(peer)),
            ).fetchone()
            (everyone, held) = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(input)), 0) FROM tasks"
                " WHERE role = ? AND state IN ('queued', 'running')",
                (role,),
            ).fetchone()
            if from_peer >= MAX_OPEN_PER_SUBMITTER or everyone >= MAX_OPEN or held + len(input_) > MAX_OPEN_BYTES:
                raise StorageError("the worker has too many open tasks; try later")
        deadline = now + timeout if timeout else None
        self._write(
            "INSERT INTO tasks (role, id, peer, name, input, timeout, deadline, state, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (role, task_id, str(peer), name, input_, timeout, deadline, TaskState.QUEUED, now, now),
        )
        record = self.get(role, task_id)
        if record is None:
            raise StorageError("the task was not stored")
        return record, True

    def get(self, role: Role, task_id: bytes) -> TaskRecord | None:
        """One task."""
        row = self._db.execute("SELECT * FROM task_rows WHERE role = ? AND id = ?", (role, task_id)).fetchone()
        return _record(row) if row else None

    def find(self, prefix: str, role: Role | None = None) -> TaskRecord:
        """The task whose id starts with ``prefix`` (6 hex digits at least); LookupError otherwise."""
        sql = "SELECT * FROM task_rows WHERE hex(id) LIKE ? AND (? IS NULL OR role = ?) ORDER BY seq LIMIT 2"
        return _record(one_by_prefix(self._db, sql, prefix, (role, role), "task"))

    def update(self, role: Role, task_id: bytes, **fields: Any) -> TaskRecord | None:
        """Change a task's fields (state, progress, note, result, error, sent); a final task
        stays as it is. Returns the task as it is now."""
        allowed = {"state", "progress", "note", "result", "error", "sent"}
        if not fields.keys() <= allowed:
            raise ValueError(f"cannot update {sorted(fields.keys() - allowed)}")
        current = self.get(role, task_id)
        if current is None or current.state.final:
            return current
        merged = {
            "state": current.state,
            "progress": current.progress,
            "note": current.note,
            "result": current.result,
            "error": current.error,
            "sent": int(current.sent),
        } | fields
        self._write(
            "UPDATE tasks SET state = ?, progress = ?, note = ?, result = ?, error = ?, sent = ?, updated = ?"
            " WHERE role = ? AND id = ?",
            (
                merged["state"], merged["progress"], merged["note"], merged["result"], merged["error"],
                int(merged["sent"]), time.time(), role, task_id,
            ),
        )  # fmt: skip
        return self.get(role, task_id)

    def open_tasks(self, role: Role) -> list[TaskRecord]:
        """Tasks of ``role`` that are not over, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM task_rows WHERE role = ? AND state IN ('queued', 'running') ORDER BY seq", (role,)
        ).fetchall()
        return [_record(row) for row in rows]

    def overdue(self, role: Role, now: float) -> list[tuple[bytes, float]]:
        """Queued tasks past their deadline: (id, timeout) each, no more (their inputs stay on disk)."""
        rows = self._db.execute(
            "SELECT id, timeout FROM tasks WHERE role = ? AND state = 'queued' AND deadline < ?", (role, now)
        ).fetchall()
        return [(bytes(row[0]), float(row[1])) for row in rows]

    def listing(self, role: Role | None = None, limit: int = 100) -> list[TaskRecord]:
        """Tasks, newest first."""
        rows = self._db.execute(
            "SELECT * FROM task_rows WHERE (? IS NULL OR role = ?) ORDER BY seq DESC LIMIT ?", (role, role, limit)
        ).fetchall()
        return [_record(row) for row in rows]

    def interrupted(self) -> list[TaskRecord]:
        """At a worker's start: tasks it was running when it stopped are failed, and said to be."""
        running = [t for t in self.open_tasks(Role.WORKING) if t.state is TaskState.RUNNING]
        for task in running:
            self.update(Role.WORKING, bytes.fromhex(task.id), state=TaskState.FAILED,
                        error="interrupted: the worker stopped while the task ran")  # fmt: skip
        return running

    def prune(self, now: float | None = None) -> None:
        """Forget finished tasks older than :data:`KEEP_DAYS`."""
        cutoff = (now if now is not None else time.time()) - KEEP_DAYS * 86400
        self._write("DELETE FROM tasks WHERE state NOT IN ('queued', 'running') AND updated < ?", (cutoff,))

    def counts(self) -> dict[str, int]:
        """Tasks by role and state."""
        rows = self._db.execute("SELECT role, state, COUNT(*) FROM tasks GROUP BY role, state").fetchall()
        return {f"{role}_{state}": int(count) for role, state, count in rows}
