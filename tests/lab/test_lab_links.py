"""The lab itself: routers drop unsolicited inbound, impaired links delay and lose, teardown is total."""

from __future__ import annotations

import re
import subprocess

import pytest

from peerpath.testing import netlab
from peerpath.testing.netlab import Impairment, Lab, NatKind


def ping(src: netlab.Node, dst: str, count: int, interval: str = "0.05") -> tuple[int, float]:
    """(replies received, average RTT in ms)."""
    proc = src.run_proc(["ping", "-n", "-q", "-c", str(count), "-i", interval, "-W", "2", dst], timeout=120)
    received = int(re.search(r"(\d+) received", proc.stdout).group(1))  # type: ignore[union-attr]
    avg = re.search(r"= [\d.]+/([\d.]+)/", proc.stdout)
    return received, float(avg.group(1)) if avg else 0.0


def test_impaired_link_adds_delay_and_loss() -> None:
    with Lab() as lab:
        server = lab.public_host("server", ["203.0.113.10"])
        delayed = lab.public_host("delayed", link=Impairment(delay_ms=40))
        lossy = lab.public_host("lossy", link=Impairment(loss=0.3, seed=7, rate="20mbit"))
        received, avg = ping(delayed, server.ip, 5)
        assert received == 5
        assert avg >= 80  # two crossings of a 40 ms link: a lower bound, never a timing race
        received, _ = ping(lossy, server.ip, 40, interval="0.01")
        assert 0 < received < 40
        assert "tbf" in lossy.run(["tc", "qdisc", "show", "dev", "eth0"])


def test_router_drops_unsolicited_inbound() -> None:
    with Lab() as lab:
        outside = lab.public_host("outside")
        router = lab.router("home", NatKind.FULL_CONE)
        lab.host("inside", behind=router)
        # Nothing inside has sent anything: a probe at the router's public address goes nowhere,
        # and leaves no conntrack entry that could steal a port later.
        received, _ = ping(outside, router.wan_ip, 2)
        assert received == 0
        proc = outside.run_proc(
            ["python3", "-c", f"import socket;s=socket.socket(2,2);s.sendto(b'x',('{router.wan_ip}',40000))"]
        )
        assert proc.returncode == 0
        entries = router.run_proc(["sh", "-c", "cat /proc/net/nf_conntrack 2>/dev/null || conntrack -L"]).stdout
        assert "dport=40000" not in entries


def test_lab_teardown_removes_namespaces_and_processes() -> None:
    lab = Lab()
    try:
        host = lab.public_host("sleeper")
        proc = host.popen(["sleep", "600"])
        names = [node.ns for node in lab.nodes.values()]
    finally:
        lab.close()
    assert proc.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(name in listed for name in names)


def test_lab_refuses_duplicate_names() -> None:
    with Lab() as lab:
        lab.public_host("a")
        with pytest.raises(netlab.LabError, match="exists already"):
            lab.public_host("a")


def test_gateway_mac_stays_when_hosts_join_later() -> None:
    # Seen in CI: a host added after others could not reach anything for a while, because the
    # internet bridge took the new port's (lower) MAC and the routers' ARP caches went stale.
    with Lab() as lab:
        lab.public_host("first")
        before = lab.internet.run(["cat", "/sys/class/net/lan0/address"])
        for i in range(8):
            lab.public_host(f"later-{i}")
        assert lab.internet.run(["cat", "/sys/class/net/lan0/address"]) == before


def test_sweep_spares_the_labs_of_running_processes() -> None:
    with Lab() as lab:
        host = lab.public_host("kept")
        netlab.sweep_stale()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert host.ns in listed
