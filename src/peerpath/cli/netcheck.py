"""``peerpath netcheck``: the NAT this host is behind."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from peerpath.cli.app import app
from peerpath.cli.common import fail, options, run_event_loop
from peerpath.nat.netcheck import DEFAULT_TIMEOUT, NetcheckResult, netcheck, resolve


@app.command("netcheck")
def netcheck_command(
    stun: Annotated[str, typer.Option("--stun", metavar="HOST[:PORT]", help="The STUN server to test against.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.1, max=60, metavar="S", help="Seconds to wait for the first STUN answer."),
    ] = DEFAULT_TIMEOUT,
) -> None:
    """Find out what NAT this host is behind (RFC 5780) and what that means for direct connections."""

    async def run() -> NetcheckResult:
        try:
            server = await resolve(stun)
        except ValueError as exc:
            fail(str(exc))
        return await netcheck(server, timeout=timeout)

    try:
        result = run_event_loop(run())
    except OSError as exc:
        if options["debug"]:
            raise
        fail(f"netcheck failed: {exc}")
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=None))
        return
    _print_netcheck(result)


def _print_netcheck(result: NetcheckResult) -> None:
    console = Console(highlight=False)

    def show(value: object) -> str:
        if value is None:
            return "unknown"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("server", result.server + (f" (other {result.other_address})" if result.other_address else ""))
    table.add_row("udp", show(result.udp) + (f", rtt {result.rtt_ms} ms" if result.rtt_ms is not None else ""))
    table.add_row("public address", show(result.public_address))
    table.add_row("local address", show(result.local_address))
    table.add_row("nat", show(result.nat))
    table.add_row("mapping", show(result.mapping))
    table.add_row("filtering", show(result.filtering))
    table.add_row("hairpinning", show(result.hairpinning))
    table.add_row("port preserving", show(result.port_preserving))
    if result.port_step is not None:
        table.add_row("port allocation", f"in sequence, step {result.port_step}" if result.port_step else "random")
    table.add_row("took", f"{result.elapsed_s:.2f} s")
    console.print(table)
    console.print(f"\n{result.verdict()}")
    for note in result.skipped:
        console.print(f"[dim]not run: {note}[/dim]")
