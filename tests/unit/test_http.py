"""peerpath.http: an ASGI app served to peers without a TCP port, reached with httpx."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from peerpath import http

from .test_tunnels import app, sides  # noqa: F401  (the fixture and the app are shared)


async def test_an_asgi_app_served_on_the_overlay_answers_httpx_with_connections_reused(sides) -> None:  # noqa: F811
    client, service = sides
    served = await http.serve(service.node, app, name="web")
    transport = http.Transport(client.node)
    try:
        async with httpx.AsyncClient(transport=transport) as browser:
            base = f"http://{service.node.address}"
            reply = await browser.get(f"{base}/status")
            assert reply.status_code == 200 and reply.text == "/status"
            body = os.urandom(300_000)
            reply = await browser.post(f"{base}/upload", content=body)
            assert reply.text == hashlib.sha256(body).hexdigest()
            for i in range(5):
                assert (await browser.get(f"{base}/{i}")).text == f"/{i}"
            assert len(transport._pool.connections) == 1  # one kept connection carried them all
    finally:
        await served.close()
    assert service.node.stream_handler(80, client.node.address) == "no service on port 80"


async def test_a_peer_is_named_by_its_address_or_the_note_it_was_trusted_under(sides) -> None:  # noqa: F811
    client, service = sides
    client.node.trust.remove(service.node.address)
    client.node.trust.add(service.node.address, "planner")
    served = await http.serve(service.node, app, name="api", port=8080)
    try:
        async with httpx.AsyncClient(transport=http.Transport(client.node)) as browser:
            assert (await browser.get("http://planner:8080/by-name")).text == "/by-name"
            with pytest.raises(httpx.ConnectError, match="neither a peer address nor the note"):
                await browser.get("http://stranger:8080/")
            with pytest.raises(httpx.ConnectError, match="no service on port 81"):
                await browser.get("http://planner:81/")
            with pytest.raises(httpx.UnsupportedProtocol, match="end-to-end encrypted already"):
                await browser.get("https://planner:8080/")
    finally:
        await served.close()
