"""The STUN server over real loopback sockets: UDP and TCP answers, netcheck end to end, bad input."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from peerpath.nat.netcheck import Behaviour, netcheck
from peerpath.nat.stun_server import StunServer
from peerpath.wire import stun
from peerpath.wire.stun import Address, Message

IPS = ["127.0.0.1", "127.0.0.2"]


@pytest.fixture
async def server():
    srv = await StunServer.start(IPS, 0)
    try:
        yield srv
    finally:
        await srv.close()


async def test_netcheck_against_real_server_on_loopback(server: StunServer) -> None:
    primary = server.responder.address_of(server.responder.socket_keys()[0])
    result = await netcheck(primary, timeout=2)
    assert result.udp and result.nat is False
    assert result.mapping is Behaviour.ENDPOINT_INDEPENDENT
    assert result.filtering is Behaviour.ENDPOINT_INDEPENDENT
    assert result.other_address == str(Address(IPS[1], server.responder.ports[1]))


async def test_tcp_binding_and_garbage_connection(server: StunServer) -> None:
    port = server.responder.ports[0]
    reader, writer = await asyncio.open_connection(IPS[0], port)
    request = Message.request(bytes(12))
    writer.write(request.serialize() * 2)  # two messages back to back, framed by their lengths
    for _ in range(2):
        header = await reader.readexactly(20)
        body = await reader.readexactly(struct.unpack("!H", header[2:4])[0])
        reply = stun.parse(header + body)
        assert reply.mapped_address is not None and reply.mapped_address.host == "127.0.0.1"
    writer.write(b"\xff" * 64)  # not STUN: the server hangs up, nothing else
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_garbage_datagrams_are_counted_and_server_keeps_answering(server: StunServer) -> None:
    port = server.responder.ports[0]
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        for junk in (b"", b"\x00", b"hello world", b"\x00\x01\x00\x04" + bytes(16), bytes(range(256)) * 4):
            await loop.sock_sendto(sock, junk, (IPS[0], port))
        await loop.sock_sendto(sock, Message.request(bytes(12)).serialize(), (IPS[0], port))
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), 5)
        assert stun.parse(data).transaction_id == bytes(12)
    finally:
        sock.close()
    assert server.responder.counters.dropped_malformed >= 4


async def test_server_refuses_an_address_it_does_not_own() -> None:
    with pytest.raises(OSError):
        await StunServer.start(["192.0.2.55"], 0)


async def test_free_ports_taken_for_tcp_are_picked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """With port 0 the UDP socket picks a free number, which a TCP socket may already hold:
    the server picks again instead of failing to start."""
    import errno

    import peerpath.nat.stun_server as module

    real = asyncio.start_server
    refused: list[int] = []

    async def taken_once(*args, **kwargs):
        if not refused:
            refused.append(kwargs["port"])
            raise OSError(errno.EADDRINUSE, "address already in use")
        return await real(*args, **kwargs)

    monkeypatch.setattr(module.asyncio, "start_server", taken_once)
    srv = await StunServer.start(IPS, 0)
    try:
        assert refused and len(srv.listening()) == 8  # two ports on two IPs, UDP and TCP
        _, writer = await asyncio.open_connection(IPS[0], srv.responder.ports[0])
        writer.close()
    finally:
        await srv.close()


async def test_a_fixed_port_taken_for_tcp_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ports the user named are not swapped for others."""
    import errno

    import peerpath.nat.stun_server as module

    calls: list[int] = []

    async def taken(*args, **kwargs):
        calls.append(kwargs["port"])
        raise OSError(errno.EADDRINUSE, "address already in use")

    monkeypatch.setattr(module.asyncio, "start_server", taken)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((IPS[0], 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError, match="already in use"):
        await StunServer.start(IPS, port, port + 1 if port < 65535 else port - 1)
    assert calls == [port]  # the port the user asked for, once: no other is tried
