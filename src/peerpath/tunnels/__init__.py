"""Tunnels: any TCP service carried through the overlay, with unmodified clients.

A node exposes services by name (``ssh``, ``web``...) on overlay ports
(:mod:`~peerpath.tunnels.services`), forwards local ports to peers' services, and joins
byte streams with TCP's semantics (:mod:`peerpath.session.splice`); what it keeps is saved
in its state directory (:mod:`~peerpath.tunnels.registry`), and a running node keeps its
tunnels in step with that (:mod:`~peerpath.tunnels.runtime`).
"""
