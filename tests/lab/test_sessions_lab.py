"""Two agents in different namespaces: an authenticated, encrypted session across a NAT and a
slow lossy link, with streams and messages both ways; the wire carries no plaintext."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from peerpath.testing.netlab import Impairment, Lab, NatKind

from .conftest import PEERPATH, identity_of, trust_in

AGENT = str(Path(__file__).with_name("agent.py"))


def introduce(a_state: Path, b_state: Path) -> tuple[str, str]:
    """Identities for two state directories that trust each other (written in this process,
    as `peerpath address` and `peerpath trust add` would); their addresses."""
    a_addr, b_addr = identity_of(a_state), identity_of(b_state)
    trust_in(a_state, b_addr)
    trust_in(b_state, a_addr)
    return a_addr, b_addr


@pytest.mark.parametrize("link", [None, Impairment(delay_ms=25, jitter_ms=2, loss=0.01)], ids=["clean", "lossy"])
def test_agents_across_a_nat_exchange_streams_and_messages_both_ways(tmp_path: Path, link: Impairment | None) -> None:
    with Lab() as lab:
        server = lab.public_host("server")
        client = lab.host("client", behind=lab.router("home", NatKind.PORT_RESTRICTED, link=link))
        s_state, c_state = tmp_path / "server", tmp_path / "client"
        _, s_addr = introduce(c_state, s_state)
        server.start([sys.executable, AGENT, "serve", str(s_state), "4433"], ready="^ready ")
        pcap = tmp_path / "wire.pcap"
        capture = lab.internet.start(["tcpdump", "-i", "lan0", "-w", str(pcap), "-U", "udp"], ready="listening on")
        out = client.run([sys.executable, AGENT, "exercise", str(c_state), f"{s_addr}@{server.ip}:4433"], timeout=240)
        result = json.loads(out)
        assert result["peer"] == s_addr
        assert result["path"] == f"direct udp {server.ip}:4433"
        assert result["streams_ok"] and result["large_message_ok"]
        assert result["reverse"] == {"streams_ok": True, "request_ok": True}
        lab.stop(capture)
        wire = pcap.read_bytes()
        assert len(wire) > 1_000_000  # the capture saw the traffic...
        assert b"call me back" not in wire  # ... and none of it in the clear


def test_ping_between_daemons_in_two_namespaces(tmp_path: Path) -> None:
    with Lab() as lab:
        a = lab.public_host("a")
        b = lab.host("b", behind=lab.router("home", NatKind.FULL_CONE))
        a_state, b_state = tmp_path / "a", tmp_path / "b"
        a_addr, _ = introduce(a_state, b_state)
        a.start([*PEERPATH, "up", "--state-dir", str(a_state), "--port", "4000"], ready="up on udp")
        b.start([*PEERPATH, "up", "--state-dir", str(b_state)], ready="up on udp")
        proc = b.run_proc(
            [*PEERPATH, "ping", f"{a_addr}@{a.ip}:4000", "-c", "3", "-i", "0.2", "--json", "--state-dir", str(b_state)]
        )
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["received"] == 3
        assert {r["path"] for r in summary["replies"]} == {f"direct udp {a.ip}:4000"}
        # The responder sees the client at its NAT's public address, not its private one.
        status = json.loads(a.run([*PEERPATH, "status", "--json", "--state-dir", str(a_state)]))
        (session,) = status["sessions"]
        assert session["path"].startswith("direct udp 198.51.100.")
        assert not session["path"].startswith(f"direct udp {b.ip}")


def test_untrusted_agent_in_another_namespace_is_refused(tmp_path: Path) -> None:
    with Lab() as lab:
        a = lab.public_host("a")
        b = lab.public_host("b")
        a_state, b_state = tmp_path / "a", tmp_path / "b"
        a_addr = identity_of(a_state)
        trust_in(b_state, a_addr)  # one-sided trust
        a.start([*PEERPATH, "up", "--state-dir", str(a_state), "--port", "4000"], ready="up on udp")
        b.start([*PEERPATH, "up", "--state-dir", str(b_state)], ready="up on udp")
        proc = b.run_proc([*PEERPATH, "ping", f"{a_addr}@{a.ip}:4000", "-c", "1", "--state-dir", str(b_state)])
        assert proc.returncode == 1
        assert "does not trust" in proc.stderr
