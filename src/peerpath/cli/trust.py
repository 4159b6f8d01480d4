"""``peerpath trust``: which peers this node trusts, and trust requests."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from peerpath.cli.app import app
from peerpath.cli.common import (
    JsonOption,
    StateDir,
    daemon_call,
    fail,
    load_identity,
    open_trust_store,
    parse_peer,
    printable,
    resolve_state_dir,
)

trust_app = typer.Typer(help="Manage which peers this node trusts (deny by default).", no_args_is_help=True)
app.add_typer(trust_app, name="trust")


@trust_app.command("add")
def trust_add(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer's address.")],
    note: Annotated[str, typer.Option("--note", help="A note to remember the peer by.")] = "",
    state_dir: StateDir = None,
) -> None:
    """Trust a peer: accept its sessions and allow connecting to it."""
    peer = parse_peer(address)
    directory = resolve_state_dir(state_dir)
    if peer == load_identity(directory).address:
        fail("that is this node's own address", 2)
    added = open_trust_store(directory).add(peer, note)
    typer.echo(f"trusted {peer}" if added else f"{peer} was trusted already")


@trust_app.command("remove")
def trust_remove(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer's address.")],
    state_dir: StateDir = None,
) -> None:
    """Stop trusting a peer (new sessions are refused; open ones stay until they close)."""
    peer = parse_peer(address)
    if not open_trust_store(resolve_state_dir(state_dir)).remove(peer):
        fail(f"{peer} is not trusted")
    typer.echo(f"no longer trusting {peer}")


@trust_app.command("request")
def trust_request(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer to ask.")],
    note: Annotated[str, typer.Option("--note", help="Who you are, for the peer to decide.")] = "",
    state_dir: StateDir = None,
) -> None:
    """Ask a peer to trust this node; delivered through the rendezvous, even if the peer is offline now."""
    peer = parse_peer(address)
    if len(note) > 1000:
        fail("--note is limited to 1000 characters", 2)
    daemon_call(state_dir, {"op": "trust-request", "address": str(peer), "note": note})
    typer.echo(f"asked {peer} to trust this node; it is trusted back when it approves")


@trust_app.command("pending")
def trust_pending(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """List trust requests waiting for your answer."""
    pending = daemon_call(state_dir, {"op": "trust-pending"})
    if json_out:
        typer.echo(json.dumps(pending))
        return
    if not pending:
        typer.echo("no pending trust requests")
        return
    for item in pending:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(item["created"]))
        typer.echo(f"{printable(str(item['address']))}  {when}  {printable(str(item['note']))}".rstrip())


@trust_app.command("approve")
def trust_approve(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer that asked.")],
    state_dir: StateDir = None,
) -> None:
    """Trust a peer that asked, and tell it so (it then trusts this node too)."""
    peer = parse_peer(address)
    daemon_call(state_dir, {"op": "trust-approve", "address": str(peer)})
    typer.echo(f"trusted {peer} and sent the approval")


@trust_app.command("deny")
def trust_deny(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer that asked.")],
    state_dir: StateDir = None,
) -> None:
    """Drop a pending trust request without trusting the peer."""
    peer = parse_peer(address)
    daemon_call(state_dir, {"op": "trust-deny", "address": str(peer)})
    typer.echo(f"denied {peer}")


@trust_app.command("list")
def trust_list(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """List trusted peers."""
    entries = open_trust_store(resolve_state_dir(state_dir)).entries()
    if json_out:
        typer.echo(json.dumps([{"address": str(e.address), "note": e.note, "added": e.added} for e in entries]))
        return
    if not entries:
        typer.echo("no trusted peers (add one with: peerpath trust add ADDR)")
        return
    for entry in entries:
        typer.echo(f"{entry.address}  {entry.added}  {entry.note}".rstrip())
