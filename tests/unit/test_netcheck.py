"""NAT behaviour discovery over the in-memory network: every RFC 4787 combination."""

from __future__ import annotations

import pytest

from peerpath.nat.netcheck import Behaviour, netcheck
from peerpath.nat.stun_responder import StunResponder
from peerpath.testing.fakenet import FakeHost, FakeNat, FakeNetwork
from peerpath.wire.endpoint import parse_endpoint
from peerpath.wire.stun import Address

EI, AD, APD = Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT
SERVER = Address("203.0.113.10", 3478)


def network(ips: list[str] | None = None) -> FakeNetwork:
    net = FakeNetwork()
    net.add_stun_server(StunResponder(ips or ["203.0.113.10", "203.0.113.11"], (3478, 3479)))
    return net


@pytest.mark.parametrize("mapping", [EI, AD, APD])
@pytest.mark.parametrize("filtering", [EI, AD, APD])
async def test_netcheck_classifies_every_nat_behaviour(mapping: Behaviour, filtering: Behaviour) -> None:
    net = network()
    nat = FakeNat("198.51.100.1", mapping=mapping, filtering=filtering, port_preserving=mapping is EI)
    net.add_nat(nat)
    host = FakeHost(net, "10.0.0.2", nat)
    result = await netcheck(SERVER, open_socket=host.open_stun_socket)
    assert result.udp and result.nat
    assert result.mapping is mapping
    assert result.filtering is filtering
    assert result.public_address is not None and result.public_address.startswith("198.51.100.1:")
    assert result.port_preserving is (mapping is EI)
    assert result.hairpinning is False


@pytest.mark.parametrize(("mapping", "step"), [(APD, 1), (APD, 3), (AD, 2), (APD, 0)])
async def test_netcheck_tells_ports_handed_out_in_sequence_from_random_ones(mapping: Behaviour, step: int) -> None:
    net = network()
    nat = FakeNat("198.51.100.1", mapping=mapping, port_preserving=False, port_step=step)
    net.add_nat(nat)
    result = await netcheck(SERVER, open_socket=FakeHost(net, "10.0.0.2", nat).open_stun_socket)
    assert result.mapping is mapping and result.port_step == step
    assert ("in sequence" in result.verdict()) is bool(step)


async def test_an_endpoint_independent_nat_has_no_port_step() -> None:
    net = network()
    nat = FakeNat("198.51.100.1")
    net.add_nat(nat)
    result = await netcheck(SERVER, open_socket=FakeHost(net, "10.0.0.2", nat).open_stun_socket)
    assert result.port_step is None and result.to_json()["port_step"] is None


async def test_netcheck_public_host_reports_no_nat() -> None:
    net = network()
    host = FakeHost(net, "198.51.100.20")
    result = await netcheck(SERVER, open_socket=host.open_stun_socket)
    assert result.udp and result.nat is False
    assert result.mapping is EI and result.filtering is EI
    assert "every peer" in result.verdict()


async def test_netcheck_detects_hairpinning() -> None:
    net = network()
    nat = FakeNat("198.51.100.1", hairpinning=True)
    net.add_nat(nat)
    result = await netcheck(SERVER, open_socket=FakeHost(net, "10.0.0.2", nat).open_stun_socket)
    assert result.hairpinning is True


async def test_netcheck_with_udp_blocked_answers_within_timeout() -> None:
    net = network()
    host = FakeHost(net, "10.0.0.2", udp_blocked=True)
    result = await netcheck(SERVER, timeout=0.5, open_socket=host.open_stun_socket)
    assert result.udp is False
    assert result.mapping is None and result.filtering is None and result.nat is None
    assert result.elapsed_s < 2.0
    assert "relay" in result.verdict()


async def test_netcheck_with_one_server_address_says_what_it_skipped() -> None:
    net = network(["203.0.113.10"])
    nat = FakeNat("198.51.100.1")
    net.add_nat(nat)
    result = await netcheck(SERVER, open_socket=FakeHost(net, "10.0.0.2", nat).open_stun_socket)
    assert result.udp and result.nat
    assert result.mapping is None and result.filtering is None
    assert any("mapping tests II and III" in s for s in result.skipped)
    assert any("filtering tests II and III" in s for s in result.skipped)


def test_verdict_words_for_hard_nat() -> None:
    from peerpath.nat.netcheck import NetcheckResult

    result = NetcheckResult(server="x", udp=True, nat=True, mapping=APD, filtering=APD)
    assert "relay" in result.verdict()
    assert result.to_json()["mapping"] == "address-and-port-dependent"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stun.example", ("stun.example", 3478)),
        ("stun.example:19302", ("stun.example", 19302)),
        ("203.0.113.1:1", ("203.0.113.1", 1)),
        ("2001:db8::1", ("2001:db8::1", 3478)),
        ("[2001:db8::1]:5000", ("2001:db8::1", 5000)),
    ],
)
def test_a_typed_server_address_takes_the_default_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text, 3478) == expected


@pytest.mark.parametrize("text", ["", "host:0", "host:99999", "host:abc", "[::1", "[::1]x", ":53", "[]:53"])
def test_a_typed_server_address_is_refused_when_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text, 3478)
