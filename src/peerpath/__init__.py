"""peerpath: a secure peer-to-peer overlay network for software agents."""

__version__ = "0.1.0"
