"""Through the relay: every pair of lab hosts, whatever their NAT or firewall, reaches the other
by address alone and moves data both ways; the relay's link never shows the plaintext."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from peerpath.identity import Address
from peerpath.node.trust import TrustStore
from peerpath.testing.netlab import Lab, Node, every_router_kind

from .conftest import PEERPATH, SERVER_IPS, start_peerpath_server

PEERPATH_PREFIX = PEERPATH

AGENT = str(Path(__file__).with_name("agent.py"))
#: These tests are about the relay: agents stay on it (direct paths: test_direct_lab.py).
RELAY_ONLY = {**os.environ, "PEERPATH_AGENT_DIRECT": "0", "PEERPATH_WAIT_DIRECT": "0"}
MARKER = b"PEERPATH-PLAINTEXT-MARKER-7f3a"


def test_every_pair_connects_through_the_relay(tmp_path: Path) -> None:
    with Lab() as lab:
        server = lab.public_host("server", SERVER_IPS)
        url = start_peerpath_server(server)
        capture = server.start(
            ["tcpdump", "-i", "eth0", "-w", str(tmp_path / "relay.pcap"), "-U", "tcp port 7000"],
            ready="listening on",
        )
        hosts = every_router_kind(lab)
        agents: dict[str, tuple[Node, object, str]] = {}
        for name, host in hosts.items():
            proc = host.popen(
                [sys.executable, AGENT, "mesh", str(tmp_path / name), url], stdin=-1, stderr=-3, env=RELAY_ONLY
            )  # -1: PIPE, -3: DEVNULL
            agents[name] = (host, proc, "")
        for name, (host, proc, _) in agents.items():
            line = proc.stdout.readline()  # type: ignore[attr-defined]
            assert line.startswith("ready "), f"{name}: {line!r}"
            agents[name] = (host, proc, line.split()[1])
        addresses = {name: Address.parse(a) for name, (_, _, a) in agents.items()}
        for name in agents:
            store = TrustStore.in_state_dir(tmp_path / name)
            for other, address in addresses.items():
                if other != name:
                    store.add(address)
        names = sorted(agents)
        # Each host exercises the hosts after it: every pair once, all initiators at the same time.
        for i, name in enumerate(names):
            targets = " ".join(str(addresses[n]) for n in names[i + 1 :])
            agents[name][1].stdin.write(f"exercise {targets}\n")  # type: ignore[attr-defined]
            agents[name][1].stdin.flush()  # type: ignore[attr-defined]
        results: dict[tuple[str, str], dict[str, object]] = {}
        by_address = {str(a): n for n, a in addresses.items()}
        for name in names:
            proc = agents[name][1]
            while (line := proc.stdout.readline().strip()) != "done":  # type: ignore[attr-defined]
                assert line, f"{name} stopped: no more output"
                result = json.loads(line)
                results[(name, by_address[result["peer"]])] = result
        lab.stop(capture)
        failures = {pair: r for pair, r in results.items() if not r.get("ok")}
        assert not failures, failures
        assert len(results) == len(names) * (len(names) - 1) // 2
        relay = f"relay {SERVER_IPS[0]}:7000"
        assert {r["path"] for r in results.values()} == {relay}
        wire = (tmp_path / "relay.pcap").read_bytes()
        assert len(wire) > 1_000_000
        assert MARKER not in wire


@pytest.mark.parametrize("kind", ["udp-blocked", "symmetric"])
def test_hard_networks_reach_each_other_by_address(tmp_path: Path, kind: str) -> None:
    """Two hosts behind the same hard network kind: only the relay can join them."""
    from peerpath.testing.netlab import NatKind

    with Lab() as lab:
        server = lab.public_host("server", SERVER_IPS)
        url = start_peerpath_server(server)
        nat = NatKind(kind)
        one = lab.host("one", behind=lab.router("r1", nat))
        two = lab.host("two", behind=lab.router("r2", nat))
        procs = {}
        for name, host in (("one", one), ("two", two)):
            procs[name] = host.popen(
                [sys.executable, AGENT, "mesh", str(tmp_path / name), url], stdin=-1, stderr=-3, env=RELAY_ONLY
            )
        addrs = {n: Address.parse(p.stdout.readline().split()[1]) for n, p in procs.items()}  # type: ignore[union-attr]
        TrustStore.in_state_dir(tmp_path / "one").add(addrs["two"])
        TrustStore.in_state_dir(tmp_path / "two").add(addrs["one"])
        procs["one"].stdin.write(f"exercise {addrs['two']}\n")  # type: ignore[union-attr]
        procs["one"].stdin.flush()  # type: ignore[union-attr]
        result = json.loads(procs["one"].stdout.readline())  # type: ignore[union-attr]
        assert result.get("ok"), result
        assert result["path"] == f"relay {SERVER_IPS[0]}:7000"


def test_resting_agents_behind_nats_stay_reachable_over_udp(tmp_path: Path) -> None:
    """Idle agents behind real NATs rest on UDP (their hellos keep the mappings open); a peer
    reaches one by address alone, over the relay's UDP through its NAT, and it goes on resting."""
    from peerpath.testing.netlab import NatKind

    resting = {**RELAY_ONLY, "PEERPATH_REST_AFTER": "0.5", "PEERPATH_RENDEZVOUS_KEEPALIVE": "0.5"}
    with Lab() as lab:
        server = lab.public_host("server", SERVER_IPS)
        url = start_peerpath_server(server)
        one = lab.host("one", behind=lab.router("r1", NatKind.PORT_RESTRICTED))
        two = lab.host("two", behind=lab.router("r2", NatKind.SYMMETRIC))
        procs = {}
        for name, host in (("one", one), ("two", two)):
            procs[name] = host.popen(
                [sys.executable, AGENT, "mesh", str(tmp_path / name), url], stdin=-1, stderr=-3, env=resting
            )
        addrs = {n: Address.parse(p.stdout.readline().split()[1]) for n, p in procs.items()}  # type: ignore[union-attr]
        TrustStore.in_state_dir(tmp_path / "one").add(addrs["two"])
        TrustStore.in_state_dir(tmp_path / "two").add(addrs["one"])

        def rendezvous(name: str) -> dict[str, object]:
            procs[name].stdin.write("status\n")  # type: ignore[union-attr]
            procs[name].stdin.flush()  # type: ignore[union-attr]
            return json.loads(procs[name].stdout.readline())["rendezvous"]  # type: ignore[union-attr, no-any-return]

        deadline = time.monotonic() + 30
        while not all(rendezvous(n)["resting"] for n in procs):
            assert time.monotonic() < deadline, {n: rendezvous(n) for n in procs}
            time.sleep(0.5)
        procs["one"].stdin.write(f"exercise {addrs['two']}\n")  # type: ignore[union-attr]
        procs["one"].stdin.flush()  # type: ignore[union-attr]
        result = json.loads(procs["one"].stdout.readline())  # type: ignore[union-attr]
        assert procs["one"].stdout.readline().strip() == "done"  # type: ignore[union-attr]
        assert result.get("ok"), result
        assert result["path"] == f"relay {SERVER_IPS[0]}:7000"
        two_status = rendezvous("two")
        assert two_status["resting"] and two_status["registrations"] == 1, two_status
        assert two_status["relay_received_udp"] > 0


def test_server_restart_agents_reregister_and_the_session_keeps_flowing(tmp_path: Path) -> None:
    from peerpath.testing.netlab import NatKind

    with Lab() as lab:
        server = lab.public_host("server", SERVER_IPS)
        state = str(tmp_path / "server-state")
        url = start_peerpath_server(server, state=state)
        one = lab.host("one", behind=lab.router("r1", NatKind.PORT_RESTRICTED))
        two = lab.host("two", behind=lab.router("r2", NatKind.SYMMETRIC))
        procs = {}
        for name, host in (("one", one), ("two", two)):
            procs[name] = host.popen(
                [sys.executable, AGENT, "mesh", str(tmp_path / name), url], stdin=-1, stderr=-3, env=RELAY_ONLY
            )
        addrs = {n: Address.parse(p.stdout.readline().split()[1]) for n, p in procs.items()}  # type: ignore[union-attr]
        TrustStore.in_state_dir(tmp_path / "one").add(addrs["two"])
        TrustStore.in_state_dir(tmp_path / "two").add(addrs["one"])

        def exercise() -> dict[str, object]:
            procs["one"].stdin.write(f"exercise {addrs['two']}\n")  # type: ignore[union-attr]
            procs["one"].stdin.flush()  # type: ignore[union-attr]
            result = json.loads(procs["one"].stdout.readline())  # type: ignore[union-attr]
            assert procs["one"].stdout.readline().strip() == "done"  # type: ignore[union-attr]
            return result

        before = exercise()
        assert before.get("ok"), before
        # Kill the server (SIGKILL: no goodbye to anyone), then start it again on the same state.
        for proc in list(lab._processes):
            if proc.args[:6] == server.argv([*PEERPATH_PREFIX, "server"])[:6]:
                proc.kill()
                proc.wait()
        start_peerpath_server(server, state=state)
        after = exercise()  # the same session (connect() reuses it), over the re-registered relay
        assert after.get("ok"), after
        assert after["path"] == before["path"] == f"relay {SERVER_IPS[0]}:7000"
        # The new server instance saw both agents register again and carried the data.
        for proc in list(lab._processes):
            if proc.args[:6] == server.argv([*PEERPATH_PREFIX, "server"])[:6]:
                lab.stop(proc)  # SIGTERM: it writes its final status
        status = json.loads((Path(state) / "status.json").read_text())
        assert status["counters"]["registered"] == 2
        assert status["counters"]["relay_bytes"] > 100_000
