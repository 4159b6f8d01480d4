#!/usr/bin/env python3
"""Agent services benchmark on loopback, printing JSON, each figure next to a baseline of the
session's own primitives measured in the same run:

- messages: messages/s through the outbox, the session and the peer's inbox (durable on both
  sides), and the latency from ``send`` to the message coming out of ``inbox()``; baseline:
  the session's raw request/response (``Connection.request``) with the same payload;
- files: a file's transfer rate (SHA-256 on both sides, written to disk) against the
  session's raw stream rate for as many bytes;
- pub/sub: one host fanning events out to 100 subscriptions (streams from another node):
  deliveries/s, the time until every subscriber has every event, and drops.

Nodes run in this process on one event loop (the numbers are the services' own cost, not
two processes'), with a rendezvous server of their own; sessions move to the direct path
(loopback UDP) before measuring, or stay on the relay with ``--relay-only``.

    python bench/services_bench.py [--messages 2000] [--file-mbytes 128] [--events 500] [--relay-only]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peerpath.identity import Identity
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.server import RendezvousServer
from peerpath.services.agent import AgentNode

PAYLOAD = {"task": "summarize", "text": "x" * 200, "n": 1}


async def _node(root: Path, name: str, server: RendezvousServer, direct: bool) -> AgentNode:
    state = root / name
    state.mkdir()
    node = await AgentNode.start(
        identity=Identity.generate(),
        trust=TrustStore(state / "trust.json"),
        host="127.0.0.1",
        rendezvous=server.url(),
        direct=direct,
    )
    assert node.rendezvous is not None
    await node.rendezvous.wait_registered(10)
    return node


async def _until(predicate: Any, timeout: float = 60.0, step: float = 0.005) -> None:
    """Wait until ``predicate()`` holds (or ``timeout`` passes)."""
    for _ in range(int(timeout / step)):
        if predicate():
            return
        await asyncio.sleep(step)
    raise TimeoutError("the benchmark's condition never held")


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
    }


async def bench_messages(alice: AgentNode, bob: AgentNode, count: int) -> dict[str, Any]:
    conn = await alice.connect(bob.address)
    body = json.dumps(PAYLOAD).encode()

    async def echo(_conn: Any, data: bytes) -> bytes:
        return b"ok"

    bob.on_message(echo)
    start = time.perf_counter()
    for _ in range(count):
        await conn.request(body)
    raw_rate = count / (time.perf_counter() - start)

    inbox = bob.inbox()
    start = time.perf_counter()
    ids = [await alice.messages.send(bob.address, PAYLOAD) for _ in range(count)]
    received = 0
    async for message in inbox:
        bob.messages.ack(message)
        received += 1
        if received == count:
            break
    rate = count / (time.perf_counter() - start)
    await alice.messages.wait_delivered(ids[-1], timeout=60)

    latencies = []
    for _ in range(min(count, 300)):
        sent = time.perf_counter()
        await alice.messages.send(bob.address, PAYLOAD)
        message = await anext(inbox)
        latencies.append(time.perf_counter() - sent)
        bob.messages.ack(message)
    await inbox.aclose()  # type: ignore[attr-defined]
    return {
        "messages": count,
        "messages_per_s": round(rate),
        "raw_requests_per_s": round(raw_rate),
        "ratio_to_raw": round(rate / raw_rate, 3),
        "send_to_inbox": _percentiles(latencies),
    }


async def bench_files(alice: AgentNode, bob: AgentNode, mbytes: int, root: Path) -> dict[str, Any]:
    size = mbytes * 1024 * 1024
    path = root / "payload.bin"
    with path.open("wb") as f:
        for _ in range(mbytes):
            f.write(os.urandom(1024 * 1024))
    conn = await alice.connect(bob.address)
    received = 0

    async def sink(reader: asyncio.StreamReader, writer: Any) -> None:
        nonlocal received
        while chunk := await reader.read(1 << 20):
            received += len(chunk)
        writer.close()

    bob.serve(9, sink)
    chunk = os.urandom(256 * 1024)
    start = time.perf_counter()
    _, writer = await conn.open_stream(9)
    for _ in range(size // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    await writer.wait_closed()
    await _until(lambda: received >= size)
    raw = size / (time.perf_counter() - start)

    start = time.perf_counter()
    transfer_id = await alice.files.send(bob.address, path)
    await alice.files.wait(transfer_id, timeout=600)
    took = time.perf_counter() - start
    saved = Path(bob.files.get(transfer_id).path)
    intact = await asyncio.to_thread(
        lambda: hashlib.sha256(saved.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()
    )
    return {
        "bytes": size,
        "file_mbit_s": round(size * 8 / took / 1e6, 1),
        "raw_stream_mbit_s": round(raw * 8 / 1e6, 1),
        "ratio_to_raw": round(size / took / raw, 3),
        "intact": intact,
        "note": "the file's time includes hashing it before sending and after receiving, and fsync",
    }


async def bench_pubsub(host: AgentNode, others: list[AgentNode], subscribers: int, events: int) -> dict[str, Any]:
    streams = [others[i % len(others)].pubsub.subscribe(f"{host.address}/bench.>") for i in range(subscribers)]
    counts = [0] * subscribers
    done = asyncio.Event()
    finished = 0

    async def consume(i: int) -> None:
        nonlocal finished
        async for _event in streams[i]:
            counts[i] += 1
            if counts[i] == events:
                finished += 1
                if finished == subscribers:
                    done.set()
                return

    tasks = [asyncio.ensure_future(consume(i)) for i in range(subscribers)]
    await _until(lambda: host.pubsub.describe()["subscribers"] >= subscribers)
    start = time.perf_counter()
    for i in range(events):
        host.pubsub.publish_local("bench.tick", {"i": i, "pad": "x" * 100})
        if i % 10 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(done.wait(), 300)
    took = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined]
    return {
        "subscribers": subscribers,
        "subscriber_nodes": len(others),
        "events": events,
        "deliveries": subscribers * events,
        "deliveries_per_s": round(subscribers * events / took),
        "all_delivered_s": round(took, 3),
        "dropped": host.pubsub.counters["dropped"],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="services-bench-"))
    server = RendezvousServer(Identity.generate(), root / "server")
    await server.start(["127.0.0.1"], 0)
    direct = not args.relay_only
    alice = await _node(root, "alice", server, direct)
    bob = await _node(root, "bob", server, direct)
    listeners = [await _node(root, f"listener{i}", server, direct) for i in range(3)]
    for node in (alice, *listeners):
        node.trust.add(bob.address)
        bob.trust.add(node.address)
    alice.trust.add(bob.address)
    if direct:
        conn = await alice.connect(bob.address)
        await _until(lambda: conn.path is not None and conn.path.kind.value != "relay", timeout=10)
    try:
        return {
            "benchmark": "services",
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "path": (await alice.connect(bob.address)).path.describe(),  # type: ignore[union-attr]
            "messages": await bench_messages(alice, bob, args.messages),
            "files": await bench_files(alice, bob, args.file_mbytes, root),
            "pubsub": await bench_pubsub(bob, [alice, *listeners], args.subscribers, args.events),
        }
    finally:
        for node in (alice, bob, *listeners):
            await node.close()
        await server.close()
        import shutil  # noqa: PLC0415

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--file-mbytes", type=int, default=128)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--relay-only", action="store_true", help="Keep every session on the relay.")
    result = asyncio.run(main(parser.parse_args()))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
