"""Sealed boxes: bytes only the holder of an address's key can open.

A message to an agent that is offline waits in the rendezvous server's mailbox; sealed,
the server (or anyone who reads its database) learns its size and who wrote to whom, and
nothing of what it says. The recipient's Ed25519 key is converted to its X25519 form (the
birational map of RFC 7748 section 4.1, as libsodium's ``crypto_sign_ed25519_pk_to_curve25519``
does), an ephemeral X25519 key agrees a secret with it, HKDF-SHA256 derives a one-time key,
and ChaCha20-Poly1305 encrypts. The sender is authenticated by the signature of the letter
around the box, and the box is bound to both keys through its associated data.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from peerpath.identity import Identity

#: The field prime of Curve25519 / edwards25519.
_P = 2**255 - 19
_INFO = b"peerpath-sealed-v1"
_NONCE = bytes(12)  # every box has a key of its own
#: Bytes a box adds to what it seals: the ephemeral key and the AEAD tag.
OVERHEAD = 32 + 16


class SealError(ValueError):
    """A box that cannot be opened: not for this key, altered, or not a box at all."""


def x25519_public(ed25519_public: bytes) -> bytes:
    """The X25519 form of an Ed25519 public key: u = (1 + y) / (1 - y) mod p."""
    if len(ed25519_public) != 32:
        raise SealError("an Ed25519 public key is 32 bytes")
    y = int.from_bytes(ed25519_public, "little") & ((1 << 255) - 1)
    if y >= _P or y == 1:
        raise SealError("not a usable Ed25519 public key")
    u = (1 + y) * pow(1 - y, _P - 2, _P) % _P
    return u.to_bytes(32, "little")


def _x25519_private(identity: Identity) -> X25519PrivateKey:
    """The X25519 form of an identity's Ed25519 key: the first half of SHA-512 of its seed
    (X25519 clamps it as Ed25519 does)."""
    return X25519PrivateKey.from_private_bytes(hashlib.sha512(identity.private_seed()).digest()[:32])


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> ChaCha20Poly1305:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO)
    return ChaCha20Poly1305(hkdf.derive(shared))


def seal(recipient_key: bytes, plaintext: bytes, context: bytes = b"") -> bytes:
    """A box of ``plaintext`` that only the holder of the Ed25519 key ``recipient_key`` can
    open; ``context`` (the sender's key, say) must be given again to open it."""
    recipient = x25519_public(recipient_key)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    except ValueError as exc:  # a low-order point: no secret to agree
        raise SealError(f"cannot seal to this key: {exc}") from None
    return ephemeral_public + _key(shared, ephemeral_public, recipient).encrypt(_NONCE, plaintext, context)


def open_sealed(identity: Identity, box: bytes, context: bytes = b"") -> bytes:
    """What ``box`` holds, if it was sealed to ``identity`` with ``context``; SealError otherwise."""
    if len(box) < OVERHEAD:
        raise SealError(f"a box is at least {OVERHEAD} bytes")
    private = _x25519_private(identity)
    recipient = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ephemeral = box[:32]
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        return _key(shared, ephemeral, recipient).decrypt(_NONCE, box[32:], context)
    except (ValueError, InvalidTag):
        raise SealError("the box does not open with this key (altered, or sealed to another)") from None
