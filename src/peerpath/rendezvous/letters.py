"""Signed letters between agents (trust requests and approvals, sealed messages): making and checking them.

Both the server (before it stores a letter) and the recipient (before it acts on one)
check letters; the recipient never takes the server's word for anything.
"""

from __future__ import annotations

import os
import time

import msgspec

from peerpath.identity import Address, Identity, verify
from peerpath.wire import rendezvous as rv

#: A letter older than this is refused (and the server forgets the nonces it has seen).
MAX_AGE = 7 * 24 * 3600
#: Clocks may disagree this much.
CLOCK_SKEW = 300


class LetterError(ValueError):
    """A letter that must not be stored or acted on; the message says why."""


def make_letter(
    identity: Identity,
    kind: str,
    recipient: Address,
    note: str = "",
    reply_to: bytes = b"",
    now: float | None = None,
    sealed: bytes = b"",
) -> rv.Letter:
    """A signed letter from ``identity`` to ``recipient``."""
    unsigned = rv.Letter(
        kind=kind,
        sender_key=identity.public_key,
        recipient=str(recipient),
        created=int(now if now is not None else time.time()),
        nonce=os.urandom(16),
        note=note,
        reply_to=reply_to,
        sealed=sealed,
    )
    return msgspec.structs.replace(unsigned, signature=identity.sign(rv.letter_payload(unsigned)))


def check_letter(letter: rv.Letter, now: float | None = None) -> tuple[Address, Address]:
    """Check a letter's form, age and signature; return (sender, recipient) addresses."""
    now = now if now is not None else time.time()
    if letter.kind not in rv.LETTER_KINDS:
        raise LetterError(f"unknown letter kind {letter.kind!r}")
    if len(letter.note) > rv.MAX_NOTE:
        raise LetterError(f"note longer than {rv.MAX_NOTE} characters")
    if len(letter.nonce) != 16:
        raise LetterError("a letter's nonce is 16 bytes")
    if letter.kind == "trust-approval" and len(letter.reply_to) != 16:
        raise LetterError("an approval names the request it answers")
    if (letter.kind == "sealed") != bool(letter.sealed):
        raise LetterError("a sealed letter, and only a sealed letter, carries a box")
    if letter.kind == "sealed" and (letter.note or letter.reply_to):
        raise LetterError("a sealed letter says everything inside its box")
    if letter.created > now + CLOCK_SKEW:
        raise LetterError("letter dated in the future")
    if letter.created < now - MAX_AGE:
        raise LetterError("letter too old")
    try:
        sender = Address.from_public_key(letter.sender_key)
        recipient = Address.parse(letter.recipient)
    except ValueError as exc:
        raise LetterError(f"malformed letter: {exc}") from exc
    if not verify(letter.sender_key, letter.signature, rv.letter_payload(letter)):
        raise LetterError("letter signature does not verify")
    return sender, recipient
