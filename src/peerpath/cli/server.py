"""``peerpath server`` and ``peerpath relay``: the rendezvous, relay and STUN servers."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from peerpath.cli.app import app
from peerpath.cli.common import URL_FILE, fail, load_identity, log, parse_rendezvous, run_event_loop, until_signalled
from peerpath.identity import Identity
from peerpath.nat.stun_server import DEFAULT_STUN_PORT, StunServer
from peerpath.node.state import default_state_dir
from peerpath.rendezvous.hub import MAX_WORKERS, Cluster
from peerpath.rendezvous.limits import ServerLimits
from peerpath.rendezvous.server import RendezvousServer
from peerpath.rendezvous.url import DEFAULT_PORT as DEFAULT_RENDEZVOUS_PORT
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.rendezvous.workers import fork_workers, stop_workers
from peerpath.wire.stun import Address

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


Workers = Annotated[
    int,
    typer.Option(
        "--workers",
        min=1,
        max=MAX_WORKERS,
        help="Processes sharing the port, to relay on several cores (one: everything in one process).",
    ),
]


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
    workers: Workers = 1,
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
    identity = load_identity(directory)
    limits = _server_limits(relay_rate, relay_burst, max_agents, max_per_ip)
    relay_urls = [parse_rendezvous(text, "--relay") for text in relay]
    processes = Processes(workers, identity, directory, limits, public_ip)

    async def run() -> None:
        try:
            stun = await StunServer.start(public_ip, stun_port, alternate, tcp=tcp, rate=rate, burst=burst)
        except OSError as exc:
            fail(f"cannot listen: {exc.strerror or exc} (is the address on this host, and the port free?)")
        try:
            stun_endpoints = [f"{ip}:{stun.responder.ports[0]}" for ip in public_ip]
            rendezvous = await _start_rendezvous(
                identity, directory, public_ip, port, wss_port, limits, relay_urls, stun_endpoints, processes
            )
        except BaseException:
            await stun.close()
            raise
        mode = "RFC 5780 behaviour discovery" if stun.responder.full else "single address, no CHANGE-REQUEST"
        log.info("STUN server (%s) listening on %s", mode, ", ".join(stun.listening()))
        try:
            await processes.until_stopped()
        finally:
            await rendezvous.close()
            await stun.close()
            counts = {**stun.responder.counters.as_dict(), **rendezvous.status()["counters"]}
            log.info("stopped; %s", ", ".join(f"{k} {v}" for k, v in counts.items()))

    processes.run(run())


def _server_limits(relay_rate: float, relay_burst: float, max_agents: int, max_per_ip: int) -> ServerLimits:
    """The limits a server or relay enforces, from its command line (docs/security.md lists them all)."""
    return ServerLimits(
        relay_rate=relay_rate,
        relay_burst=max(relay_burst, relay_rate / 10),
        max_agents=max_agents,
        max_connections=max(ServerLimits.max_connections, max_agents * 2),
        max_connections_per_ip=max_per_ip,
    )


class Processes:
    """The server's processes: this one, and with ``--workers N`` N-1 more forked before the
    event loop starts (peerpath.rendezvous.workers), stopped with it."""

    def __init__(self, count: int, identity: Identity, directory: Path, limits: ServerLimits, hosts: list[str]) -> None:
        self.count = count
        self._args = (identity, directory, limits, hosts)
        self._ends: dict[tuple[int, int], socket.socket] = {}
        self._pids: list[int] = []
        self.cluster: Cluster | None = None

    def run(self, main: Coroutine[Any, Any, None]) -> None:
        """Fork the workers, run ``main`` (the hub) on this process's event loop, stop the workers."""
        if self.count > 1:
            self._ends, self._pids = fork_workers(self.count, *self._args, run_loop=run_event_loop)
        try:
            run_event_loop(main)
        finally:
            for sock in self._ends.values():
                sock.close()
            stop_workers(self._pids)

    def make_cluster(self, server: RendezvousServer) -> Cluster | None:
        if self.count == 1:
            return None
        self.cluster = Cluster(server, self.count, self._ends)
        return self.cluster

    async def until_stopped(self) -> None:
        """Until a signal, or a worker is gone (then the whole server stops, for its supervisor
        to start it again: agents reconnect on their own)."""
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(until_signalled())]
        if self.cluster is not None:
            waits.append(asyncio.ensure_future(self.cluster.gone.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if self.cluster is not None and self.cluster.gone.is_set():
            raise SystemExit(1)


async def _start_rendezvous(
    identity: Identity,
    directory: Path,
    public_ip: list[str],
    port: int,
    wss_port: int | None,
    limits: ServerLimits,
    relays: list[RendezvousUrl],
    stun: list[str] | None = None,
    processes: Processes | None = None,
) -> RendezvousServer:
    """Start a rendezvous/relay server, print its URL (and write it to DIR/rendezvous.url)."""
    if wss_port is None:  # 443 where this process may listen on it, else no WebSocket
        try:
            _try_listen(public_ip, 443)
            wss_port = 443
        except OSError as exc:
            log.warning("no WebSocket listener: port 443 is not available (%s); use --wss-port", exc.strerror or exc)
    rendezvous = RendezvousServer(identity, directory, limits=limits, relays=relays, stun=stun)
    cluster = processes.make_cluster(rendezvous) if processes is not None else None
    try:
        await rendezvous.start(public_ip, port, wss_port=wss_port, cluster=cluster)
    except OSError as exc:
        await rendezvous.close()
        also = f" or --wss-port {wss_port}" if wss_port is not None else ""
        fail(f"cannot listen on port {port}{also}: {exc.strerror or exc}")
    url = str(rendezvous.url())
    (directory / URL_FILE).write_text(url + "\n")
    typer.echo(url)
    sys.stdout.flush()
    listeners = [f"tls+udp {h}:{rendezvous.port}" for h in public_ip]
    if rendezvous.wss_port:
        listeners += [f"wss {h}:{rendezvous.wss_port}" for h in public_ip]
    shared = f" ({cluster.count} processes)" if cluster is not None else ""
    log.info("rendezvous and relay on %s%s", ", ".join(listeners), shared)
    return rendezvous


def _try_listen(hosts: list[str], port: int) -> None:
    """Raise OSError unless a TCP socket can listen on ``port`` of every host (then closed)."""
    for host in hosts:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen()


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
    workers: Workers = 1,
) -> None:
    """Run a relay alone; agents near it pick it as their home relay.

    Give its URL to the server: peerpath server --relay URL.
    """
    for ip in public_ip:
        try:
            Address(ip, 0)
        except ValueError:
            fail(f"--public-ip {ip!r} is not an IP address", 2)
    directory = state_dir if state_dir is not None else default_state_dir() / "relay"
    identity = load_identity(directory)
    limits = _server_limits(relay_rate, relay_burst, max_agents, max_per_ip)
    processes = Processes(workers, identity, directory, limits, public_ip)

    async def run() -> None:
        relay = await _start_rendezvous(identity, directory, public_ip, port, wss_port, limits, [], processes=processes)
        try:
            await processes.until_stopped()
        finally:
            await relay.close()
            log.info("stopped; %s", ", ".join(f"{k} {v}" for k, v in relay.status()["counters"].items()))

    processes.run(run())
