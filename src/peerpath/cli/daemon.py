"""The node: ``peerpath up`` runs it; ``address``, ``ping``, ``status`` and ``demo``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from peerpath import errors
from peerpath.cli.app import app
from peerpath.cli.common import (
    JsonOption,
    StateDir,
    fail,
    human_bytes,
    load_identity,
    log,
    open_trust_store,
    options,
    parse_rendezvous,
    peer_argument,
    resolve_state_dir,
    run_command,
    until_signalled,
)
from peerpath.node import control
from peerpath.node.local import LocalRendezvous
from peerpath.node.node import Node
from peerpath.rendezvous.client import REST_AFTER
from peerpath.services.agent import AgentNode
from peerpath.services.files import DEFAULT_MAX_SIZE
from peerpath.session.connection import SessionConfig
from peerpath.session.pathset import PathKind
from peerpath.tunnels.runtime import Tunnels
from peerpath.tunnels.services import ServiceError
from peerpath.wire.endpoint import parse_endpoint


@app.command("address")
def address_command(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """Print this node's overlay address (creating its identity on first use)."""
    directory = resolve_state_dir(state_dir)
    identity = load_identity(directory)
    if json_out:
        typer.echo(json.dumps({"address": str(identity.address), "state_dir": str(directory)}))
    else:
        typer.echo(str(identity.address))


@app.command("up")
def up_command(
    state_dir: StateDir = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="UDP port to listen on (0: any).")] = 0,
    host: Annotated[str, typer.Option("--host", help="Local address to bind.")] = "0.0.0.0",
    idle_timeout: Annotated[
        float, typer.Option("--idle-timeout", min=1.0, metavar="S", help="Close sessions silent this long.")
    ] = SessionConfig.idle_timeout,
    keepalive: Annotated[
        float,
        typer.Option("--keepalive", min=0.0, metavar="S", help="Ping idle sessions this often (0: never)."),
    ] = SessionConfig.keepalive_interval,
    rendezvous: Annotated[
        str | None,
        typer.Option(
            "--rendezvous",
            metavar="URL|FILE|local|none",
            envvar="PEERPATH_RENDEZVOUS",
            help="The rendezvous server: its pp://ADDRESS@HOST:PORT URL or a rendezvous.url file; "
            "'local' (the default) shares one with the other nodes on this machine; 'none' runs without.",
        ),
    ] = "local",
    direct: Annotated[
        bool, typer.Option("--direct/--relay-only", help="Move sessions to direct paths where NATs allow.")
    ] = True,
    rest_after: Annotated[
        float | None,
        typer.Option(
            "--rest-after",
            min=0.0,
            metavar="S",
            help="Idle this long, rest at the rendezvous server on UDP alone, without a connection "
            f"(0: stay connected) [default: {REST_AFTER:g}; with the local server, 0].",
            show_default=False,
        ),
    ] = None,
    files_dir: Annotated[
        Path | None,
        typer.Option("--files-to", metavar="DIR", help="Save received files here (default: STATE_DIR/files)."),
    ] = None,
    max_file_size: Annotated[
        int, typer.Option("--max-file-size", min=0, metavar="BYTES", help="Refuse larger files from peers.")
    ] = DEFAULT_MAX_SIZE,
) -> None:
    """Run this machine's agent node in the foreground (Ctrl-C stops it)."""
    local = rendezvous in (None, "", "local")
    url = None if local or rendezvous == "none" else parse_rendezvous(str(rendezvous))
    directory = resolve_state_dir(state_dir)
    identity = load_identity(directory)
    trust = open_trust_store(directory)
    if keepalive and keepalive >= idle_timeout:
        fail("--keepalive must be shorter than --idle-timeout, or sessions time out between pings", 2)
    config = SessionConfig(idle_timeout=idle_timeout, keepalive_interval=keepalive)

    async def run() -> None:
        embedded = LocalRendezvous() if local else None
        if embedded is not None:
            await embedded.start()
        node = await AgentNode.start(
            identity=identity,
            trust=trust,
            host=host,
            port=port,
            config=config,
            rendezvous=embedded.url if embedded is not None else url,
            direct=direct,
        )
        # The local server is no memory to save, and another node takes it over within a
        # second when its node stops: connected agents follow at once, resting ones would not.
        default = None if local else REST_AFTER
        node.relays.rest_after(default if rest_after is None else rest_after or None)
        if files_dir is not None:
            node.files.directory = files_dir.expanduser().resolve()
        node.files.max_size = max_file_size
        tunnels = Tunnels(node, directory)
        server = control.ControlServer(node, control.socket_path(directory), tunnels, node.control_extensions())
        try:
            await server.start()
            endpoint = node.local_endpoint
            log.info("node %s up on udp %s:%d (state %s)", node.address, endpoint[0], endpoint[1], directory)
            try:
                await tunnels.reload()  # what failed is logged, and shown by status
            except ServiceError as exc:
                log.warning("no tunnels: %s", exc)
            await until_signalled()
            log.info("shutting down")
        finally:
            await server.close()
            await tunnels.close()
            await node.close()
            if embedded is not None:
                await embedded.close()

    run_command(run())


@app.command("ping")
def ping_command(
    target: Annotated[
        str, typer.Argument(metavar="PEER[@HOST:PORT]", help="The peer (address or name), and where to reach it.")
    ],
    count: Annotated[int, typer.Option("--count", "-c", min=1, max=100000, help="How many pings.")] = 4,
    interval: Annotated[float, typer.Option("--interval", "-i", min=0.0, help="Seconds between pings.")] = 1.0,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each pong.")] = 5.0,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Round trips to a peer through the overlay, with the path each took."""
    text, _, via = target.partition("@")
    address = peer_argument(text)
    if via:
        try:
            parse_endpoint(via)
        except ValueError as exc:
            fail(str(exc), 2)
    request: dict[str, Any] = {"op": "ping", "address": address, "via": via or None, "count": count}
    request |= {"interval": interval, "timeout": timeout}
    replies: list[dict[str, Any]] = []

    async def run() -> None:
        async for answer in control.call(resolve_state_dir(state_dir), request):
            replies.append(answer)
            if not json_out:
                if answer.get("timeout"):
                    typer.echo(f"seq={answer['seq']} timeout")
                else:
                    typer.echo(
                        f"pong from {answer['peer']} via {answer['path']}: seq={answer['seq']} "
                        f"time={answer['rtt_ms']} ms"
                    )

    run_command(run())
    rtts = [r["rtt_ms"] for r in replies if "rtt_ms" in r]
    peers = {r["peer"] for r in replies if "peer" in r}
    summary = {
        "address": peers.pop() if peers else address,
        "sent": len(replies),
        "received": len(rtts),
        "replies": replies,
    }
    if rtts:
        summary |= {"rtt_min_ms": min(rtts), "rtt_avg_ms": round(sum(rtts) / len(rtts), 3), "rtt_max_ms": max(rtts)}
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        loss = 100 * (1 - len(rtts) / max(1, len(replies)))
        line = f"{len(replies)} sent, {len(rtts)} received, {loss:.0f}% loss"
        if rtts:
            line += f", rtt min/avg/max {summary['rtt_min_ms']}/{summary['rtt_avg_ms']}/{summary['rtt_max_ms']} ms"
        typer.echo(line)
    if not rtts:
        raise typer.Exit(1)


@app.command("status")
def status_command(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """Show the running node: its address and every session with its path, RTT and bytes."""

    async def run() -> dict[str, Any]:
        async for answer in control.call(resolve_state_dir(state_dir), {"op": "status"}):
            return answer
        raise errors.LocalError("the node sent no status")

    status = run_command(run())
    if json_out:
        typer.echo(json.dumps(status))
        return
    # Addresses are copied from this output: never wrap or truncate them.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    tcp = f", tcp port {status['tcp_port']}" if status.get("tcp_port") else ""
    console.print(f"address   {status['address']}\nendpoint  udp {status['endpoint']}{tcp}")
    mapping = status.get("port_mapping") or {}
    if mapping.get("udp"):
        mapped = [f"{proto} {mapping[proto]['external']}" for proto in ("udp", "tcp") if mapping.get(proto)]
        method = mapping["udp"]["method"].upper()
        console.print(f"mapped    {', '.join(mapped)} by {method} on the router {mapping['gateway']}")
    rendezvous = status.get("rendezvous")
    if rendezvous:
        state = f"registered, seen from {rendezvous['observed']}" if rendezvous["registered"] else "not registered"
        if rendezvous.get("resting"):
            state += ", resting on UDP"
        if not rendezvous["registered"] and rendezvous["last_error"]:
            state += f" ({rendezvous['last_error']})"
        console.print(f"rendezvous {rendezvous['url']}: {state}")
    _print_tunnels(console, status.get("tunnels") or {})
    _print_services(console, status)
    if not status["sessions"]:
        console.print("no sessions")
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("peer", no_wrap=True, min_width=35)
    for name in ("role", "path", "rtt", "sent", "received"):
        table.add_column(name, no_wrap=True)
    for session in status["sessions"]:
        rtt = f"{session['rtt_ms']} ms" if session["rtt_ms"] is not None else "-"
        table.add_row(
            session["peer"] or "(authenticating)",
            session["role"],
            session["path"] or "-",
            rtt,
            human_bytes(session["bytes_sent"]),
            human_bytes(session["bytes_received"]),
        )
    console.print(table)
    for session in status["sessions"]:
        for path in session.get("paths", []):
            heard = f"heard {path['heard_s_ago']} s ago" if path["heard_s_ago"] is not None else "not heard yet"
            rtt = f", rtt {path['rtt_ms']} ms" if path.get("rtt_ms") is not None else ""
            loss = f", probe loss {path['loss']:.0%}" if path["loss"] is not None else ""
            if path.get("recent_loss") is not None:
                loss += f" (recent {path['recent_loss']:.0%})"
            aside = f"; set aside: {path['degraded']}" if path.get("degraded") else ""
            sent, received = human_bytes(path["bytes_sent"]), human_bytes(path["bytes_received"])
            console.print(
                f"  {path['path']}: up {path['age_s']} s, {heard}{rtt}, {sent} out / {received} in{loss}{aside}"
            )
        if session.get("relay_reason"):
            console.print(f"{session['peer']} stays on the relay: {session['relay_reason']}")


def _print_services(console: Console, status: dict[str, Any]) -> None:
    """One line each for the agent services that have something to say."""
    messages, tasks, files = status.get("messages") or {}, status.get("tasks") or {}, status.get("files") or {}
    if messages.get("inbox_unacked") or messages.get("outbox_queued"):
        console.print(
            f"messages  {messages['inbox_unacked']} in the inbox, {messages['outbox_queued']} waiting in the outbox"
        )
    if tasks.get("serves") or tasks.get("running"):
        serves = ", ".join(tasks["serves"]) or "nothing"
        console.print(f"tasks     serving {serves}; {tasks['running']} running")
    if files.get("sending") or files.get("receiving"):
        console.print(f"files     {files['sending']} being sent, {files['receiving']} being received")


def _print_tunnels(console: Console, tunnels: dict[str, Any]) -> None:
    for item in tunnels.get("exposed", []):
        who = "every trusted peer" if item["allow"] == "trusted" else ", ".join(item["allow"])
        console.print(f"exposed   {item['name']} (overlay port {item['port']}) -> {item['target']}, to {who}")
    for item in tunnels.get("forwards", []):
        state = "" if item["listening"] else f" (not listening: {tunnels['errors'].get(item['bind'], '?')})"
        console.print(f"forward   {item['bind']} -> {item['peer']}:{item['service']}{state}")


@app.command("demo")
def demo_command(
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo's state directories.")] = False,
) -> None:
    """Two agents on this machine find each other through the embedded rendezvous and talk.

    Everything is real: identities, trust stores, the local rendezvous and relay, and an
    authenticated, encrypted session between the two nodes.
    """
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    root = Path(tempfile.mkdtemp(prefix="peerpath-demo-"))
    console = Console(highlight=False, soft_wrap=True)
    if not options["debug"]:
        logging.getLogger("peerpath").setLevel(logging.WARNING)

    async def run() -> None:
        embedded = LocalRendezvous(root / "rendezvous", port=_free_tcp_port())
        await embedded.start()
        console.print(f"rendezvous  {embedded.url} (embedded, this process)")
        alice = await Node.start(root / "alice", host="127.0.0.1", rendezvous=embedded.url)
        bob = await Node.start(root / "bob", host="127.0.0.1", rendezvous=embedded.url)
        try:
            console.print(f"alice       {alice.address}\nbob         {bob.address}")
            alice.trust.add(bob.address, "demo")
            bob.trust.add(alice.address, "demo")
            console.print("alice and bob trust each other")

            async def greet(conn: Any, data: bytes) -> bytes:
                return b"hello alice, this is bob (you said: " + data + b")"

            async def echo(reader: asyncio.StreamReader, writer: Any) -> None:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.close()

            bob.on_message(greet)
            alice.serve(80, echo)
            for node in (alice, bob):
                if node.rendezvous is not None:
                    await node.rendezvous.wait_registered(10)
            start = time.perf_counter()
            conn = await alice.connect(bob.address)
            reply = await conn.request(b"hi bob")
            took = (time.perf_counter() - start) * 1000
            path = conn.path.describe() if conn.path else "?"
            console.print(f"alice -> bob  request: {reply.decode()!r}  via {path}, {took:.1f} ms from connect()")
            back = bob.connection_to(alice.address)
            if back is None:
                raise errors.SessionClosedError("bob lost the session with alice")
            payload = os.urandom(1 << 20)
            start = time.perf_counter()
            reader, writer = await back.open_stream(80)
            writer.write(payload)
            writer.write_eof()
            echoed = await reader.read()
            took = (time.perf_counter() - start) * 1000
            verdict = "intact" if echoed == payload else "CORRUPTED"
            console.print(f"bob -> alice  stream to port 80: 1 MiB echoed {verdict} in {took:.0f} ms")
            # Meanwhile the nodes punch a direct path beside the relay and move the session to it.
            for _ in range(60):
                if conn.path is not None and conn.path.kind is not PathKind.RELAY:
                    break
                await asyncio.sleep(0.05)
            path = conn.path.describe() if conn.path else "?"
            reply = await conn.request(b"still there?")
            rtt = conn.rtt * 1000 if conn.rtt else 0.0
            console.print(f"alice -> bob  request: {reply.decode()!r}  via {path}")
            console.print(f"session       {path}, rtt {rtt:.2f} ms, both sides authenticated, end-to-end encrypted")
        finally:
            await alice.close()
            await bob.close()
            await embedded.close()

    try:
        run_command(run())
    finally:
        if keep:
            console.print(f"state kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
