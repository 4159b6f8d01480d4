"""Names and tags: ``peerpath name``, ``tag``, ``listing`` and ``find`` (through the running node).

A name is claimed at the rendezvous server, first come, first served, and renewed while the
node runs; a peer found by a name is trusted with ``peerpath trust add NAME``, which pins the
name to its address (:mod:`peerpath.cli.trust`).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from peerpath.cli.app import app
from peerpath.cli.common import JsonOption, StateDir, daemon_call, fail, printable
from peerpath.rendezvous.directory import InvalidNameError, InvalidTagError, check_name, check_tags
from peerpath.wire.rendezvous import MAX_TAGS

name_app = typer.Typer(
    help="This node's name at the rendezvous server, and who holds a name there.", no_args_is_help=True
)
app.add_typer(name_app, name="name")
tag_app = typer.Typer(
    help="This node's tags (KEY or KEY=VALUE), which searches of public nodes match.", no_args_is_help=True
)
app.add_typer(tag_app, name="tag")

_PRIVATE_HINT = "private: searches do not list this node (list it with: peerpath listing public)"
_PUBLIC_HINT = "public: searches list this node's address, name and tags"


def name_argument(text: str) -> str:
    """A NAME argument, checked (lower-cased); a malformed one is a usage error."""
    try:
        return check_name(text)
    except InvalidNameError as exc:
        fail(f"{printable(text)!r}: {exc}", 2)


def tag_arguments(texts: list[str]) -> list[str]:
    """TAG arguments, checked (lower-cased, without repeats); a malformed one is a usage error."""
    try:
        return check_tags(texts)
    except InvalidTagError as exc:
        fail(printable(str(exc)), 2)


def _one(state_dir: Any, request: dict[str, Any]) -> dict[str, Any]:
    answers = daemon_call(state_dir, request)
    if not answers:
        fail("the node did not answer")
    return answers[0]


def _listing(public: bool) -> str:
    return _PUBLIC_HINT if public else _PRIVATE_HINT


@name_app.command("set")
def name_set(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="Lower-case letters, digits and '-'; 1-63, a letter first.")
    ],
    state_dir: StateDir = None,
) -> None:
    """Claim a name for this node at the rendezvous server (it replaces the node's previous name).

    First come, first served: a name another agent holds is refused. The claim is signed with
    this node's key, renewed while the node runs, and released after 30 days without it.
    """
    answer = _one(state_dir, {"op": "name-set", "name": name_argument(name)})
    typer.echo(f"{answer['name']} is the name of {answer['address']} at the rendezvous server")


@name_app.command("release")
def name_release(state_dir: StateDir = None) -> None:
    """Give up this node's name at the rendezvous server."""
    answer = _one(state_dir, {"op": "name-release"})
    typer.echo(f"released {answer['released']}")


@name_app.command("show")
def name_show(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """This node's name, tags and listing."""
    profile = _one(state_dir, {"op": "profile"})
    if json_out:
        typer.echo(json.dumps(profile))
        return
    name = profile["name"] or "(none; claim one with: peerpath name set NAME)"
    if profile.get("claim_error"):
        name += f"  (not held: {printable(str(profile['claim_error']))})"
    typer.echo(f"address  {profile['address']}")
    typer.echo(f"name     {name}")
    typer.echo(f"tags     {' '.join(profile['tags']) or '(none)'}")
    typer.echo(f"listing  {_listing(profile['public'])}")


@name_app.command("lookup")
def name_lookup(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The name to look up.")],
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Who holds a name at the rendezvous server, and whether this node trusts it.

    The claim is checked against the agent's own key; a name pinned here to another address
    is reported as a conflict (the pin stands).
    """
    answer = _one(state_dir, {"op": "name-lookup", "name": name_argument(name)})
    if json_out:
        typer.echo(json.dumps(answer))
        return
    if answer["trusted"]:
        standing = "trusted" + (", pinned" if answer["pinned"] else "")
    else:
        standing = f"not trusted; to trust it: peerpath trust add {answer['name']}"
    typer.echo(f"{answer['name']} is {answer['address']} ({standing})")


@tag_app.command("add")
def tag_add(
    tags: Annotated[list[str], typer.Argument(metavar="TAG...", help="KEY or KEY=VALUE, e.g. gpu region=eu.")],
    public: Annotated[
        bool | None,
        typer.Option("--public/--private", help="Also list this node in searches, or stop [default: unchanged]."),
    ] = None,
    state_dir: StateDir = None,
) -> None:
    """Add tags to this node (at most 8). Searches find only public nodes: a node is private until
    tagged with --public or made public with 'peerpath listing public'."""
    checked = tag_arguments(tags)
    if len(checked) > MAX_TAGS:
        fail(f"a node has at most {MAX_TAGS} tags", 2)
    profile = _one(state_dir, {"op": "tag-add", "tags": checked, "public": public})
    typer.echo(f"tags: {' '.join(profile['tags'])}")
    typer.echo(_listing(profile["public"]))


@tag_app.command("remove")
def tag_remove(
    tags: Annotated[list[str], typer.Argument(metavar="TAG...", help="Tags to remove, as listed.")],
    state_dir: StateDir = None,
) -> None:
    """Remove tags from this node."""
    profile = _one(state_dir, {"op": "tag-remove", "tags": tag_arguments(tags)})
    typer.echo(f"tags: {' '.join(profile['tags']) or '(none)'}")


@tag_app.command("list")
def tag_list(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """This node's tags, one a line (and whether searches list it, on stderr)."""
    profile = _one(state_dir, {"op": "profile"})
    if json_out:
        typer.echo(json.dumps({"tags": profile["tags"], "public": profile["public"]}))
        return
    for tag in profile["tags"]:
        typer.echo(tag)
    if not profile["tags"]:
        typer.echo("no tags (add some with: peerpath tag add TAG...)", err=True)
    typer.echo(_listing(profile["public"]), err=True)


@app.command("listing")
def listing_command(
    visibility: Annotated[str, typer.Argument(metavar="public|private", help="Whether searches list this node.")],
    state_dir: StateDir = None,
) -> None:
    """Let searches ('peerpath find') list this node's address, name and tags, or not (the default).

    A private node reveals nothing to a search: not its existence, its tags or its name.
    """
    if visibility not in ("public", "private"):
        fail(f"{printable(visibility)!r}: say public or private", 2)
    profile = _one(state_dir, {"op": "listing", "public": visibility == "public"})
    typer.echo(_listing(profile["public"]))


@app.command("find")
def find_command(
    tags: Annotated[
        list[str],
        typer.Option("--tag", "-t", metavar="TAG", help="A tag the agents must have (repeat: all of them)."),
    ],
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Public agents at the rendezvous server that have every given tag: address, name, online, tags.

    Each address comes from the agent's key and each name from its signed claim, both checked
    here. To talk to one, trust it: peerpath trust add ADDR (or NAME).
    """
    wanted = tag_arguments(tags)
    if len(wanted) > MAX_TAGS:
        fail(f"search by at most {MAX_TAGS} tags", 2)
    answers = daemon_call(state_dir, {"op": "find-agents", "tags": wanted})
    found = [a for a in answers if "address" in a]
    more = any(a.get("more") for a in answers)
    if json_out:
        typer.echo(json.dumps(found))
    elif found:
        table = Table(box=None, pad_edge=False)
        for column in ("address", "name", "online", "tags"):
            table.add_column(column, no_wrap=column != "tags")
        for agent in found:
            online = "online" if agent["online"] else "offline"
            table.add_row(agent["address"], agent["name"] or "-", online, " ".join(agent["tags"]))
        Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)
    else:
        typer.echo(f"no public agent has {'all of ' if len(wanted) > 1 else ''}{' '.join(wanted)}", err=True)
    if more:
        typer.echo("more agents match; add a tag to narrow the search", err=True)
