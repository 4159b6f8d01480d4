"""Who the peer of a session is: the two halves of peerpath's identity proof, sans-I/O.

The responder is authenticated by TLS 1.3 with a certificate whose key is its identity key;
the initiator checks that certificate against the address it dialled
(:meth:`InitiatorAuth.handshake_done`). The initiator proves its identity in-band, first
thing on the encrypted connection: it says who it claims to be (:class:`~control.Hello`),
the responder sends a fresh nonce (:class:`~control.Challenge`), the initiator signs the
nonce together with both addresses (:class:`~control.Auth`), and the responder, if the
signature holds and it trusts that address, answers :class:`~control.Welcome`.

Frames go in, frames to send and a verdict come out; nothing here touches a connection.
A refusal is raised as :class:`Refused`; a frame that has no place in the exchange as
:class:`~peerpath.session.control.ControlError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from peerpath.certs import certificate_address
from peerpath.identity import Address, Identity, verify
from peerpath.session import control


class Refused(Exception):
    """The proof failed (``authentication``: a wrong identity, key or signature) or the peer
    is not welcome (an untrusted address, an unsupported version). ``str()`` is the reason
    the peer is told."""

    def __init__(self, reason: str, *, authentication: bool) -> None:
        super().__init__(reason)
        self.authentication = authentication


@dataclass(frozen=True, slots=True)
class Step:
    """What one frame led to: a frame to answer with, and whether the proof is complete."""

    reply: control.Frame | None = None
    done: bool = False


class InitiatorAuth:
    """The dialling side: checks the responder's certificate, then proves itself."""

    def __init__(self, identity: Identity, expected: Address) -> None:
        self.identity = identity
        self.expected = expected
        #: The responder's challenge, once it came.
        self.nonce: bytes | None = None

    def handshake_done(self, certificate: x509.Certificate | None) -> control.Frame:
        """TLS finished: check who answered; the :class:`~control.Hello` to send."""
        proven = certificate_address(certificate) if certificate is not None else None
        if proven != self.expected:
            raise Refused(
                f"the peer at this endpoint is {proven or 'not a peerpath node'}, not {self.expected}",
                authentication=True,
            )
        return control.Hello(control.PROTOCOL_VERSION, self.identity.public_key)

    def on_frame(self, frame: control.Frame) -> Step:
        """A control frame from the responder."""
        if isinstance(frame, control.Challenge) and self.nonce is None:
            self.nonce = frame.nonce
            payload = control.auth_payload(frame.nonce, self.identity.address, self.expected)
            return Step(reply=control.Auth(self.identity.sign(payload)))
        if isinstance(frame, control.Welcome) and self.nonce is not None:
            return Step(done=True)
        raise control.ControlError(f"unexpected {type(frame).__name__} from the responder")


class ResponderAuth:
    """The answering side: challenges the initiator and checks its proof and trust."""

    def __init__(self, identity: Identity, is_trusted: Callable[[Address], bool]) -> None:
        self.identity = identity
        self._is_trusted = is_trusted
        self.nonce: bytes | None = None
        self._claimed_key: bytes | None = None
        #: The initiator, once proven and trusted.
        self.peer: Address | None = None

    def handshake_done(self) -> control.Frame:
        """TLS finished: the :class:`~control.Challenge` to send (a fresh nonce)."""
        self.nonce = os.urandom(32)
        return control.Challenge(self.nonce)

    def on_frame(self, frame: control.Frame) -> Step:
        """A control frame from the initiator."""
        if isinstance(frame, control.Hello) and self._claimed_key is None:
            if frame.version != control.PROTOCOL_VERSION:
                raise Refused(f"protocol version {frame.version} not supported", authentication=False)
            self._claimed_key = frame.public_key
            return Step()
        if (
            isinstance(frame, control.Auth)
            and self._claimed_key is not None
            and self.nonce is not None
            and self.peer is None
        ):
            self.peer = self._check(frame, self._claimed_key, self.nonce)
            return Step(reply=control.Welcome(), done=True)
        raise control.ControlError(f"unexpected {type(frame).__name__} from the initiator")

    def _check(self, frame: control.Auth, claimed_key: bytes, nonce: bytes) -> Address:
        try:
            claimed = Address.from_public_key(claimed_key)
        except ValueError:
            raise Refused("authentication failed: malformed key", authentication=True) from None
        payload = control.auth_payload(nonce, claimed, self.identity.address)
        if not verify(claimed_key, frame.signature, payload):
            raise Refused("authentication failed: bad signature", authentication=True)
        if not self._is_trusted(claimed):
            raise Refused(f"{self.identity.address} does not trust {claimed}", authentication=False)
        return claimed
