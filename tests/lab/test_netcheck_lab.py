"""Every router kind of the NAT lab, classified by our netcheck against our server."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import pytest

from peerpath.testing.netlab import Impairment, Lab, NatKind, Node, every_router_kind

from .conftest import SERVER_IPS, run_netcheck, start_peerpath_server

EI, AD, APD = "endpoint-independent", "address-dependent", "address-and-port-dependent"


@dataclass(frozen=True)
class Expect:
    udp: bool = True
    nat: bool | None = True
    mapping: str | None = EI
    filtering: str | None = APD
    hairpinning: bool | None = False
    port_preserving: bool | None = True


EXPECTED = {
    "public": Expect(nat=False, mapping=EI, filtering=EI, hairpinning=None),
    "full-cone": Expect(filtering=EI),
    "address-restricted": Expect(filtering=AD),
    "port-restricted": Expect(),
    "symmetric": Expect(mapping=APD, port_preserving=False),
    "cgnat": Expect(),
    "udp-blocked": Expect(udp=False, nat=None, mapping=None, filtering=None, hairpinning=None, port_preserving=None),
    "same-nat-1": Expect(hairpinning=True),
    "same-nat-2": Expect(hairpinning=True),
    "impaired": Expect(),
}


@pytest.fixture(scope="module")
def hosts(lab: Lab) -> dict[str, Node]:
    start_peerpath_server(lab.public_host("server", SERVER_IPS))
    return every_router_kind(lab, impaired=Impairment(delay_ms=25, jitter_ms=2, loss=0.02))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_netcheck_classifies_router_kind(hosts: dict[str, Node], name: str) -> None:
    result = run_netcheck(hosts[name])
    want = EXPECTED[name]
    got = Expect(
        udp=bool(result["udp"]),
        nat=result["nat"],  # type: ignore[arg-type]
        mapping=result["mapping"],  # type: ignore[arg-type]
        filtering=result["filtering"],  # type: ignore[arg-type]
        hairpinning=result["hairpinning"],  # type: ignore[arg-type]
        port_preserving=result["port_preserving"],  # type: ignore[arg-type]
    )
    assert got == want, result
    if want.udp:
        public = str(result["public_address"])
        assert public.rsplit(":", 1)[0] != hosts[name].ip or not want.nat


def test_netcheck_tells_sequential_ports_from_random_ones(lab: Lab, hosts: dict[str, Node]) -> None:
    sequential = lab.host("h-seq", behind=lab.router("seq", NatKind.SYMMETRIC_SEQUENTIAL))
    result = run_netcheck(sequential)
    assert result["mapping"] == APD and result["port_step"] == 1, result  # nothing else uses that router
    assert "port prediction" in str(result["direct"]), result
    assert run_netcheck(hosts["symmetric"])["port_step"] == 0
    assert run_netcheck(hosts["port-restricted"])["port_step"] is None  # one port for every destination


def test_udp_blocked_answers_within_its_timeout(hosts: dict[str, Node]) -> None:
    result = run_netcheck(hosts["udp-blocked"], "--timeout", "1")
    assert result["udp"] is False
    assert float(result["elapsed_s"]) < 5  # type: ignore[arg-type]  # bounded by --timeout, not a hang


def test_two_hosts_behind_one_nat_share_its_address(hosts: dict[str, Node]) -> None:
    first, second = run_netcheck(hosts["same-nat-1"]), run_netcheck(hosts["same-nat-2"])
    ip1, _ = str(first["public_address"]).rsplit(":", 1)
    ip2, _ = str(second["public_address"]).rsplit(":", 1)
    assert ip1 == ip2
    assert first["local_address"] != second["local_address"]
    # And they see each other on the LAN directly.
    hosts["same-nat-1"].run(["ping", "-c", "1", "-W", "2", hosts["same-nat-2"].ip])


def test_human_output_explains_what_it_means(hosts: dict[str, Node]) -> None:
    from .conftest import PEERPATH

    out = hosts["symmetric"].run([*PEERPATH, "netcheck", "--stun", SERVER_IPS[0]])
    assert "address-and-port-dependent" in out
    assert "relay" in out  # the plain-words verdict for a hard NAT


def test_netcheck_against_single_address_server(lab: Lab, hosts: dict[str, Node]) -> None:
    lone = lab.public_host("lone", ["203.0.113.20"])
    from .conftest import PEERPATH

    state = tempfile.mkdtemp(prefix="pp-server-")
    lone.start([*PEERPATH, "server", "--state-dir", state, "--public-ip", "203.0.113.20"], ready="STUN server")
    proc = hosts["port-restricted"].run_proc([*PEERPATH, "netcheck", "--stun", "203.0.113.20", "--json"])
    import json

    result = json.loads(proc.stdout)
    assert result["udp"] is True and result["nat"] is True
    assert result["mapping"] is None and result["filtering"] is None
    assert any("mapping tests II and III" in s for s in result["skipped"])
