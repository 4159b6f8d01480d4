"""Messages: ``send``, ``inbox`` and ``outbox`` (through the running node)."""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from peerpath.cli.app import app
from peerpath.cli.common import (
    JsonOption,
    StateDir,
    fail,
    given_data,
    human_bytes,
    open_trust_store,
    peer_argument,
    printable,
    resolve_state_dir,
    run_command,
)
from peerpath.node import control

#: Characters of a message shown in the inbox's table (``--json`` shows it whole).
PREVIEW = 60


@app.command("send")
def send_command(
    peer: Annotated[str, typer.Argument(metavar="PEER", help="The peer's address, or the name you trust it as.")],
    text: Annotated[str | None, typer.Argument(metavar="[TEXT]", help="The message: a line of text.")] = None,
    json_data: Annotated[
        str | None, typer.Option("--json", metavar="OBJ", help="Send this JSON value instead of text.")
    ] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Send standard input (UTF-8 text).")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Return once the peer has stored it.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, metavar="S", help="How long --wait waits.")] = 60.0,
    state_dir: StateDir = None,
) -> None:
    """Send a message to a peer's inbox (kept in the outbox until it is delivered).

    Prints the message's id. A peer that is offline gets it when it comes back: directly,
    or from the rendezvous mailbox, sealed so that only it can read it.
    """
    # An empty TEXT is no message (publish, by contrast, takes an empty event).
    data = given_data("message", text or None, json_data, stdin, "; send binary data as a file")
    request = {"op": "send", "peer": peer_argument(peer), "data": data, "wait": wait, "timeout": timeout}

    async def run() -> dict[str, Any]:
        async for answer in control.call(resolve_state_dir(state_dir), request):
            return answer
        raise control.ControlError("the node did not answer")

    answer = run_command(run())
    typer.echo(answer["id"])
    state = "delivered to" if answer["state"] == "delivered" else "queued for"
    typer.echo(f"{state} {answer['to']}", err=True)


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    age = time.time() - stamp
    if age < 60:
        return f"{max(0, int(age))} s ago"
    if age < 3600:
        return f"{int(age // 60)} min ago"
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


def _preview(data: Any) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    text = printable(text)
    return text if len(text) <= PREVIEW else text[: PREVIEW - 1] + "…"


@app.command("inbox")
def inbox_command(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing messages as they arrive.")] = False,
    ack: Annotated[
        list[str] | None, typer.Option("--ack", metavar="ID", help="Acknowledge a message (id or its first digits).")
    ] = None,
    all_messages: Annotated[bool, typer.Option("--all", help="Show acknowledged messages too.")] = False,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """The messages peers sent this node, oldest first, until acknowledged.

    With --json, one JSON object per line (a message's data as it was sent).
    """
    directory = resolve_state_dir(state_dir)
    if ack:
        if follow:
            fail("--ack and --follow do not go together", 2)

        async def acknowledge() -> list[dict[str, Any]]:
            done = []
            for message_id in ack:
                async for answer in control.call(directory, {"op": "inbox-ack", "id": message_id}):
                    done.append(answer)
            return done

        for answer in run_command(acknowledge()):
            typer.echo(json.dumps(answer) if json_out else f"acknowledged {answer['id']}")
        return
    names = {str(entry.address): entry.note for entry in open_trust_store(directory).entries()}
    console = Console(highlight=False, soft_wrap=True)

    def show(message: dict[str, Any]) -> None:
        if json_out:
            typer.echo(json.dumps(message, ensure_ascii=False))
            return
        sender = printable(names.get(message["from"]) or "") or message["from"]
        data = message["data"]
        if message["via"] == "file" and isinstance(data, dict):
            size = human_bytes(int(data.get("size", 0)))
            shown = f"file {printable(str(data.get('file')))} ({size}), saved as {printable(str(data.get('path')))}"
        else:
            shown = _preview(data)
        console.print(f"{message['id'][:12]}  {_when(message['received']):>16}  {sender}: {shown}")

    async def run() -> int:
        count = 0
        request = {"op": "inbox", "follow": follow, "all": all_messages}
        async for message in control.call(directory, request):
            show(message)
            count += 1
        return count

    if not run_command(run()) and not json_out:
        typer.echo("the inbox is empty", err=True)


@app.command("outbox")
def outbox_command(
    limit: Annotated[int, typer.Option("--limit", min=1, max=100000, help="How many, newest first.")] = 20,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Messages this node sent, newest first: queued (with the last error), delivered or failed."""

    async def run() -> list[dict[str, Any]]:
        request = {"op": "outbox", "limit": limit}
        return [answer async for answer in control.call(resolve_state_dir(state_dir), request)]

    items = run_command(run())
    if json_out:
        typer.echo(json.dumps(items))
        return
    if not items:
        typer.echo("no messages sent", err=True)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("id", "to", "sent", "state", "note"):
        table.add_column(column, no_wrap=column != "note")
    for item in items:
        note = item["last_error"] or ""
        if item["state"] == "queued":
            note = f"{item['attempts']} attempts" + (f"; last: {note}" if note else "")
            if item["via_mailbox"]:
                note += "; sealed in the mailbox"
        table.add_row(item["id"][:12], item["to"], _when(item["created"]), item["state"], printable(note))
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)
