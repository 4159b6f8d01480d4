"""Tunnels on loopback: real servers (uvicorn, plain TCP) behind `expose`, real clients (curl,
`peerpath connect`) in front of `forward`, two nodes and a rendezvous in between."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn

from peerpath import errors
from peerpath.identity import Identity
from peerpath.node import control
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.server import RendezvousServer
from peerpath.tunnels.registry import Exposure, Forward, Registry, parse_bind
from peerpath.tunnels.runtime import Tunnels
from peerpath.tunnels.services import ServiceError, service_port, split_target

from .conftest import eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Side:
    """A node with its state directory and tunnels."""

    def __init__(self, node: Node, state: Path) -> None:
        self.node, self.state, self.tunnels = node, state, Tunnels(node, state)
        self.registry = Registry.load(state)

    async def apply(self) -> dict[str, str]:
        self.registry.save()
        return await self.tunnels.reload()


@pytest.fixture
async def sides(tmp_path: Path) -> AsyncIterator[tuple[Side, Side]]:
    server = RendezvousServer(Identity.generate(), tmp_path / "server")
    await server.start(["127.0.0.1"], 0)
    made: list[Side] = []
    try:
        for name in ("client", "service"):
            state = tmp_path / name
            state.mkdir()
            node = await Node.start(
                identity=Identity.generate(),
                trust=TrustStore(state / "trust.json"),
                host="127.0.0.1",
                rendezvous=server.url(),
                direct=False,
            )
            assert node.rendezvous is not None
            await node.rendezvous.wait_registered(5)
            made.append(Side(node, state))
        client, service = made
        client.node.trust.add(service.node.address)
        service.node.trust.add(client.node.address)
        yield client, service
    finally:
        for side in made:
            await side.tunnels.close()
            await side.node.close()
        await server.close()


async def app(scope, receive, send) -> None:  # a small ASGI app: GET echoes the path, POST the body's digest
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    reply = hashlib.sha256(body).hexdigest().encode() if scope["method"] == "POST" else scope["path"].encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": reply})


@pytest.fixture
async def web() -> AsyncIterator[int]:
    """A real HTTP server (uvicorn) on a loopback port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    await eventually(lambda: server.started)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def forward_to(client: Side, service: Side, name: str) -> int:
    local = free_port()
    client.registry.forward(Forward(f"127.0.0.1:{local}", str(service.node.address), name))
    assert await client.apply() == {}
    return local


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out, err


async def test_curl_reaches_an_http_server_through_expose_and_forward(sides, web) -> None:
    client, service = sides
    service.registry.expose(Exposure("web", 80, f"127.0.0.1:{web}"))
    await service.apply()
    local = await forward_to(client, service, "web")
    code, out, err = await curl(f"http://127.0.0.1:{local}/hello/agents")
    assert code == 0 and out == b"/hello/agents", err
    body = os.urandom(1 << 20)
    path = service.state / "body.bin"
    path.write_bytes(body)
    code, out, err = await curl("--data-binary", f"@{path}", f"http://127.0.0.1:{local}/upload")
    assert code == 0 and out.decode() == hashlib.sha256(body).hexdigest(), err
    # Keep-alive: several requests on one connection.
    urls = [f"http://127.0.0.1:{local}/{i}" for i in range(5)]
    code, out, err = await curl(*urls)
    assert code == 0 and out == b"".join(f"/{i}".encode() for i in range(5)), err
    assert service.tunnels.counters["streams_served"] >= 3


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def tcp_server(handler) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=2048)
    return server, int(server.sockets[0].getsockname()[1])


async def test_a_half_close_ends_one_direction_only(sides) -> None:
    """`ssh host cmd < file`: the client sends, shuts its sending side, and still reads the answer."""

    async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF
        writer.write(f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode())
        await writer.drain()
        writer.close()

    client, service = sides
    server, port = await tcp_server(count_then_answer)
    async with server:
        service.registry.expose(Exposure("counter", service_port("counter"), f"127.0.0.1:{port}"))
        await service.apply()
        local = await forward_to(client, service, "counter")
        reader, writer = await asyncio.open_connection("127.0.0.1", local)
        data = os.urandom(300_000)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 20)
        assert answer.decode() == f"{len(data)} {hashlib.sha256(data).hexdigest()}"
        writer.close()


async def test_unknown_services_and_peers_not_allowed_are_refused_at_once_with_a_reason(sides) -> None:
    client, service = sides
    service.registry.expose(Exposure("private", 7001, "127.0.0.1:9", allow=(str(Identity.generate().address),)))
    await service.apply()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(errors.ServiceNotFoundError, match="no service on port"):
        await client.tunnels.open(str(service.node.address), "nosuch")
    with pytest.raises(errors.ServiceNotFoundError, match="not open to"):
        await client.tunnels.open(str(service.node.address), "7001")
    assert loop.time() - start < 5  # answers, not timeouts


async def test_a_target_that_is_down_resets_the_forwarded_connection(sides) -> None:
    client, service = sides
    service.registry.expose(Exposure("down", 7002, f"127.0.0.1:{free_port()}"))  # nothing listens there
    await service.apply()
    local = await forward_to(client, service, "7002")
    reader, writer = await asyncio.open_connection("127.0.0.1", local)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 10)
    writer.close()
    await eventually(lambda: service.tunnels.counters["target_unreachable"] == 1)
    # Through the Python API the reset says why.
    stream_reader, _ = await client.tunnels.open(str(service.node.address), "7002")
    with pytest.raises(errors.StreamResetError, match="could not reach its target"):
        await asyncio.wait_for(stream_reader.read(), 10)


async def test_a_thousand_connections_share_one_session(sides) -> None:
    client, service = sides
    server, port = await tcp_server(echo)
    async with server:
        service.registry.expose(Exposure("echo", 7003, f"127.0.0.1:{port}"))
        await service.apply()
        local = await forward_to(client, service, "7003")

        async def one(i: int) -> bool:
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            payload = f"connection {i} ".encode() * 50
            writer.write(payload)
            writer.write_eof()
            got = await reader.read()
            writer.close()
            return got == payload

        results = await asyncio.gather(*(one(i) for i in range(1000)))
        assert all(results)
        assert len(client.node.connections) == 1  # one session carried them all


async def test_peerpath_connect_joins_stdin_and_stdout_to_a_service(sides, tmp_path: Path) -> None:
    """The OpenSSH ProxyCommand case: a separate process, standard input and output, the
    running node's control socket in between; EOF on stdin is passed on as a half-close."""

    async def shout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    client, service = sides
    server, port = await tcp_server(shout)
    daemon = control.ControlServer(client.node, control.socket_path(client.state), client.tunnels)
    await daemon.start()
    async with server:
        service.registry.expose(Exposure("shout", 7004, f"127.0.0.1:{port}"))
        await service.apply()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "peerpath", "connect", f"{service.node.address}:7004",
                "--state-dir", str(client.state),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(b"hello through the overlay\n"), 30)
            assert proc.returncode == 0, err
            assert out == b"HELLO THROUGH THE OVERLAY\n"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "peerpath", "connect", f"{service.node.address}:nosuch",
                "--state-dir", str(client.state),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(b""), 30)
            assert proc.returncode == 1 and b"no service on port" in err, err
        finally:
            await daemon.close()


def test_service_names_map_to_ports_both_ends_agree_on() -> None:
    assert service_port("ssh") == 22 and service_port("web") == 80 and service_port("8080") == 8080
    derived = service_port("planner-api")
    assert 49152 <= derived <= 65535 and derived == service_port("planner-api")
    assert split_target("pp1abc") == ("pp1abc", "web") and split_target("pp1abc:ssh") == ("pp1abc", "ssh")
    for bad in ("Bad_Name", "0start", "x" * 40, "99999", "0"):
        with pytest.raises(ServiceError):
            service_port(bad)
    assert parse_bind("8080") == "127.0.0.1:8080" and parse_bind("0.0.0.0:80") == "0.0.0.0:80"
    with pytest.raises(ServiceError):
        parse_bind("99999")


def test_the_registry_refuses_a_second_service_on_one_port_and_survives_a_reload(tmp_path: Path) -> None:
    registry = Registry.load(tmp_path)
    registry.expose(Exposure("web", 80, "127.0.0.1:8000"))
    with pytest.raises(ServiceError, match="'web''s already"):
        registry.expose(Exposure("www", 80, "127.0.0.1:8001"))
    registry.expose(Exposure("db", 5432, "/run/postgresql/.s.PGSQL.5432", allow=(str(Identity.generate().address),)))
    registry.save()
    assert oct((tmp_path / "tunnels.json").stat().st_mode & 0o777) == "0o600"
    again = Registry.load(tmp_path)
    assert again.exposures == registry.exposures
    (tmp_path / "tunnels.json").write_text(json.dumps({"expose": [{"name": "x"}]}))
    with pytest.raises(ServiceError, match="malformed"):
        Registry.load(tmp_path)


def test_the_ports_of_built_in_services_cannot_be_exposed() -> None:
    for port, service in [(1001, "messages"), (1002, "pubsub"), (1003, "tasks"), (1004, "files")]:
        with pytest.raises(ServiceError, match=f"belongs to peerpath's own {service} service"):
            Exposure("mine", port, "127.0.0.1:8000").check()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["expose", "not-an-endpoint"], "bad target"),
        (["expose", "127.0.0.1:8000", "--name", "Bad_Name"], "bad service name"),
        (["expose", "127.0.0.1:8000", "--allow", "pp1notanaddress"], ""),
        (["forward", "99999", "pp1x"], "bad local port"),
        (["forward", "8080"], "give [BIND:]LOCALPORT and PEER[:SERVICE]"),
        (["connect", "pp1abc:Bad_Name"], "bad service name"),
    ],
)
def test_bad_tunnel_arguments_get_a_clear_message_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "peerpath", *args, "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("peerpath: ") and message in proc.stderr, proc.stderr
    assert not (tmp_path / "tunnels.json").exists()


async def test_the_gateway_puts_each_trusted_peer_at_its_own_loopback_address(sides) -> None:
    from peerpath.tunnels.gateway import GatewayConfig, derived_address, hosts_fragment

    client, service = sides
    server, port = await tcp_server(echo)
    async with server:
        service.registry.expose(Exposure("echo", 7005, f"127.0.0.1:{port}"))
        await service.apply()
        config = GatewayConfig.load(client.state)
        config.enabled, config.ports = True, (7005, 7006)
        config.save()
        assert await client.tunnels.reload() == {}
        ip = GatewayConfig.load(client.state).addresses[str(service.node.address)]
        assert ip == derived_address(service.node.address) and ip.startswith("127.") and not ip.startswith("127.0.0.")
        reader, writer = await asyncio.open_connection(ip, 7005)  # an unmodified client
        writer.write(b"through the gateway")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 20) == b"through the gateway"
        writer.close()
        reader, writer = await asyncio.open_connection(ip, 7006)  # a port the peer does not serve: reset
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 10)
        writer.close()
        fragment = hosts_fragment({str(service.node.address): ip}, {str(service.node.address): "Planner"})
        assert f"{ip}\t{service.node.address} planner\n" in fragment
        config = GatewayConfig.load(client.state)
        config.enabled = False
        config.save()
        await client.tunnels.reload()
        with pytest.raises(OSError):
            await asyncio.open_connection(ip, 7005)


def test_gateway_addresses_stay_put_and_collisions_take_the_next_one(tmp_path: Path) -> None:
    from peerpath.tunnels.gateway import GatewayConfig, derived_address

    one, two, earlier = (Identity.generate().address for _ in range(3))
    config = GatewayConfig(tmp_path / "gateway.json")
    config.addresses[str(earlier)] = derived_address(two)  # already given out
    assigned = config.assign([one, two])
    assert assigned[str(one)] == derived_address(one)
    assert assigned[str(two)] == derived_address(two, 1)  # the next free one
    config.save()
    assert GatewayConfig.load(tmp_path).addresses == assigned


async def test_a_stream_reset_while_the_peer_still_sends_leaves_the_session_alive(sides) -> None:
    """Regression: a stream the service side reset was forgotten at once, so the opener's
    data still in flight looked like a new stream whose header was garbage, and the whole
    session was closed as a protocol error."""

    async def refuse(reader: asyncio.StreamReader, writer) -> None:
        await reader.readexactly(10)
        writer.abort()  # like a target that resets the connection

    client, service = sides
    service.node.serve(7020, refuse)
    conn = await client.node.connect(service.node.address)
    reader, writer = await conn.open_stream(7020)
    with pytest.raises(errors.StreamResetError):
        for _ in range(200):  # keep sending while the reset travels
            writer.write(os.urandom(16384))
            await writer.drain()
        await asyncio.wait_for(reader.read(), 10)
    assert not conn.closed.done()
    assert await conn.ping() > 0  # the session carries on


async def test_a_reader_that_does_not_read_holds_the_writer_and_bounds_its_memory(sides) -> None:
    """Receive credit follows what the application has read: while the service's handler
    does not read, the opener's writes stop at the stream's window, the service holds at
    most that much, and everything arrives once it reads."""
    from peerpath.session.connection import SessionConfig

    window = SessionConfig.max_stream_data
    seen: dict[str, object] = {}
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer) -> None:
        seen["reader"] = reader
        await release.wait()
        data = await reader.read()
        writer.write(hashlib.sha256(data).hexdigest().encode())
        writer.close()

    client, service = sides
    service.node.serve(7031, slow)
    conn = await client.node.connect(service.node.address)
    reader, writer = await conn.open_stream(7031)
    payload = os.urandom(6 * window)

    async def send() -> None:
        for i in range(0, len(payload), 1 << 16):
            writer.write(payload[i : i + (1 << 16)])
            await writer.drain()
        writer.write_eof()

    sending = asyncio.ensure_future(send())
    await asyncio.sleep(3.0)
    held = len(seen["reader"]._buffer)  # type: ignore[attr-defined]
    assert not sending.done()  # the writer is held
    assert 0 < held <= window + 65536  # at most the window (and a packet)
    release.set()
    await asyncio.wait_for(sending, 60)
    assert (await asyncio.wait_for(reader.read(), 60)).decode() == hashlib.sha256(payload).hexdigest()


def test_a_tunnels_file_written_before_exec_services_loads_and_is_written_back_the_same(tmp_path: Path) -> None:
    peer = str(Identity.generate().address)
    before = {
        "expose": [
            {"name": "web", "port": 80, "target": "127.0.0.1:8000", "allow": None},
            {"name": "db", "port": 5432, "target": "/run/postgresql/.s.PGSQL.5432", "allow": [peer]},
        ],
        "forward": [{"bind": "127.0.0.1:9000", "peer": peer, "service": "web"}],
    }
    (tmp_path / "tunnels.json").write_text(json.dumps(before))
    registry = Registry.load(tmp_path)
    assert [(e.target, e.command, e.leads_to) for e in registry.exposures.values()] == [
        ("127.0.0.1:8000", None, "127.0.0.1:8000"),
        ("/run/postgresql/.s.PGSQL.5432", None, "/run/postgresql/.s.PGSQL.5432"),
    ]
    registry.save()
    assert json.loads((tmp_path / "tunnels.json").read_text()) == before
