#!/usr/bin/env python3
"""Tunnel benchmark on loopback, printing JSON: a TCP service reached through
``peerpath forward`` -> session -> ``peerpath expose``, next to the same service reached
directly, and the session's raw stream throughput, all measured in the same run.

- bulk throughput (one connection), and 1 KiB request/response latency, to a TCP server;
- HTTP/1.1 with keep-alive (httpx; 1 KiB request and response bodies): requests per
  second and latency, to uvicorn;
- the ratios: forwarded / direct, and forwarded / the session's raw stream rate.

Two nodes run as daemons (``peerpath up``, each in its own process, sharing this
machine's local rendezvous), the servers in a third process, the clients here.

    python bench/tunnel_bench.py [--mbytes 128] [--requests 1000] [--relay-only]

With ``--lab`` (root) the same runs across the NAT lab instead: the service behind a
full-cone NAT, the client behind a port-restricted one, over the direct path and over the
relay; the baseline there is the session's raw stream over the same path, in the same run
(``sudo python3 bench/tunnel_bench.py --lab [--mbytes 32] [--requests 300]``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import direct_bench
import session_bench

PEERPATH = [sys.executable, "-m", "peerpath"]
BODY = os.urandom(1024)


async def _http_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """1 KiB back for whatever comes in."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1024")]})
    await send({"type": "http.response.body", "body": BODY})


async def _http_requests(port: int, count: int) -> list[float]:
    samples = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        await client.post("/", content=BODY)  # the connection is made and kept
        for _ in range(count):
            start = time.perf_counter()
            reply = await client.post("/", content=BODY)
            samples.append(time.perf_counter() - start)
            assert len(reply.content) == 1024
    return samples


def _cli(*args: str) -> str:
    return subprocess.run([*PEERPATH, *args], check=True, capture_output=True, text=True).stdout.strip()


def _wait_direct(state: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(_cli("status", "--state-dir", str(state), "--json"))
        paths = [s["path"] or "" for s in status["sessions"]]
        if any(p.startswith("direct") for p in paths):
            return next(p for p in paths if p.startswith("direct"))
        time.sleep(0.2)
    return "relay"


def _http_stats(samples: list[float]) -> dict[str, float]:
    return {
        "requests_per_s": round(len(samples) / sum(samples), 1),
        "median_us": round(statistics.median(samples) * 1e6, 1),
    }


def main() -> None:
    """Run every measurement and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mbytes", type=int, default=128, help="bytes per throughput run (MiB)")
    parser.add_argument("--requests", type=int, default=1000, help="request/response round trips")
    parser.add_argument("--relay-only", action="store_true", help="keep the session on the relay")
    parser.add_argument("--lab", action="store_true", help="across the NAT lab (root), direct and relayed")
    args = parser.parse_args()
    if args.lab:
        print(json.dumps(_lab(args.mbytes, args.requests), indent=2))
        return
    total = args.mbytes << 20
    results: dict[str, object] = {
        "benchmark": "tunnel",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "bytes": total,
        "requests": args.requests,
    }
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            tcp_port, http_port = session_bench._free_port(), session_bench._free_port()
            procs.append(session_bench._spawn("_serve", "tcp", str(tcp_port), tmp))
            procs.append(_spawn_http(http_port))
            alice, bob = root / "alice", root / "bob"
            addresses = {name: _cli("address", "--state-dir", str(d)) for name, d in (("a", alice), ("b", bob))}
            _cli("trust", "add", addresses["b"], "--state-dir", str(alice))
            _cli("trust", "add", addresses["a"], "--state-dir", str(bob))
            for state in (alice, bob):
                log = (root / f"{state.name}.log").open("w")
                mode = ["--relay-only"] if args.relay_only else []
                up = [*PEERPATH, "up", "--state-dir", str(state), *mode]
                procs.append(subprocess.Popen(up, stderr=log, text=True))
            time.sleep(2.0)
            _cli("expose", f"127.0.0.1:{tcp_port}", "--name", "bench", "--state-dir", str(bob))
            _cli("expose", f"127.0.0.1:{http_port}", "--name", "web", "--state-dir", str(bob))
            fwd_tcp, fwd_http = session_bench._free_port(), session_bench._free_port()
            _cli("forward", str(fwd_tcp), f"{addresses['b']}:bench", "--state-dir", str(alice))
            _cli("forward", str(fwd_http), f"{addresses['b']}:web", "--state-dir", str(alice))
            asyncio.run(_http_requests(fwd_http, 5))  # the session is made
            results["path"] = "relay" if args.relay_only else _wait_direct(alice)
            for name, tcp, http in (("direct_tcp", tcp_port, http_port), ("forwarded", fwd_tcp, fwd_http)):
                gbits = asyncio.run(session_bench._tcp_throughput(tcp, total, None))
                latency = asyncio.run(session_bench._tcp_latency(tcp, args.requests, None))
                requests = asyncio.run(_http_requests(http, args.requests))
                results[name] = {
                    "gbit_s": round(gbits, 3),
                    "req_resp_1k": session_bench._latency_stats(latency),
                    "http_keepalive_1k": _http_stats(requests),
                }
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait()
        results["session_raw_stream_gbit_s"] = round(_raw_stream(root, total), 3)
    forwarded, direct = results["forwarded"], results["direct_tcp"]
    assert isinstance(forwarded, dict) and isinstance(direct, dict)
    raw = float(results["session_raw_stream_gbit_s"])  # type: ignore[arg-type]
    results["ratios"] = {
        "forwarded_vs_direct_throughput": round(forwarded["gbit_s"] / direct["gbit_s"], 3),
        "forwarded_vs_session_raw_stream": round(forwarded["gbit_s"] / raw, 3),
        "forwarded_vs_direct_http_requests_per_s": round(
            forwarded["http_keepalive_1k"]["requests_per_s"] / direct["http_keepalive_1k"]["requests_per_s"], 3
        ),
    }
    print(json.dumps(results, indent=2))


def _raw_stream(root: Path, total: int) -> float:
    """One session stream's throughput between two nodes (server in its own process)."""
    server_dir, client_dir = root / "raw-server", root / "raw-client"
    server_address = _cli("address", "--state-dir", str(server_dir))
    client_address = _cli("address", "--state-dir", str(client_dir))
    _cli("trust", "add", server_address, "--state-dir", str(client_dir))
    _cli("trust", "add", client_address, "--state-dir", str(server_dir))
    port = session_bench._free_port()
    server = session_bench._spawn("_serve", "peerpath", str(port), str(server_dir))
    try:
        measured = session_bench._run(session_bench._peerpath_client(str(client_dir), server_address, port, total, 1))
    finally:
        server.kill()
        server.wait()
    return float(measured["gbit_s"])  # type: ignore[arg-type]


def _spawn_http(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, "_http", str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith("ready"):
        proc.kill()
        raise RuntimeError("the HTTP server did not start")
    return proc


def _serve_http(port: int) -> None:
    import uvicorn  # noqa: PLC0415

    server = uvicorn.Server(uvicorn.Config(_http_app, host="127.0.0.1", port=port, log_level="warning"))

    async def run() -> None:
        task = asyncio.ensure_future(server.serve())
        for _ in range(1000):  # uvicorn offers a flag, not an event
            if server.started:
                break
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await task

    asyncio.run(run())


# -- across the NAT lab ---------------------------------------------------------------------


def _lab(mbytes: int, requests: int) -> dict[str, object]:
    """Forwarded vs the session's raw stream, over the lab's direct path and over the relay."""
    from peerpath.testing.netlab import Lab, NatKind, available  # noqa: PLC0415

    reason = available()
    if reason:
        raise SystemExit(f"tunnel_bench --lab: {reason}")
    results: dict[str, object] = {"benchmark": "tunnel-lab", "bytes": mbytes << 20, "requests": requests}
    with tempfile.TemporaryDirectory() as tmp_dir, Lab() as lab:
        tmp = Path(tmp_dir)
        server = lab.public_host("server", ["203.0.113.10", "203.0.113.11"])
        ips = ["--public-ip", "203.0.113.10", "--public-ip", "203.0.113.11"]
        server.start([*PEERPATH, "server", "--state-dir", str(tmp / "server"), *ips], ready="STUN server")
        url = (tmp / "server" / "rendezvous.url").read_text().strip()
        far = lab.host("far", behind=lab.router("r-far", NatKind.FULL_CONE))
        near = lab.host("near", behind=lab.router("r-near", NatKind.PORT_RESTRICTED))
        far.start([sys.executable, session_bench.__file__, "_serve", "tcp", "9100", tmp_dir], ready="^ready")
        far.start([sys.executable, __file__, "_http", "9101"], ready="^ready")
        for i, mode in enumerate(("direct", "relay")):
            states = {name: tmp / f"{name}-{mode}" for name in ("near", "far", "raw-near", "raw-far")}
            addresses = {name: _cli("address", "--state-dir", str(state)) for name, state in states.items()}
            for a, b in (("near", "far"), ("far", "near"), ("raw-near", "raw-far"), ("raw-far", "raw-near")):
                _cli("trust", "add", addresses[b], "--state-dir", str(states[a]))
            flags = ["--rendezvous", url, *(["--relay-only"] if mode == "relay" else [])]
            far.start([*PEERPATH, "up", "--state-dir", str(states["far"]), *flags], ready="up on udp")
            near.start([*PEERPATH, "up", "--state-dir", str(states["near"]), *flags], ready="up on udp")
            _cli("expose", "127.0.0.1:9100", "--name", "bench", "--state-dir", str(states["far"]))
            _cli("expose", "127.0.0.1:9101", "--name", "web", "--state-dir", str(states["far"]))
            tcp_port, http_port = 9200 + 10 * i, 9201 + 10 * i  # each mode's near node forwards its own
            _cli("forward", str(tcp_port), f"{addresses['far']}:bench", "--state-dir", str(states["near"]))
            _cli("forward", str(http_port), f"{addresses['far']}:web", "--state-dir", str(states["near"]))
            client = [sys.executable, __file__, "_lab_client", str(tcp_port), str(http_port)]
            forwarded = json.loads(near.run([*client, str(mbytes << 20), str(requests)], timeout=600))
            status = json.loads(_cli("status", "--state-dir", str(states["near"]), "--json"))
            direct_bench = str(Path(__file__).with_name("direct_bench.py"))
            far.start([sys.executable, direct_bench, "_serve", str(states["raw-far"]), url], ready="^ready")
            raw = [sys.executable, __file__, "_lab_raw", str(states["raw-near"]), url, addresses["raw-far"]]
            raw_gbit = float(near.run([*raw, str(mbytes << 20), mode], timeout=600))
            results[mode] = forwarded | {
                "paths": [session["path"] for session in status["sessions"]],
                "session_raw_stream_gbit_s": round(raw_gbit, 3),
                "forwarded_vs_session_raw_stream": round(forwarded["gbit_s"] / raw_gbit, 3),
            }
    return results


def _lab_client(tcp_port: int, http_port: int, total: int, requests: int) -> dict[str, object]:
    """In the near host's namespace: through its node's forwards (TCP and HTTP)."""
    asyncio.run(_http_requests(http_port, 5))  # the session is made
    time.sleep(3.0)  # and goes direct where it can
    gbits = asyncio.run(session_bench._tcp_throughput(tcp_port, total, None))
    latency = asyncio.run(session_bench._tcp_latency(tcp_port, requests, None))
    http = asyncio.run(_http_requests(http_port, requests))
    return {
        "gbit_s": round(gbits, 3),
        "req_resp_1k": session_bench._latency_stats(latency),
        "http_keepalive_1k": _http_stats(http),
    }


async def _lab_raw(state: str, url: str, peer: str, total: int, relay_only: bool) -> float:
    """In the near host's namespace: one session stream's rate to the far node, over the
    same kind of path."""
    from peerpath.node.node import Node  # noqa: PLC0415
    from peerpath.session.pathset import PathKind  # noqa: PLC0415

    async with Node.start(state, rendezvous=url, direct=not relay_only) as node:
        assert node.rendezvous is not None
        await node.rendezvous.wait_registered(20)
        conn = await node.connect(peer, timeout=20)
        for _ in range(300):
            if relay_only or (conn.path is not None and conn.path.kind is not PathKind.RELAY):
                break
            await asyncio.sleep(0.01)
        return float((await direct_bench._measure_path(conn, total))["gbit_s"])


if __name__ == "__main__":
    if sys.argv[1:2] == ["_http"]:
        _serve_http(int(sys.argv[2]))
    elif sys.argv[1:2] == ["_lab_client"]:
        print(json.dumps(_lab_client(*(int(a) for a in sys.argv[2:6]))))
    elif sys.argv[1:2] == ["_lab_raw"]:
        state, url, peer, total, mode = sys.argv[2:7]
        print(asyncio.run(_lab_raw(state, url, peer, int(total), mode == "relay")))
    else:
        main()
