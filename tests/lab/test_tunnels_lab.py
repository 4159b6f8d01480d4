"""OpenSSH through the overlay across real NATs: sshd on a host behind a symmetric NAT, ssh
and scp from a host behind a port-restricted one, through `peerpath connect` as the
ProxyCommand; a 64 MiB copy runs while the session moves from the relay to the direct
path, and another while the direct path is cut (the relay carries it) and restored."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from peerpath.testing import sshd
from peerpath.testing.netlab import Lab, NatKind, Node

from .conftest import PEERPATH, SERVER_IPS, identity_of, start_peerpath_server, trust_in
from .test_direct_lab import forward_filter

pytestmark = pytest.mark.skipif(sshd.available() is not None, reason=str(sshd.available()))

SSH_PORT = 2222
SIZE = 64 << 20


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def session(host: Node, state: Path, peer: str) -> dict[str, object]:
    status = json.loads(host.run([*PEERPATH, "status", "--json", "--state-dir", str(state)]))
    return next((s for s in status["sessions"] if s["peer"] == peer), {"path": "none", "paths": []})


def relayed_bytes(host: Node, state: Path, peer: str) -> int:
    """What the session has received over the relay so far."""
    paths = session(host, state, peer)["paths"]
    assert isinstance(paths, list)
    return sum(int(p["bytes_received"]) for p in paths if str(p["path"]).startswith("relay"))


def test_ssh_and_scp_across_nats_while_the_path_changes_and_is_cut(tmp_path: Path) -> None:
    with Lab() as lab:
        url = start_peerpath_server(lab.public_host("server", SERVER_IPS))
        symmetric, restricted = lab.router("sym", NatKind.SYMMETRIC), lab.router("pr", NatKind.PORT_RESTRICTED)
        service, client = lab.host("svc", behind=symmetric), lab.host("cli", behind=restricted)
        states = {"svc": tmp_path / "svc", "cli": tmp_path / "cli"}
        addresses = {n: identity_of(d) for n, d in states.items()}
        trust_in(states["svc"], addresses["cli"])
        trust_in(states["cli"], addresses["svc"])
        server = sshd.prepare(tmp_path / "ssh", SSH_PORT)
        service.start(server.command, ready="Server listening")
        for host, name in ((service, "svc"), (client, "cli")):
            host.start([*PEERPATH, "up", "--state-dir", str(states[name]), "--rendezvous", url], ready="up on udp")
        service.run([*PEERPATH, "expose", f"127.0.0.1:{SSH_PORT}", "--name", "ssh", "--state-dir", str(states["svc"])])
        proxy = f"{PEERPATH[0]} -m peerpath connect %h:ssh --state-dir {states['cli']}"
        options = server.client_options(proxy, tmp_path / "known_hosts")
        peer = f"root@{addresses['svc']}"
        original = tmp_path / "original.bin"
        original.write_bytes(os.urandom(SIZE))

        # The first session starts on the relay and moves to the direct path during the copy.
        client.run(["scp", *options, str(original), f"{peer}:{tmp_path / 'up.bin'}"], timeout=180)
        remote = client.run(["ssh", *options, peer, "sha256sum", str(tmp_path / "up.bin")], timeout=60)
        assert remote.split()[0] == digest(original)
        for _ in range(100):
            path = str(session(client, states["cli"], addresses["svc"])["path"])
            if path.startswith("direct"):
                break
            time.sleep(0.2)
        assert path.startswith(f"direct udp {symmetric.wan_ip}:"), path

        # A copy back while the direct path is cut at the client's router, then restored.
        cut = forward_filter("cut", f"ip daddr {symmetric.wan_ip} drop", f"ip saddr {symmetric.wan_ip} drop")

        def faults() -> None:
            time.sleep(0.5)
            restricted.run(["nft", "-f", "-"], input=cut)
            time.sleep(6.0)
            restricted.run(["nft", "delete", "table", "ip", "cut"])

        before = relayed_bytes(client, states["cli"], addresses["svc"])
        chaos = threading.Thread(target=faults)
        chaos.start()
        try:
            back = tmp_path / "back.bin"
            client.run(["scp", *options, f"{peer}:{tmp_path / 'up.bin'}", str(back)], timeout=180)
        finally:
            chaos.join()
        assert digest(back) == digest(original)
        # The relay carried the copy while the direct path was cut.
        assert relayed_bytes(client, states["cli"], addresses["svc"]) - before > 1 << 20
        # Still one working session afterwards.
        assert client.run(["ssh", *options, peer, "echo", "still here"], timeout=60).strip() == "still here"
