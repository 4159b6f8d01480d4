"""The overlay ports of peerpath's own services: a peer opens a stream there to reach one.

They lie below the ports that service names derive to (49152-65535), and ``expose``
refuses them, so that a user's tunnel never shadows a built-in service.
"""

from __future__ import annotations

#: Messages to the inbox, and receipts back.
MESSAGES = 1001
#: Pub/sub: subscriptions and the events they get, and events published to the host.
PUBSUB = 1002
#: Tasks: submissions, and their progress and outcomes.
TASKS = 1003
#: Files: offers, and the bytes of the files.
FILES = 1004

#: Every port a built-in service uses, by name.
BUILT_IN = {"messages": MESSAGES, "pubsub": PUBSUB, "tasks": TASKS, "files": FILES}


def is_built_in(port: int) -> bool:
    """Whether ``port`` belongs to a built-in service."""
    return port in BUILT_IN.values()


def name_of(port: int) -> str:
    """The built-in service on ``port`` ("" if none)."""
    return next((name for name, number in BUILT_IN.items() if number == port), "")
