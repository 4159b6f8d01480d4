"""peerpath: a secure peer-to-peer overlay network for software agents.

The public API is a few names: :class:`Node` (a node with the agent services: messages,
the inbox, names), :class:`Connection`, :class:`Address` and the exceptions in
:mod:`peerpath.errors`. They are imported on first use, so that
``import peerpath.wire`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Address", "Connection", "Node", "__version__", "errors"]

if TYPE_CHECKING:
    from peerpath import errors
    from peerpath.identity import Address
    from peerpath.services.agent import AgentNode as Node
    from peerpath.session.connection import Connection

_LAZY = {
    "Node": ("peerpath.services.agent", "AgentNode"),
    "Connection": ("peerpath.session.connection", "Connection"),
    "Address": ("peerpath.identity", "Address"),
    "errors": ("peerpath.errors", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'peerpath' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
