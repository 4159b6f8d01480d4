"""The ``peerpath`` command. Thin: it parses arguments and calls into the package."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from peerpath import __version__, errors
from peerpath.identity import Address as PeerAddress
from peerpath.identity import Identity
from peerpath.nat.netcheck import DEFAULT_TIMEOUT, NetcheckResult, netcheck, resolve
from peerpath.nat.stun_server import DEFAULT_STUN_PORT, StunServer
from peerpath.node import control
from peerpath.node.local import LocalRendezvous
from peerpath.node.node import Node
from peerpath.node.state import default_state_dir
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.limits import ServerLimits
from peerpath.rendezvous.server import RendezvousServer
from peerpath.rendezvous.url import DEFAULT_PORT as DEFAULT_RENDEZVOUS_PORT
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.session.connection import SessionConfig
from peerpath.session.pathset import PathKind, parse_endpoint
from peerpath.wire.stun import Address

app = typer.Typer(
    name="peerpath",
    help="peerpath: a secure peer-to-peer overlay network for software agents.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
trust_app = typer.Typer(help="Manage which peers this node trusts (deny by default).", no_args_is_help=True)
app.add_typer(trust_app, name="trust")
_state = {"debug": False}
log = logging.getLogger("peerpath")
T = TypeVar("T")
URL_FILE = "rendezvous.url"

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        metavar="DIR",
        envvar="PEERPATH_STATE_DIR",
        help="Where the identity key, trust store and control socket live [default: per-user data dir].",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
# The limits a server or a relay enforces (docs/security.md lists them all).
RelayRate = Annotated[
    float, typer.Option("--relay-rate", min=1024, metavar="BYTES", help="Relayed bytes per second per agent.")
]
RelayBurst = Annotated[
    float, typer.Option("--relay-burst", min=2048, metavar="BYTES", help="Relay burst per agent, in bytes.")
]
MaxAgents = Annotated[int, typer.Option("--max-agents", min=1, help="Agents registered at once, at most.")]
MaxPerIp = Annotated[
    int, typer.Option("--max-connections-per-ip", min=1, help="Open connections per client IP, at most.")
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line ``peerpath: MESSAGE`` on stderr and exit with ``code``."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"peerpath: {message}", markup=False)
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
    if not debug:
        for noisy in ("quic", "websockets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(coro: Awaitable[T]) -> T:
    """Run ``coro``; expected failures become one line on stderr and exit code 1."""

    async def main() -> T:
        return await coro

    try:
        return run_event_loop(main())
    except errors.PeerpathError as exc:
        if _state["debug"]:
            raise
        fail(str(exc))
    except OSError as exc:
        if _state["debug"]:
            raise
        fail(str(exc.strerror or exc))


def run_event_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop where it is installed (several times the UDP packet rate), else asyncio."""
    try:
        import uvloop  # noqa: PLC0415  (optional: the CLI runs without it)
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _state_dir(value: Path | None) -> Path:
    return value if value is not None else default_state_dir()


def _identity(state_dir: Path) -> Identity:
    try:
        return Identity.load_or_create(state_dir)
    except errors.PeerpathError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot use state directory {state_dir}: {exc.strerror or exc}")


def _peer_address(text: str) -> PeerAddress:
    try:
        return PeerAddress.parse(text)
    except ValueError as exc:
        fail(str(exc), 2)


def _rendezvous_url(value: str, option: str = "--rendezvous") -> RendezvousUrl:
    text = value
    if not value.startswith("pp://"):
        try:
            text = Path(value).read_text().strip()
        except OSError as exc:
            fail(f"{option} {value!r} is neither a pp:// URL nor a readable file: {exc.strerror or exc}", 2)
    try:
        return RendezvousUrl.parse(text)
    except ValueError as exc:
        fail(f"{option}: {exc}", 2)


def _trust_store(state_dir: Path) -> TrustStore:
    try:
        return TrustStore.in_state_dir(state_dir)
    except errors.PeerpathError as exc:
        fail(str(exc))


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
    if result.port_step is not None:
        table.add_row("port allocation", f"in sequence, step {result.port_step}" if result.port_step else "random")
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
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", metavar="DIR", help="The server's key and state [default: per-user dir/server]."),
    ] = None,
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Rendezvous and relay port (TLS over TCP and UDP; 0: any).")
    ] = DEFAULT_RENDEZVOUS_PORT,
    wss_port: Annotated[
        int | None,
        typer.Option(
            "--wss-port",
            min=0,
            max=65535,
            help="WebSocket-over-TLS port, for networks that let only HTTPS out (0: any) [default: 443 if free].",
        ),
    ] = None,
    stun_port: Annotated[int, typer.Option("--stun-port", min=1, max=65535, help="Primary STUN port.")] = (
        DEFAULT_STUN_PORT
    ),
    alternate_port: Annotated[
        int | None,
        typer.Option("--alternate-port", min=1, max=65535, help="Alternate STUN port (default: primary + 1)."),
    ] = None,
    tcp: Annotated[bool, typer.Option("--tcp/--no-tcp", help="Also answer STUN over TCP.")] = True,
    rate: Annotated[
        float, typer.Option("--rate", min=0.1, help="STUN requests per second allowed per source IP.")
    ] = 50.0,
    burst: Annotated[float, typer.Option("--burst", min=1, help="STUN request burst allowed per source IP.")] = 100.0,
    relay_rate: RelayRate = ServerLimits.relay_rate,
    relay_burst: RelayBurst = ServerLimits.relay_burst,
    max_agents: MaxAgents = ServerLimits.max_agents,
    max_per_ip: MaxPerIp = ServerLimits.max_connections_per_ip,
    relay: Annotated[
        list[str],
        typer.Option(
            "--relay", metavar="URL", help="Another relay (peerpath relay) agents may pick as home; repeatable."
        ),
    ] = [],  # noqa: B006  (typer reads the default, never mutates it)
) -> None:
    """Run the peerpath server: rendezvous and relay (TLS), and STUN (RFC 8489/5780) on UDP and TCP.

    Prints the rendezvous URL agents use (also written to STATE_DIR/rendezvous.url).
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
    directory = state_dir if state_dir is not None else default_state_dir() / "server"
    identity = _identity(directory)
    limits = _server_limits(relay_rate, relay_burst, max_agents, max_per_ip)
    relay_urls = [_rendezvous_url(text, "--relay") for text in relay]

    async def run() -> None:
        try:
            stun = await StunServer.start(public_ip, stun_port, alternate, tcp=tcp, rate=rate, burst=burst)
        except OSError as exc:
            fail(f"cannot listen: {exc.strerror or exc} (is the address on this host, and the port free?)")
        try:
            stun_endpoints = [f"{ip}:{stun.responder.ports[0]}" for ip in public_ip]
            rendezvous = await _start_rendezvous(
                identity, directory, public_ip, port, wss_port, limits, relay_urls, stun_endpoints
            )
        except BaseException:
            await stun.close()
            raise
        mode = "RFC 5780 behaviour discovery" if stun.responder.full else "single address, no CHANGE-REQUEST"
        log.info("STUN server (%s) listening on %s", mode, ", ".join(stun.listening()))
        try:
            await _until_signalled()
        finally:
            await rendezvous.close()
            await stun.close()
            counts = {**stun.responder.counters.as_dict(), **rendezvous.counters}
            log.info("stopped; %s", ", ".join(f"{k} {v}" for k, v in counts.items()))

    run_event_loop(run())


def _server_limits(relay_rate: float, relay_burst: float, max_agents: int, max_per_ip: int) -> ServerLimits:
    """The limits a server or relay enforces, from its command line (docs/security.md lists them all)."""
    return ServerLimits(
        relay_rate=relay_rate,
        relay_burst=max(relay_burst, relay_rate / 10),
        max_agents=max_agents,
        max_connections=max(ServerLimits.max_connections, max_agents * 2),
        max_connections_per_ip=max_per_ip,
    )


async def _start_rendezvous(
    identity: Identity,
    directory: Path,
    public_ip: list[str],
    port: int,
    wss_port: int | None,
    limits: ServerLimits,
    relays: list[RendezvousUrl],
    stun: list[str] | None = None,
) -> RendezvousServer:
    """Start a rendezvous/relay server, print its URL (and write it to DIR/rendezvous.url)."""
    rendezvous = RendezvousServer(identity, directory, limits=limits, relays=relays, stun=stun)
    try:
        await rendezvous.start(public_ip, port, wss_port=443 if wss_port is None else wss_port)
    except OSError as exc:
        await rendezvous.close()
        if wss_port is not None:
            fail(f"cannot listen on port {port} or --wss-port {wss_port}: {exc.strerror or exc}")
        log.warning("no WebSocket listener: port 443 is not available (%s); use --wss-port", exc.strerror or exc)
        rendezvous = RendezvousServer(identity, directory, limits=limits, relays=relays, stun=stun)
        try:
            await rendezvous.start(public_ip, port)
        except OSError as again:
            await rendezvous.close()
            fail(f"cannot listen on port {port}: {again.strerror or again}")
    url = str(rendezvous.url())
    (directory / URL_FILE).write_text(url + "\n")
    typer.echo(url)
    sys.stdout.flush()
    listeners = [f"tls+udp {h}:{rendezvous.port}" for h in public_ip]
    if rendezvous.wss_port:
        listeners += [f"wss {h}:{rendezvous.wss_port}" for h in public_ip]
    log.info("rendezvous and relay on %s", ", ".join(listeners))
    return rendezvous


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@app.command("relay")
def relay_command(
    public_ip: Annotated[list[str], typer.Option("--public-ip", metavar="IP", help="A public IP to relay on.")],
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", metavar="DIR", help="The relay's key and state [default: per-user dir/relay]."),
    ] = None,
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Relay port (TLS over TCP and UDP; 0: any).")
    ] = DEFAULT_RENDEZVOUS_PORT,
    wss_port: Annotated[
        int | None,
        typer.Option("--wss-port", min=0, max=65535, help="WebSocket-over-TLS port [default: 443 if free]."),
    ] = None,
    relay_rate: RelayRate = ServerLimits.relay_rate,
    relay_burst: RelayBurst = ServerLimits.relay_burst,
    max_agents: MaxAgents = ServerLimits.max_agents,
    max_per_ip: MaxPerIp = ServerLimits.max_connections_per_ip,
) -> None:
    """Run a relay alone. Give its URL to the server (peerpath server --relay URL); agents near it
    pick it as their home relay."""
    for ip in public_ip:
        try:
            Address(ip, 0)
        except ValueError:
            fail(f"--public-ip {ip!r} is not an IP address", 2)
    directory = state_dir if state_dir is not None else default_state_dir() / "relay"
    identity = _identity(directory)
    limits = _server_limits(relay_rate, relay_burst, max_agents, max_per_ip)

    async def run() -> None:
        relay = await _start_rendezvous(identity, directory, public_ip, port, wss_port, limits, [])
        try:
            await _until_signalled()
        finally:
            await relay.close()
            log.info("stopped; %s", ", ".join(f"{k} {v}" for k, v in relay.counters.items()))

    run_event_loop(run())


@app.command("address")
def address_command(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """Print this node's overlay address (creating its identity on first use)."""
    directory = _state_dir(state_dir)
    identity = _identity(directory)
    if json_out:
        typer.echo(json.dumps({"address": str(identity.address), "state_dir": str(directory)}))
    else:
        typer.echo(str(identity.address))


@app.command("up")
def up_command(
    state_dir: StateDir = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="UDP port to listen on (0: any).")] = 0,
    host: Annotated[str, typer.Option("--host", help="Local address to bind.")] = "0.0.0.0",
    idle_timeout: Annotated[
        float, typer.Option("--idle-timeout", min=1.0, metavar="S", help="Close sessions silent this long.")
    ] = SessionConfig.idle_timeout,
    keepalive: Annotated[
        float,
        typer.Option("--keepalive", min=0.0, metavar="S", help="Ping idle sessions this often (0: never)."),
    ] = SessionConfig.keepalive_interval,
    rendezvous: Annotated[
        str | None,
        typer.Option(
            "--rendezvous",
            metavar="URL|FILE|local|none",
            envvar="PEERPATH_RENDEZVOUS",
            help="The rendezvous server: its pp://ADDRESS@HOST:PORT URL or a rendezvous.url file; "
            "'local' (the default) shares one with the other nodes on this machine; 'none' runs without.",
        ),
    ] = "local",
) -> None:
    """Run this machine's agent node in the foreground (Ctrl-C stops it)."""
    local = rendezvous in (None, "", "local")
    url = None if local or rendezvous == "none" else _rendezvous_url(str(rendezvous))
    directory = _state_dir(state_dir)
    identity = _identity(directory)
    trust = _trust_store(directory)
    if keepalive and keepalive >= idle_timeout:
        fail("--keepalive must be shorter than --idle-timeout, or sessions time out between pings", 2)
    config = SessionConfig(idle_timeout=idle_timeout, keepalive_interval=keepalive)

    async def run() -> None:
        embedded = LocalRendezvous() if local else None
        if embedded is not None:
            await embedded.start()
        node = await Node.start(
            identity=identity,
            trust=trust,
            host=host,
            port=port,
            config=config,
            rendezvous=embedded.url if embedded is not None else url,
        )
        server = control.ControlServer(node, control.socket_path(directory))
        try:
            await server.start()
            endpoint = node.local_endpoint
            log.info("node %s up on udp %s:%d (state %s)", node.address, endpoint[0], endpoint[1], directory)
            await _until_signalled()
            log.info("shutting down")
        finally:
            await server.close()
            await node.close()
            if embedded is not None:
                await embedded.close()

    _run(run())


@app.command("ping")
def ping_command(
    target: Annotated[str, typer.Argument(metavar="ADDR[@HOST:PORT]", help="The peer, and where to reach it.")],
    count: Annotated[int, typer.Option("--count", "-c", min=1, max=100000, help="How many pings.")] = 4,
    interval: Annotated[float, typer.Option("--interval", "-i", min=0.0, help="Seconds between pings.")] = 1.0,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each pong.")] = 5.0,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Round trips to a peer through the overlay, with the path each took."""
    text, _, via = target.partition("@")
    address = _peer_address(text)
    if via:
        try:
            parse_endpoint(via)
        except ValueError as exc:
            fail(str(exc), 2)
    request: dict[str, Any] = {"op": "ping", "address": str(address), "via": via or None, "count": count}
    request |= {"interval": interval, "timeout": timeout}
    replies: list[dict[str, Any]] = []

    async def run() -> None:
        async for answer in control.call(_state_dir(state_dir), request):
            replies.append(answer)
            if not json_out:
                if answer.get("timeout"):
                    typer.echo(f"seq={answer['seq']} timeout")
                else:
                    typer.echo(
                        f"pong from {address} via {answer['path']}: seq={answer['seq']} time={answer['rtt_ms']} ms"
                    )

    _run(run())
    rtts = [r["rtt_ms"] for r in replies if "rtt_ms" in r]
    summary = {"address": str(address), "sent": len(replies), "received": len(rtts), "replies": replies}
    if rtts:
        summary |= {"rtt_min_ms": min(rtts), "rtt_avg_ms": round(sum(rtts) / len(rtts), 3), "rtt_max_ms": max(rtts)}
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        loss = 100 * (1 - len(rtts) / max(1, len(replies)))
        line = f"{len(replies)} sent, {len(rtts)} received, {loss:.0f}% loss"
        if rtts:
            line += f", rtt min/avg/max {summary['rtt_min_ms']}/{summary['rtt_avg_ms']}/{summary['rtt_max_ms']} ms"
        typer.echo(line)
    if not rtts:
        raise typer.Exit(1)


@app.command("status")
def status_command(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """Show the running node: its address and every session with its path, RTT and bytes."""

    async def run() -> dict[str, Any]:
        async for answer in control.call(_state_dir(state_dir), {"op": "status"}):
            return answer
        raise errors.LocalError("the node sent no status")

    status = _run(run())
    if json_out:
        typer.echo(json.dumps(status))
        return
    # Addresses are copied from this output: never wrap or truncate them.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    tcp = f", tcp port {status['tcp_port']}" if status.get("tcp_port") else ""
    console.print(f"address   {status['address']}\nendpoint  udp {status['endpoint']}{tcp}")
    mapping = status.get("port_mapping") or {}
    if mapping.get("udp"):
        mapped = [f"{proto} {mapping[proto]['external']}" for proto in ("udp", "tcp") if mapping.get(proto)]
        method = mapping["udp"]["method"].upper()
        console.print(f"mapped    {', '.join(mapped)} by {method} on the router {mapping['gateway']}")
    rendezvous = status.get("rendezvous")
    if rendezvous:
        state = f"registered, seen from {rendezvous['observed']}" if rendezvous["registered"] else "not registered"
        if not rendezvous["registered"] and rendezvous["last_error"]:
            state += f" ({rendezvous['last_error']})"
        console.print(f"rendezvous {rendezvous['url']}: {state}")
    if not status["sessions"]:
        console.print("no sessions")
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("peer", no_wrap=True, min_width=35)
    for name in ("role", "path", "rtt", "sent", "received"):
        table.add_column(name, no_wrap=True)
    for session in status["sessions"]:
        rtt = f"{session['rtt_ms']} ms" if session["rtt_ms"] is not None else "-"
        table.add_row(
            session["peer"] or "(authenticating)",
            session["role"],
            session["path"] or "-",
            rtt,
            _bytes(session["bytes_sent"]),
            _bytes(session["bytes_received"]),
        )
    console.print(table)
    for session in status["sessions"]:
        for path in session.get("paths", []):
            heard = f"heard {path['heard_s_ago']} s ago" if path["heard_s_ago"] is not None else "not heard yet"
            rtt = f", rtt {path['rtt_ms']} ms" if path.get("rtt_ms") is not None else ""
            loss = f", probe loss {path['loss']:.0%}" if path["loss"] is not None else ""
            if path.get("recent_loss") is not None:
                loss += f" (recent {path['recent_loss']:.0%})"
            aside = f"; set aside: {path['degraded']}" if path.get("degraded") else ""
            sent, received = _bytes(path["bytes_sent"]), _bytes(path["bytes_received"])
            console.print(
                f"  {path['path']}: up {path['age_s']} s, {heard}{rtt}, {sent} out / {received} in{loss}{aside}"
            )
        if session.get("relay_reason"):
            console.print(f"{session['peer']} stays on the relay: {session['relay_reason']}")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@trust_app.command("add")
def trust_add(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer's address.")],
    note: Annotated[str, typer.Option("--note", help="A note to remember the peer by.")] = "",
    state_dir: StateDir = None,
) -> None:
    """Trust a peer: accept its sessions and allow connecting to it."""
    peer = _peer_address(address)
    directory = _state_dir(state_dir)
    if peer == _identity(directory).address:
        fail("that is this node's own address", 2)
    added = _trust_store(directory).add(peer, note)
    typer.echo(f"trusted {peer}" if added else f"{peer} was trusted already")


@trust_app.command("remove")
def trust_remove(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer's address.")],
    state_dir: StateDir = None,
) -> None:
    """Stop trusting a peer (new sessions are refused; open ones stay until they close)."""
    peer = _peer_address(address)
    if not _trust_store(_state_dir(state_dir)).remove(peer):
        fail(f"{peer} is not trusted")
    typer.echo(f"no longer trusting {peer}")


def _daemon_call(state_dir: Path | None, request: dict[str, Any]) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return [answer async for answer in control.call(_state_dir(state_dir), request)]

    return _run(run())


@trust_app.command("request")
def trust_request(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer to ask.")],
    note: Annotated[str, typer.Option("--note", help="Who you are, for the peer to decide.")] = "",
    state_dir: StateDir = None,
) -> None:
    """Ask a peer to trust this node; delivered through the rendezvous, even if the peer is offline now."""
    peer = _peer_address(address)
    if len(note) > 1000:
        fail("--note is limited to 1000 characters", 2)
    _daemon_call(state_dir, {"op": "trust-request", "address": str(peer), "note": note})
    typer.echo(f"asked {peer} to trust this node; it is trusted back when it approves")


#: Code points a stranger's text must not send to the terminal as they are: bidirectional marks,
#: embeddings, overrides (U+202A-U+202E) and isolates (U+2066-U+2069), and line and paragraph separators.
_UNSAFE_FORMATTING = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")


def _printable(text: str) -> str:
    """``text`` safe to print: C0 and C1 controls and DEL (so escape sequences, newlines and tabs too),
    bidi controls, separators and lone surrogates are shown as visible escapes such as ``\\x1b``."""

    def shown(char: str) -> str:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"\\x{code:02x}"
        if char in _UNSAFE_FORMATTING or 0xD800 <= code <= 0xDFFF:
            return f"\\u{code:04x}"
        return char

    return "".join(shown(char) for char in text)


@trust_app.command("pending")
def trust_pending(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """List trust requests waiting for your answer."""
    pending = _daemon_call(state_dir, {"op": "trust-pending"})
    if json_out:
        typer.echo(json.dumps(pending))
        return
    if not pending:
        typer.echo("no pending trust requests")
        return
    for item in pending:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(item["created"]))
        typer.echo(f"{_printable(str(item['address']))}  {when}  {_printable(str(item['note']))}".rstrip())


@trust_app.command("approve")
def trust_approve(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer that asked.")],
    state_dir: StateDir = None,
) -> None:
    """Trust a peer that asked, and tell it so (it then trusts this node too)."""
    peer = _peer_address(address)
    _daemon_call(state_dir, {"op": "trust-approve", "address": str(peer)})
    typer.echo(f"trusted {peer} and sent the approval")


@trust_app.command("deny")
def trust_deny(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The peer that asked.")],
    state_dir: StateDir = None,
) -> None:
    """Drop a pending trust request without trusting the peer."""
    peer = _peer_address(address)
    _daemon_call(state_dir, {"op": "trust-deny", "address": str(peer)})
    typer.echo(f"denied {peer}")


@trust_app.command("list")
def trust_list(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """List trusted peers."""
    entries = _trust_store(_state_dir(state_dir)).entries()
    if json_out:
        typer.echo(json.dumps([{"address": str(e.address), "note": e.note, "added": e.added} for e in entries]))
        return
    if not entries:
        typer.echo("no trusted peers (add one with: peerpath trust add ADDR)")
        return
    for entry in entries:
        typer.echo(f"{entry.address}  {entry.added}  {entry.note}".rstrip())


@app.command("demo")
def demo_command(
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo's state directories.")] = False,
) -> None:
    """Two agents on this machine find each other through the embedded rendezvous and talk.

    Everything is real: identities, trust stores, the local rendezvous and relay, and an
    authenticated, encrypted session between the two nodes.
    """
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    root = Path(tempfile.mkdtemp(prefix="peerpath-demo-"))
    console = Console(highlight=False, soft_wrap=True)
    if not _state["debug"]:
        logging.getLogger("peerpath").setLevel(logging.WARNING)

    async def run() -> None:
        embedded = LocalRendezvous(root / "rendezvous", port=_free_tcp_port())
        await embedded.start()
        console.print(f"rendezvous  {embedded.url} (embedded, this process)")
        alice = await Node.start(root / "alice", host="127.0.0.1", rendezvous=embedded.url)
        bob = await Node.start(root / "bob", host="127.0.0.1", rendezvous=embedded.url)
        try:
            console.print(f"alice       {alice.address}\nbob         {bob.address}")
            alice.trust.add(bob.address, "demo")
            bob.trust.add(alice.address, "demo")
            console.print("alice and bob trust each other")

            async def greet(conn: Any, data: bytes) -> bytes:
                return b"hello alice, this is bob (you said: " + data + b")"

            async def echo(reader: asyncio.StreamReader, writer: Any) -> None:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.close()

            bob.on_message(greet)
            alice.serve(80, echo)
            for node in (alice, bob):
                if node.rendezvous is not None:
                    await node.rendezvous.wait_registered(10)
            start = time.perf_counter()
            conn = await alice.connect(bob.address)
            reply = await conn.request(b"hi bob")
            took = (time.perf_counter() - start) * 1000
            path = conn.path.describe() if conn.path else "?"
            console.print(f"alice -> bob  request: {reply.decode()!r}  via {path}, {took:.1f} ms from connect()")
            back = bob.connection_to(alice.address)
            if back is None:
                raise errors.SessionClosedError("bob lost the session with alice")
            payload = os.urandom(1 << 20)
            start = time.perf_counter()
            reader, writer = await back.open_stream(80)
            writer.write(payload)
            writer.write_eof()
            echoed = await reader.read()
            took = (time.perf_counter() - start) * 1000
            verdict = "intact" if echoed == payload else "CORRUPTED"
            console.print(f"bob -> alice  stream to port 80: 1 MiB echoed {verdict} in {took:.0f} ms")
            # Meanwhile the nodes punch a direct path beside the relay and move the session to it.
            for _ in range(60):
                if conn.path is not None and conn.path.kind is not PathKind.RELAY:
                    break
                await asyncio.sleep(0.05)
            path = conn.path.describe() if conn.path else "?"
            reply = await conn.request(b"still there?")
            rtt = conn.rtt * 1000 if conn.rtt else 0.0
            console.print(f"alice -> bob  request: {reply.decode()!r}  via {path}")
            console.print(f"session       {path}, rtt {rtt:.2f} ms, both sides authenticated, end-to-end encrypted")
        finally:
            await alice.close()
            await bob.close()
            await embedded.close()

    try:
        _run(run())
    finally:
        if keep:
            console.print(f"state kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    """Entry point of the ``peerpath`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
