"""The node: the public API (:class:`Node`), its UDP socket, the trust store, the daemon."""
