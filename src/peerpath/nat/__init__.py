"""NAT traversal: STUN client and server, NAT behaviour discovery (RFC 5780 / RFC 4787),
hole punching (the punch engine), and port mapping (PCP, NAT-PMP, UPnP IGD)."""
