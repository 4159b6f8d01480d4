"""Agent identity: an Ed25519 key pair, and the overlay address derived from its public key.

The address is self-certifying: it is the first 16 bytes of SHA-256 over the raw public
key, so whoever completes a handshake for an address holds the key it was derived from.
Its text form is bech32m (BIP 350) with the prefix ``pp``: case-insensitive, and a
checksum that catches any typo of up to four characters, so a mistyped address is
rejected as a typo instead of being looked up as an unknown peer.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from peerpath.errors import LocalError

ADDRESS_PREFIX = "pp"
ADDRESS_BYTES = 16
KEY_FILE = "identity.key"
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32M_CONST = 0x2BC830A3


class AddressError(LocalError, ValueError):
    """Text that is not a valid peerpath address (the message says why, typo or not)."""


class KeyFileError(LocalError):
    """The identity key file is unsafe or unreadable."""


def _polymod(values: list[int]) -> int:
    # BIP 173: the BCH code's generator, evaluated over 5-bit groups.
    generator = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for value in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ value
        for i, g in enumerate(generator):
            if (top >> i) & 1:
                chk ^= g
    return chk


def _expand_prefix(prefix: str) -> list[int]:
    return [ord(c) >> 5 for c in prefix] + [0] + [ord(c) & 31 for c in prefix]


def _to_5bit(data: bytes) -> list[int]:
    acc = bits = 0
    out = []
    for byte in data:
        acc = (acc << 8) | byte
        bits += 8
        while bits >= 5:
            bits -= 5
            out.append((acc >> bits) & 31)
    if bits:
        out.append((acc << (5 - bits)) & 31)
    return out


def _from_5bit(groups: list[int]) -> bytes:
    acc = bits = 0
    out = bytearray()
    for group in groups:
        acc = (acc << 5) | group
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    if bits >= 5 or (acc & ((1 << bits) - 1)):
        raise AddressError("address has trailing bits that are not zero")
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Address:
    """A peer's overlay address: 16 bytes derived from its Ed25519 public key."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != ADDRESS_BYTES:
            raise AddressError(f"an address is {ADDRESS_BYTES} bytes, got {len(self.digest)}")

    @classmethod
    def from_public_key(cls, public_key: bytes) -> Address:
        """The address of a raw 32-byte Ed25519 public key."""
        if len(public_key) != 32:
            raise AddressError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
        return cls(hashlib.sha256(public_key).digest()[:ADDRESS_BYTES])

    def matches(self, public_key: bytes) -> bool:
        """True if ``public_key`` is the key this address was derived from."""
        return len(public_key) == 32 and Address.from_public_key(public_key) == self

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse the text form; raise :class:`AddressError` saying what is wrong."""
        return cls(_parse_digest(text))

    def __str__(self) -> str:
        return _text_form(self.digest)

    def __repr__(self) -> str:
        return f"Address({str(self)!r})"


@functools.lru_cache(maxsize=4096)
def _parse_digest(text: str) -> bytes:
    """The digest an address's text stands for (cached, like :func:`_text_form`; errors are not)."""
    cleaned = text.strip()
    if cleaned.lower() != cleaned and cleaned.upper() != cleaned:
        raise AddressError(f"{text!r} mixes upper and lower case")
    cleaned = cleaned.lower()
    head = ADDRESS_PREFIX + "1"
    if not cleaned.startswith(head):
        raise AddressError(f"{text!r} is not a peerpath address (they start with {head!r})")
    body = cleaned[len(head) :]
    bad = sorted({c for c in body if c not in _CHARSET})
    if bad:
        raise AddressError(f"{text!r} has characters that no address contains: {''.join(bad)!r}")
    expected_length = len(_to_5bit(bytes(ADDRESS_BYTES))) + 6
    if len(body) != expected_length:
        raise AddressError(f"{text!r} has {len(body)} characters after {head!r}, an address has {expected_length}")
    groups = [_CHARSET.index(c) for c in body]
    if _polymod(_expand_prefix(ADDRESS_PREFIX) + groups) != _BECH32M_CONST:
        raise AddressError(f"{text!r} fails its checksum: a typo? check the address and paste it again")
    return _from_5bit(groups[:-6])


@functools.lru_cache(maxsize=4096)
def _text_form(digest: bytes) -> str:
    """The bech32m text of an address (cached: services turn the same few addresses into text
    for every row they store or read)."""
    groups = _to_5bit(digest)
    poly = _polymod([*_expand_prefix(ADDRESS_PREFIX), *groups, 0, 0, 0, 0, 0, 0]) ^ _BECH32M_CONST
    checksum = [(poly >> 5 * (5 - i)) & 31 for i in range(6)]
    return ADDRESS_PREFIX + "1" + "".join(_CHARSET[g] for g in groups + checksum)


@dataclass(frozen=True, slots=True)
class Identity:
    """An agent's Ed25519 key pair and the address it certifies."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def address(self) -> Address:
        """This identity's overlay address."""
        return Address.from_public_key(self.public_key)

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature over ``data``."""
        return self.private_key.sign(data)

    def private_seed(self) -> bytes:
        """The raw 32-byte private seed (what sealed boxes to this identity are opened with)."""
        return self.private_key.private_bytes_raw()

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Identity:
        """Load ``state_dir/identity.key``, creating it (mode 0600) on first start.

        Refuses a key file that group or others can read or write.
        """
        path = state_dir / KEY_FILE
        if not path.exists():
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            identity = cls.generate()
            pem = identity.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            # Written whole to a temporary file, then linked into place: a process that
            # races us sees either no key file or a complete one, never half of one.
            fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".identity-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                os.link(tmp, path)
            except FileExistsError:
                return cls.load(path)  # another process created it first
            finally:
                os.unlink(tmp)
            return identity
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Load a key file written by :meth:`load_or_create`."""
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise KeyFileError(f"key file {path} is readable by others; run chmod 600 on it")
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"key file {path} is not a PEM Ed25519 private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)


# Ed25519's field (RFC 8032 5.1) and the y coordinates of its eight points of small order
# (order 1, 2, 4 and 8); tests/unit/test_identity.py derives them from the curve.
_P = 2**255 - 19
_SMALL_ORDER_Y = frozenset(
    {
        0,
        1,
        _P - 1,
        0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
        0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,
    }
)


def is_usable_key(public_key: bytes) -> bool:
    """Whether ``public_key`` can be an identity: 32 bytes, a canonical encoding (y < p), and
    not a point of small order. A small-order key (the all-zero one, say) has no private key,
    yet with the right signature it "verifies" some messages; OpenSSL accepts it, so we check
    ourselves (as libsodium does, by the encoding: these points are few and known)."""
    if len(public_key) != 32:
        return False
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)
    return y < _P and y not in _SMALL_ORDER_Y


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature by ``public_key`` over ``data``
    (and ``public_key`` is a usable key, see :func:`is_usable_key`)."""
    if not is_usable_key(public_key):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
