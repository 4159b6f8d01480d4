"""NAT traversal: STUN client and server, NAT behaviour discovery (RFC 5780 / RFC 4787)."""
