"""``peerpath events``: what happens on the running node, as it happens."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import httpx
import typer

from peerpath.cli.app import app
from peerpath.cli.common import JsonOption, StateDir, fail, printable, resolve_state_dir, run_command
from peerpath.node import control

#: Seconds a webhook has to answer each event.
WEBHOOK_TIMEOUT = 5.0


def _describe(event: dict[str, Any]) -> str:
    """An event in one line: its time, kind, and its details."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", time.time())))
    details = " ".join(f"{key}={value}" for key, value in event.items() if key not in ("event", "time"))
    return f"{stamp} {event['event']:<18} {printable(details)}"


@app.command("events")
def events_command(
    webhook: Annotated[
        str | None, typer.Option("--webhook", metavar="URL", help="Also POST each event (JSON) to this URL.")
    ] = None,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="Stop after this many events.")] = None,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Print what happens on the node as it happens (Ctrl-C stops).

    Sessions up and down, path changes and why, trust requests, messages, files and tasks.
    With --json, one object a line; with --webhook, each is also POSTed as JSON.
    """
    if webhook is not None and not webhook.startswith(("http://", "https://")):
        fail("--webhook takes an http:// or https:// URL", 2)

    async def run() -> None:
        seen = 0
        failures: set[str] = set()
        async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT) as client:
            async for event in control.call(resolve_state_dir(state_dir), {"op": "events"}):
                if event.get("keepalive") or event.get("watching"):
                    continue
                typer.echo(json.dumps(event, ensure_ascii=False) if json_out else _describe(event))
                if webhook is not None:
                    await _post(client, webhook, event, failures)
                seen += 1
                if count is not None and seen >= count:
                    return

    run_command(run())


async def _post(client: httpx.AsyncClient, url: str, event: dict[str, Any], failures: set[str]) -> None:
    """POST one event; say once (per kind of failure) when the webhook does not take it."""
    try:
        response = await client.post(url, json=event)
        problem = "" if response.is_success else f"answered {response.status_code}"
    except httpx.HTTPError as exc:
        problem = f"failed: {type(exc).__name__}: {exc}"
    if problem and problem not in failures:
        failures.add(problem)
        typer.echo(f"peerpath: webhook {url} {problem} (events go on; this is said once)", err=True)
