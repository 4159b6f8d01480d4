"""The server's mailbox: ids from the network, one sender's share of a box, undecodable bodies,
and who can read the database."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerpath.identity import Identity
from peerpath.rendezvous.letters import LetterError, make_letter
from peerpath.rendezvous.mailbox import (
    MAX_LETTER_ID,
    MAX_PER_PAIR,
    MAX_PER_RECIPIENT,
    MAX_PER_SENDER,
    Mailbox,
)

NOW = time.time()


@pytest.fixture
def mailbox(tmp_path: Path) -> Iterator[Mailbox]:
    box = Mailbox(tmp_path / "rendezvous.db")
    try:
        yield box
    finally:
        box.close()


def post_from(box: Mailbox, sender: Identity, recipient: Identity, count: int = 1) -> list[int]:
    ids = []
    for _ in range(count):
        letter = make_letter(sender, "trust-request", recipient.address, "hi", now=NOW)
        ids.append(box.post(letter, sender.address.digest, recipient.address.digest, NOW))
    return ids


@pytest.mark.parametrize("letter_id", [2**64 - 1, 2**63, MAX_LETTER_ID + 1, -(2**63) - 1, -1, 0, True])
def test_ids_out_of_sqlite_range_name_no_letter(mailbox: Mailbox, letter_id: int) -> None:
    bob = Identity.generate()
    (stored,) = post_from(mailbox, Identity.generate(), bob)
    assert mailbox.delete(letter_id, bob.address.digest) is False
    assert mailbox.drop(letter_id) is False
    assert [i for i, _ in mailbox.waiting_for(bob.address.digest)] == [stored]


def test_one_sender_cannot_fill_a_recipients_box(mailbox: Mailbox) -> None:
    mallory, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    post_from(mailbox, mallory, bob, MAX_PER_PAIR)
    with pytest.raises(LetterError, match="waiting for this recipient"):
        post_from(mailbox, mallory, bob)
    assert len(mailbox.waiting_for(bob.address.digest)) == MAX_PER_PAIR
    post_from(mailbox, carol, bob)  # others still get through
    post_from(mailbox, mallory, carol)  # and mallory may still write to someone else


def test_one_sender_has_a_total_too(mailbox: Mailbox) -> None:
    mallory = Identity.generate()
    for _ in range(MAX_PER_SENDER // MAX_PER_PAIR):
        post_from(mailbox, mallory, Identity.generate(), MAX_PER_PAIR)
    with pytest.raises(LetterError, match=f"{MAX_PER_SENDER} letters waiting"):
        post_from(mailbox, mallory, Identity.generate())


def test_a_recipient_has_a_total(mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    from peerpath.rendezvous import mailbox as module

    monkeypatch.setattr(module, "MAX_PER_RECIPIENT", 6)
    bob = Identity.generate()
    for _ in range(3):
        post_from(mailbox, Identity.generate(), bob, 2)
    with pytest.raises(LetterError, match="mailbox is full"):
        post_from(mailbox, Identity.generate(), bob)
    assert MAX_PER_RECIPIENT // MAX_PER_PAIR >= 100  # filling a box takes that many identities


def test_a_refused_letter_leaves_no_trace(mailbox: Mailbox) -> None:
    """The count and the insert are one transaction: a refused letter is not 'seen' and can come later."""
    mallory, bob = Identity.generate(), Identity.generate()
    ids = post_from(mailbox, mallory, bob, MAX_PER_PAIR)
    late = make_letter(mallory, "trust-request", bob.address, "later", now=NOW)
    with pytest.raises(LetterError, match="waiting for this recipient"):
        mailbox.post(late, mallory.address.digest, bob.address.digest, NOW)
    assert mailbox.delete(ids[0], bob.address.digest)
    mailbox.post(late, mallory.address.digest, bob.address.digest, NOW)


def test_waiting_for_returns_at_most_limit_oldest_first(mailbox: Mailbox) -> None:
    bob = Identity.generate()
    ids = [i for _ in range(3) for i in post_from(mailbox, Identity.generate(), bob, 2)]
    assert [i for i, _ in mailbox.waiting_for(bob.address.digest, limit=4)] == ids[:4]
    assert [i for i, _ in mailbox.waiting_for(bob.address.digest)] == ids
    assert mailbox.waiting_for(bob.address.digest, limit=0) == []
    assert len(mailbox.waiting_for(bob.address.digest, limit=2**70)) == 6


def test_an_undecodable_stored_letter_is_dropped_and_logged(mailbox: Mailbox, caplog) -> None:
    bob = Identity.generate()
    first, second = post_from(mailbox, Identity.generate(), bob, 2)
    mailbox._db.execute("UPDATE letters SET body = ? WHERE id = ?", (b"\xc1garbage", first))
    with caplog.at_level(logging.WARNING):
        assert [i for i, _ in mailbox.waiting_for(bob.address.digest)] == [second]
    assert "does not decode" in caplog.text
    assert [i for i, _ in mailbox.waiting_for(bob.address.digest)] == [second]  # gone for good


def test_drop_forgets_a_letter_whoever_it_is_for(mailbox: Mailbox) -> None:
    bob = Identity.generate()
    (letter_id,) = post_from(mailbox, Identity.generate(), bob)
    assert mailbox.drop(letter_id) is True
    assert mailbox.drop(letter_id) is False
    assert mailbox.waiting_for(bob.address.digest) == []


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir() if p.name.startswith("rendezvous")}


def test_the_database_and_its_wal_files_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        box = Mailbox(tmp_path / "rendezvous.db")
        post_from(box, Identity.generate(), Identity.generate())
        modes = _modes(tmp_path)
        box.close()
    finally:
        os.umask(old_umask)
    assert {"rendezvous.db", "rendezvous.db-wal", "rendezvous.db-shm"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes


def test_an_existing_readable_database_is_made_private(tmp_path: Path) -> None:
    box = Mailbox(tmp_path / "rendezvous.db")
    post_from(box, Identity.generate(), Identity.generate())
    for name in ("rendezvous.db", "rendezvous.db-wal", "rendezvous.db-shm"):
        os.chmod(tmp_path / name, 0o644)  # as an older version left them
    reopened = Mailbox(tmp_path / "rendezvous.db")
    try:
        assert set(_modes(tmp_path).values()) == {0o600}
    finally:
        reopened.close()
        box.close()


def test_a_sender_that_posts_and_has_its_letters_taken_still_has_a_weekly_total(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivered letters leave their nonces behind (replays are refused for a week): a sender
    posting to its own second identity and acknowledging each letter is bounded all the same."""
    monkeypatch.setattr("peerpath.rendezvous.mailbox.MAX_POSTED_PER_SENDER", 10)
    mallory, accomplice = Identity.generate(), Identity.generate()
    for _ in range(10):
        (letter_id,) = post_from(mailbox, mallory, accomplice)
        assert mailbox.delete(letter_id, accomplice.address.digest)
    with pytest.raises(LetterError, match="posted 10 letters in a week"):
        post_from(mailbox, mallory, accomplice)


def test_the_server_keeps_a_bounded_number_of_letters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peerpath.rendezvous.mailbox.MAX_SEEN", 5)
    box = Mailbox(tmp_path / "rendezvous.db")
    try:
        for _ in range(5):
            post_from(box, Identity.generate(), Identity.generate())
        with pytest.raises(LetterError, match="too many letters"):
            post_from(box, Identity.generate(), Identity.generate())
        box.prune(NOW + 8 * 24 * 3600)  # a week later, the old nonces are gone
        assert box._seen == 0
    finally:
        box.close()
    reopened = Mailbox(tmp_path / "rendezvous.db")
    assert reopened._seen == 0
    reopened.close()
