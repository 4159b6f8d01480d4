"""Sealed boxes and sealed letters: only the recipient opens them; the server can check and
keep them but not read them; their quotas leave room for trust requests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from peerpath.identity import Identity
from peerpath.rendezvous import mailbox as mb
from peerpath.rendezvous.letters import LetterError, check_letter, make_letter
from peerpath.seal import OVERHEAD, SealError, open_sealed, seal, x25519_public
from peerpath.wire import rendezvous as rv


def test_the_x25519_form_of_a_key_is_that_of_its_private_half() -> None:
    """The public conversion (RFC 7748 4.1's map) agrees with the private one (SHA-512 of the seed)."""
    for _ in range(20):
        identity = Identity.generate()
        private = X25519PrivateKey.from_private_bytes(hashlib.sha512(identity.private_seed()).digest()[:32])
        assert x25519_public(identity.public_key) == private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_a_box_opens_only_for_its_recipient_and_context() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    box = seal(bob.public_key, b"the plan", b"ctx")
    assert len(box) == len(b"the plan") + OVERHEAD and b"the plan" not in box
    assert open_sealed(bob, box, b"ctx") == b"the plan"
    for who, context, altered in [(alice, b"ctx", box), (bob, b"other", box), (bob, b"ctx", box[:-1] + b"\x00")]:
        with pytest.raises(SealError):
            open_sealed(who, altered, context)
    with pytest.raises(SealError, match="at least"):
        open_sealed(bob, b"short")
    with pytest.raises(SealError):
        seal(bytes(31), b"x")


def test_a_sealed_letter_is_signed_over_its_box() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    letter = make_letter(alice, "sealed", bob.address, sealed=seal(bob.public_key, b"hi"))
    assert check_letter(letter) == (alice.address, bob.address)
    tampered = msgspec.structs.replace(letter, sealed=letter.sealed[:-1] + b"\x01")
    with pytest.raises(LetterError, match="signature"):
        check_letter(tampered)
    for bad in [
        msgspec.structs.replace(letter, sealed=b""),
        make_letter(alice, "trust-request", bob.address, sealed=b"box"),
        make_letter(alice, "sealed", bob.address, note="hello", sealed=b"box"),
    ]:
        with pytest.raises(LetterError):
            check_letter(bad)


def test_sealed_letters_have_quotas_of_their_own(tmp_path: Path) -> None:
    """A sender fills its sealed quota for a recipient, and can still send it a trust request;
    a trust request's quota does not limit sealed letters either."""
    box = mb.Mailbox(tmp_path / "mailbox.db")
    alice, bob = Identity.generate(), Identity.generate()
    sender, recipient = alice.address.digest, bob.address.digest
    for _ in range(mb.MAX_SEALED_PER_PAIR):
        box.post(make_letter(alice, "sealed", bob.address, sealed=b"b" * 64), sender, recipient, 0)
    with pytest.raises(LetterError, match="waiting for this recipient"):
        box.post(make_letter(alice, "sealed", bob.address, sealed=b"b" * 64), sender, recipient, 0)
    box.post(make_letter(alice, "trust-request", bob.address), sender, recipient, 0)
    assert len(box.waiting_for(recipient)) == mb.MAX_SEALED_PER_PAIR + 1


def test_an_old_mailbox_gains_the_sealed_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE letters (id INTEGER PRIMARY KEY AUTOINCREMENT, recipient BLOB NOT NULL, sender BLOB NOT NULL,"
        " created INTEGER NOT NULL, body BLOB NOT NULL);"
    )
    db.close()
    box = mb.Mailbox(path)
    alice, bob = Identity.generate(), Identity.generate()
    box.post(make_letter(alice, "sealed", bob.address, sealed=b"box"), alice.address.digest, bob.address.digest, 0)
    [(_, letter)] = box.waiting_for(bob.address.digest)
    assert letter.sealed == b"box"


def test_the_largest_sealed_letter_fits_a_delivery() -> None:
    letter = make_letter(Identity.generate(), "sealed", Identity.generate().address, sealed=bytes(rv.MAX_SEALED))
    rv.encode_control(rv.Deliver((1 << 63) - 1, letter))
