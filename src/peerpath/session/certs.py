"""Certificates bound to identities: the identity key itself is the certificate key.

A responder presents a self-signed X.509 certificate whose subject key is its Ed25519
identity key; TLS 1.3's CertificateVerify proves it holds that key for this handshake,
and the initiator accepts the certificate only if the key derives the address it dialled.
No CA is involved: the address is the trust anchor.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from peerpath.identity import Address, Identity

#: Certificates are valid for a long time: validity is not what authenticates them.
_VALIDITY = datetime.timedelta(days=3650)


def self_signed_certificate(identity: Identity, now: datetime.datetime | None = None) -> x509.Certificate:
    """A self-signed certificate for ``identity``, named by its address."""
    now = now or datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity.address))])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .sign(identity.private_key, None)
    )


def certificate_public_key(certificate: x509.Certificate) -> bytes | None:
    """The raw Ed25519 public key of ``certificate``, or None if it holds another kind of key."""
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def certificate_address(certificate: x509.Certificate) -> Address | None:
    """The overlay address that ``certificate``'s key certifies, or None."""
    key = certificate_public_key(certificate)
    return Address.from_public_key(key) if key is not None else None
