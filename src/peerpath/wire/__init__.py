"""Sans-I/O codecs: bytes in, typed messages out. Imports nothing else of peerpath."""
