#!/usr/bin/env python3
"""Session benchmark on loopback: one-stream throughput and 1 KiB request/response latency over a
peerpath session, next to plain TCP and TLS-over-TCP measured in the same run. Prints JSON.

Each measurement runs the server in its own process (as two agents would), the client here.
Also timed: a new connection to its first byte (TCP and TLS handshakes; peerpath's QUIC
handshake and identity proof) and the first reply, as the median of FIRST_BYTE_TRIALS new
connections from a process that has made one before (the same for all three); peerpath's very
first session of a fresh node is printed apart (``first_byte_cold_ms``). Everything runs
``--runs`` times; the JSON has the medians and peerpath's ratios to TLS over TCP from the same runs, which is what to
compare between machines (a regression shows there, not in the absolute figures).

    python bench/session_bench.py [--mbytes 256] [--requests 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from peerpath.cli import run_event_loop
from peerpath.node.node import Node
from peerpath.quic import ENGINE

CHUNK = 256 * 1024
MSG = os.urandom(1024)
#: New TLS connections timed per run (a peerpath run makes one new session).
FIRST_BYTE_TRIALS = 20


# -- servers (run in a child process) --------------------------------------------------------


async def _tcp_server(port: int, tls: ssl.SSLContext | None) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = await reader.readexactly(1)
        if mode == b"T":  # throughput: an 8-byte length, that many bytes, then one byte back
            remaining = int.from_bytes(await reader.readexactly(8), "big")
            while remaining > 0:
                data = await reader.read(min(remaining, 1 << 20))
                if not data:
                    break
                remaining -= len(data)
            writer.write(b"k")
        else:  # latency: echo 1 KiB records
            while True:
                try:
                    data = await reader.readexactly(1024)
                except asyncio.IncompleteReadError:
                    break
                writer.write(data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=tls)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def _peerpath_server(state_dir: str, port: int) -> None:
    async def sink(reader: asyncio.StreamReader, writer) -> None:
        while await reader.read(1 << 20):
            pass
        writer.write(b"k")
        writer.close()

    async def echo(_conn, data: bytes) -> bytes:
        return data

    async with Node.start(state_dir, host="127.0.0.1", port=port) as node:
        node.serve(9, sink)
        node.on_message(echo)
        print("ready", flush=True)
        await asyncio.Event().wait()


def _tls_contexts(directory: Path) -> ssl.SSLContext:
    """Write a self-signed certificate and key for the TLS server; return the client context."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return client


# -- clients -------------------------------------------------------------------------------


async def _tcp_throughput(port: int, total: int, tls: ssl.SSLContext | None) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    chunk = os.urandom(CHUNK)
    start = time.perf_counter()
    writer.write(b"T" + (total // CHUNK * CHUNK).to_bytes(8, "big"))
    for _ in range(total // CHUNK):
        writer.write(chunk)
        await writer.drain()
    await reader.readexactly(1)  # the server has it all
    elapsed = time.perf_counter() - start
    writer.close()
    return total * 8 / elapsed / 1e9


async def _tcp_latency(port: int, count: int, tls: ssl.SSLContext | None) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    writer.write(b"L")
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        writer.write(MSG)
        await reader.readexactly(1024)
        samples.append(time.perf_counter() - start)
    writer.close()
    return samples


async def _tcp_first_byte(port: int, tls: ssl.SSLContext | None) -> float:
    """A new connection (TCP handshake, and TLS's) to the first byte of an echoed record."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    writer.write(b"L" + MSG)
    await reader.readexactly(1024)
    elapsed = time.perf_counter() - start
    writer.close()
    return elapsed


async def _peerpath_client(state_dir: str, server_address: str, port: int, total: int, count: int) -> dict[str, object]:
    async with Node.start(state_dir, host="127.0.0.1") as node:
        start = time.perf_counter()
        conn = await node.connect(server_address, ("127.0.0.1", port), timeout=10)
        connect_s = time.perf_counter() - start
        await conn.request(MSG)  # the first byte of the new session's first reply
        cold_s = time.perf_counter() - start
        reader, writer = await conn.open_stream(9)
        chunk = os.urandom(CHUNK)
        start = time.perf_counter()
        for _ in range(total // CHUNK):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        await reader.read()
        gbits = total * 8 / (time.perf_counter() - start) / 1e9
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            await conn.request(MSG)
            samples.append(time.perf_counter() - start)
        first = []
        for _ in range(FIRST_BYTE_TRIALS):  # new sessions, each closed before the next
            await conn.close("next trial")
            start = time.perf_counter()
            conn = await node.connect(server_address, ("127.0.0.1", port), timeout=10)
            await conn.request(MSG)
            first.append(time.perf_counter() - start)
        return {
            "connect_ms": round(connect_s * 1000, 2),
            "first_byte_cold_ms": round(cold_s * 1000, 2),
            "first_byte_ms": round(statistics.median(first) * 1000, 2),
            "gbit_s": gbits,
            "samples": samples,
        }


def _spawn(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"server {args} did not start: {line!r}")
    return proc


def _latency_stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": round(statistics.median(ordered) * 1e6, 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1] * 1e6, 1),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(coro):  # type: ignore[no-untyped-def]
    """peerpath's side runs on the event loop the CLI uses (uvloop where installed)."""
    return run_event_loop(coro) if not os.environ.get("BENCH_ASYNCIO") else asyncio.run(coro)


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return "asyncio"
    return "uvloop"


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def _one_run(directory: Path, total: int, requests: int, server_address: str) -> dict[str, object]:
    """Every measurement once: plain TCP, TLS over TCP, then a peerpath session."""
    results: dict[str, object] = {}
    tls_client = _tls_contexts(directory)
    for name, tls in (("tcp", None), ("tls_tcp", tls_client)):
        port = _free_port()
        server = _spawn("_serve", name, str(port), str(directory))
        try:
            gbits = asyncio.run(_tcp_throughput(port, total, tls))
            samples = asyncio.run(_tcp_latency(port, requests, tls))
            first = [asyncio.run(_tcp_first_byte(port, tls)) for _ in range(FIRST_BYTE_TRIALS)]
        finally:
            server.kill()
            server.wait()
        results[name] = {
            "gbit_s": round(gbits, 3),
            "req_resp_1k": _latency_stats(samples),
            "first_byte_ms": round(statistics.median(first) * 1000, 2),
        }
    port = _free_port()
    server = _spawn("_serve", "peerpath", str(port), str(directory / "server"))
    try:
        measured = _run(_peerpath_client(str(directory / "client"), server_address, port, total, requests))
    finally:
        server.kill()
        server.wait()
    samples = measured.pop("samples")
    assert isinstance(samples, list)
    results["peerpath"] = {
        "connect_ms": measured["connect_ms"],
        "first_byte_cold_ms": measured["first_byte_cold_ms"],
        "first_byte_ms": measured["first_byte_ms"],
        "gbit_s": round(float(measured["gbit_s"]), 3),  # type: ignore[arg-type]
        "req_resp_1k": _latency_stats(samples),
    }
    return results


def _ratios(run: dict[str, Any]) -> dict[str, float]:
    """peerpath against TLS over TCP in the same run: throughput (higher is better), request
    latency and time to the first byte of a new connection (lower is better)."""
    ours, tls = run["peerpath"], run["tls_tcp"]
    return {
        "throughput_vs_tls": _ratio(ours["gbit_s"], tls["gbit_s"]),
        "req_resp_vs_tls": _ratio(ours["req_resp_1k"]["median_us"], tls["req_resp_1k"]["median_us"]),
        "first_byte_vs_tls": _ratio(ours["first_byte_ms"], tls["first_byte_ms"]),
    }


def _median_of(runs: list[dict[str, Any]], *keys: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in keys:
            value = value[key]
        values.append(value)
    return round(statistics.median(values), 3)


def main() -> None:
    """Run every measurement ``--runs`` times and print one JSON object: the medians, and
    peerpath's ratios to TLS over TCP measured in the same run (the figures that compare
    across machines)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mbytes", type=int, default=256, help="bytes per throughput run (MiB)")
    parser.add_argument("--requests", type=int, default=2000, help="request/response round trips")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    args = parser.parse_args()
    total = args.mbytes * 1024 * 1024
    results: dict[str, Any] = {
        "benchmark": "session",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "engine": ENGINE,
        "bytes": total,
        "requests": args.requests,
        "runs": args.runs,
        "peerpath_event_loop": "asyncio" if os.environ.get("BENCH_ASYNCIO") else _loop_name(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        server_dir, client_dir = directory / "server", directory / "client"
        peerpath = [sys.executable, "-m", "peerpath"]
        server_address = subprocess.check_output([*peerpath, "address", "--state-dir", str(server_dir)], text=True)
        client_address = subprocess.check_output([*peerpath, "address", "--state-dir", str(client_dir)], text=True)
        subprocess.check_call(
            [*peerpath, "trust", "add", server_address.strip(), "--state-dir", str(client_dir)],
            stdout=subprocess.DEVNULL,
        )
        subprocess.check_call(
            [*peerpath, "trust", "add", client_address.strip(), "--state-dir", str(server_dir)],
            stdout=subprocess.DEVNULL,
        )
        runs = [_one_run(directory, total, args.requests, server_address.strip()) for _ in range(args.runs)]
    for name in ("tcp", "tls_tcp", "peerpath"):
        results[name] = {
            "gbit_s": _median_of(runs, name, "gbit_s"),
            "req_resp_1k_median_us": _median_of(runs, name, "req_resp_1k", "median_us"),
            "req_resp_1k_p99_us": _median_of(runs, name, "req_resp_1k", "p99_us"),
            "first_byte_ms": _median_of(runs, name, "first_byte_ms"),
        }
    results["peerpath"]["connect_ms"] = _median_of(runs, "peerpath", "connect_ms")
    results["peerpath"]["first_byte_cold_ms"] = _median_of(runs, "peerpath", "first_byte_cold_ms")
    per_run = [_ratios(run) for run in runs]
    results["ratios"] = {key: round(statistics.median(r[key] for r in per_run), 3) for key in per_run[0]}
    results["ratios_per_run"] = per_run
    print(json.dumps(results, indent=2))


def _serve(kind: str, port: int, directory: str) -> None:
    if kind == "peerpath":
        _run(_peerpath_server(directory, port))
        return
    tls = None
    if kind == "tls_tcp":
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(Path(directory) / "cert.pem", Path(directory) / "key.pem")
    asyncio.run(_tcp_server(port, tls))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        _serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
