"""The end-to-end secure session: QUIC (aioquic) with TLS 1.3 bound to Ed25519 identities,
carried over a path set (the relay, direct UDP, direct TCP)."""
