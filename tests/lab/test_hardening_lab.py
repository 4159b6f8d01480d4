"""A soak under attack: a node and the server take garbage, floods and many sources for a
while, and two agents keep a session and move data through it all (issue 11)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from peerpath.testing.netlab import Lab, NatKind

from .conftest import SERVER_IPS, Mesh, start_peerpath_server

ATTACKER = str(Path(__file__).with_name("attacker.py"))
ATTACK_SECONDS = 90
#: The attacker's addresses: many sources on one host.
ATTACKER_IPS = [f"198.51.100.{200 + i}" for i in range(10)]


def rss_mib(pid: int) -> float:
    """Resident memory of a process (the lab shares this PID namespace)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_trusted_traffic_flows_while_the_server_and_a_node_are_attacked(tmp_path: Path) -> None:
    with Lab() as lab:
        server = lab.public_host("server", SERVER_IPS)
        state = tmp_path / "server"
        url = start_peerpath_server(server, state=str(state))
        server_proc = lab._processes[-1]
        home = lab.router("home", NatKind.PORT_RESTRICTED)
        alice = lab.host("alice", home)
        bob = lab.public_host("bob")
        attacker = lab.public_host("attacker", ATTACKER_IPS)
        mesh = Mesh(tmp_path, url, {"alice": alice, "bob": bob})
        warm = mesh.exercise("alice", "bob")
        assert warm["ok"], warm
        bob_status = json.loads(_ask(mesh, "bob", "status"))
        bob_port = bob_status["endpoint"].rpartition(":")[2]
        bob_pid = mesh.procs["bob"].pid
        before = {"server": rss_mib(server_proc.pid), "bob": rss_mib(bob_pid)}
        peak = dict(before)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak["server"] = max(peak["server"], rss_mib(server_proc.pid))
                peak["bob"] = max(peak["bob"], rss_mib(bob_pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        attack = attacker.popen(
            [
                sys.executable,
                ATTACKER,
                str(ATTACK_SECONDS),
                url,
                f"{bob.ip}:{bob_port}",
                str(mesh.addresses["bob"]),
                *ATTACKER_IPS,
            ]
        )
        try:
            soak = mesh.soak("alice", "bob", ATTACK_SECONDS)
            out, _ = attack.communicate(timeout=ATTACK_SECONDS + 60)
        finally:
            stop.set()
            sampler.join()
        report = json.loads(out.strip().splitlines()[-1])
        after = json.loads(_ask(mesh, "bob", "status"))
        again = mesh.exercise("alice", "bob")
        server_status = json.loads((state / "status.json").read_text())
        figures = {
            "attack": report,
            "soak": {k: soak.get(k) for k in ("sent", "ok", "paths", "error")},
            "rss_mib": {"before": before, "peak": peak},
            "server_counters": server_status["counters"],
            "bob_counters": after["counters"],
            "bob_admission": after["admission"],
            "bob_pending_trust_requests": after["pending"],
        }
        print(json.dumps(figures, indent=2))
        assert not report["attack_errors"], report
        # Trusted traffic kept flowing, and still does.
        assert "error" not in soak and soak["sent"] == soak["ok"] and soak["ok"] > 0, soak
        assert again["ok"], again
        # Nothing died: the server serves, bob's socket reader handled every datagram.
        assert server_proc.poll() is None
        assert server_status["counters"]["handler_errors"] == 0
        assert after["counters"]["datagrams_failed"] == 0
        assert server_status["counters"]["malformed"] > 0 and server_status["counters"]["connections_refused"] > 0
        # Memory stayed bounded (a generous bound: the findings grew a node by hundreds of MiB).
        assert peak["server"] - before["server"] < 150, figures["rss_mib"]
        assert peak["bob"] - before["bob"] < 150, figures["rss_mib"]
        assert after["pending"] <= 256


def _ask(mesh: Mesh, name: str, command: str) -> str:
    mesh.send(name, command)
    return mesh._out(name).readline()
