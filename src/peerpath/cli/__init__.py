"""The ``peerpath`` command. Thin: it parses arguments and calls into the package.

One module per command group: :mod:`~peerpath.cli.daemon` (the node: up, address, ping,
status, demo), :mod:`~peerpath.cli.trust`, :mod:`~peerpath.cli.netcheck`,
:mod:`~peerpath.cli.server` (server and relay), :mod:`~peerpath.cli.tunnels` (expose,
forward, connect), and the agent services: :mod:`~peerpath.cli.messages` (send, inbox,
outbox), :mod:`~peerpath.cli.files`, :mod:`~peerpath.cli.tasks`, :mod:`~peerpath.cli.pubsub`,
:mod:`~peerpath.cli.events`, :mod:`~peerpath.cli.names` (names, tags, find),
:mod:`~peerpath.cli.mcp` (the MCP server).
:mod:`~peerpath.cli.common` holds what they share.
"""

from __future__ import annotations

import sys

from peerpath.cli import daemon, events, files, mcp, messages, names, netcheck, pubsub, server, tasks, trust, tunnels
from peerpath.cli.app import app
from peerpath.cli.common import run_event_loop

__all__ = [
    "app",
    "daemon",
    "events",
    "files",
    "main",
    "mcp",
    "messages",
    "names",
    "netcheck",
    "pubsub",
    "run_event_loop",
    "server",
    "tasks",
    "trust",
    "tunnels",
]


def main() -> None:
    """Entry point of the ``peerpath`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
