"""The server's mailbox: letters kept in SQLite until their recipient comes online."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import msgspec

from peerpath.rendezvous.letters import MAX_AGE, LetterError
from peerpath.storage import open_database
from peerpath.wire import rendezvous as rv

log = logging.getLogger(__name__)

#: Letters one sender may have waiting, for all its recipients together.
MAX_PER_SENDER = 100
#: Letters one sender may have waiting for one recipient: a request, a second thought, an approval or two.
#: So one sender alone cannot fill anyone's mailbox (it takes MAX_PER_RECIPIENT / MAX_PER_PAIR senders).
MAX_PER_PAIR = 4
#: Letters one recipient may have waiting, from all its senders together.
MAX_PER_RECIPIENT = 1000
#: Sealed letters (messages for an agent that is offline) have quotas of their own, so that
#: they never crowd out a trust request: per sender and recipient, and per recipient.
MAX_SEALED_PER_PAIR = 64
MAX_SEALED_PER_RECIPIENT = 1000
#: Letters one sender may post in a letter's lifetime (its nonces are kept that long to
#: refuse replays, delivered or not), and nonces kept in all: the database's bound.
MAX_POSTED_PER_SENDER = 1000
MAX_SEEN = 1_000_000
#: Letters :meth:`Mailbox.waiting_for` returns unless asked for fewer: everything a mailbox can hold.
MAX_WAITING_BATCH = MAX_PER_RECIPIENT
#: Letter ids are SQLite integers: 64-bit signed, and AUTOINCREMENT starts at 1.
MAX_LETTER_ID = 2**63 - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient BLOB NOT NULL,
    sender BLOB NOT NULL,
    created INTEGER NOT NULL,
    body BLOB NOT NULL,
    sealed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS letters_recipient ON letters (recipient);
CREATE INDEX IF NOT EXISTS letters_sender ON letters (sender, recipient);
CREATE INDEX IF NOT EXISTS letters_created ON letters (created);
CREATE TABLE IF NOT EXISTS seen (
    sender BLOB NOT NULL,
    nonce BLOB NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (sender, nonce)
);
CREATE INDEX IF NOT EXISTS seen_created ON seen (created);
"""
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(rv.Letter)


def _valid_id(letter_id: object) -> bool:
    """Whether ``letter_id`` can name a stored letter (anything else names none, rather than overflow SQLite)."""
    return type(letter_id) is int and 1 <= letter_id <= MAX_LETTER_ID


class Mailbox:
    """Letters by recipient, with replay protection by (sender, nonce)."""

    def __init__(self, path: Path | str) -> None:
        self._db = open_database(path)
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(letters)")}
        if "sealed" not in columns:  # a mailbox from before sealed letters
            self._db.execute("ALTER TABLE letters ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0")
        (self._seen,) = self._db.execute("SELECT COUNT(*) FROM seen").fetchone()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def post(self, letter: rv.Letter, sender: bytes, recipient: bytes, now: float) -> int:
        """Store a letter already checked by the caller; raise :class:`LetterError` for a replay or
        a full mailbox. Returns the letter's id."""
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")  # the counts and the insert are one step
                sealed = int(bool(letter.sealed))
                self._check_room(sender, recipient, sealed)
                self._db.execute(
                    "INSERT INTO seen (sender, nonce, created) VALUES (?, ?, ?)", (sender, letter.nonce, letter.created)
                )
                cursor = self._db.execute(
                    "INSERT INTO letters (recipient, sender, created, body, sealed) VALUES (?, ?, ?, ?, ?)",
                    (recipient, sender, int(now), _encoder.encode(letter), sealed),
                )
            self._seen += 1
        except sqlite3.IntegrityError:
            raise LetterError("this letter was sent before (replayed)") from None
        self.prune(now)
        return int(cursor.lastrowid or 0)

    def _check_room(self, sender: bytes, recipient: bytes, sealed: int) -> None:
        if self._seen >= MAX_SEEN:
            raise LetterError("the server keeps too many letters; try again later")
        (posted,) = self._db.execute("SELECT COUNT(*) FROM seen WHERE sender = ?", (sender,)).fetchone()
        if posted >= MAX_POSTED_PER_SENDER:
            raise LetterError(f"you have posted {posted} letters in a week already")
        (waiting,) = self._db.execute("SELECT COUNT(*) FROM letters WHERE sender = ?", (sender,)).fetchone()
        if waiting >= MAX_PER_SENDER:
            raise LetterError(f"you have {waiting} letters waiting already")
        (to_them,) = self._db.execute(
            "SELECT COUNT(*) FROM letters WHERE sender = ? AND recipient = ? AND sealed = ?",
            (sender, recipient, sealed),
        ).fetchone()
        if to_them >= (MAX_SEALED_PER_PAIR if sealed else MAX_PER_PAIR):
            raise LetterError(f"you have {to_them} letters waiting for this recipient already")
        (queued,) = self._db.execute(
            "SELECT COUNT(*) FROM letters WHERE recipient = ? AND sealed = ?", (recipient, sealed)
        ).fetchone()
        if queued >= (MAX_SEALED_PER_RECIPIENT if sealed else MAX_PER_RECIPIENT):
            raise LetterError("the recipient's mailbox is full")

    def waiting_for(self, recipient: bytes, limit: int = MAX_WAITING_BATCH) -> list[tuple[int, rv.Letter]]:
        """The letters waiting for ``recipient``, oldest first, at most ``limit`` of them. A stored
        letter that no longer decodes is dropped (and logged), not returned."""
        if limit < 1:
            return []
        rows = self._db.execute(
            "SELECT id, body FROM letters WHERE recipient = ? ORDER BY id LIMIT ?",
            (recipient, min(limit, MAX_LETTER_ID)),
        ).fetchall()
        letters = []
        for letter_id, body in rows:
            try:
                letters.append((int(letter_id), _decoder.decode(body)))
            except (msgspec.DecodeError, TypeError) as exc:
                log.warning("dropped stored letter %s: it does not decode (%s)", letter_id, exc)
                self.drop(int(letter_id))
        return letters

    def delete(self, letter_id: int, recipient: bytes) -> bool:
        """Forget a delivered letter (only its recipient may do that); False if there is no such letter."""
        if not _valid_id(letter_id):
            return False
        cursor = self._db.execute("DELETE FROM letters WHERE id = ? AND recipient = ?", (letter_id, recipient))
        return cursor.rowcount > 0

    def drop(self, letter_id: int) -> bool:
        """Forget a letter that cannot be delivered, whoever it is for; False if there is no such letter.
        Its nonce stays seen, so it cannot be posted again."""
        if not _valid_id(letter_id):
            return False
        cursor = self._db.execute("DELETE FROM letters WHERE id = ?", (letter_id,))
        return cursor.rowcount > 0

    def prune(self, now: float) -> None:
        """Drop letters and nonces past their maximum age."""
        cutoff = int(now) - MAX_AGE
        self._db.execute("DELETE FROM letters WHERE created < ?", (cutoff,))
        self._seen -= self._db.execute("DELETE FROM seen WHERE created < ?", (cutoff,)).rowcount
