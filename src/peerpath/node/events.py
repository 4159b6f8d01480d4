"""What happens on a node, told to whoever listens: sessions up and down, path changes with
their reasons, trust requests; the agent services add their own (messages, files, tasks).

An event is a kind (``session-up``) and a dict of JSON-ready details. Listeners are called at
once, in the event loop, and must not block; one that raises is logged and kept.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]


class Events:
    """A node's event bus."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Call ``listener(kind, details)`` for every event from now on."""
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        """Stop calling ``listener``."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def emit(self, kind: str, **details: Any) -> None:
        """Tell every listener that ``kind`` happened (with the time it did)."""
        details.setdefault("time", time.time())
        for listener in list(self._listeners):
            try:
                listener(kind, details)
            except Exception:
                log.exception("an event listener failed on %s", kind)
