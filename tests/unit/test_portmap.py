"""Port mapping: PCP and NAT-PMP on the wire (RFC 6887 / RFC 6886 layouts), the client against
the lab's port-mapping server on loopback, fallback, refusal, and the gateway lookup."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerpath.nat import portmap
from peerpath.nat.portmap import PortMapper, PortMapUnavailable, reaches_internet
from peerpath.net import default_gateway
from peerpath.testing.pcpd import PortMapServer, _Protocol
from peerpath.wire import portmap as pm

WAN = "198.51.100.7"


def test_pcp_map_request_has_the_rfc_6887_layout() -> None:
    nonce = bytes(range(12))
    request = pm.MapRequest("udp", 41641, 7200, "10.0.0.5", nonce, 41000, "0.0.0.0")
    data = pm.encode_pcp_map(request)
    assert len(data) == 60  # 24-byte common header + 36-byte MAP body
    assert data[0] == 2 and data[1] == 1 and data[2:4] == b"\x00\x00"  # version 2, R=0, MAP
    assert struct.unpack("!I", data[4:8])[0] == 7200
    assert ipaddress.IPv6Address(data[8:24]).ipv4_mapped == ipaddress.IPv4Address("10.0.0.5")
    assert data[24:36] == nonce and data[36] == 17 and data[37:40] == b"\x00" * 3
    assert struct.unpack("!HH", data[40:44]) == (41641, 41000)
    assert ipaddress.IPv6Address(data[44:60]).ipv4_mapped == ipaddress.IPv4Address("0.0.0.0")


def test_natpmp_messages_have_the_rfc_6886_layout() -> None:
    request = pm.MapRequest("tcp", 5000, 3600, "10.0.0.5", suggested_port=6000)
    assert pm.encode_natpmp_map(request) == bytes([0, 2, 0, 0]) + struct.pack("!HHI", 5000, 6000, 3600)
    assert pm.encode_natpmp_address() == b"\x00\x00"
    answer = pm.decode_response(bytes([0, 130, 0, 0]) + struct.pack("!IHHI", 99, 5000, 6001, 3600))
    assert (answer.protocol, answer.internal_port, answer.external_port, answer.lifetime) == ("tcp", 5000, 6001, 3600)
    # "Unsupported version" to a PCP request, with opcode 0 (RFC 6886) or 128 (its errata).
    for opcode in (0, 128):
        refusal = pm.decode_response(bytes([0, opcode, 0, 1]) + struct.pack("!I", 5))
        assert refusal.version == 0 and refusal.result == 1 and refusal.reason == "unsupported version"


@given(st.binary(max_size=80))
def test_garbage_responses_raise_only_portmap_errors(data: bytes) -> None:
    with contextlib.suppress(pm.PortMapError):
        pm.decode_response(data)


class _Router:
    """The lab's port-mapping server on loopback, with the rules it would install recorded."""

    def __init__(self, protocols: frozenset[str]) -> None:
        self.rules: dict[int, tuple[str, int, str, int]] = {}
        self.server = PortMapServer(WAN, self._install, self._remove, protocols=protocols)
        self.transport: asyncio.DatagramTransport | None = None

    def _install(self, protocol: str, external: int, host: str, port: int) -> int:
        handle = len(self.rules) + 1
        self.rules[handle] = (protocol, external, host, port)
        return handle

    def _remove(self, handle: int) -> None:
        del self.rules[handle]

    async def __aenter__(self) -> tuple[_Router, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self.server), local_addr=("127.0.0.1", 0))
        self.transport = transport
        return self, transport.get_extra_info("sockname")[1]

    async def __aexit__(self, *exc: object) -> None:
        assert self.transport is not None
        self.transport.close()


@pytest.mark.parametrize("protocols", [{"pcp", "nat-pmp"}, {"nat-pmp"}])
async def test_client_maps_renews_and_deletes(protocols: set[str]) -> None:
    async with _Router(frozenset(protocols)) as (router, port):
        mapper = PortMapper("127.0.0.1", port=port)
        udp = await mapper.map("udp", 41641, lifetime=600)
        assert mapper.method == ("pcp" if "pcp" in protocols else "nat-pmp")  # NAT-PMP: after PCP's refusal
        assert udp.external == (WAN, 41641) and udp.lifetime == 600  # the port is kept when free
        tcp = await mapper.map("tcp", 41641)
        assert tcp.lifetime == 3600  # the router grants less than the 7200 s asked
        assert sorted(router.rules.values()) == [("tcp", 41641, "127.0.0.1", 41641), ("udp", 41641, "127.0.0.1", 41641)]
        renewed = await mapper.map("udp", 41641, previous=udp)
        assert renewed.external == udp.external and len(router.rules) == 2
        await mapper.unmap(udp)
        await mapper.unmap(tcp)
        assert router.rules == {}


async def test_a_taken_port_gets_another_and_the_mapping_expires() -> None:
    async with _Router(frozenset({"pcp"})) as (router, port):
        first = await PortMapper("127.0.0.1", port=port).map("udp", 5000)
        router.server.mappings[("udp", "127.0.0.2", 6000)] = router.server.mappings.pop(("udp", "127.0.0.1", 5000))
        second = await PortMapper("127.0.0.1", port=port).map("udp", 5000)
        assert first.external[1] == 5000 and second.external[1] != 5000
        for mapping in router.server.mappings.values():
            mapping.expires = 0
        router.server.expire()
        assert router.rules == {}


def test_the_router_refuses_a_request_that_names_another_host() -> None:
    router = _Router(frozenset({"pcp"}))
    request = pm.MapRequest("udp", 5000, 600, "10.9.9.9", bytes(12))
    answer = router.server.handle(pm.encode_pcp_map(request), ("10.0.0.5", 40000))
    assert answer is not None
    refusal = pm.decode_response(answer)
    assert refusal.version == 2 and not refusal.ok and refusal.reason == "address mismatch"
    assert router.rules == {}


async def test_no_router_answers_quickly(monkeypatch) -> None:
    monkeypatch.setattr(portmap, "RETRIES", (0.05, 0.05))
    silent = await asyncio.get_running_loop().create_datagram_endpoint(asyncio.DatagramProtocol, ("127.0.0.1", 0))
    try:
        port = silent[0].get_extra_info("sockname")[1]
        with pytest.raises(PortMapUnavailable, match="no answer"):
            await PortMapper("127.0.0.1", port=port).map("udp", 5000)
    finally:
        silent[0].close()


def test_default_gateway_comes_from_the_routing_table(tmp_path: Path) -> None:
    table = tmp_path / "route"
    header = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
    table.write_text(
        header
        + "eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        + "eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    assert default_gateway(table) == "10.0.0.1"
    table.write_text(header)
    assert default_gateway(table) is None
    assert default_gateway(tmp_path / "missing") is None


def test_only_addresses_on_the_internet_are_offered() -> None:
    assert reaches_internet("198.51.100.7") and reaches_internet("8.8.8.8")
    for inner in ("10.1.2.3", "192.168.1.1", "100.64.0.9", "172.20.0.1", "0.0.0.0", "junk"):
        assert not reaches_internet(inner)
