"""The server's mailbox: letters kept in SQLite until their recipient comes online."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from peerpath.rendezvous.letters import MAX_AGE, LetterError
from peerpath.wire import rendezvous as rv

#: Letters one sender may have waiting, and one recipient may be sent.
MAX_PER_SENDER = 100
MAX_PER_RECIPIENT = 1000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient BLOB NOT NULL,
    sender BLOB NOT NULL,
    created INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS letters_recipient ON letters (recipient);
CREATE TABLE IF NOT EXISTS seen (
    sender BLOB NOT NULL,
    nonce BLOB NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (sender, nonce)
);
"""
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(rv.Letter)


class Mailbox:
    """Letters by recipient, with replay protection by (sender, nonce)."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def post(self, letter: rv.Letter, sender: bytes, recipient: bytes, now: float) -> int:
        """Store a letter already checked by the caller; raise :class:`LetterError` for a replay or
        a full mailbox. Returns the letter's id."""
        (waiting,) = self._db.execute("SELECT COUNT(*) FROM letters WHERE sender = ?", (sender,)).fetchone()
        if waiting >= MAX_PER_SENDER:
            raise LetterError(f"you have {waiting} letters waiting already")
        (queued,) = self._db.execute("SELECT COUNT(*) FROM letters WHERE recipient = ?", (recipient,)).fetchone()
        if queued >= MAX_PER_RECIPIENT:
            raise LetterError("the recipient's mailbox is full")
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute(
                    "INSERT INTO seen (sender, nonce, created) VALUES (?, ?, ?)", (sender, letter.nonce, letter.created)
                )
                cursor = self._db.execute(
                    "INSERT INTO letters (recipient, sender, created, body) VALUES (?, ?, ?, ?)",
                    (recipient, sender, int(now), _encoder.encode(letter)),
                )
        except sqlite3.IntegrityError:
            raise LetterError("this letter was sent before (replayed)") from None
        self.prune(now)
        return int(cursor.lastrowid or 0)

    def waiting_for(self, recipient: bytes) -> list[tuple[int, rv.Letter]]:
        """Every letter waiting for ``recipient``, oldest first."""
        rows = self._db.execute("SELECT id, body FROM letters WHERE recipient = ? ORDER BY id", (recipient,))
        return [(int(i), _decoder.decode(body)) for i, body in rows]

    def delete(self, letter_id: int, recipient: bytes) -> bool:
        """Forget a delivered letter (only its recipient may do that)."""
        cursor = self._db.execute("DELETE FROM letters WHERE id = ? AND recipient = ?", (letter_id, recipient))
        return cursor.rowcount > 0

    def prune(self, now: float) -> None:
        """Drop letters and nonces past their maximum age."""
        cutoff = int(now) - MAX_AGE
        self._db.execute("DELETE FROM letters WHERE created < ?", (cutoff,))
        self._db.execute("DELETE FROM seen WHERE created < ?", (cutoff,))
