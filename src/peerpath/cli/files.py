"""Files: ``send-file`` (with a progress bar) and ``files`` (through the running node)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from peerpath.cli.app import app
from peerpath.cli.common import (
    JsonOption,
    StateDir,
    fail,
    human_bytes,
    peer_argument,
    printable,
    resolve_state_dir,
    run_command,
)
from peerpath.node import control


@app.command("send-file")
def send_file_command(
    peer: Annotated[str, typer.Argument(metavar="PEER", help="The peer's address, or the name you trust it as.")],
    paths: Annotated[list[Path], typer.Argument(metavar="PATH...", help="The files to send.")],
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Show progress until each file is delivered (default).")
    ] = True,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Send files to a peer (SHA-256 checked; resumed after a broken session or a restart).

    Ctrl-C stops watching, not the transfer: the node goes on sending in the background.
    """
    for path in paths:
        if not path.is_file():
            fail(f"{path} is not a file", 2)
    request = {
        "op": "file-send",
        "peer": peer_argument(peer),
        "paths": [str(p.resolve()) for p in paths],
        "wait": wait,
    }
    final: dict[str, dict[str, Any]] = {}
    quiet = json_out or not sys.stderr.isatty()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    bars: dict[str, TaskID] = {}

    async def run() -> None:
        with Progress(*columns, console=Console(stderr=True), disable=quiet) as progress:
            async for transfer in control.call(resolve_state_dir(state_dir), request):
                final[transfer["id"]] = transfer
                if transfer["id"] not in bars:
                    bars[transfer["id"]] = progress.add_task(printable(transfer["name"]), total=transfer["size"])
                progress.update(bars[transfer["id"]], completed=transfer["bytes"])

    run_command(run())
    failed = [t for t in final.values() if t["state"] == "failed"]
    if json_out:
        typer.echo(json.dumps(list(final.values())))
    else:
        for transfer in final.values():
            state = transfer["state"] if transfer["state"] != "done" else "delivered"
            why = f": {transfer['failure']}" if transfer["failure"] and transfer["state"] != "done" else ""
            typer.echo(
                f"{transfer['id'][:12]}  {printable(transfer['name'])}  {human_bytes(transfer['size'])}  {state}{why}"
            )
    if failed:
        raise typer.Exit(1)


@app.command("files")
def files_command(
    direction: Annotated[
        str | None, typer.Option("--direction", metavar="in|out", help="Only received, or sent.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100000, help="How many, newest first.")] = 20,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """File transfers, newest first: received ones with where they were saved."""
    if direction not in (None, "in", "out"):
        fail("--direction is in or out", 2)

    async def run() -> list[dict[str, Any]]:
        request = {"op": "files", "direction": direction, "limit": limit}
        return [answer async for answer in control.call(resolve_state_dir(state_dir), request)]

    transfers = run_command(run())
    if json_out:
        typer.echo(json.dumps(transfers))
        return
    if not transfers:
        typer.echo("no file transfers", err=True)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("id", "", "peer", "name", "size", "state"):
        table.add_column(column, no_wrap=True)
    table.add_column("where", overflow="fold")
    for t in transfers:
        where = t["path"] if t["direction"] == "in" and t["state"] == "done" else t["failure"] or ""
        progress = f" {t['bytes'] / t['size']:.0%}" if t["state"] == "sending" and t["size"] else ""
        table.add_row(t["id"][:12], "<-" if t["direction"] == "in" else "->", t["peer"], printable(t["name"]),
                      human_bytes(t["size"]), t["state"] + progress, printable(where))  # fmt: skip
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)
