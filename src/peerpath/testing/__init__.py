"""Test support: an in-memory network with RFC 4787 NATs (fakenet) and the root-only
Linux namespace lab (netlab). Not part of the public API."""
