"""Certificates bound to identities: the identity key itself is the certificate key.

A responder presents a self-signed X.509 certificate whose subject key is its Ed25519
identity key; TLS 1.3's CertificateVerify proves it holds that key for this handshake,
and the initiator accepts the certificate only if the key derives the address it dialled.
No CA is involved: the address is the trust anchor.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from peerpath.identity import Address, Identity, is_usable_key

#: Certificates are valid for a long time: validity is not what authenticates them.
_VALIDITY = datetime.timedelta(days=3650)
#: A responder's certificate is signed once a day and reused by every session (signing one is
#: a few percent of accepting a session); the last few identities' are kept.
_REUSE = datetime.timedelta(days=1)
_KEPT = 16
_made: dict[bytes, tuple[datetime.datetime, x509.Certificate]] = {}


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


def session_certificate(identity: Identity, now: datetime.datetime | None = None) -> x509.Certificate:
    """``identity``'s certificate for the sessions it accepts: :func:`self_signed_certificate`,
    made again once a day."""
    now = now or datetime.datetime.now(datetime.UTC)
    made = _made.get(identity.public_key)
    if made is not None and datetime.timedelta(0) <= now - made[0] < _REUSE:
        return made[1]
    certificate = self_signed_certificate(identity, now)
    _made.pop(identity.public_key, None)
    _made[identity.public_key] = (now, certificate)
    while len(_made) > _KEPT:
        del _made[next(iter(_made))]
    return certificate


def certificate_public_key(certificate: x509.Certificate) -> bytes | None:
    """The raw Ed25519 public key of ``certificate``, or None if it holds another kind of key."""
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def certificate_address(certificate: x509.Certificate) -> Address | None:
    """The overlay address that ``certificate``'s key certifies, or None."""
    key = certificate_public_key(certificate)
    return Address.from_public_key(key) if key is not None and is_usable_key(key) else None


def tls_server_context(identity: Identity, directory: Path) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting ``identity``'s self-signed certificate.

    OpenSSL loads certificates from files: the certificate and key are written to private
    (0600) temporary files in ``directory``, loaded, and removed, so processes sharing the
    directory never read each other's half-written files.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    certificate = self_signed_certificate(identity)
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths = []
    try:
        for data in (certificate.public_bytes(serialization.Encoding.PEM), key_pem):
            fd, name = tempfile.mkstemp(dir=directory, prefix=".tls-", suffix=".pem")
            paths.append(name)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(paths[0], paths[1])
    finally:
        for name in paths:
            os.unlink(name)
    return context


def tls_client_context() -> ssl.SSLContext:
    """A TLS 1.3 client context that accepts any certificate: the caller checks the
    certificate's key against the address it expects (:func:`tls_peer_address`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tls_peer_address(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Address | None:
    """The overlay address certified by the peer's TLS certificate, or None."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return certificate_address(x509.load_der_x509_certificate(der))
