"""Pub/sub: ``publish``, ``subscribe`` and ``topic allow | rules`` (through the running node)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from peerpath.cli.app import app
from peerpath.cli.common import JsonOption, StateDir, given_data, printable, resolve_state_dir, run_command
from peerpath.node import control

topic_app = typer.Typer(help="Who may publish and subscribe to this node's topics.", no_args_is_help=True)
app.add_typer(topic_app, name="topic")


@app.command("publish")
def publish_command(
    target: Annotated[str, typer.Argument(metavar="[PEER/]TOPIC", help="A topic of a peer's, or of this node.")],
    text: Annotated[str | None, typer.Argument(metavar="[TEXT]", help="The event: a line of text.")] = None,
    json_data: Annotated[
        str | None, typer.Option("--json", metavar="OBJ", help="Publish this JSON value instead of text.")
    ] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Publish standard input (UTF-8 text).")] = False,
    state_dir: StateDir = None,
) -> None:
    """Publish an event to a topic: the host fans it out to the subscribers its patterns match."""
    data = given_data("event", text, json_data, stdin)

    async def run() -> dict[str, Any]:
        async for answer in control.call(
            resolve_state_dir(state_dir), {"op": "publish", "target": target, "data": data}
        ):
            return answer
        raise control.ControlError("the node did not answer")

    answer = run_command(run())
    typer.echo(f"published to {answer['subscribers']} subscriber(s)", err=True)


@app.command("subscribe")
def subscribe_command(
    targets: Annotated[
        list[str], typer.Argument(metavar="[PEER/]PATTERN...", help="Patterns: '*' is one part, '>' (last) the rest.")
    ],
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="Stop after this many events.")] = None,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Print the events of the topics the patterns match, as they are published (Ctrl-C stops).

    A broken session is resumed; events published meanwhile are missed. With --json, one
    JSON object per line.
    """
    seen = 0

    async def run() -> None:
        nonlocal seen
        async for answer in control.call(resolve_state_dir(state_dir), {"op": "subscribe", "targets": targets}):
            if answer.get("keepalive"):
                continue
            if "subscribed" in answer:
                typer.echo(f"subscribed to {', '.join(answer['subscribed'])}", err=True)
                continue
            if json_out:
                typer.echo(json.dumps(answer, ensure_ascii=False))
            else:
                data = answer["data"] if isinstance(answer["data"], str) else json.dumps(answer["data"])
                dropped = f"  ({answer['dropped']} dropped so far)" if answer["dropped"] else ""
                typer.echo(f"{answer['topic']}: {printable(data)}{dropped}")
            seen += 1
            if count is not None and seen >= count:
                return

    run_command(run())


@topic_app.command("allow")
def allow_command(
    pattern: Annotated[str, typer.Argument(metavar="PATTERN", help="The topics the rule is for.")],
    publishers: Annotated[
        list[str] | None,
        typer.Option("--publish", metavar="trusted|host|PEER", help="Who may publish (repeat for several peers)."),
    ] = None,
    subscribers: Annotated[
        list[str] | None,
        typer.Option("--subscribe", metavar="trusted|host|PEER", help="Who may subscribe (repeat for several)."),
    ] = None,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Set who may publish and subscribe to the topics PATTERN matches (default: every trusted peer).

    'host' is this node alone; the first rule whose pattern matches a topic decides.
    """
    request = {"op": "topic-allow", "pattern": pattern, "publishers": publishers, "subscribers": subscribers}

    async def run() -> dict[str, Any]:
        async for answer in control.call(resolve_state_dir(state_dir), request):
            return answer
        raise control.ControlError("the node did not answer")

    rule = run_command(run())
    typer.echo(json.dumps(rule) if json_out else _describe(rule))


def _describe(rule: dict[str, Any]) -> str:
    def who(group: str | list[str]) -> str:
        if group == "trusted":
            return "every trusted peer"
        return ", ".join(group) if group else "this node alone"

    return f"{rule['pattern']}: published by {who(rule['publishers'])}, subscribed by {who(rule['subscribers'])}"


@topic_app.command("rules")
def rules_command(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """The rules for this node's topics, in the order they are checked."""

    async def run() -> list[dict[str, Any]]:
        return [answer async for answer in control.call(resolve_state_dir(state_dir), {"op": "topic-rules"})]

    rules = run_command(run())
    if json_out:
        typer.echo(json.dumps(rules))
        return
    for rule in rules:
        typer.echo(_describe(rule))
    typer.echo("every other topic: published and subscribed by every trusted peer")
