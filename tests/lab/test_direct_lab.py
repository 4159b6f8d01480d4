"""Direct paths: sessions start on the relay and move to a validated direct UDP path wherever
the NATs allow it; the matrix of which pairs go direct is asserted and printed."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peerpath.testing.matrix import expected_direct
from peerpath.testing.netlab import Impairment, Lab, NatKind, every_router_kind

from .conftest import SERVER_IPS, Mesh, start_peerpath_server

RELAY = f"relay {SERVER_IPS[0]}:7000"


def forward_filter(table: str, *rules: str) -> str:
    """An nftables table for a router: ``rules`` in a forward chain ahead of its NAT's own."""
    lines = [f"table ip {table} {{", "  chain forward {", "    type filter hook forward priority -10; policy accept;"]
    return "\n".join([*lines, *(f"    {rule}" for rule in rules), "  }", "}"])


def soak_through(mesh: Mesh, name: str, target: str, seconds: float, faults: Callable[[], None]) -> dict[str, Any]:
    """Requests from ``name`` to ``target`` for ``seconds`` while ``faults`` runs beside
    them; every request must come back intact. The soak's result (paths taken in order)."""
    chaos = threading.Thread(target=faults)
    chaos.start()
    try:
        result: dict[str, Any] = mesh.soak(name, target, seconds)
    finally:
        chaos.join()
    print(result)
    assert "error" not in result, result
    assert result["ok"] == result["sent"] > 20, result  # nothing lost, nothing corrupted
    return result


@pytest.mark.parametrize("link", [None, Impairment(delay_ms=50, loss=0.02, seed=5)], ids=["clean", "50ms-2%-loss"])
def test_direct_path_matrix(tmp_path: Path, link: Impairment | None) -> None:
    with Lab() as lab:
        url = start_peerpath_server(lab.public_host("server", SERVER_IPS))
        hosts = every_router_kind(lab, link=link)
        env = {**os.environ, "PEERPATH_WAIT_DIRECT": "100", "PEERPATH_AGENT_SMALL": "1" if link else "0"}
        mesh = Mesh(tmp_path, url, hosts, env)
        names = sorted(hosts)
        for i, name in enumerate(names):  # every pair once, all initiators at the same time
            mesh.start_exercise(name, *names[i + 1 :])
        results = {frozenset((name, peer)): r for name in names for peer, r in mesh.results(name).items()}
        matrix = []
        wrong = []
        for a, b in itertools.combinations(names, 2):
            result = results[frozenset((a, b))]
            assert result.get("ok"), (a, b, result)
            assert str(result["path"]).startswith("relay "), result  # the first byte never waits for punching
            final = str(result["final_path"])
            matrix.append(f"{a:>20} - {b:<20} {final}")
            expected = expected_direct(a, b)
            if not final.startswith(f"{expected} " if expected else "relay "):
                wrong.append((a, b, final))
        print(f"\n{'impaired: ' + str(link) if link else 'clean links'}\n" + "\n".join(matrix))
        assert not wrong, wrong


@pytest.mark.parametrize(("kind", "path"), [("full-cone", "direct udp"), ("udp-blocked", "direct tcp")])
def test_direct_path_cut_mid_transfer_falls_back_to_relay_and_recovers(tmp_path: Path, kind: str, path: str) -> None:
    with Lab() as lab:
        url = start_peerpath_server(lab.public_host("server", SERVER_IPS))
        router = lab.router("home", NatKind(kind))
        one, two = lab.host("one", behind=router), lab.public_host("two")
        # Up to 10 s to go direct, as the other direct-path tests give: this is no timing test.
        mesh = Mesh(tmp_path, url, {"one": one, "two": two}, {**os.environ, "PEERPATH_WAIT_DIRECT": "100"})
        warm = mesh.exercise("one", "two")  # the session goes direct
        assert str(warm["final_path"]).startswith(path), warm

        cut = forward_filter("cut", f"ip daddr {two.ip} drop", f"ip saddr {two.ip} drop")

        def faults() -> None:
            time.sleep(2.0)
            router.run(["nft", "-f", "-"], input=cut)  # the direct path dies mid-transfer
            time.sleep(6.0)
            router.run(["nft", "delete", "table", "ip", "cut"])  # and comes back
            time.sleep(5.0)
            router.run(["conntrack", "-F"], check=False)  # every NAT mapping forgotten

        paths = [str(p) for p in soak_through(mesh, "one", "two", 22, faults)["paths"]]
        kinds = [" ".join(p.split()[:2]) if p.startswith("direct") else "relay" for p in paths]
        assert kinds[0] == path and "relay" in kinds, paths
        assert kinds[kinds.index("relay") :].count(path) >= 1, paths  # back to direct
        assert kinds[-1] == path, paths  # and again after the conntrack flush


def test_a_lossy_direct_path_is_set_aside_for_the_relay_without_flapping(tmp_path: Path) -> None:
    """70 % of the packets between the two hosts lost: the session moves to the relay (which
    the loss does not touch) once the probes show it, stays there while the loss lasts, and
    goes back to the direct path after the hold-down once the loss is over."""
    with Lab() as lab:
        url = start_peerpath_server(lab.public_host("server", SERVER_IPS))
        router = lab.router("home", NatKind.FULL_CONE)
        one, two = lab.host("one", behind=router), lab.public_host("two")
        env = {**os.environ, "PEERPATH_WAIT_DIRECT": "100", "PEERPATH_HOLD_DOWN": "6"}
        mesh = Mesh(tmp_path, url, {"one": one, "two": two}, env)
        warm = mesh.exercise("one", "two")
        assert str(warm["final_path"]).startswith("direct udp"), warm
        drop = "numgen random mod 10 < 7 drop"
        lossy = forward_filter("lossy", f"ip daddr {two.ip} {drop}", f"ip saddr {two.ip} {drop}")

        def faults() -> None:
            time.sleep(2.0)
            router.run(["nft", "-f", "-"], input=lossy)
            time.sleep(20.0)
            router.run(["nft", "delete", "table", "ip", "lossy"])

        result = soak_through(mesh, "one", "two", 40, faults)
        assert any("lost" in reason for reason in result["aside"]), result
        paths = [str(p) for p in result["paths"]]
        kinds = ["relay" if p.startswith("relay") else "direct" for p in paths]
        assert kinds[0] == "direct" and kinds[-1] == "direct" and "relay" in kinds, paths
        # A silent stretch may hand the lossy path to the relay before the probes have
        # judged it; once set aside it stays aside: a handful of moves, not a flap a second.
        assert len(paths) <= 8, paths


def test_a_nat_rebinding_mid_session_moves_the_direct_path_to_the_new_port(tmp_path: Path) -> None:
    """The router of the host behind NAT forgets its mappings and gives new ones from another
    port range: the peer's direct path to the old public port dies, the session carries on
    over the relay, and goes direct again to the new port with nothing lost."""
    with Lab() as lab:
        url = start_peerpath_server(lab.public_host("server", SERVER_IPS))
        router = lab.router("home", NatKind.PORT_RESTRICTED)
        one, two = lab.host("one", behind=router), lab.public_host("two")
        mesh = Mesh(tmp_path, url, {"one": one, "two": two}, {**os.environ, "PEERPATH_WAIT_DIRECT": "100"})
        warm = mesh.exercise("two", "one")  # the public host sees one's public port
        before = str(warm["final_path"])
        assert before.startswith(f"direct udp {router.wan_ip}:"), warm
        old_port = int(before.rpartition(":")[2])
        # The router keeps source ports (the node's, from the ephemeral range 32768-60999),
        # so the new range below cannot contain the old port.
        assert not 20000 <= old_port < 21000, warm

        def rebind() -> None:
            time.sleep(3.0)
            rule = 'oifname "wan" meta l4proto udp masquerade to :20000-20999'
            router.run(["nft", f"insert rule ip lab srcnat {rule}"])
            router.run(["conntrack", "-F"], check=False)

        paths = [str(p) for p in soak_through(mesh, "two", "one", 20, rebind)["paths"]]
        assert paths[0] == before, paths
        new_port = int(paths[-1].rpartition(":")[2])
        assert paths[-1].startswith(f"direct udp {router.wan_ip}:") and 20000 <= new_port < 21000, paths


@pytest.mark.parametrize("initiator", ["easy", "hard"])
def test_port_prediction_takes_a_sequential_symmetric_nat_direct(tmp_path: Path, initiator: str) -> None:
    """A NAT that maps per destination but hands out ports in sequence, against a
    port-restricted one (which needs the hard side's exact port to open its filter): the
    easy side checks the ports the hard side's sequence predicts, and that is where the
    direct path is found, whichever side starts the round."""
    with Lab() as lab:
        url = start_peerpath_server(lab.public_host("server", SERVER_IPS))
        sequential = lab.router("seq", NatKind.SYMMETRIC_SEQUENTIAL)
        hosts = {
            "hard": lab.host("h-seq", behind=sequential),
            "easy": lab.host("h-easy", behind=lab.router("easy", NatKind.PORT_RESTRICTED)),
        }
        mesh = Mesh(tmp_path, url, hosts, {**os.environ, "PEERPATH_WAIT_DIRECT": "100"})
        result = mesh.exercise(initiator, "easy" if initiator == "hard" else "hard")
        counters = {name: mesh.counters(name) for name in hosts}
        print(result, counters)
        assert result.get("ok"), result
        assert str(result["final_path"]).startswith("direct udp"), result
        assert counters["easy"]["predicted_rounds"] >= 1 and counters["easy"]["predicted_paths"] >= 1, counters


@pytest.mark.parametrize(
    ("kind", "why"),
    [(NatKind.SYMMETRIC, "with random ports"), (NatKind.SYMMETRIC_SEQUENTIAL, "ports come in sequence")],
    ids=["random", "sequential"],
)
def test_two_symmetric_nats_stay_on_the_relay_and_say_why(tmp_path: Path, kind: NatKind, why: str) -> None:
    with Lab() as lab:
        url = start_peerpath_server(lab.public_host("server", SERVER_IPS))
        one = lab.host("one", behind=lab.router("r1", kind))
        two = lab.host("two", behind=lab.router("r2", kind))
        mesh = Mesh(tmp_path, url, {"one": one, "two": two}, {**os.environ, "PEERPATH_WAIT_DIRECT": "50"})
        result = mesh.exercise("one", "two")
        assert result.get("ok"), result
        assert result["final_path"] == RELAY
        reason = str(result["relay_reason"] or "")
        assert "both NATs map per destination" in reason and why in reason, result


@pytest.mark.parametrize("protocols", ["pcp,nat-pmp", "nat-pmp", "upnp"])
def test_a_router_that_maps_ports_makes_a_symmetric_nat_reachable(tmp_path: Path, protocols: str) -> None:
    """Behind a symmetric NAT whose router maps ports on request (PCP, NAT-PMP or UPnP), a
    host goes direct with another symmetric NAT over UDP, and with a UDP-blocked network
    over TCP: pairs that otherwise stay on the relay."""
    with Lab() as lab:
        url = start_peerpath_server(lab.public_host("server", SERVER_IPS))
        mapped = lab.router("mapped", NatKind.SYMMETRIC, port_mapping=protocols)
        hosts = {
            "mapped": lab.host("h-mapped", behind=mapped),
            "symmetric": lab.host("h-sym", behind=lab.router("sym", NatKind.SYMMETRIC)),
            "udp-blocked": lab.host("h-blocked", behind=lab.router("blocked", NatKind.UDP_BLOCKED)),
        }
        mesh = Mesh(tmp_path, url, hosts, {**os.environ, "PEERPATH_WAIT_DIRECT": "100"})
        results = {}
        for peer in ("symmetric", "udp-blocked"):
            results[peer] = mesh.exercise(peer, "mapped")
        print(results)
        assert all(r.get("ok") for r in results.values()), results
        assert str(results["symmetric"]["final_path"]).startswith(f"direct udp {mapped.wan_ip}:"), results
        assert str(results["udp-blocked"]["final_path"]).startswith(f"direct tcp {mapped.wan_ip}:"), results
        # Through the ports the router mapped on request, not by luck.
        rules = mapped.run(["nft", "list", "chain", "ip", "lab", "dstnat"])
        for result in results.values():
            port = str(result["final_path"]).rsplit(":", 1)[1]
            assert f"dport {port} dnat to {hosts['mapped'].ip}:{port}" in rules, rules
