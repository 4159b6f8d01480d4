"""Which QUIC Initials may start a responder session (sans-I/O policy, no sockets, no clock).

A responder session costs state from the first Initial until the peer proves its identity
(a few KiB for at most the connect timeout, see peerpath.session.connection), so handshakes
in progress are limited in total and per source. Over the relay the source is the sender's
overlay address, which the server authenticated: a source this node trusts is always
admitted, so strangers filling the slots never lock a trusted peer out. Over direct UDP the
source is an IP address anyone can spoof: once handshakes pile up, an Initial must carry a
Retry token (RFC 9000 8.1.2) proving its sender receives at that address, so spoofed
Initials create no state at all.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from peerpath.quic import retry_packet

#: Responder handshakes in progress, at most: in all, and from one source.
MAX_PENDING = 256
MAX_PENDING_PER_SOURCE = 8
#: Beyond this many handshakes in progress, an Initial over direct UDP needs a Retry token.
RETRY_ABOVE = 16
#: A Retry token is good this long (clients return it at once, RFC 9000 8.1.4).
TOKEN_LIFETIME = 10.0
_NONCE = 12
_CID = 8


class Verdict(enum.Enum):
    """What to do with an Initial that would start a session."""

    ADMIT = "admit"
    RETRY = "retry"
    DROP = "drop"


@dataclass(frozen=True)
class Decision:
    """The verdict, with what admitting (the session's connection IDs) or a Retry (the packet) needs."""

    verdict: Verdict
    original_dcid: bytes = b""
    retry_scid: bytes | None = None
    retry_packet: bytes = b""
    reason: str = ""
    #: Where an admitted handshake is counted (give it back to :meth:`Admission.finished`).
    slot: str = ""


@dataclass(frozen=True)
class Source:
    """Who an Initial comes from: ``name`` (an IP, or a relay sender's address), whether that
    name is authenticated (relay) and whether this node trusts it."""

    name: str
    authenticated: bool = False
    trusted: bool = False


class Admission:
    """Counts responder handshakes in progress and decides on each new Initial."""

    def __init__(self, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self._random = random_bytes
        self._aead = AESGCM(AESGCM.generate_key(bit_length=128))
        self.pending: dict[str, int] = {}
        self.counters = {"admitted": 0, "retries": 0, "retried_admitted": 0, "dropped": 0}

    @property
    def in_progress(self) -> int:
        """Handshakes admitted and not yet finished."""
        return sum(self.pending.values())

    def decide(self, source: Source, version: int, dcid: bytes, scid: bytes, token: bytes, now: float) -> Decision:
        """The verdict on an Initial from ``source`` (its header's fields)."""
        if source.trusted:
            return self._admit(source.name, dcid)
        if self.in_progress >= MAX_PENDING:
            return self._drop("too many handshakes in progress")
        if token:
            original = self._validate(token, source.name, dcid, now)
            if original is None:
                return self._drop("invalid or expired Retry token")
            # The sender receives at this address: it has slots of its own, which no one
            # spoofing the address can take.
            slot = f"{source.name} proven"
            if self.pending.get(slot, 0) >= MAX_PENDING_PER_SOURCE:
                return self._drop(f"too many handshakes in progress from {source.name}")
            self.counters["retried_admitted"] += 1
            return self._admit(slot, original, retry_scid=dcid)
        crowded = self.pending.get(source.name, 0) >= MAX_PENDING_PER_SOURCE
        if source.authenticated:
            return (
                self._drop(f"too many handshakes in progress from {source.name}")
                if crowded
                else self._admit(source.name, dcid)
            )
        if crowded or self.in_progress >= RETRY_ABOVE:
            return self._retry(source.name, version, dcid, scid, now)
        return self._admit(source.name, dcid)

    def finished(self, slot: str) -> None:
        """A handshake admitted into ``slot`` (:attr:`Decision.slot`) ended, established or not."""
        left = self.pending.get(slot, 0) - 1
        if left > 0:
            self.pending[slot] = left
        else:
            self.pending.pop(slot, None)

    def _retry(self, name: str, version: int, dcid: bytes, scid: bytes, now: float) -> Decision:
        retry_scid = self._random(_CID)
        packet = retry_packet(
            version=version,
            source_cid=retry_scid,
            destination_cid=scid,
            original_destination_cid=dcid,
            token=self._token(name, dcid, retry_scid, now),
        )
        self.counters["retries"] += 1
        return Decision(Verdict.RETRY, retry_packet=packet)

    def _admit(self, slot: str, original_dcid: bytes, retry_scid: bytes | None = None) -> Decision:
        self.pending[slot] = self.pending.get(slot, 0) + 1
        self.counters["admitted"] += 1
        return Decision(Verdict.ADMIT, original_dcid=original_dcid, retry_scid=retry_scid, slot=slot)

    def _drop(self, reason: str) -> Decision:
        self.counters["dropped"] += 1
        return Decision(Verdict.DROP, reason=reason)

    def _token(self, source: str, original_dcid: bytes, retry_scid: bytes, now: float) -> bytes:
        """What only this node can make: the source, both connection IDs and the time, sealed."""
        plain = struct.pack("!dB", now, len(original_dcid)) + original_dcid + retry_scid
        nonce = self._random(_NONCE)
        return nonce + self._aead.encrypt(nonce, plain, source.encode())

    def _validate(self, token: bytes, source: str, dcid: bytes, now: float) -> bytes | None:
        """The original destination CID a valid token carries, or None."""
        if len(token) <= _NONCE:
            return None
        try:
            plain = self._aead.decrypt(token[:_NONCE], token[_NONCE:], source.encode())
        except InvalidTag:
            return None  # another node's, another source's, or forged
        issued, size = struct.unpack_from("!dB", plain)
        original, retry_scid = plain[9 : 9 + size], plain[9 + size :]
        # RFC 9000 17.2.5.2: the client sends to the Retry's source CID, so the token is for it only.
        if retry_scid != dcid or not 0 <= now - issued <= TOKEN_LIFETIME:
            return None
        return original
