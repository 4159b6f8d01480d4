"""The in-memory internet (fakenet) as a peerpath Net: UDP through NATs of every kind, LANs,
carrier-grade NAT, cuts and loss, conntrack-like TCP with simultaneous open and TLS; and
the virtual-time loop (vtime) the tests run on."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from peerpath.certs import tls_client_context, tls_peer_address, tls_server_context
from peerpath.identity import Identity
from peerpath.nat.netcheck import Behaviour
from peerpath.net import open_stream, serve_streams
from peerpath.testing import vtime
from peerpath.testing.fakenet import SYN_RTO, FakeHost, FakeNat, FakeNetwork
from peerpath.wire.endpoint import Endpoint

EI, AD, APD = Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT
LATENCY = 0.02


def run(main: Coroutine[Any, Any, None]) -> None:
    vtime.run(main, limit=600.0)


class Inbox:
    """What a UDP socket received."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, Endpoint]] = []

    def __call__(self, data: bytes, addr: Endpoint) -> None:
        self.got.append((data, addr))


class Recorder(asyncio.Protocol):
    """A TCP protocol that writes down what happens to it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.events: list[str] = []
        self.lost: Exception | None = None
        self.keep_open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost = exc


class Accepting:
    """A listener's protocol factory that keeps what it made."""

    def __init__(self) -> None:
        self.made: list[Recorder] = []

    def __call__(self) -> Recorder:
        self.made.append(Recorder())
        return self.made[-1]


def behind(net: FakeNetwork, public_ip: str, host_ip: str, **nat: Any) -> tuple[FakeNat, FakeHost]:
    """A NAT on the internet and one host behind it."""
    gateway = FakeNat(public_ip, **nat)
    net.add_nat(gateway)
    return gateway, FakeHost(net, host_ip, gateway)


async def settle(seconds: float = 1.0) -> None:
    await asyncio.sleep(seconds)


# -- UDP ----------------------------------------------------------------------------------


def test_full_cone_nat_lets_anyone_reach_a_mapping() -> None:
    async def main() -> None:
        net = FakeNetwork()
        _, inside = behind(net, "198.51.100.1", "10.0.0.2", filtering=EI)
        server, stranger = FakeHost(net, "203.0.113.1"), FakeHost(net, "203.0.113.2")
        inbox, seen = Inbox(), Inbox()
        sock = inside.bind_udp("0.0.0.0", 0, inbox)
        server.bind_udp("203.0.113.1", 3478, seen)
        sock.sendto(b"out", ("203.0.113.1", 3478))
        await settle()
        assert seen.got == [(b"out", ("198.51.100.1", sock.local[1]))]  # port preserved
        stranger.bind_udp("0.0.0.0", 9, Inbox()).sendto(b"in", seen.got[0][1])
        await settle()
        assert inbox.got == [(b"in", ("203.0.113.2", 9))]

    run(main())


def test_port_restricted_nat_admits_only_the_address_and_port_it_sent_to() -> None:
    async def main() -> None:
        net = FakeNetwork()
        _, inside = behind(net, "198.51.100.1", "10.0.0.2", filtering=APD)
        server = FakeHost(net, "203.0.113.1")
        inbox = Inbox()
        sock = inside.bind_udp("10.0.0.2", 5000, inbox)
        sock.sendto(b"hello", ("203.0.113.1", 3478))
        mapping = ("198.51.100.1", 5000)
        right, other_port = server.bind_udp("0.0.0.0", 3478, Inbox()), server.bind_udp("0.0.0.0", 3479, Inbox())
        await settle()
        dropped = net.dropped
        other_port.sendto(b"no", mapping)
        FakeHost(net, "203.0.113.2").bind_udp("0.0.0.0", 3478, Inbox()).sendto(b"no", mapping)
        right.sendto(b"yes", mapping)
        await settle()
        assert inbox.got == [(b"yes", ("203.0.113.1", 3478))]
        assert net.dropped == dropped + 2

    run(main())


def test_symmetric_nat_maps_each_destination_to_its_own_port() -> None:
    async def main() -> None:
        net = FakeNetwork()
        _, inside = behind(net, "198.51.100.1", "10.0.0.2", mapping=APD, port_preserving=False)
        first, second = Inbox(), Inbox()
        FakeHost(net, "203.0.113.1").bind_udp("0.0.0.0", 1, first)
        FakeHost(net, "203.0.113.2").bind_udp("0.0.0.0", 1, second)
        sock = inside.bind_udp("0.0.0.0", 0, Inbox())
        for _ in range(2):
            sock.sendto(b"x", ("203.0.113.1", 1))
            sock.sendto(b"x", ("203.0.113.2", 1))
        await settle()
        assert len({addr for _, addr in first.got}) == 1 and len({addr for _, addr in second.got}) == 1
        assert first.got[0][1] != second.got[0][1]
        assert sock.local[1] not in (first.got[0][1][1], second.got[0][1][1])

    run(main())


def test_udp_ports_in_use_and_free_ports() -> None:
    async def main() -> None:
        net = FakeNetwork()
        host = FakeHost(net, "203.0.113.1")
        first, second = host.bind_udp("0.0.0.0", 0, Inbox()), host.bind_udp("203.0.113.1", 0, Inbox())
        assert first.local[1] != second.local[1] and first.local[0] == "0.0.0.0"
        with pytest.raises(OSError) as caught:
            host.bind_udp("0.0.0.0", first.local[1], Inbox())
        assert caught.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError):
            host.bind_udp("192.0.2.1", 0, Inbox())
        first.close()
        host.bind_udp("0.0.0.0", first.local[1], Inbox())
        assert host.route_source(("192.0.2.1", 1)) == "203.0.113.1" and host.default_gateway() is None

    run(main())


def test_hosts_behind_one_nat_reach_each_other_on_the_lan() -> None:
    async def main() -> None:
        net = FakeNetwork(latency=LATENCY)
        gateway, one = behind(net, "198.51.100.1", "10.0.0.2")
        two = FakeHost(net, "10.0.0.3", gateway)
        inbox = Inbox()
        two.bind_udp("0.0.0.0", 6000, inbox)
        one.bind_udp("0.0.0.0", 5000, Inbox()).sendto(b"lan", ("10.0.0.3", 6000))
        accepted = Accepting()
        await two.listen_tcp("0.0.0.0", 7000, accepted)
        transport, _ = await one.connect_tcp(("10.0.0.3", 7000), Recorder)
        await settle()
        assert inbox.got == [(b"lan", ("10.0.0.2", 5000))]
        assert accepted.made[0].transport is not None
        assert accepted.made[0].transport.get_extra_info("peername") == transport.get_extra_info("sockname")
        assert gateway._udp.mappings == {} and gateway._tcp.mappings == {}  # nothing was translated

    run(main())


def test_carrier_grade_nat_nests_a_home_nat() -> None:
    async def main() -> None:
        net = FakeNetwork(latency=LATENCY)
        carrier = FakeNat("198.51.100.9", mapping=APD, port_preserving=False)
        net.add_nat(carrier)
        home = FakeNat("100.64.0.2", upstream=carrier)
        net.add_nat(home)
        inside = FakeHost(net, "192.168.1.2", home)
        server = FakeHost(net, "203.0.113.1")
        seen, inbox = Inbox(), Inbox()
        reply = server.bind_udp("0.0.0.0", 3478, seen)
        inside.bind_udp("0.0.0.0", 5000, inbox).sendto(b"up", ("203.0.113.1", 3478))
        await settle()
        source = seen.got[0][1]
        assert source[0] == "198.51.100.9"
        assert home._udp.internal[5000].host == "192.168.1.2" and carrier._udp.internal[source[1]].host == "100.64.0.2"
        reply.sendto(b"down", source)
        accepted = Accepting()
        await server.listen_tcp("0.0.0.0", 443, accepted)
        await inside.connect_tcp(("203.0.113.1", 443), Recorder)
        await settle()
        assert inbox.got == [(b"down", ("203.0.113.1", 3478))]
        assert accepted.made[0].transport is not None
        assert accepted.made[0].transport.get_extra_info("peername")[0] == "198.51.100.9"

    run(main())


def test_cut_and_heal_and_loss_between_public_ips() -> None:
    async def main() -> None:
        net = FakeNetwork()
        a, b = FakeHost(net, "203.0.113.1"), FakeHost(net, "203.0.113.2")
        inbox = Inbox()
        b.bind_udp("0.0.0.0", 1, inbox)
        sock = a.bind_udp("0.0.0.0", 1, Inbox())
        net.cut("203.0.113.2", "203.0.113.1")
        sock.sendto(b"lost", ("203.0.113.2", 1))
        await settle()
        net.heal("203.0.113.1", "203.0.113.2")
        sock.sendto(b"through", ("203.0.113.2", 1))
        await settle()
        assert [data for data, _ in inbox.got] == [b"through"]
        net.set_loss("203.0.113.1", "203.0.113.2", 0.5)
        for _ in range(1000):
            sock.sendto(b"x", ("203.0.113.2", 1))
        await settle()
        assert 400 < len(inbox.got) - 1 < 600
        net.set_loss("203.0.113.1", "203.0.113.2", 0)
        inbox.got.clear()
        for _ in range(100):
            sock.sendto(b"x", ("203.0.113.2", 1))
        await settle()
        assert len(inbox.got) == 100

    run(main())


def test_forget_drops_mappings_and_new_ones_come_from_the_new_range() -> None:
    async def main() -> None:
        net = FakeNetwork()
        gateway, inside = behind(net, "198.51.100.1", "10.0.0.2")
        server = FakeHost(net, "203.0.113.1")
        seen, inbox = Inbox(), Inbox()
        reply = server.bind_udp("0.0.0.0", 3478, seen)
        sock = inside.bind_udp("0.0.0.0", 40000, inbox)
        sock.sendto(b"1", ("203.0.113.1", 3478))
        await settle()
        assert seen.got[-1][1] == ("198.51.100.1", 40000)
        gateway.forget((30000, 30009))
        reply.sendto(b"to the old mapping", ("198.51.100.1", 40000))
        sock.sendto(b"2", ("203.0.113.1", 3478))
        await settle()
        assert inbox.got == []
        new_port = seen.got[-1][1][1]
        assert 30000 <= new_port <= 30009
        assert gateway._tcp.mappings == {} and list(gateway._udp.internal) == [new_port]

    run(main())


# -- TCP ----------------------------------------------------------------------------------


def test_simultaneous_open_through_two_port_restricted_nats() -> None:
    async def main() -> None:
        net = FakeNetwork(latency=LATENCY)
        _, a = behind(net, "198.51.100.1", "10.0.0.2")
        _, b = behind(net, "198.51.100.2", "10.1.0.2")
        accepted_a, accepted_b = Accepting(), Accepting()
        await a.listen_tcp("0.0.0.0", 7000, accepted_a, reuse_port=True)
        await b.listen_tcp("0.0.0.0", 7000, accepted_b, reuse_port=True)
        loop = asyncio.get_running_loop()
        start = loop.time()
        (ta, pa), (tb, pb) = await asyncio.gather(
            a.connect_tcp(("198.51.100.2", 7000), Recorder, local=("0.0.0.0", 7000)),
            b.connect_tcp(("198.51.100.1", 7000), Recorder, local=("0.0.0.0", 7000)),
        )
        assert loop.time() - start == pytest.approx(2 * LATENCY)
        assert accepted_a.made == [] and accepted_b.made == []  # joined, not accepted
        assert ta.get_extra_info("peername") == ("198.51.100.2", 7000)
        assert tb.get_extra_info("peername") == ("198.51.100.1", 7000)
        assert ta.get_extra_info("sockname") == ("10.0.0.2", 7000) and ta.get_extra_info("socket") is None
        ta.write(b"from a")
        tb.writelines([b"from ", b"b"])
        await settle()
        assert isinstance(pa, Recorder) and isinstance(pb, Recorder)
        assert pb.data == b"from a" and pa.data == b"from b"

    run(main())


def test_a_syn_without_an_outbound_syn_first_is_dropped_even_by_a_full_cone_nat() -> None:
    async def main() -> None:
        net = FakeNetwork(latency=LATENCY)
        outside = FakeHost(net, "203.0.113.1")
        outside.bind_udp("0.0.0.0", 7000, Inbox())
        for n, filtering in enumerate((EI, APD)):
            gateway, inside = behind(net, f"198.51.100.{n}", f"10.{n}.0.2", filtering=filtering)
            accepted = Accepting()
            await inside.listen_tcp("0.0.0.0", 7000, accepted, reuse_port=True)
            # UDP from the same port opens the full-cone NAT for UDP only.
            inside.bind_udp("0.0.0.0", 7000, Inbox()).sendto(b"x", ("203.0.113.1", 7000))
            dropped = net.dropped
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(outside.connect_tcp((gateway.public_ip, 7000), Recorder), 10.0)
            assert net.dropped - dropped == 4  # the SYN at 0 s and its retransmissions at 1, 3 and 7 s
            assert accepted.made == [] and outside._connecting == {} and outside._connections == {}

    run(main())


def test_connect_to_a_public_listener_and_refused_without_one() -> None:
    async def main() -> None:
        net = FakeNetwork(latency=LATENCY)
        server = FakeHost(net, "203.0.113.1")
        _, inside = behind(net, "198.51.100.1", "10.0.0.2")
        accepted = Accepting()
        listener = await server.listen_tcp("203.0.113.1", 0, accepted)
        loop = asyncio.get_running_loop()
        start = loop.time()
        transport, _ = await inside.connect_tcp(("203.0.113.1", listener.port), Recorder)
        assert loop.time() - start == pytest.approx(2 * LATENCY)
        server_side = accepted.made[0]
        assert server_side.transport is not None
        assert server_side.transport.get_extra_info("peername") == (
            "198.51.100.1",
            transport.get_extra_info("sockname")[1],
        )
        listener.close()
        start = loop.time()
        with pytest.raises(ConnectionRefusedError):
            await inside.connect_tcp(("203.0.113.1", listener.port), Recorder)
        assert loop.time() - start == pytest.approx(2 * LATENCY)
        assert inside._connecting == {}

    run(main())


def test_tcp_ports_in_use() -> None:
    async def main() -> None:
        net = FakeNetwork()
        host, other = FakeHost(net, "203.0.113.1"), FakeHost(net, "203.0.113.2")
        await other.listen_tcp("0.0.0.0", 80, Accepting())
        plain = await host.listen_tcp("0.0.0.0", 7000, Accepting())
        with pytest.raises(OSError) as caught:
            await host.listen_tcp("0.0.0.0", 7000, Accepting())
        assert caught.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError):
            await host.connect_tcp(("203.0.113.2", 80), Recorder, local=("0.0.0.0", plain.port))
        shared = await host.listen_tcp("0.0.0.0", 7001, Accepting(), reuse_port=True)
        transport, _ = await host.connect_tcp(("203.0.113.2", 80), Recorder, local=("203.0.113.1", shared.port))
        assert transport.get_extra_info("sockname") == ("203.0.113.1", 7001)
        with pytest.raises(OSError):  # the same four-tuple again
            await host.connect_tcp(("203.0.113.2", 80), Recorder, local=("0.0.0.0", shared.port))

    run(main())


def test_a_dropped_syn_gets_through_on_retransmission_once_the_other_side_connected_out() -> None:
    async def main() -> None:
        net = FakeNetwork(latency=LATENCY)
        public = FakeHost(net, "203.0.113.1")
        _, inside = behind(net, "198.51.100.1", "10.0.0.2")
        accepted = Accepting()
        await inside.listen_tcp("0.0.0.0", 7001, accepted, reuse_port=True)
        loop = asyncio.get_running_loop()
        start = loop.time()
        connect = asyncio.ensure_future(public.connect_tcp(("198.51.100.1", 7001), Recorder, local=("0.0.0.0", 7000)))
        await asyncio.sleep(0.2)
        assert not connect.done() and net.dropped == 1  # dropped by the NAT
        # The inside host connects out, but its SYN is lost on the way (a cut) and it gives up:
        # the hole it punched in its NAT stays, its connect leaves nothing behind.
        net.cut("203.0.113.1", "198.51.100.1")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(inside.connect_tcp(("203.0.113.1", 7000), Recorder, local=("0.0.0.0", 7001)), 0.3)
        assert inside._connecting == {} and inside._connections == {}
        net.heal("203.0.113.1", "198.51.100.1")
        transport, _ = await connect
        assert loop.time() - start == pytest.approx(SYN_RTO + 2 * LATENCY)
        assert len(accepted.made) == 1 and accepted.made[0].transport is not None
        assert accepted.made[0].transport.get_extra_info("peername") == ("203.0.113.1", 7000)
        assert transport.get_extra_info("peername") == ("198.51.100.1", 7001)

    run(main())


def test_established_tcp_data_waits_out_a_cut() -> None:
    async def main() -> None:
        net = FakeNetwork(latency=LATENCY)
        server, client = FakeHost(net, "203.0.113.1"), FakeHost(net, "203.0.113.2")
        accepted = Accepting()
        await server.listen_tcp("0.0.0.0", 80, accepted)
        transport, _ = await client.connect_tcp(("203.0.113.1", 80), Recorder)
        net.cut("203.0.113.1", "203.0.113.2")
        for chunk in (b"one ", b"two ", b"three"):
            transport.write(chunk)
            await asyncio.sleep(1)
        await settle(30)
        assert accepted.made[0].data == b""
        net.heal("203.0.113.1", "203.0.113.2")
        await settle()
        assert accepted.made[0].data == b"one two three"

    run(main())


def test_close_and_abort_as_the_other_side_sees_them() -> None:
    async def main() -> None:
        net = FakeNetwork(latency=LATENCY)
        server, client = FakeHost(net, "203.0.113.1"), FakeHost(net, "203.0.113.2")
        accepted = Accepting()
        await server.listen_tcp("0.0.0.0", 80, accepted)

        transport, mine = await client.connect_tcp(("203.0.113.1", 80), Recorder)
        assert isinstance(mine, Recorder)
        transport.write(b"last words")
        transport.close()
        assert transport.is_closing()
        await settle()
        theirs = accepted.made[-1]
        assert theirs.data == b"last words"
        assert theirs.events == ["made", "eof", "lost"] and theirs.lost is None
        assert mine.events == ["made", "lost"] and mine.lost is None
        assert client._connections == {} and server._connections == {}

        transport, mine = await client.connect_tcp(("203.0.113.1", 80), Recorder)
        transport.abort()
        await settle()
        theirs = accepted.made[-1]
        assert theirs.events == ["made", "lost"] and isinstance(theirs.lost, ConnectionResetError)

        # write_eof: a half close; the other side may still answer.
        transport, mine = await client.connect_tcp(("203.0.113.1", 80), Recorder)
        assert isinstance(mine, Recorder)
        theirs = accepted.made[-1]
        theirs.keep_open = True
        transport.write_eof()
        await settle()
        assert theirs.events == ["made", "eof"]
        assert theirs.transport is not None
        theirs.transport.write(b"answer")
        theirs.transport.close()
        await settle()
        assert mine.data == b"answer" and mine.events == ["made", "eof", "lost"]

    run(main())


def test_paused_reading_holds_data_until_resumed() -> None:
    async def main() -> None:
        net = FakeNetwork()
        server, client = FakeHost(net, "203.0.113.1"), FakeHost(net, "203.0.113.2")
        accepted = Accepting()
        await server.listen_tcp("0.0.0.0", 80, accepted)
        transport, _ = await client.connect_tcp(("203.0.113.1", 80), Recorder)
        await settle()
        theirs = accepted.made[0]
        assert theirs.transport is not None
        theirs.transport.pause_reading()
        assert not theirs.transport.is_reading()
        transport.write(b"held")
        await settle()
        assert theirs.data == b""
        theirs.transport.resume_reading()
        await settle()
        assert theirs.data == b"held"

    run(main())


def test_streams_over_tcp_and_tls_with_the_certified_address(tmp_path: Path) -> None:
    identity = Identity.generate()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{writer.get_extra_info('peername')[0]} ".encode() + await reader.readline())
        await writer.drain()
        writer.close()

    async def main() -> None:
        net = FakeNetwork(latency=LATENCY)
        server = FakeHost(net, "203.0.113.1")
        _, inside = behind(net, "198.51.100.1", "10.0.0.2")
        plain = await serve_streams(server, echo, "0.0.0.0", 0)
        secure = await serve_streams(server, echo, "203.0.113.1", 0, tls=tls_server_context(identity, tmp_path))

        reader, writer = await open_stream(inside, ("203.0.113.1", plain.port))
        writer.write(b"plain\n")
        assert await reader.read() == b"198.51.100.1 plain\n"
        writer.close()

        reader, writer = await open_stream(inside, ("203.0.113.1", secure.port), tls=tls_client_context())
        assert tls_peer_address(writer.get_extra_info("ssl_object")) == identity.address
        assert writer.get_extra_info("peername") == ("203.0.113.1", secure.port)
        writer.write(b"secret\n")
        assert await reader.read() == b"198.51.100.1 secret\n"
        writer.close()
        await writer.wait_closed()

        # Not TLS to a TLS listener: the handshake fails and the server just closes.
        reader, writer = await open_stream(inside, ("203.0.113.1", secure.port))
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
        writer.close()

    run(main())


# -- virtual time -------------------------------------------------------------------------


def test_virtual_time_skips_sleeps() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        start, real = loop.time(), time.monotonic()
        await asyncio.sleep(100)
        assert loop.time() - start == pytest.approx(100, abs=0.01)
        assert time.monotonic() - real < 0.5

    run(main())


def test_thread_work_takes_no_virtual_time() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ticker = asyncio.ensure_future(asyncio.sleep(50))
        start, real = loop.time(), time.monotonic()
        await loop.run_in_executor(None, time.sleep, 0.2)
        assert time.monotonic() - real >= 0.2
        assert loop.time() - start < 0.1
        assert not ticker.done()
        await ticker

    run(main())


def test_waiting_out_a_deadline_ends_while_other_tasks_keep_the_loop_busy() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1e-10  # within the loop's clock resolution
        done = False

        async def busy() -> None:
            while not done:  # noqa: ASYNC110  (the busy polling is the point)
                await asyncio.sleep(0)

        other = asyncio.ensure_future(busy())
        while (left := deadline - loop.time()) > 0:  # noqa: ASYNC110  (waiting out a deadline is the point)
            await asyncio.sleep(left)
        done = True
        await other

    run(main())


def test_virtual_time_limit_stops_a_livelock() -> None:
    async def forever() -> None:
        loop = asyncio.get_running_loop()

        def keepalive() -> None:
            loop.call_later(1, keepalive)

        keepalive()
        await asyncio.Event().wait()  # for something that never happens

    with pytest.raises(vtime.VirtualTimeLimitError):
        vtime.run(forever(), limit=30)
