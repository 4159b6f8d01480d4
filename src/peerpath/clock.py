"""The one clock peerpath reads time from.

Every component that reads time takes a :data:`Clock` (default :func:`monotonic`) and
the pure cores (path set, punch rounds, admission, rate limits) take ``now`` as an
argument, so a test can run a node, its sessions, its direct paths, the rendezvous client
and the server on one virtual clock (:mod:`peerpath.testing.vtime`). A clock given to a
component must advance with the event loop's own timers: the loop's ``time`` is always a
valid choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Seconds, from an arbitrary origin, never going backwards.
Clock = Callable[[], float]


def monotonic() -> float:
    """The default clock: the operating system's monotonic clock at high resolution (the
    event loop's may tick in milliseconds, as uvloop's does, and QUIC's pacing needs finer)."""
    return time.perf_counter()
