"""What agents use, on top of the node's public API: messages with an inbox (and, to come,
files, pub/sub, tasks, events), each a module of its own, served on well-known overlay
ports (:mod:`peerpath.services.ports`) and run with a node by :class:`AgentNode`."""
