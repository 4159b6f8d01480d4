"""The peerpath exception tree (h11/h2 style).

- :class:`LocalError`: this side misused the API or was misconfigured; fix the call.
- :class:`RemoteError`: the peer or a server misbehaved (bad bytes, bad proof).
- :class:`NetworkError`: the network failed (timeout, unreachable).

Codecs in :mod:`peerpath.wire` raise ``ValueError`` subclasses of their own
(``StunError``), since ``wire`` imports nothing of peerpath.
"""

from __future__ import annotations


class PeerpathError(Exception):
    """Base of every error peerpath raises on purpose."""


class LocalError(PeerpathError):
    """The local side misused the API or is misconfigured."""


class RemoteError(PeerpathError):
    """The remote side misbehaved."""


class NetworkError(PeerpathError):
    """The network failed: nothing answered in time, or a socket could not be used."""


class NotTrustedError(LocalError):
    """This node does not trust the address it was asked to connect to."""


class PeerAuthenticationError(RemoteError):
    """The peer did not prove that it holds the key of the address it claims or was dialled at."""


class PeerRefusedError(RemoteError):
    """The peer refused the session (for example: it does not trust us)."""


class ServiceNotFoundError(RemoteError):
    """The peer has no service on the requested port."""


class MessageError(RemoteError):
    """The peer's message handler failed, or the message was too large."""


class SessionClosedError(NetworkError):
    """The session is closed or died; pending and later operations fail with this."""


class ConnectTimeoutError(NetworkError, TimeoutError):
    """No session could be established in time."""


class RequestTimeoutError(NetworkError, TimeoutError):
    """A request got no reply in time."""


class StreamResetError(RemoteError, ConnectionResetError):
    """The peer reset a byte stream (its end of a tunnel was reset, say)."""
