"""How a NAT hands out public ports (pure): whether they come in sequence, and the step."""

from __future__ import annotations

import itertools

#: The largest step between consecutive ports that still counts as "in sequence" (other
#: flows through the same NAT may take a few of the ports in between).
MAX_PORT_STEP = 8


def port_step(ports: list[int]) -> int:
    """The step of a NAT that gave ``ports`` to one socket's first flows in turn: the last
    difference when every difference is between 1 and :data:`MAX_PORT_STEP`, else 0."""
    steps = [b - a for a, b in itertools.pairwise(ports)]
    if steps and all(0 < step <= MAX_PORT_STEP for step in steps):
        return steps[-1]
    return 0
