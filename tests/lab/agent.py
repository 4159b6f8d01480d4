"""A test agent for the lab: serves echo on port 7 and digests messages; or exercises a peer.

python agent.py serve STATE_DIR PORT          -> prints "ready ADDRESS PORT", runs until killed
python agent.py exercise STATE_DIR ADDR@HOST:PORT  -> prints one JSON object of results
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time

from peerpath.clock import monotonic as clock
from peerpath.node.node import Node
from peerpath.rendezvous import client as rendezvous_client
from peerpath.session.connection import Connection, SessionConfig
from peerpath.session.pathset import HOLD_DOWN

#: How long (tenths of a second) an exercise waits for a session to go direct.
WAIT_DIRECT_STEPS = int(os.environ.get("PEERPATH_WAIT_DIRECT", "40"))
#: Smaller payloads, for slow lossy links.
SMALL = os.environ.get("PEERPATH_AGENT_SMALL", "0") == "1"
#: Seconds a direct path set aside for its quality stays aside (SessionConfig.path_hold_down).
HOLD_DOWN_S = float(os.environ.get("PEERPATH_HOLD_DOWN", str(HOLD_DOWN)))
#: Seconds idle before the node rests on UDP at the server, and how often its client checks
#: (both shortened by the tests of resting agents).
REST_AFTER = os.environ.get("PEERPATH_REST_AFTER")
rendezvous_client.KEEPALIVE = float(os.environ.get("PEERPATH_RENDEZVOUS_KEEPALIVE", str(rendezvous_client.KEEPALIVE)))
#: A recognisable plaintext inside the payloads; it must never show up on the wire.
MARKER = b"PEERPATH-PLAINTEXT-MARKER-7f3a"


async def echo(reader: asyncio.StreamReader, writer) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def stream_round_trip(conn: Connection, size: int) -> bool:
    payload = os.urandom(size)
    reader, writer = await conn.open_stream(7)

    async def send() -> None:
        for i in range(0, len(payload), 32768):
            writer.write(payload[i : i + 32768])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    got = await reader.read()
    await sender
    return got == payload


async def handle(conn: Connection, data: bytes) -> bytes:
    if data == b"call me back":
        # The responder opens streams and sends a request to the initiator: both ways.
        streams_ok = all(await asyncio.gather(*(stream_round_trip(conn, 20000) for _ in range(5))))
        blob = os.urandom(100_000 if SMALL else 1_000_000)
        reply = await conn.request(blob, timeout=60)
        return json.dumps({"streams_ok": streams_ok, "request_ok": reply == hashlib.sha256(blob).digest()}).encode()
    return hashlib.sha256(data).digest()


async def serve(state_dir: str, port: int) -> None:
    async with Node.start(state_dir, port=port) as node:
        node.serve(7, echo)
        node.on_message(handle)
        print("ready", node.address, node.local_endpoint[1], flush=True)
        await asyncio.Event().wait()


async def exercise_peer(node: Node, address: str) -> dict[str, object]:
    """Connect by address alone; move data both ways; report."""
    start = time.perf_counter()
    try:
        conn = await node.connect(address, timeout=20)
        connect_s = time.perf_counter() - start
        first_path = conn.path.describe() if conn.path else None
        streams_ok = all(await asyncio.gather(*(stream_round_trip(conn, 50_000) for _ in range(3))))
        blob = os.urandom(32 * 1024 if SMALL else 256 * 1024) + MARKER
        digest_ok = await conn.request(blob, timeout=60) == hashlib.sha256(blob).digest()
        back = json.loads(await conn.request(b"call me back", timeout=60))
        # Give the direct-path upgrade a few seconds, then move data over whatever path it is.
        for _ in range(WAIT_DIRECT_STEPS):
            if conn.path is not None and not conn.path.describe().startswith("relay"):
                break
            await asyncio.sleep(0.1)
        again = await conn.request(blob, timeout=60) == hashlib.sha256(blob).digest()
    except Exception as exc:
        return {"peer": address, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "peer": address,
        "path": first_path,
        "final_path": conn.path.describe() if conn.path else None,
        "relay_reason": conn.relay_reason,
        "connect_s": round(connect_s, 3),
        "ok": streams_ok and digest_ok and again and back == {"streams_ok": True, "request_ok": True},
    }


def path_trace(conn: Connection, t: float) -> str:
    """One line of what the path set knows, for a failing soak's report: per path its probe
    outcomes oldest first (+ answered, - lost), probes pending, seconds since heard, verdict."""
    now = clock()
    parts = [f"{t:.0f}s on {conn.path.kind.value if conn.path else None}"]
    for p in conn.paths.paths.values():
        outcomes = "".join("+" if answered else "-" for _, answered in p._outcomes)
        heard = f"{now - p.last_received:.1f}" if p.last_received is not None else "-"
        parts.append(f"{p.kind.value} [{outcomes}] {len(p._pending)}? heard {heard}s aside {p.degraded}")
    return " | ".join(parts)


async def soak(node: Node, address: str, seconds: float) -> dict[str, object]:
    """Requests of 64 KiB back to back for ``seconds``; which path each took, any loss, why
    a path was set aside for its quality, and a trace of the path set every second."""
    conn = await node.connect(address, timeout=20)
    paths: list[str] = []
    aside: list[str] = []
    trace: list[str] = []
    sent = ok = 0
    begin = time.monotonic()

    async def tracer() -> None:
        while True:
            trace.append(path_trace(conn, time.monotonic() - begin))
            await asyncio.sleep(1.0)

    tracing = asyncio.ensure_future(tracer())
    try:
        while time.monotonic() < begin + seconds:
            blob = os.urandom(64 * 1024)
            sent += 1
            try:
                if await conn.request(blob, timeout=30) == hashlib.sha256(blob).digest():
                    ok += 1
            except Exception as exc:
                return {"error": f"{type(exc).__name__}: {exc}", "sent": sent, "ok": ok, "paths": paths, "trace": trace}
            path = conn.path.describe() if conn.path else "none"
            if not paths or paths[-1] != path:
                paths.append(path)
            for p in conn.paths.paths.values():
                if p.degraded and f"{p.describe()}: {p.degraded}" not in aside:
                    aside.append(f"{p.describe()}: {p.degraded}")
            await asyncio.sleep(0.05)
    finally:
        tracing.cancel()
    return {"sent": sent, "ok": ok, "paths": paths, "aside": aside, "trace": trace}


async def mesh(state_dir: str, url: str) -> None:
    loop = asyncio.get_running_loop()
    direct = os.environ.get("PEERPATH_AGENT_DIRECT", "1") != "0"
    config = SessionConfig(path_hold_down=HOLD_DOWN_S)
    async with Node.start(state_dir, rendezvous=url, direct=direct, config=config) as node:
        node.serve(7, echo)
        node.on_message(handle)
        if REST_AFTER is not None:
            node.relays.rest_after(float(REST_AFTER))
        assert node.rendezvous is not None
        await node.rendezvous.wait_registered(30)
        print("ready", node.address, flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            words = line.split()
            if words[:1] == ["exercise"]:
                for address in words[1:]:
                    print(json.dumps(await exercise_peer(node, address)), flush=True)
                print("done", flush=True)
            elif words[:1] == ["soak"]:
                print(json.dumps(await soak(node, words[1], float(words[2]))), flush=True)
            elif words[:1] == ["counters"]:
                print(json.dumps(node.direct.counters), flush=True)
            elif words[:1] == ["status"]:
                status = node.status()
                keep = ("endpoint", "counters", "admission", "rendezvous")
                print(json.dumps({k: status[k] for k in keep} | {"pending": len(node.pending_trust())}), flush=True)


async def exercise(state_dir: str, target: str) -> dict[str, object]:
    address, _, endpoint = target.partition("@")
    host, _, port = endpoint.rpartition(":")
    async with Node.start(state_dir) as node:
        node.serve(7, echo)
        node.on_message(handle)
        start = time.perf_counter()
        conn = await node.connect(address, (host, int(port)), timeout=20)
        connect_s = time.perf_counter() - start
        sizes = [1000 + 3000 * i for i in range(30)]
        streams = await asyncio.gather(*(stream_round_trip(conn, n) for n in sizes))
        big = os.urandom(5 * 1024 * 1024)
        digest_ok = await conn.request(big, timeout=120) == hashlib.sha256(big).digest()
        back = json.loads(await conn.request(b"call me back", timeout=120))
        return {
            "peer": str(conn.peer),
            "path": conn.path.describe() if conn.path else None,
            "connect_s": round(connect_s, 3),
            "streams_ok": all(streams),
            "large_message_ok": digest_ok,
            "reverse": back,
        }


def main() -> None:
    """Command-line entry."""
    command, state_dir, arg = sys.argv[1:4]
    if command == "serve":
        asyncio.run(serve(state_dir, int(arg)))
    elif command == "mesh":
        asyncio.run(mesh(state_dir, arg))
    else:
        print(json.dumps(asyncio.run(exercise(state_dir, arg))), flush=True)


if __name__ == "__main__":
    main()
