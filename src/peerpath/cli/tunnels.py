"""``peerpath expose``, ``forward``, ``connect`` and ``gateway``: TCP services (and programs run
per stream) through the overlay.

``expose`` and ``forward`` edit the state directory's tunnels.json and tell a running node
to follow it (``peerpath up`` starts from it too); ``connect`` joins standard input and
output to a stream through the running node (an OpenSSH ProxyCommand).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import stat
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from peerpath.cli.app import app
from peerpath.cli.common import JsonOption, StateDir, fail, open_trust_store, parse_peer, resolve_state_dir, run_command
from peerpath.node import control
from peerpath.tunnels.gateway import DEFAULT_PORTS, GatewayConfig, check_ports, hosts_fragment
from peerpath.tunnels.registry import Exposure, Forward, Registry, check_command, parse_bind
from peerpath.tunnels.services import Destination, ServiceError, check_name, service_port, split_target


def _registry(state_dir: Path) -> Registry:
    try:
        return Registry.load(state_dir)
    except ServiceError as exc:
        fail(str(exc))


def _save(registry: Registry) -> None:
    try:
        registry.save()
    except OSError as exc:
        fail(f"cannot write {registry.path}: {exc.strerror or exc}")


def _reload(state_dir: Path) -> dict[str, str] | None:
    """Tell the running node to follow tunnels.json; what failed (None: no node is running)."""

    async def run() -> dict[str, str] | None:
        try:
            async for answer in control.call(state_dir, {"op": "tunnels-reload"}):
                return dict(answer.get("errors") or {})
        except control.ControlError as exc:
            if "no node is running" in str(exc):
                return None
            raise
        return {}

    return run_command(run())


def _applied(state_dir: Path, what: str, json_out: bool, entry: dict[str, Any], key: str) -> None:
    failures = _reload(state_dir)
    if failures and key in failures:
        fail(failures[key])
    running = failures is not None
    if json_out:
        typer.echo(json.dumps(entry | {"running": running}))
    elif running:
        typer.echo(what)
    else:
        typer.echo(f"{what} (saved: it starts with peerpath up)")


@app.command("expose")
def expose_command(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="TARGET | COMMAND [ARGS]",
            help="HOST:PORT or a Unix socket path the service's streams connect to; with --exec, the program to run.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="The name peers ask for (ssh, web, grpc...) [default: web].")
    ] = None,
    exec_name: Annotated[
        str | None,
        typer.Option(
            "--exec",
            metavar="NAME",
            help="Serve NAME by running COMMAND (given after --) for each stream, joined to its stdin and stdout.",
        ),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=1, max=65535, help="Overlay port [default: the name's].")
    ] = None,
    allow: Annotated[
        list[str],
        typer.Option("--allow", metavar="PEER|all", help="Only these trusted peers; repeatable [default: all]."),
    ] = [],  # noqa: B006  (typer reads the default, never mutates it)
    list_: Annotated[bool, typer.Option("--list", help="List the exposed services.")] = False,
    remove: Annotated[str | None, typer.Option("--remove", metavar="NAME", help="Stop exposing NAME.")] = None,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Expose a local TCP service (or Unix socket), or a program run per stream, to trusted peers under a name.

    With --exec NAME -- COMMAND [ARGS], each stream a peer opens to NAME runs COMMAND (in this directory) with
    its standard input and output joined to the stream, e.g. a stdio MCP server that peers reach with
    peerpath connect PEER:NAME. Streams already open go on after --remove.
    """
    directory = resolve_state_dir(state_dir)
    registry = _registry(directory)
    if list_:
        _list_exposures(registry, json_out)
        return
    if remove is not None:
        try:
            gone = registry.unexpose(remove)
        except ServiceError as exc:
            fail(str(exc))
        _save(registry)
        _applied(directory, f"no longer exposing {gone.name}", json_out, {"removed": gone.name}, gone.name)
        return
    try:
        target, command, cwd = _what_to_expose(args or [], exec_name, name)
        service = check_name(exec_name or name or "web")
        overlay_port = port if port is not None else service_port(service)
        allowed = None if not allow or "all" in allow else tuple(str(parse_peer(a)) for a in allow)
        exposure = Exposure(service, overlay_port, target, allowed, command, cwd)
        registry.expose(exposure)
    except ServiceError as exc:
        fail(str(exc), 2)
    _save(registry)
    who = "every trusted peer" if allowed is None else ", ".join(allowed)
    what = "running " + shlex.join(command) + " for each stream" if command else f"exposing {target}"
    line = f"{what} as {service} (overlay port {overlay_port}) to {who}"
    _applied(directory, line, json_out, _shown(exposure), service)


def _what_to_expose(
    args: list[str], exec_name: str | None, name: str | None
) -> tuple[str | None, tuple[str, ...] | None, str | None]:
    """The target, or the command (checked: it can be found) and the directory it runs in."""
    if exec_name is None:
        if len(args) != 1:
            raise ServiceError(
                "give one TARGET (HOST:PORT or a Unix socket path), or --exec NAME -- COMMAND [ARGS], "
                "or --list or --remove NAME"
            )
        return args[0], None, None
    if name is not None:
        raise ServiceError("--exec NAME names the service already; leave out --name")
    command = check_command(args)
    if _looks_like_a_target(command[0]):
        raise ServiceError(
            f"give either a TARGET or --exec NAME -- COMMAND, not both ({command[0]!r} is a target, not a program)"
        )
    cwd = os.getcwd()
    if not _runnable(command[0], cwd):
        where = f"in {cwd}" if os.sep in command[0] else "on PATH"
        raise ServiceError(f"no program {command[0]!r} {where}; give the command after --, e.g. -- python server.py")
    return None, command, cwd


def _runnable(program: str, cwd: str) -> bool:
    """Whether ``program`` can be run from ``cwd``: a path (relative to it) or a name on PATH."""
    if os.sep not in program:
        return shutil.which(program) is not None
    path = os.path.join(cwd, program)
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _looks_like_a_target(text: str) -> bool:
    """Whether a would-be program is rather a tunnel's TARGET: HOST:PORT, or a Unix socket."""
    with contextlib.suppress(ServiceError):
        if Destination.parse(text).endpoint is not None:
            return True
    with contextlib.suppress(OSError):
        return stat.S_ISSOCK(os.stat(text).st_mode)
    return False


def _shown(exposure: Exposure) -> dict[str, Any]:
    """An exposure as ``--json`` shows it (``allow`` is "trusted" for every trusted peer)."""
    return exposure.describe() | {"allow": list(exposure.allow) if exposure.allow else "trusted"}


def _list_exposures(registry: Registry, json_out: bool) -> None:
    items = [_shown(e) for e in registry.exposures.values()]
    if json_out:
        typer.echo(json.dumps(items))
        return
    if not items:
        typer.echo("no exposed services (expose one with: peerpath expose HOST:PORT --name NAME)")
    for exposure in registry.exposures.values():
        peers = "every trusted peer" if exposure.allow is None else ", ".join(exposure.allow)
        typer.echo(f"{exposure.name:<12} port {exposure.port:<5} -> {exposure.leads_to}  ({peers})")


@app.command("forward")
def forward_command(
    local: Annotated[
        str | None, typer.Argument(metavar="[BIND:]LOCALPORT", help="Where to listen (default bind 127.0.0.1).")
    ] = None,
    target: Annotated[
        str | None, typer.Argument(metavar="PEER[:SERVICE]", help="The peer and its service [default: web].")
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the forwards.")] = False,
    remove: Annotated[
        str | None, typer.Option("--remove", metavar="[BIND:]LOCALPORT", help="Stop forwarding that port.")
    ] = None,
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Listen on a local port; each connection becomes a stream to a peer's service."""
    directory = resolve_state_dir(state_dir)
    registry = _registry(directory)
    if list_:
        items = [f.__dict__ for f in registry.forwards.values()]
        if json_out:
            typer.echo(json.dumps(items))
        elif not items:
            typer.echo("no forwards (add one with: peerpath forward 8080 PEER:web)")
        for item in [] if json_out else items:
            typer.echo(f"{item['bind']:<22} -> {item['peer']}:{item['service']}")
        return
    try:
        if remove is not None:
            gone = registry.unforward(parse_bind(remove))
            _save(registry)
            _applied(directory, f"no longer forwarding {gone.bind}", json_out, {"removed": gone.bind}, gone.bind)
            return
        if local is None or target is None:
            fail("give [BIND:]LOCALPORT and PEER[:SERVICE], or --list or --remove [BIND:]LOCALPORT", 2)
        peer, service = split_target(target)
        forward = Forward(parse_bind(local), str(parse_peer(peer)), service)
        registry.forward(forward)
    except ServiceError as exc:
        fail(str(exc), 2)
    _save(registry)
    line = f"forwarding {forward.bind} to {forward.peer}:{forward.service} (overlay port {service_port(service)})"
    failures = _reload(directory)
    if failures and forward.bind in failures:
        registry.unforward(forward.bind)  # it cannot listen: do not keep it
        _save(registry)
        fail(failures[forward.bind])
    if json_out:
        typer.echo(json.dumps(forward.__dict__ | {"running": failures is not None}))
    else:
        typer.echo(line if failures is not None else f"{line} (saved: it starts with peerpath up)")


@app.command("connect")
def connect_command(
    target: Annotated[str, typer.Argument(metavar="PEER[:SERVICE]", help="The peer and its service [default: web].")],
    state_dir: StateDir = None,
) -> None:
    """Join standard input and output to a peer's service, netcat style.

    For OpenSSH: ssh -o ProxyCommand='peerpath connect %h:ssh' PEER (scp and rsync -e ssh too).
    """
    try:
        peer, service = split_target(target)
        service_port(service)
    except ServiceError as exc:
        fail(str(exc), 2)
    address = parse_peer(peer)
    run_command(_connect(resolve_state_dir(state_dir), str(address), service))


async def _connect(state_dir: Path, address: str, service: str) -> None:
    reader, writer = await control.open_stream(state_dir, address, service)
    await _pipe_stdio(reader, writer)


async def _pipe_stdio(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Standard input to ``writer`` (EOF passed on), ``reader`` to standard output."""
    loop = asyncio.get_running_loop()

    async def upstream() -> None:
        stdin = sys.stdin.buffer
        while data := await loop.run_in_executor(None, os.read, stdin.fileno(), 65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def downstream() -> None:
        out = sys.stdout.buffer
        while data := await reader.read(65536):
            out.write(data)
            out.flush()

    up = asyncio.ensure_future(upstream())
    try:
        await downstream()  # the peer's side ending ends the command
    finally:
        up.cancel()
        with contextlib.suppress(BaseException):
            await up
        writer.close()


gateway_app = typer.Typer(
    help="Every trusted peer at a loopback address of its own (127.x.y.z), on its service ports.",
    no_args_is_help=True,
)
app.add_typer(gateway_app, name="gateway")


def _gateway_config(state_dir: Path) -> GatewayConfig:
    try:
        return GatewayConfig.load(state_dir)
    except ServiceError as exc:
        fail(str(exc))


def _peers_and_notes(state_dir: Path) -> tuple[list[Any], dict[str, str]]:
    entries = open_trust_store(state_dir).entries()
    return [e.address for e in entries], {str(e.address): e.note for e in entries}


@gateway_app.command("on")
def gateway_on(
    port: Annotated[
        list[int],
        typer.Option("--port", min=1, max=65535, help="A port to listen on for every peer; repeatable."),
    ] = [],  # noqa: B006  (typer reads the default, never mutates it)
    state_dir: StateDir = None,
    json_out: JsonOption = False,
) -> None:
    """Listen for every trusted peer at its own loopback address, on its service ports.

    The well-known service ports unless --port says otherwise.
    """
    directory = resolve_state_dir(state_dir)
    config = _gateway_config(directory)
    peers, notes = _peers_and_notes(directory)
    try:
        config.ports = check_ports(port) if port else DEFAULT_PORTS
    except ServiceError as exc:
        fail(str(exc), 2)
    config.enabled = True
    addresses = config.assign(peers)
    _save_gateway(config)
    failures = _reload(directory)
    if json_out:
        typer.echo(json.dumps({"addresses": addresses, "ports": list(config.ports), "errors": failures}))
        return
    for peer in peers:
        note = f"  ({notes[str(peer)]})" if notes.get(str(peer)) else ""
        typer.echo(f"{addresses[str(peer)]:<16} {peer}{note}")
    typer.echo(f"ports {', '.join(map(str, config.ports))}")
    if failures is None:
        typer.echo("(saved: the gateway starts with peerpath up)")
    for where, why in sorted((failures or {}).items()):
        typer.echo(f"not listening on {where}: {why}")
    if sys.platform == "darwin":
        typer.echo("macOS: add each address first, e.g. sudo ifconfig lo0 alias 127.1.2.3")


@gateway_app.command("off")
def gateway_off(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """Stop the gateway (the addresses given out are kept for next time)."""
    directory = resolve_state_dir(state_dir)
    config = _gateway_config(directory)
    config.enabled = False
    _save_gateway(config)
    running = _reload(directory) is not None
    typer.echo(json.dumps({"enabled": False, "running": running}) if json_out else "gateway off")


@gateway_app.command("hosts")
def gateway_hosts(state_dir: StateDir = None, json_out: JsonOption = False) -> None:
    """Print a hosts-file fragment naming each peer's gateway address (append it to /etc/hosts)."""
    directory = resolve_state_dir(state_dir)
    config = _gateway_config(directory)
    peers, notes = _peers_and_notes(directory)
    addresses = {p: ip for p, ip in config.assign(peers).items() if p in notes}
    _save_gateway(config)
    if json_out:
        typer.echo(json.dumps([{"ip": ip, "address": p, "note": notes[p]} for p, ip in addresses.items()]))
        return
    typer.echo(hosts_fragment(addresses, notes), nl=False)


def _save_gateway(config: GatewayConfig) -> None:
    try:
        config.save()
    except OSError as exc:
        fail(f"cannot write {config.path}: {exc.strerror or exc}")
