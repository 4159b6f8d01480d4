"""The ``peerpath`` command. Thin: it parses arguments and calls into the package."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from peerpath import __version__
from peerpath.nat.netcheck import DEFAULT_TIMEOUT, NetcheckResult, netcheck, resolve
from peerpath.nat.stun_server import DEFAULT_STUN_PORT, StunServer
from peerpath.wire.stun import Address

app = typer.Typer(
    name="peerpath",
    help="peerpath: a secure peer-to-peer overlay network for software agents.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
_state = {"debug": False}
log = logging.getLogger("peerpath")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line ``peerpath: MESSAGE`` on stderr and exit with ``code``."""
    Console(stderr=True, highlight=False).print(f"peerpath: {message}", markup=False)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"peerpath {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Verbose logs and full tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """peerpath: a secure peer-to-peer overlay network for software agents."""
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s" if debug else "peerpath: %(message)s",
        stream=sys.stderr,
    )


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
        result = asyncio.run(run())
    except OSError as exc:
        if _state["debug"]:
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
    table.add_row("took", f"{result.elapsed_s:.2f} s")
    console.print(table)
    console.print(f"\n{result.verdict()}")
    for note in result.skipped:
        console.print(f"[dim]not run: {note}[/dim]")


@app.command("server")
def server_command(
    public_ip: Annotated[
        list[str],
        typer.Option(
            "--public-ip",
            metavar="IP",
            help="A public IP to serve on; give two for RFC 5780 behaviour discovery.",
        ),
    ],
    stun_port: Annotated[int, typer.Option("--stun-port", min=1, max=65535, help="Primary STUN port.")] = (
        DEFAULT_STUN_PORT
    ),
    alternate_port: Annotated[
        int | None,
        typer.Option("--alternate-port", min=1, max=65535, help="Alternate STUN port (default: primary + 1)."),
    ] = None,
    tcp: Annotated[bool, typer.Option("--tcp/--no-tcp", help="Also answer STUN over TCP.")] = True,
    rate: Annotated[float, typer.Option("--rate", min=0.1, help="Requests per second allowed per source IP.")] = 50.0,
    burst: Annotated[float, typer.Option("--burst", min=1, help="Burst of requests allowed per source IP.")] = 100.0,
) -> None:
    """Run the peerpath server: STUN (RFC 8489/5780) on UDP and TCP.

    It grows into the rendezvous and relay server in later releases.
    """
    if len(public_ip) > 2:
        fail("give at most two --public-ip addresses", 2)
    for ip in public_ip:
        try:
            Address(ip, 0)
        except ValueError:
            fail(f"--public-ip {ip!r} is not an IP address", 2)
    if len(public_ip) == 2 and public_ip[0] == public_ip[1]:
        fail("the two --public-ip addresses must differ", 2)
    alternate = alternate_port if alternate_port is not None else stun_port + 1
    if alternate == stun_port or alternate > 65535:
        fail("--alternate-port must differ from --stun-port and be at most 65535", 2)

    async def run() -> None:
        try:
            server = await StunServer.start(public_ip, stun_port, alternate, tcp=tcp, rate=rate, burst=burst)
        except OSError as exc:
            fail(f"cannot listen: {exc.strerror or exc} (is the address on this host, and the port free?)")
        mode = "RFC 5780 behaviour discovery" if server.responder.full else "single address, no CHANGE-REQUEST"
        log.info("STUN server (%s) listening on %s", mode, ", ".join(server.listening()))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.close()
            counts = server.responder.counters.as_dict()
            log.info("stopped; %s", ", ".join(f"{k} {v}" for k, v in counts.items()))

    asyncio.run(run())


def main() -> None:
    """Entry point of the ``peerpath`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
