"""``peerpath mcp``: this node's overlay as tools for an AI agent, an MCP server over stdio."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from peerpath.cli.app import app
from peerpath.cli.common import StateDir, options, resolve_state_dir, run_command

#: The name the server goes under in an MCP client's configuration.
SERVER_NAME = "peerpath"


def client_config(command: str, state_dir: Path | None) -> dict[str, Any]:
    """What an MCP client's configuration needs to start this server (its ``mcpServers`` entry)."""
    args = ["mcp"] + (["--state-dir", str(state_dir.absolute())] if state_dir is not None else [])
    return {"mcpServers": {SERVER_NAME: {"command": command, "args": args}}}


def _own_command() -> str:
    """The ``peerpath`` executable to put in a configuration: the one running (as a full path, since
    an MCP client may start it with another PATH), else the one on PATH, else the bare name."""
    running = Path(sys.argv[0])
    if running.name == "peerpath" and running.exists():
        return str(running.absolute())
    return shutil.which("peerpath") or "peerpath"


@app.command("mcp")
def mcp_command(
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            help="Print the JSON an MCP client's configuration needs to run this server, and exit (writes nothing).",
        ),
    ] = False,
    state_dir: StateDir = None,
) -> None:
    """Serve the overlay to an AI agent: an MCP server on standard input and output.

    Its tools list the trusted peers (with path and RTT), send and read messages, give tasks
    to peers, publish events and call peers' HTTP services, through the running node (peerpath
    up). Add it to an MCP client with the JSON that --print-config prints.
    """
    if print_config:
        typer.echo(json.dumps(client_config(_own_command(), state_dir), indent=2))
        return
    from peerpath.mcp.server import serve_stdio  # noqa: PLC0415  (the SDK takes a second to import: only here)

    if not options["debug"]:
        logging.getLogger("mcp").setLevel(logging.WARNING)
    if sys.stdin.isatty():
        typer.echo(
            "peerpath: serving MCP on standard input and output (for an MCP client: see --print-config)", err=True
        )
    run_command(serve_stdio(resolve_state_dir(state_dir)))
