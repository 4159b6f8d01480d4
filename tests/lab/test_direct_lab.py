"""Direct paths: sessions start on the relay and move to a validated direct UDP path wherever
the NATs allow it; the matrix of which pairs go direct is asserted and printed."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from peerpath.identity import Address
from peerpath.node.trust import TrustStore
from peerpath.testing.netlab import Lab, every_router_kind

from .conftest import SERVER_IPS, start_peerpath_server

AGENT = str(Path(__file__).with_name("agent.py"))

#: Hosts behind a NAT whose mapping is endpoint-independent (and UDP allowed).
EASY = {"public", "full-cone", "address-restricted", "port-restricted", "cgnat", "same-nat-1", "same-nat-2"}
#: Where a symmetric NAT's new mapping can still be reached: the peer's filter lets it in.
OPEN_TO_NEW_PORTS = {"public", "full-cone", "address-restricted"}


def expected_direct(a: str, b: str) -> bool:
    """What this release achieves (birthday probing for symmetric vs port-restricted is next)."""
    pair = {a, b}
    if "udp-blocked" in pair:
        return False  # needs direct TCP
    if "symmetric" in pair:
        other = (pair - {"symmetric"}).pop()
        return other in OPEN_TO_NEW_PORTS
    return pair <= EASY


def test_direct_path_matrix(tmp_path: Path) -> None:
    with Lab() as lab:
        server = lab.public_host("server", SERVER_IPS)
        url = start_peerpath_server(server)
        hosts = every_router_kind(lab)
        procs = {}
        for name, host in hosts.items():
            procs[name] = host.popen([sys.executable, AGENT, "mesh", str(tmp_path / name), url], stdin=-1, stderr=-3)
        addresses = {n: Address.parse(p.stdout.readline().split()[1]) for n, p in procs.items()}  # type: ignore[union-attr]
        for name in hosts:
            store = TrustStore.in_state_dir(tmp_path / name)
            for other, address in addresses.items():
                if other != name:
                    store.add(address)
        names = sorted(hosts)
        for i, name in enumerate(names):
            targets = " ".join(str(addresses[n]) for n in names[i + 1 :])
            procs[name].stdin.write(f"exercise {targets}\n")  # type: ignore[union-attr]
            procs[name].stdin.flush()  # type: ignore[union-attr]
        by_address = {str(a): n for n, a in addresses.items()}
        results = {}
        for name in names:
            while (line := procs[name].stdout.readline().strip()) != "done":  # type: ignore[union-attr]
                assert line, f"{name} stopped"
                result = json.loads(line)
                results[frozenset((name, by_address[result["peer"]]))] = (name, result)
        matrix = []
        wrong = []
        for a, b in itertools.combinations(names, 2):
            _, result = results[frozenset((a, b))]
            assert result.get("ok"), (a, b, result)
            assert result["path"].startswith("relay "), result  # the first byte never waits for punching
            direct = result["final_path"].startswith("direct ")
            matrix.append(f"{a:>20} - {b:<20} {result['final_path']}")
            if direct != expected_direct(a, b):
                wrong.append((a, b, result["final_path"]))
        print("\n".join(matrix))
        assert not wrong, wrong
