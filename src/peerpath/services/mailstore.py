"""The messages service's durable state: the inbox, the outbox and the keys of peers, in one
SQLite database in the state directory (``messages.db``, mode 0600).

Messages are identified by their sender and a random 16-byte id the sender chose, so a
message that arrives twice (resent after a lost acknowledgement, or both directly and
through the mailbox) lands in the inbox once. Every write is one transaction; a full disk
is a :class:`~peerpath.storage.StorageError` that loses nothing already stored.
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
from peerpath.storage import StorageError, is_disk_full, one_by_prefix, open_database, write

#: Messages from one sender the inbox keeps unacknowledged, and their bytes: a sender beyond
#: either is told to try later (its messages wait in its outbox).
MAX_UNACKED_PER_SENDER = 10_000
MAX_UNACKED_BYTES_PER_SENDER = 256 * 1024 * 1024
#: Messages the outbox holds undelivered, for all peers together.
MAX_OUTBOX = 100_000
#: Days an acknowledged message, or a delivered or failed one in the outbox, is kept.
KEEP_DAYS = 7

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sender TEXT NOT NULL,
    id BLOB NOT NULL,
    created REAL NOT NULL,
    received REAL NOT NULL,
    via TEXT NOT NULL,
    body BLOB NOT NULL,
    acked REAL,
    UNIQUE (sender, id)
);
CREATE INDEX IF NOT EXISTS inbox_unacked ON inbox (acked, seq);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    peer TEXT NOT NULL,
    id BLOB NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    posted INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    finished REAL,
    UNIQUE (kind, id)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, peer, seq);
CREATE VIEW IF NOT EXISTS inbox_rows AS
    SELECT seq, sender, id, created, received, via, body, acked FROM inbox;
CREATE VIEW IF NOT EXISTS outbox_rows AS
    SELECT seq, peer, id, kind, created, body, state, posted, attempts, error FROM outbox;
CREATE TABLE IF NOT EXISTS keys (
    address TEXT PRIMARY KEY,
    key BLOB NOT NULL
);
"""


class Kind(enum.StrEnum):
    """What an outbox item is."""

    #: A message for the peer's inbox.
    MESSAGE = "message"
    #: "Your message arrived": sent back for a message that came through the mailbox.
    RECEIPT = "receipt"


class State(enum.StrEnum):
    """Where an outbox item is."""

    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class Message:
    """A message in the inbox."""

    seq: int
    id: str
    sender: Address
    created: float
    received: float
    via: str
    body: bytes
    acked: float | None

    @property
    def data(self) -> Any:
        """The message's content (what the sender passed to ``send``)."""
        return msgspec.msgpack.decode(self.body)

    def describe(self) -> dict[str, Any]:
        """The message as JSON-ready values (bytes content as base64)."""
        return {
            "id": self.id,
            "from": str(self.sender),
            "created": self.created,
            "received": self.received,
            "via": self.via,
            "data": shown(self.body),
            "acked": self.acked,
        }


@dataclass(frozen=True)
class Outgoing:
    """An item in the outbox."""

    seq: int
    id: str
    peer: Address
    kind: Kind
    created: float
    body: bytes
    state: State
    posted: bool
    attempts: int
    error: str

    def describe(self) -> dict[str, Any]:
        """The item as JSON-ready values (without its content)."""
        return {
            "id": self.id,
            "to": str(self.peer),
            "kind": self.kind.value,
            "created": self.created,
            "state": self.state.value,
            "via_mailbox": self.posted,
            "attempts": self.attempts,
            "last_error": self.error or None,
            "bytes": len(self.body),
        }


class Refusal(Exception):
    """A message the inbox does not take now; ``retry`` says whether it may later."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.retry = retry


def _message(row: tuple[Any, ...]) -> Message:
    seq, sender, id_, created, received, via, body, acked = row
    return Message(seq, bytes(id_).hex(), Address.parse(sender), created, received, via, bytes(body), acked)


def _outgoing(row: tuple[Any, ...]) -> Outgoing:
    seq, peer, id_, kind, created, body, state, posted, attempts, error = row
    return Outgoing(
        seq, bytes(id_).hex(), Address.parse(peer), Kind(kind), created, bytes(body), State(state), bool(posted),
        attempts, error,
    )  # fmt: skip


class MailStore:
    """The inbox, outbox and peer keys of one node."""

    def __init__(self, path: Path | str) -> None:
        self._db = open_database(path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        return write(self._db, sql, args, "the message")

    # -- inbox ------------------------------------------------------------------------

    def receive(self, sender: Address, message_id: bytes, created: float, body: bytes, via: str) -> bool:
        """Put a message in the inbox; False if it is there already (a duplicate). Refusal if
        the sender has too much waiting, or the disk is full (both: try later)."""
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                if self._db.execute(
                    "SELECT 1 FROM inbox WHERE sender = ? AND id = ?", (str(sender), message_id)
                ).fetchone():
                    return False
                count, size = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM inbox WHERE sender = ? AND acked IS NULL",
                    (str(sender),),
                ).fetchone()
                if count >= MAX_UNACKED_PER_SENDER or size + len(body) > MAX_UNACKED_BYTES_PER_SENDER:
                    raise Refusal("the recipient's inbox holds too many of your messages; try later", retry=True)
                self._db.execute(
                    "INSERT INTO inbox (sender, id, created, received, via, body) VALUES (?, ?, ?, ?, ?, ?)",
                    (str(sender), message_id, created, time.time(), via, body),
                )
        except sqlite3.OperationalError as exc:
            if is_disk_full(exc):
                raise Refusal("the recipient's disk is full; try later", retry=True) from None
            raise
        return True

    def messages(self, *, after: int = 0, acked: bool = False, limit: int = 1000) -> list[Message]:
        """Inbox messages after sequence number ``after``, oldest first; acknowledged ones too if ``acked``."""
        rows = self._db.execute(
            "SELECT * FROM inbox_rows WHERE seq > ? AND (? OR acked IS NULL) ORDER BY seq LIMIT ?",
            (after, int(acked), limit),
        ).fetchall()
        return [_message(row) for row in rows]

    def find(self, prefix: str) -> Message:
        """The inbox message whose id starts with ``prefix`` (hex); LookupError if none or several."""
        sql = "SELECT * FROM inbox_rows WHERE hex(id) LIKE ? ORDER BY seq LIMIT 2"
        return _message(one_by_prefix(self._db, sql, prefix, (), "message"))

    def ack(self, seq: int) -> None:
        """Mark an inbox message handled (it leaves the default listing; kept a while)."""
        self._write("UPDATE inbox SET acked = ? WHERE seq = ? AND acked IS NULL", (time.time(), seq))

    # -- outbox -----------------------------------------------------------------------

    def queue(self, peer: Address, kind: Kind, item_id: bytes, created: float, body: bytes) -> bool:
        """Put an item in the outbox; False if it is there already (a receipt owed twice)."""
        (pending,) = self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = ?", (State.QUEUED,)).fetchone()
        if pending >= MAX_OUTBOX:
            raise StorageError(f"the outbox holds {pending} undelivered messages; wait for some to be delivered")
        try:
            self._write(
                "INSERT INTO outbox (peer, id, kind, created, body, state) VALUES (?, ?, ?, ?, ?, ?)",
                (str(peer), item_id, kind, created, body, State.QUEUED),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def pending(self, peer: Address | None = None, limit: int = 1000) -> list[Outgoing]:
        """Undelivered items (for ``peer``, or for everyone), oldest first."""
        who = None if peer is None else str(peer)
        rows = self._db.execute(
            "SELECT * FROM outbox_rows WHERE state = ? AND (? IS NULL OR peer = ?) ORDER BY seq LIMIT ?",
            (State.QUEUED, who, who, limit),
        ).fetchall()
        return [_outgoing(row) for row in rows]

    def outbox(self, limit: int = 1000) -> list[Outgoing]:
        """Messages in the outbox, newest first: undelivered, delivered and failed (receipts left out)."""
        rows = self._db.execute(
            "SELECT * FROM outbox_rows WHERE kind = ? ORDER BY seq DESC LIMIT ?", (Kind.MESSAGE, limit)
        ).fetchall()
        return [_outgoing(row) for row in rows]

    def outgoing(self, kind: Kind, item_id: bytes) -> Outgoing | None:
        """One outbox item."""
        row = self._db.execute("SELECT * FROM outbox_rows WHERE kind = ? AND id = ?", (kind, item_id)).fetchone()
        return _outgoing(row) if row else None

    def finish(self, kind: Kind, item_id: bytes, state: State, error: str = "", peer: Address | None = None) -> bool:
        """Mark an undelivered item delivered or failed (only if it is ``peer``'s, when given);
        False if there is no such undelivered item."""
        sql = "UPDATE outbox SET state = ?, error = ?, finished = ? WHERE kind = ? AND id = ? AND state = ?"
        args: tuple[Any, ...] = (state, error, time.time(), kind, item_id, State.QUEUED)
        if peer is not None:
            sql, args = sql + " AND peer = ?", (*args, str(peer))
        return self._write(sql, args).rowcount > 0

    def attempted(self, seqs: list[int], *, posted: bool = False, error: str = "") -> None:
        """Count a failed delivery attempt for outbox items (saying why), or that they went to the mailbox."""
        for seq in seqs:
            if posted:
                self._write("UPDATE outbox SET posted = 1 WHERE seq = ?", (seq,))
            else:
                self._write("UPDATE outbox SET attempts = attempts + 1, error = ? WHERE seq = ?", (error[:500], seq))

    # -- keys and upkeep ----------------------------------------------------------------

    def learn_key(self, address: Address, key: bytes) -> None:
        """Remember ``address``'s public key (the caller checked that it matches)."""
        self._write("INSERT OR REPLACE INTO keys (address, key) VALUES (?, ?)", (str(address), key))

    def key_of(self, address: Address) -> bytes | None:
        """``address``'s public key, if it was ever learnt."""
        row = self._db.execute("SELECT key FROM keys WHERE address = ?", (str(address),)).fetchone()
        return bytes(row[0]) if row else None

    def prune(self, now: float | None = None) -> None:
        """Forget acknowledged messages, and finished outbox items, older than :data:`KEEP_DAYS`."""
        cutoff = (now if now is not None else time.time()) - KEEP_DAYS * 86400
        self._write("DELETE FROM inbox WHERE acked IS NOT NULL AND acked < ?", (cutoff,))
        self._write("DELETE FROM outbox WHERE state != ? AND finished < ?", (State.QUEUED, cutoff))

    def counts(self) -> dict[str, int]:
        """How many messages are unread, undelivered, and so on."""
        (unacked,) = self._db.execute("SELECT COUNT(*) FROM inbox WHERE acked IS NULL").fetchone()
        by_state = dict(
            self._db.execute("SELECT state, COUNT(*) FROM outbox WHERE kind = ? GROUP BY state", (Kind.MESSAGE,))
        )
        return {
            "inbox_unacked": int(unacked),
            "outbox_queued": int(by_state.get(State.QUEUED, 0)),
            "outbox_delivered": int(by_state.get(State.DELIVERED, 0)),
            "outbox_failed": int(by_state.get(State.FAILED, 0)),
        }
