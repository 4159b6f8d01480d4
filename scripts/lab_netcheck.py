#!/usr/bin/env python3
"""Build the NAT lab (root only), run `peerpath netcheck` from behind every router kind, print a table.

Usage: sudo python3 scripts/lab_netcheck.py [--json]
"""

from __future__ import annotations

import json
import sys
import tempfile

from peerpath.testing.netlab import Impairment, Lab, Node, available, every_router_kind

PEERPATH = [sys.executable, "-m", "peerpath"]
SERVER_IPS = ["203.0.113.10", "203.0.113.11"]


def build(lab: Lab) -> dict[str, Node]:
    """The server and one host behind each router kind."""
    server = lab.public_host("server", SERVER_IPS)
    state = tempfile.mkdtemp(prefix="pp-server-")
    ips = ["--public-ip", SERVER_IPS[0], "--public-ip", SERVER_IPS[1]]
    server.start([*PEERPATH, "server", "--state-dir", state, *ips], ready="STUN server")
    hosts = every_router_kind(lab, impaired=Impairment(delay_ms=50, loss=0.02))
    hosts["port-restricted, 50 ms, 2% loss"] = hosts.pop("impaired")
    return hosts


def main() -> int:
    """Run the table."""
    reason = available()
    if reason:
        print(f"lab_netcheck: {reason}", file=sys.stderr)
        return 1
    rows = []
    with Lab() as lab:
        for name, host in build(lab).items():
            proc = host.run_proc([*PEERPATH, "netcheck", "--stun", SERVER_IPS[0], "--json", "--timeout", "2"])
            rows.append((name, json.loads(proc.stdout)))
    if "--json" in sys.argv:
        print(json.dumps(dict(rows), indent=2))
        return 0
    print(f"{'router':34} {'udp':5} {'nat':5} {'mapping':27} {'filtering':27} {'hairpin':7} {'time':>6}")
    for name, r in rows:
        print(
            f"{name:34} {r['udp']!s:5} {r['nat']!s:5} {r['mapping']!s:27} {r['filtering']!s:27} "
            f"{r['hairpinning']!s:7} {r['elapsed_s']:5.2f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
