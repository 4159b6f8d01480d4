#!/usr/bin/env python3
"""Relay benchmark on loopback, printing JSON:

- time from ``connect(address)`` (lookup + handshake + proof over the relay) to the first
  reply byte, over fresh identities;
- one session stream's throughput through the relay, next to the same bytes through a
  plain TCP forwarder written the obvious way with asyncio, measured in the same run;
- the server's memory (RSS) and CPU with thousands of registered idle agents.

The server runs in its own process (``peerpath server``); agents run here.

    python bench/relay_bench.py [--trials 20] [--mbytes 64] [--agents 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peerpath.certs import tls_client_context
from peerpath.cli import run_event_loop
from peerpath.identity import Identity
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.wire import rendezvous as rv

CHUNK = 256 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _proc_stats(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


async def _sink(reader: asyncio.StreamReader, writer) -> None:
    while await reader.read(1 << 20):
        pass
    writer.write(b"k")
    writer.close()


async def _answer(_conn, data: bytes) -> bytes:
    return b"k"


async def measure_sessions(url: RendezvousUrl, tmp: Path, trials: int, total: int) -> dict[str, object]:
    """Connect-to-first-byte over fresh identities, then one stream's throughput."""
    callers = [Identity.generate() for _ in range(trials)]
    trust = TrustStore(tmp / "b-trust.json")
    for caller in callers:
        trust.add(caller.address)
    async with Node.start(
        identity=Identity.generate(), trust=trust, host="127.0.0.1", rendezvous=url, direct=False
    ) as b:
        b.on_message(_answer)
        b.serve(9, _sink)
        assert b.rendezvous is not None
        await b.rendezvous.wait_registered(10)
        first_byte = []
        for i, caller in enumerate(callers):
            a_trust = TrustStore(tmp / f"a{i}.json")
            a_trust.add(b.address)
            async with Node.start(identity=caller, trust=a_trust, host="127.0.0.1", rendezvous=url, direct=False) as a:
                assert a.rendezvous is not None
                await a.rendezvous.wait_registered(10)
                start = time.perf_counter()
                conn = await a.connect(b.address)
                await conn.request(b"x")
                first_byte.append(time.perf_counter() - start)
                if i == len(callers) - 1:
                    reader, writer = await conn.open_stream(9)
                    chunk = os.urandom(CHUNK)
                    start = time.perf_counter()
                    for _ in range(total // CHUNK):
                        writer.write(chunk)
                        await writer.drain()
                    writer.write_eof()
                    await reader.read()
                    gbits = total * 8 / (time.perf_counter() - start) / 1e9
    ordered = sorted(first_byte)
    return {
        "connect_to_first_byte_ms": {
            "median": round(statistics.median(ordered) * 1000, 2),
            "p90": round(ordered[int(len(ordered) * 0.9) - 1] * 1000, 2),
            "trials": len(ordered),
        },
        "relayed_session_gbit_s": round(gbits, 3),
    }


async def _forwarder(port: int, ready: asyncio.Event, total: int, result: list[float]) -> None:
    """A plain TCP forwarder: the first connection is forwarded to the second."""
    peers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    both = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append((reader, writer))
        if len(peers) == 2:
            both.set()
        await both.wait()
        if len(peers) == 2 and peers[0][0] is reader:
            (src, _), (_, dst) = peers
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
            dst.close()

    server = await asyncio.start_server(accept, "127.0.0.1", port)
    ready.set()
    async with server:
        await asyncio.sleep(3600)


def measure_forwarder(total: int) -> float:
    """Bytes through a plain asyncio TCP forwarder in another process, Gbit/s."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "_forward", str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    try:

        async def run() -> float:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.05)
            reader, sink_writer = await asyncio.open_connection("127.0.0.1", port)
            chunk = os.urandom(CHUNK)

            async def drain_all() -> None:
                got = 0
                while got < total:
                    data = await reader.read(1 << 20)
                    if not data:
                        break
                    got += len(data)

            start = time.perf_counter()
            receiver = asyncio.ensure_future(drain_all())
            for _ in range(total // CHUNK):
                writer.write(chunk)
                await writer.drain()
            await receiver
            elapsed = time.perf_counter() - start
            writer.close()
            sink_writer.close()
            return total * 8 / elapsed / 1e9

        return asyncio.run(run())
    finally:
        proc.kill()
        proc.wait()


async def register_idle_agents(url: RendezvousUrl, count: int) -> list[asyncio.StreamWriter]:
    """Register ``count`` agents (TLS + signed challenge each) and leave them idle."""
    writers = []
    context = tls_client_context()

    async def one() -> asyncio.StreamWriter:
        identity = Identity.generate()
        reader, writer = await asyncio.open_connection(url.host, url.port, ssl=context)
        decoder = rv.FrameDecoder()
        frames: list = []
        while not frames:
            frames = decoder.feed(await reader.read(65536))
        challenge = frames[0][0]
        payload = rv.register_payload(challenge.nonce, identity.address.digest, url.address.digest)
        writer.write(rv.encode_control(rv.Register(identity.public_key, identity.sign(payload))))
        frames = []
        while not frames:
            frames = decoder.feed(await reader.read(65536))
        assert isinstance(frames[0][0], rv.Registered)
        return writer

    for start in range(0, count, 100):
        writers += await asyncio.gather(*(one() for _ in range(min(100, count - start))))
    return writers


def main() -> None:
    """Run everything and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--mbytes", type=int, default=64)
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()
    _raise_fd_limit()
    total = args.mbytes * 1024 * 1024
    results: dict[str, object] = {
        "benchmark": "relay",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        port = _free_port()
        command = [sys.executable, "-m", "peerpath", "server", "--public-ip", "127.0.0.1", "--port", str(port)]
        command += ["--stun-port", str(_free_port()), "--state-dir", str(tmp / "server")]
        server = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            preexec_fn=_raise_fd_limit,  # noqa: PLW1509
        )
        try:
            assert server.stdout is not None
            url = RendezvousUrl.parse(server.stdout.readline())
            results |= run_event_loop(measure_sessions(url, tmp, args.trials, total))
            results["tcp_forwarder_gbit_s"] = round(measure_forwarder(total), 3)
            rss_before, _ = _proc_stats(server.pid)

            async def idle() -> dict[str, object]:
                start = time.perf_counter()
                writers = await register_idle_agents(url, args.agents)
                registered_s = time.perf_counter() - start
                rss, cpu0 = _proc_stats(server.pid)
                await asyncio.sleep(args.idle_seconds)
                _, cpu1 = _proc_stats(server.pid)
                for writer in writers:
                    writer.close()
                return {
                    "agents": len(writers),
                    "register_all_s": round(registered_s, 2),
                    "rss_before_mib": round(rss_before / 2**20, 1),
                    "rss_with_agents_mib": round(rss / 2**20, 1),
                    "rss_per_agent_kib": round((rss - rss_before) / len(writers) / 1024, 1),
                    "idle_cpu_percent": round((cpu1 - cpu0) / args.idle_seconds * 100, 2),
                    "idle_seconds": args.idle_seconds,
                }

            results["idle_agents"] = run_event_loop(idle())
        finally:
            server.terminate()
            server.wait(10)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_forward":

        async def serve(port: int) -> None:
            ready = asyncio.Event()
            task = asyncio.ensure_future(_forwarder(port, ready, 0, []))
            await ready.wait()
            print("ready", flush=True)
            await task

        asyncio.run(serve(int(sys.argv[2])))
    else:
        main()
