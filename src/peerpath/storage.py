"""SQLite databases in a state directory: private to their owner, in WAL mode, and with the
errors of a full disk told apart from bugs."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from peerpath.errors import LocalError

#: A database and its -wal and -shm files say who talks to whom: their owner alone reads them.
DB_MODE = 0o600


class StorageError(LocalError):
    """A database could not be written: the disk is full, or the file is unusable."""


def open_database(path: Path | str) -> sqlite3.Connection:
    """Open (or create) the database at ``path`` in autocommit mode with WAL (synchronous
    NORMAL: commits survive the process, not a power cut); ``:memory:``
    for one that lives in memory. The file is created 0600 before SQLite opens it (SQLite
    gives its -wal and -shm files the database's mode), and an existing one is made 0600."""
    text = str(path)
    if text not in ("", ":memory:") and not text.startswith("file:"):  # a file, not a URI
        file = Path(text)
        fd = os.open(file, os.O_RDWR | os.O_CREAT, DB_MODE)
        os.close(fd)
        for name in (file, file.with_name(file.name + "-wal"), file.with_name(file.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(name, DB_MODE)
    db = sqlite3.connect(text, isolation_level=None, timeout=10)
    db.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL syncs at checkpoints, not at every commit: a commit survives the
    # process (a crash, a kill, a restart) but the last ones may not survive the machine
    # losing power. It makes a message's commit ~10x cheaper (bench/services_bench.py).
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def is_disk_full(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLite saying the disk (or the database's size limit) is full."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc) or "disk I/O error" in str(exc)


def write(db: sqlite3.Connection, sql: str, args: tuple[object, ...], what: str) -> sqlite3.Cursor:
    """Run one writing statement; a full disk becomes a StorageError that says ``what`` could
    not be stored (other SQLite errors are bugs, and stay as they are)."""
    try:
        return db.execute(sql, args)
    except sqlite3.OperationalError as exc:
        if is_disk_full(exc):
            raise StorageError(f"cannot store {what}: {exc}") from None
        raise


#: Fewest hex digits of an id that users may type for it.
MIN_ID_PREFIX = 6


def one_by_prefix(
    db: sqlite3.Connection, sql: str, prefix: str, args: tuple[object, ...], what: str
) -> tuple[object, ...]:
    """The one row whose id starts with the hex ``prefix`` a user typed: ``sql`` selects rows
    ``WHERE hex(id) LIKE ?`` (then ``args``) with ``LIMIT 2``. LookupError, saying why, if the
    prefix is too short or not hex, or names no row or several."""
    prefix = prefix.strip().lower()
    if len(prefix) < MIN_ID_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
        raise LookupError(f"a {what} id is hex, at least {MIN_ID_PREFIX} digits of it: {prefix!r}")
    rows = db.execute(sql, (prefix.upper() + "%", *args)).fetchall()
    if not rows:
        raise LookupError(f"no {what} {prefix}")
    if len(rows) > 1:
        raise LookupError(f"{prefix} names more than one {what}; give more of its id")
    return tuple(rows[0])
