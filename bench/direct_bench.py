#!/usr/bin/env python3
"""Direct-path benchmark in the NAT lab (needs root), printing JSON. Per pair kind:

- time from ``connect(address)`` to the first reply byte (over the relay, at once);
- time from ``connect`` until the session runs on a validated direct path, and how many
  of the tries got there (punch success);
- round-trip time and one stream's throughput over the direct path (UDP, or TCP for a
  host whose network blocks UDP) and over the relay, measured in the same run.

    sudo python3 bench/direct_bench.py [--tries 10] [--mbytes 8] [--pair NEAR:FAR ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from peerpath.identity import Identity
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.session.pathset import PathKind
from peerpath.testing.netlab import Lab, NatKind, available

PEERPATH = [sys.executable, "-m", "peerpath"]
SERVER_IPS = ["203.0.113.10", "203.0.113.11"]
PAIRS = [
    ("public", "full-cone"),
    ("port-restricted", "port-restricted"),
    ("symmetric", "full-cone"),
    ("symmetric", "port-restricted"),
    ("symmetric-sequential", "port-restricted"),
    ("udp-blocked", "public"),
    ("udp-blocked", "port-restricted"),
]
KINDS = {
    "full-cone": NatKind.FULL_CONE,
    "port-restricted": NatKind.PORT_RESTRICTED,
    "symmetric": NatKind.SYMMETRIC,
    "symmetric-sequential": NatKind.SYMMETRIC_SEQUENTIAL,
    "udp-blocked": NatKind.UDP_BLOCKED,
}


async def _sink(reader: asyncio.StreamReader, writer) -> None:  # type: ignore[no-untyped-def]
    while await reader.read(1 << 20):
        pass
    writer.write(b"k")
    writer.close()


async def _echo(_conn, data: bytes) -> bytes:  # type: ignore[no-untyped-def]
    return data


async def serve(state: str, url: str) -> None:
    """The far end: answers requests and sinks streams."""
    async with Node.start(state, rendezvous=url) as node:
        node.on_message(_echo)
        node.serve(9, _sink)
        print("ready", flush=True)
        await asyncio.Event().wait()


async def _measure_path(conn, total: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    rtts = [await conn.ping() for _ in range(20)]
    reader, writer = await conn.open_stream(9)
    chunk = os.urandom(256 * 1024)
    start = time.perf_counter()
    for _ in range(total // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    await reader.read()
    return {
        "rtt_ms": round(statistics.median(rtts) * 1000, 2),
        "gbit_s": round(total * 8 / (time.perf_counter() - start) / 1e9, 3),
    }


async def drive(state: str, relay_state: str, url: str, peer: str, tries: int, total: int) -> dict[str, object]:
    """The near end: ``tries`` fresh sessions, then path measurements direct and relayed."""
    first_byte, to_direct, kinds = [], [], []
    first_direct: float | None = None
    async with Node.start(state, rendezvous=url) as node:
        assert node.rendezvous is not None
        await node.rendezvous.wait_registered(20)
        direct_measure: dict[str, float] | None = None
        for _ in range(tries):
            start = time.perf_counter()
            conn = await node.connect(peer, timeout=20)
            await conn.request(b"x")
            first_byte.append(time.perf_counter() - start)
            for _ in range(1000):  # up to 10 s
                if conn.path is not None and conn.path.kind is not PathKind.RELAY:
                    break
                await asyncio.sleep(0.01)
            if conn.path is not None and conn.path.kind is not PathKind.RELAY:
                to_direct.append(time.perf_counter() - start)
                if len(first_byte) == 1:
                    first_direct = to_direct[0]
                kinds.append(conn.path.kind.value)
                if direct_measure is None:
                    direct_measure = await _measure_path(conn, total)
            await conn.close()
            await asyncio.sleep(0.3)
    async with Node.start(relay_state, rendezvous=url, direct=False) as relay_node:
        assert relay_node.rendezvous is not None
        await relay_node.rendezvous.wait_registered(20)
        conn = await relay_node.connect(peer, timeout=20)
        relay_measure = await _measure_path(conn, total)
    return {
        "tries": tries,
        "direct": len(to_direct),
        "direct_kinds": sorted(set(kinds)),
        "connect_to_first_byte_ms": round(statistics.median(first_byte) * 1000, 1),
        "connect_to_direct_ms": round(statistics.median(to_direct) * 1000, 1) if to_direct else None,
        # The first try meets cold NATs; later tries reuse the mappings it left (same sockets).
        "first_try_to_direct_ms": round(first_direct * 1000, 1) if first_direct is not None else None,
        "direct_path": direct_measure,
        "relay_path": relay_measure,
    }


def main() -> int:
    """Build the lab, run every pair, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--mbytes", type=int, default=8)
    parser.add_argument(
        "--pair",
        action="append",
        metavar="NEAR:FAR",
        help="only this pair (repeatable), e.g. symmetric:full-cone; default every pair",
    )
    args = parser.parse_args()
    pairs = PAIRS
    if args.pair:
        pairs = [tuple(p.split(":", 1)) for p in args.pair]  # type: ignore[misc]
        unknown = {k for pair in pairs for k in pair} - set(KINDS) - {"public"}
        if unknown or any(len(p) != 2 for p in pairs):
            parser.error(f"--pair takes NEAR:FAR of {', '.join(['public', *KINDS])}")
    reason = available()
    if reason:
        print(f"direct_bench: {reason}", file=sys.stderr)
        return 1
    results: dict[str, object] = {"benchmark": "direct", "tries": args.tries, "pairs": {}}
    with tempfile.TemporaryDirectory() as tmp_dir, Lab() as lab:
        tmp = Path(tmp_dir)
        server = lab.public_host("server", SERVER_IPS)
        server_state = tmp / "server"
        ips = [a for ip in SERVER_IPS for a in ("--public-ip", ip)]
        server.start([*PEERPATH, "server", "--state-dir", str(server_state), *ips], ready="STUN server")
        url = (server_state / "rendezvous.url").read_text().strip()
        for i, (near_kind, far_kind) in enumerate(pairs):
            hosts = []
            for side, kind in (("near", near_kind), ("far", far_kind)):
                name = f"{side}{i}"
                if kind == "public":
                    hosts.append(lab.public_host(name))
                else:
                    hosts.append(lab.host(name, behind=lab.router(f"r-{name}", KINDS[kind])))
            near_host, far_host = hosts
            states = {k: tmp / f"{k}{i}" for k in ("near", "relay", "far")}
            ids = {k: Identity.load_or_create(v) for k, v in states.items()}
            for a, b in (("near", "far"), ("relay", "far"), ("far", "near"), ("far", "relay")):
                TrustStore.in_state_dir(states[a]).add(ids[b].address)
            far_host.start([sys.executable, __file__, "_serve", str(states["far"]), url], ready="^ready")
            near = [sys.executable, __file__, "_drive", str(states["near"]), str(states["relay"]), url]
            near += [str(ids["far"].address), str(args.tries), str(args.mbytes)]
            out = near_host.run(near, timeout=600)
            results["pairs"][f"{near_kind} -> {far_kind}"] = json.loads(out)  # type: ignore[index]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        asyncio.run(serve(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_drive":
        state, relay_state, url, peer, tries, mbytes = sys.argv[2:8]
        print(json.dumps(asyncio.run(drive(state, relay_state, url, peer, int(tries), int(mbytes) << 20))))
    else:
        sys.exit(main())
