"""Identities and overlay addresses: key files, self-certification, typo-proof text form."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from peerpath.identity import Address, AddressError, Identity, KeyFileError, is_usable_key, verify

KEY = Identity(
    serialization.load_pem_private_key(
        b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
        b"-----END PRIVATE KEY-----\n",
        password=None,
    )  # type: ignore[arg-type]
)


def test_address_is_derived_from_the_public_key() -> None:
    address = KEY.address
    assert address.matches(KEY.public_key)
    assert not address.matches(Identity.generate().public_key)
    assert Identity.generate().address != address


def test_text_form_round_trips_case_insensitively() -> None:
    text = str(KEY.address)
    assert text.startswith("pp1") and len(text) == 35
    assert Address.parse(text) == KEY.address
    assert Address.parse(text.upper()) == KEY.address
    assert Address.parse(f"  {text}\n") == KEY.address


def test_every_single_character_typo_is_caught_as_a_typo() -> None:
    text = str(KEY.address)
    alphabet = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
    for i in range(3, len(text)):
        for c in alphabet:
            if c == text[i]:
                continue
            with pytest.raises(AddressError, match="checksum: a typo"):
                Address.parse(text[:i] + c + text[i + 1 :])


def test_swapped_neighbours_are_caught() -> None:
    text = str(KEY.address)
    for i in range(3, len(text) - 1):
        if text[i] != text[i + 1]:
            with pytest.raises(AddressError):
                Address.parse(text[:i] + text[i + 1] + text[i] + text[i + 2 :])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not a peerpath address"),
        ("xx1qqqq", "not a peerpath address"),
        ("pp1qqq", "characters after"),
        ("pp1" + "b" * 32, "characters that no address contains"),
        ("Pp1" + "q" * 32, "mixes upper and lower case"),
    ],
)
def test_malformed_addresses_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(AddressError, match=reason):
        Address.parse(text)


@given(st.binary(min_size=16, max_size=16))
def test_any_digest_round_trips(digest: bytes) -> None:
    assert Address.parse(str(Address(digest))) == Address(digest)


def test_signatures_verify_only_for_the_right_key_and_data() -> None:
    signature = KEY.sign(b"nonce")
    assert verify(KEY.public_key, signature, b"nonce")
    assert not verify(KEY.public_key, signature, b"other")
    assert not verify(Identity.generate().public_key, signature, b"nonce")
    assert not verify(b"short", signature, b"nonce")


def test_key_file_is_created_0600_and_reloaded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = Identity.load_or_create(state)
    path = state / "identity.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(state).address == first.address


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    Identity.load_or_create(tmp_path)
    path = tmp_path / "identity.key"
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=r"readable by others; run chmod 600 on it"):
        Identity.load_or_create(tmp_path)


def test_key_file_with_another_kind_of_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        Identity.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(KeyFileError, match="not a PEM Ed25519 private key"):
        Identity.load(path)


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    import concurrent.futures

    with concurrent.futures.ProcessPoolExecutor(4) as pool:
        addresses = set(pool.map(_address_of, [tmp_path] * 16))
    assert len(addresses) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["identity.key"]


def _address_of(directory: Path) -> str:
    return str(Identity.load_or_create(directory).address)


SMALL_ORDER_KEYS = [
    bytes(32),  # y = 0: order 4
    bytes([1]) + bytes(31),  # the identity
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),  # order 8
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),  # order 8
    bytes([0xEC]) + b"\xff" * 30 + b"\x7f",  # y = p - 1: order 2
]


@pytest.mark.parametrize("key", [*SMALL_ORDER_KEYS, bytes(31) + b"\x80", bytes([0xEE]) + b"\xff" * 30 + b"\x7f"])
def test_small_order_and_non_canonical_keys_are_not_identities(key: bytes) -> None:
    """A small-order key has no private key, yet an all-zero signature verifies about one
    message in four under the all-zero key (OpenSSL accepts it): such keys verify nothing."""
    assert not is_usable_key(key)
    assert not any(verify(key, bytes(64), os.urandom(32)) for _ in range(64))


# Ed25519 (RFC 8032 5.1): -x^2 + y^2 = 1 + d x^2 y^2 over GF(p), in affine coordinates.
P = 2**255 - 19
D = -121665 * pow(121666, P - 2, P) % P


def point(encoded: bytes) -> tuple[int, int] | None:
    """Decode a point (RFC 8032 5.1.3); None if the encoding names none."""
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    sign = encoded[31] >> 7
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * pow(2, (P - 1) // 4, P) % P
    if (x * x - x2) % P or (x == 0 and sign):
        return None
    return (P - x if x & 1 != sign else x), y


def double(p: tuple[int, int]) -> tuple[int, int]:
    x, y = p
    t = D * x * x * y * y
    return 2 * x * y * pow(1 + t, P - 2, P) % P, (y * y + x * x) * pow(1 - t, P - 2, P) % P


@pytest.mark.parametrize("key", SMALL_ORDER_KEYS)
def test_the_refused_keys_are_the_points_of_order_dividing_8(key: bytes) -> None:
    decoded = point(key)
    assert decoded is not None  # on the curve: refused for its order, not its encoding
    for _ in range(3):
        decoded = double(decoded)
    assert decoded == (0, 1)
    assert not is_usable_key(key[:31] + bytes([key[31] ^ 0x80]))  # the other sign of x alike


def test_the_refused_y_values_cover_all_eight_small_order_points() -> None:
    # Identity (y = 1), order 2 (y = -1), order 4 (y = 0, two points), order 8: four points,
    # (x, y), (-x, y), (x, -y), (-x, -y), whose two y values sum to p.
    y8 = [int.from_bytes(key, "little") for key in SMALL_ORDER_KEYS[2:4]]
    assert sum(y8) == P


def test_real_keys_have_large_order() -> None:
    key = Identity.generate().public_key
    decoded = point(key)
    assert decoded is not None
    for _ in range(3):
        decoded = double(decoded)
    assert decoded != (0, 1)


def test_real_keys_are_usable() -> None:
    for _ in range(50):
        identity = Identity.generate()
        assert is_usable_key(identity.public_key)
        assert verify(identity.public_key, identity.sign(b"data"), b"data")


def test_a_responder_certificate_is_reused_for_a_day_then_made_again() -> None:
    import datetime

    from peerpath.certs import certificate_address, session_certificate

    identity, other = Identity.generate(), Identity.generate()
    now = datetime.datetime(2026, 12, 3, tzinfo=datetime.UTC)
    first = session_certificate(identity, now)
    assert certificate_address(first) == identity.address
    assert session_certificate(identity, now + datetime.timedelta(hours=23)) is first
    assert certificate_address(session_certificate(other, now)) == other.address  # its own
    later = session_certificate(identity, now + datetime.timedelta(days=1, seconds=1))
    assert later is not first and certificate_address(later) == identity.address
