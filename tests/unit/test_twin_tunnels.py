"""A long-lived, mostly idle tunnelled TCP connection keeps going while its session moves
relay -> direct -> relay (the direct path cut) -> direct, in the lab's twin."""

from __future__ import annotations

import asyncio
from pathlib import Path

from peerpath.net import open_stream, serve_streams
from peerpath.session.pathset import PathKind
from peerpath.testing import vtime
from peerpath.testing.twin import Twin
from peerpath.tunnels.registry import Exposure, Forward, Registry
from peerpath.tunnels.runtime import Tunnels


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_an_idle_tunnelled_connection_survives_every_path_change(tmp_path: Path) -> None:
    async def main() -> list[str]:
        async with Twin(tmp_path) as twin:
            router = twin.router("home", "full-cone")
            one_host, two_host = twin.host(router), twin.host()
            one, two = await twin.node("one", one_host), await twin.node("two", two_host)
            await serve_streams(two_host, echo, two_host.ip, 7000)
            tunnels = []
            for node, name, entry in (
                (two, "two", Exposure("echo", 7000, f"{two_host.ip}:7000")),
                (one, "one", Forward(f"{one_host.ip}:9000", str(two.address), "7000")),
            ):
                state = tmp_path / f"{name}-tunnels"
                state.mkdir()
                registry = Registry.load(state)
                if isinstance(entry, Exposure):
                    registry.expose(entry)
                else:
                    registry.forward(entry)
                registry.save()
                tunnel = Tunnels(node, state)
                assert await tunnel.reload() == {}
                tunnels.append(tunnel)
            reader, writer = await open_stream(one_host, (one_host.ip, 9000))  # an app's TCP connection
            paths = []

            async def exchange(word: bytes) -> None:
                writer.write(word)
                await writer.drain()
                assert await asyncio.wait_for(reader.readexactly(len(word)), 30) == word
                conn = one.connection_to(two.address)
                assert conn is not None and conn.path is not None
                kind = "relay" if conn.path.kind is PathKind.RELAY else conn.path.kind.value
                if not paths or paths[-1] != kind:
                    paths.append(kind)

            await exchange(b"first, over the relay")
            await asyncio.sleep(10)  # idle while the session goes direct
            await exchange(b"now direct")
            twin.net.cut(router.public_ip, two_host.ip)
            await asyncio.sleep(10)  # idle through the cut
            await exchange(b"back on the relay")
            twin.net.heal(router.public_ip, two_host.ip)
            await asyncio.sleep(45)  # idle until the path is direct again (after its hold-down)
            await exchange(b"direct again, same connection")
            writer.close()
            await asyncio.sleep(1)  # the close reaches the echo server, which ends
            for tunnel in tunnels:
                await tunnel.close()
            return paths

    paths = vtime.run(main())
    # The first bytes cross the relay; by the time they are echoed the session may be direct.
    assert paths in (["relay", "direct udp", "relay", "direct udp"], ["direct udp", "relay", "direct udp"]), paths
