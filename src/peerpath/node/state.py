"""Where a node keeps its files."""

from __future__ import annotations

from pathlib import Path

import platformdirs


def default_state_dir() -> Path:
    """The per-user state directory, e.g. ``~/.local/share/peerpath``."""
    return Path(platformdirs.user_data_dir("peerpath", appauthor=False))
