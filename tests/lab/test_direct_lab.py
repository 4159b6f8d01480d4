"""Direct paths: sessions start on the relay and move to a validated direct UDP path wherever
the NATs allow it; the matrix of which pairs go direct is asserted and printed."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import pytest

from peerpath.identity import Address
from peerpath.node.trust import TrustStore
from peerpath.testing.netlab import Impairment, Lab, every_router_kind

from .conftest import SERVER_IPS, start_peerpath_server

AGENT = str(Path(__file__).with_name("agent.py"))

#: Hosts behind a NAT whose mapping is endpoint-independent (and UDP allowed).
EASY = {"public", "full-cone", "address-restricted", "port-restricted", "cgnat", "same-nat-1", "same-nat-2"}


def expected_direct(a: str, b: str) -> str | None:
    """Direct wherever one side maps endpoint-independently: symmetric against an open
    filter through a peer-reflexive candidate, against a restricted one by birthday probing.
    A UDP-blocked host goes direct over TCP (simultaneous open, or a plain connect to the
    public host) with every peer whose NAT keeps its TCP port; a symmetric NAT picks random
    ports for TCP too, so that pair stays on the relay. None: stays on the relay."""
    pair = {a, b}
    if "udp-blocked" in pair:
        return "direct tcp" if pair - {"udp-blocked"} <= EASY else None
    return "direct udp" if pair <= EASY | {"symmetric"} else None


@pytest.mark.parametrize("link", [None, Impairment(delay_ms=50, loss=0.02, seed=5)], ids=["clean", "50ms-2%-loss"])
def test_direct_path_matrix(tmp_path: Path, link: Impairment | None) -> None:
    with Lab() as lab:
        server = lab.public_host("server", SERVER_IPS)
        url = start_peerpath_server(server)
        hosts = every_router_kind(lab, link=link)
        env = {**os.environ, "PEERPATH_WAIT_DIRECT": "100", "PEERPATH_AGENT_SMALL": "1" if link else "0"}
        procs = {}
        for name, host in hosts.items():
            procs[name] = host.popen(
                [sys.executable, AGENT, "mesh", str(tmp_path / name), url], stdin=-1, stderr=-3, env=env
            )
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
            final = result["final_path"]
            matrix.append(f"{a:>20} - {b:<20} {final}")
            expected = expected_direct(a, b)
            if not final.startswith(f"{expected} " if expected else "relay "):
                wrong.append((a, b, result["final_path"]))
        print(f"\n{'impaired: ' + str(link) if link else 'clean links'}\n" + "\n".join(matrix))
        assert not wrong, wrong


@pytest.mark.parametrize(("kind", "path"), [("full-cone", "direct udp"), ("udp-blocked", "direct tcp")])
def test_direct_path_cut_mid_transfer_falls_back_to_relay_and_recovers(tmp_path: Path, kind: str, path: str) -> None:
    import threading
    import time

    from peerpath.testing.netlab import NatKind

    with Lab() as lab:
        server = lab.public_host("server", SERVER_IPS)
        url = start_peerpath_server(server)
        router = lab.router("home", NatKind(kind))
        one = lab.host("one", behind=router)
        two = lab.public_host("two")
        procs = {}
        for name, host in (("one", one), ("two", two)):
            procs[name] = host.popen([sys.executable, AGENT, "mesh", str(tmp_path / name), url], stdin=-1, stderr=-3)
        addrs = {n: Address.parse(p.stdout.readline().split()[1]) for n, p in procs.items()}  # type: ignore[union-attr]
        TrustStore.in_state_dir(tmp_path / "one").add(addrs["two"])
        TrustStore.in_state_dir(tmp_path / "two").add(addrs["one"])
        # Warm up: the session goes direct.
        procs["one"].stdin.write(f"exercise {addrs['two']}\n")  # type: ignore[union-attr]
        procs["one"].stdin.flush()  # type: ignore[union-attr]
        warm = json.loads(procs["one"].stdout.readline())  # type: ignore[union-attr]
        procs["one"].stdout.readline()  # type: ignore[union-attr]
        assert warm["final_path"].startswith(path), warm

        cut = "\n".join(
            [
                "table ip cut {",
                "  chain forward {",
                "    type filter hook forward priority -10; policy accept;",
                f"    ip daddr {two.ip} drop",
                f"    ip saddr {two.ip} drop",
                "  }",
                "}",
            ]
        )

        def faults() -> None:
            time.sleep(2.0)
            router.run(["nft", "-f", "-"], input=cut)  # the direct path dies mid-transfer
            time.sleep(6.0)
            router.run(["nft", "delete", "table", "ip", "cut"])  # and comes back
            time.sleep(5.0)
            router.run(["conntrack", "-F"], check=False)  # every NAT mapping forgotten

        chaos = threading.Thread(target=faults)
        chaos.start()
        procs["one"].stdin.write(f"soak {addrs['two']} 22\n")  # type: ignore[union-attr]
        procs["one"].stdin.flush()  # type: ignore[union-attr]
        result = json.loads(procs["one"].stdout.readline())  # type: ignore[union-attr]
        chaos.join()
        print(result)
        assert "error" not in result, result
        assert result["ok"] == result["sent"] > 20  # nothing lost, nothing corrupted
        kinds = [" ".join(p.split()[:2]) if p.startswith("direct") else "relay" for p in result["paths"]]
        assert kinds[0] == path and "relay" in kinds, result["paths"]
        assert kinds[kinds.index("relay") :].count(path) >= 1, result["paths"]  # back to direct
        assert kinds[-1] == path, result["paths"]  # and again after the conntrack flush


def test_two_symmetric_nats_stay_on_the_relay_and_say_why(tmp_path: Path) -> None:
    from peerpath.testing.netlab import NatKind

    with Lab() as lab:
        server = lab.public_host("server", SERVER_IPS)
        url = start_peerpath_server(server)
        one = lab.host("one", behind=lab.router("r1", NatKind.SYMMETRIC))
        two = lab.host("two", behind=lab.router("r2", NatKind.SYMMETRIC))
        env = {**os.environ, "PEERPATH_WAIT_DIRECT": "50"}
        procs = {}
        for name, host in (("one", one), ("two", two)):
            procs[name] = host.popen(
                [sys.executable, AGENT, "mesh", str(tmp_path / name), url], stdin=-1, stderr=-3, env=env
            )
        addrs = {n: Address.parse(p.stdout.readline().split()[1]) for n, p in procs.items()}  # type: ignore[union-attr]
        TrustStore.in_state_dir(tmp_path / "one").add(addrs["two"])
        TrustStore.in_state_dir(tmp_path / "two").add(addrs["one"])
        procs["one"].stdin.write(f"exercise {addrs['two']}\n")  # type: ignore[union-attr]
        procs["one"].stdin.flush()  # type: ignore[union-attr]
        result = json.loads(procs["one"].stdout.readline())  # type: ignore[union-attr]
        assert result.get("ok"), result
        assert result["final_path"] == f"relay {SERVER_IPS[0]}:7000"
        assert "both NATs map per destination" in (result["relay_reason"] or ""), result
