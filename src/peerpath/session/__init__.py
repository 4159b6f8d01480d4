"""The end-to-end secure session: QUIC (through :mod:`peerpath.quic`) with TLS 1.3 bound to
Ed25519 identities (:mod:`.auth`), streams and messages (:mod:`.mux`), carried over a path set
(the relay, direct UDP, direct TCP); :mod:`.connection` drives them."""
