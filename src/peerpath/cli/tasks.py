"""Tasks: ``task submit | status | result | cancel | list | serve`` (through the running node)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from peerpath.cli.app import app
from peerpath.cli.common import JsonOption, StateDir, fail, peer_argument, printable, resolve_state_dir, run_command
from peerpath.node import control

task_app = typer.Typer(
    help="Give a job to a peer, follow it, and run the jobs peers give this node.", no_args_is_help=True
)
app.add_typer(task_app, name="task")

TaskId = Annotated[str, typer.Argument(metavar="ID", help="The task's id (or its first 6+ digits).")]
FINAL = ("done", "failed", "cancelled")


def _line(task: dict[str, Any]) -> str:
    """A task in one line: id, state, progress, and the result or why it failed."""
    head = f"{task['id'][:12]}  {task['name']}  {task['state']}"
    if task["state"] in ("queued", "running") and task.get("progress") is not None:
        head += f" {task['progress']:.0%}"
    if task.get("note") and task["state"] in ("queued", "running"):
        head += f" ({printable(task['note'])})"
    if task["state"] == "done":
        head += f": {printable(json.dumps(task['result'], ensure_ascii=False))}"
    elif task.get("failure"):
        head += f": {printable(task['failure'])}"
    return head


def _finish(task: dict[str, Any], json_out: bool) -> None:
    """Print a task's outcome; exit 1 unless it is done (or still going)."""
    if json_out:
        typer.echo(json.dumps(task, ensure_ascii=False))
    elif task["state"] == "done":
        typer.echo(json.dumps(task["result"], ensure_ascii=False))
    else:
        typer.echo(_line(task), err=True)
    if task["state"] in ("failed", "cancelled"):
        raise typer.Exit(1)


def _follow(request: dict[str, Any], state_dir: Any, json_out: bool) -> None:
    """Send ``request`` (an op that streams a task's updates), show them, and its outcome."""
    last: dict[str, Any] = {}

    async def run() -> None:
        async for task in control.call(resolve_state_dir(state_dir), request):
            if not last:
                typer.echo(f"task {task['id']}", err=True)
            elif not json_out and (task["state"], task.get("progress"), task.get("note")) != (
                last["state"],
                last.get("progress"),
                last.get("note"),
            ):
                typer.echo(_line(task), err=True)
            last.clear()
            last.update(task)

    run_command(run())
    _finish(last, json_out)


@task_app.command("submit")
def submit_command(
    peer: Annotated[str, typer.Argument(metavar="PEER", help="The worker: its address or name.")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="The task's name (what the worker serves).")],
    input_json: Annotated[str, typer.Option("--input", metavar="JSON", help="The task's input (JSON).")] = "null",
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0.001, max=86400, metavar="S", help="Fail the task after this.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the task and print its result.")] = False,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Give task NAME to a peer; print its id (with --wait: its progress, then its result)."""
    try:
        data = json.loads(input_json)
    except ValueError as exc:
        fail(f"--input: not JSON: {exc}", 2)
    request = {"op": "task-submit", "peer": peer_argument(peer), "name": name, "input": data, "timeout": timeout}
    if wait:
        _follow(request | {"wait": True}, state_dir, json_out)
        return
    [task] = run_command(_collect(state_dir, request))
    typer.echo(json.dumps(task) if json_out else task["id"])


async def _collect(state_dir: Any, request: dict[str, Any]) -> list[dict[str, Any]]:
    return [answer async for answer in control.call(resolve_state_dir(state_dir), request)]


@task_app.command("status")
def status_command(task_id: TaskId, state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """Where a task is: queued, running (with progress), done, failed or cancelled."""
    [task] = run_command(_collect(state_dir, {"op": "task-status", "id": task_id}))
    typer.echo(json.dumps(task, ensure_ascii=False) if json_out else _line(task))


@task_app.command("result")
def result_command(
    task_id: TaskId,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the task to end.")] = False,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """A task's result (exit 1 if it failed or was cancelled, 3 if it has not ended)."""
    if wait:
        _follow({"op": "task-status", "id": task_id, "wait": True}, state_dir, json_out)
        return
    [task] = run_command(_collect(state_dir, {"op": "task-status", "id": task_id}))
    if task["state"] not in FINAL:
        if json_out:
            typer.echo(json.dumps(task))
        else:
            typer.echo(f"task {task['id']} is {task['state']}; wait for it with: peerpath task result --wait", err=True)
        raise typer.Exit(3)
    _finish(task, json_out)


@task_app.command("cancel")
def cancel_command(task_id: TaskId, state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """Cancel a task: one this node submitted (at its worker) or one it runs."""
    [task] = run_command(_collect(state_dir, {"op": "task-cancel", "id": task_id}))
    typer.echo(json.dumps(task) if json_out else _line(task))


@task_app.command("list")
def list_command(
    role: Annotated[
        str | None, typer.Option("--role", metavar="submitted|working", help="Only tasks this node gave, or runs.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100000, help="How many, newest first.")] = 20,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Tasks this node submitted and runs, newest first."""
    if role not in (None, "submitted", "working"):
        fail("--role is submitted or working", 2)
    tasks = run_command(_collect(state_dir, {"op": "task-list", "role": role, "limit": limit}))
    if json_out:
        typer.echo(json.dumps(tasks, ensure_ascii=False))
        return
    if not tasks:
        typer.echo("no tasks", err=True)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("id", "role", "peer", "name", "state", "outcome"):
        table.add_column(column, no_wrap=column != "outcome")
    for task in tasks:
        outcome = json.dumps(task["result"], ensure_ascii=False) if task["state"] == "done" else task["failure"] or ""
        table.add_row(task["id"][:12], task["role"], task["peer"], task["name"], task["state"], printable(outcome))
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)


@task_app.command("serve")
def serve_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The task name to serve.")],
    command: Annotated[list[str], typer.Argument(metavar="-- COMMAND [ARGS]...", help="What runs each task.")],
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, max=1024, help="Tasks run at once.")] = 4,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Run COMMAND for every task NAME that peers submit, while this command runs (Ctrl-C stops).

    Each task's input arrives as JSON on the command's standard input; what it prints is the
    result (JSON if it parses); a non-zero exit fails the task with its last line of standard
    error. Lines such as "progress 0.4 reading" (or "progress 40%") on standard error report
    progress. PEERPATH_TASK_ID and PEERPATH_TASK_SUBMITTER are set in its environment.
    """
    request = {"op": "task-serve", "name": name, "command": command, "concurrency": concurrency}

    async def run() -> None:
        async for answer in control.call(resolve_state_dir(state_dir), request):
            if answer.get("keepalive"):
                continue
            if json_out:
                typer.echo(json.dumps(answer), nl=True)
            elif "serving" in answer:
                typer.echo(f"serving task {name!r} with: {' '.join(command)} (Ctrl-C stops)", err=True)
            else:
                state = answer["event"].removeprefix("task-")
                if answer.get("progress") is not None and state == "running":
                    state += f" {answer['progress']:.0%}"
                typer.echo(f"{answer['id'][:12]}  {state}  from {answer['peer']}")

    run_command(run())
