"""Real protocols through a forward: gRPC (unary, server streaming, bidirectional streaming,
over HTTP/2) and WebSocket."""

from __future__ import annotations

import asyncio

import grpc
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve

from peerpath.tunnels.registry import Exposure

from .test_tunnels import forward_to, free_port, sides  # noqa: F401  (the fixture is shared)

SERVICE = "peerpath.test.Echo"


def _handlers() -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"re:" + request

    async def server_streaming(request: bytes, context: grpc.aio.ServicerContext):
        for i in range(int(request)):
            yield f"item {i}".encode()

    async def bidi(requests, context: grpc.aio.ServicerContext):
        async for request in requests:
            yield request.upper()

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Items": grpc.unary_stream_rpc_method_handler(server_streaming),
            "Shout": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


async def test_grpc_unary_server_streaming_and_bidirectional_through_a_forward(sides) -> None:  # noqa: F811
    client, service = sides
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        service.registry.expose(Exposure("grpc", 50051, f"127.0.0.1:{port}"))
        await service.apply()
        local = await forward_to(client, service, "grpc")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{local}") as channel:
            unary = channel.unary_unary(f"/{SERVICE}/Unary")
            assert await unary(b"hello", timeout=20) == b"re:hello"
            items = channel.unary_stream(f"/{SERVICE}/Items")
            assert [m async for m in items(b"50", timeout=20)] == [f"item {i}".encode() for i in range(50)]
            shout = channel.stream_stream(f"/{SERVICE}/Shout")
            call = shout(timeout=20)
            for word in (b"one", b"two", b"three"):
                await call.write(word)
                assert await call.read() == word.upper()  # each answer before the next question
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
    finally:
        await server.stop(None)


async def test_websocket_through_a_forward(sides) -> None:  # noqa: F811
    async def echo(ws) -> None:
        async for message in ws:
            await ws.send(message)

    client, service = sides
    port = free_port()
    async with ws_serve(echo, "127.0.0.1", port):
        service.registry.expose(Exposure("ws", 7010, f"127.0.0.1:{port}"))
        await service.apply()
        local = await forward_to(client, service, "7010")
        async with ws_connect(f"ws://127.0.0.1:{local}/") as ws:
            for message in ("text", b"\x00binary\xff" * 1000):
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 20) == message
