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
