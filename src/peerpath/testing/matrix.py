"""Which pairs of NAT kinds the direct-path logic takes direct, and how: the one
expectation the root lab's matrix and its twin on fakenet both check."""

from __future__ import annotations

#: Hosts behind a NAT whose mapping is endpoint-independent (and UDP allowed).
EASY = frozenset({"public", "full-cone", "address-restricted", "port-restricted", "cgnat", "same-nat-1", "same-nat-2"})


def expected_direct(a: str, b: str) -> str | None:
    """Direct wherever one side maps endpoint-independently: symmetric against an open
    filter through a peer-reflexive candidate, against a restricted one by birthday probing.
    A UDP-blocked host goes direct over TCP (simultaneous open, or a plain connect to the
    public host) with every peer whose NAT keeps its TCP port; a symmetric NAT picks random
    ports for TCP too, so that pair stays on the relay. None: stays on the relay."""
    pair = {a, b}
    if "udp-blocked" in pair:
        return "direct tcp" if pair - {"udp-blocked"} <= EASY else None
    return "direct udp" if pair <= EASY | {"symmetric"} else None
