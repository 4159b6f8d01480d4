"""``peerpath trust``: which peers this node trusts, the names pinned to them, and trust requests."""

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
from peerpath.cli.names import name_argument
from peerpath.identity import ADDRESS_PREFIX
from peerpath.identity import Address as PeerAddress
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.directory import is_name

trust_app = typer.Typer(help="Manage which peers this node trusts (deny by default).", no_args_is_help=True)
app.add_typer(trust_app, name="trust")


@trust_app.command("add")
def trust_add(
    address: Annotated[
        str, typer.Argument(metavar="ADDR|NAME", help="The peer's address, or its name at the rendezvous server.")
    ],
    note: Annotated[
        str, typer.Option("--note", help="A note to remember the peer by; if it is a name, it is pinned to the peer.")
    ] = "",
    state_dir: StateDir = None,
) -> None:
    """Trust a peer: accept its sessions and allow connecting to it.

    Given a NAME, the running node looks it up at the rendezvous server (checking the claim
    against the agent's own key) and the address it stands for is trusted. A name (NAME, or a
    --note that is one) is pinned to the address: here it stands for that peer from now on,
    whatever a server says later.
    """
    directory = resolve_state_dir(state_dir)
    name = ""
    if address.strip().lower().startswith(ADDRESS_PREFIX + "1"):
        peer = parse_peer(address)
    else:
        name = name_argument(address)
        found = daemon_call(directory, {"op": "name-lookup", "name": name})
        if not found:
            fail("the node did not answer")
        peer = parse_peer(str(found[0]["address"]))
        typer.echo(f"{name} is {peer} at the rendezvous server (its claim checked against its key)")
        note = note or name
    if peer == load_identity(directory).address:
        fail("that is this node's own address", 2)
    store = open_trust_store(directory)
    added = store.add(peer, note)
    typer.echo(f"trusted {peer}" if added else f"{peer} was trusted already")
    pin = name or note.strip().lower()
    if is_name(pin):
        _pin(store, pin, peer)


def _pin(store: TrustStore, name: str, peer: PeerAddress) -> None:
    previous = store.pin(name, peer)
    if previous is not None:
        typer.echo(f"{name} now stands for {peer} here (it stood for {previous})")
    elif store.pinned(name) == peer:
        typer.echo(f"{name} is pinned to {peer}: here it stands for this peer, whatever a server says later")


@trust_app.command("remove")
def trust_remove(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer's address.")],
    state_dir: StateDir = None,
) -> None:
    """Stop trusting a peer (new sessions are refused; open ones stay until they close), and drop
    the names pinned to it."""
    peer = parse_peer(address)
    store = open_trust_store(resolve_state_dir(state_dir))
    pinned = [name for name, pinned_to in store.pins().items() if pinned_to == peer]
    if not store.remove(peer):
        fail(f"{peer} is not trusted")
    typer.echo(f"no longer trusting {peer}" + (f" (unpinned {', '.join(pinned)})" if pinned else ""))


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
    """List trusted peers, with the names pinned to them."""
    store = open_trust_store(resolve_state_dir(state_dir))
    entries = store.entries()
    pins: dict[PeerAddress, list[str]] = {}
    for name, pinned_to in store.pins().items():
        pins.setdefault(pinned_to, []).append(name)
    if json_out:
        listed = [
            {"address": str(e.address), "note": e.note, "added": e.added, "names": pins.get(e.address, [])}
            for e in entries
        ]
        typer.echo(json.dumps(listed))
        return
    if not entries:
        typer.echo("no trusted peers (add one with: peerpath trust add ADDR)")
        return
    for entry in entries:
        names = pins.get(entry.address)
        line = f"{entry.address}  {entry.added}  {printable(entry.note)}".rstrip()
        typer.echo(line + (f"  [pinned: {', '.join(names)}]" if names else ""))
