"""The NAT lab: Linux network namespaces joined by veth pairs and bridges, with
routers that NAT with the kernel's netfilter (nftables). Needs root.

A topology is a few lines::

    with Lab() as lab:
        server = lab.public_host("server", ["203.0.113.10", "203.0.113.11"])
        home = lab.router("home", NatKind.PORT_RESTRICTED)
        alice = lab.host("alice", behind=home)
        alice.run(["ping", "-c1", "203.0.113.10"])

Addresses: the "internet" is a router namespace whose bridge carries RFC 5737
documentation ranges (203.0.113.0/24 for servers, 198.51.100.0/24 for routers and
public hosts); home networks are 10.N.0.0/24; carrier-grade NAT uses 100.64.N.0/24.
Nothing leaves the namespaces. :meth:`Lab.close` kills every process the lab started
and deletes every namespace, also after a failure.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

NS_PREFIX = "pplab-"


class NatKind(enum.Enum):
    """Router kinds, named by RFC 4787 behaviour (mapping / filtering)."""

    #: Endpoint-independent mapping and filtering.
    FULL_CONE = "full-cone"
    #: Endpoint-independent mapping, address-dependent filtering.
    ADDRESS_RESTRICTED = "address-restricted"
    #: Endpoint-independent mapping, address-and-port-dependent filtering.
    PORT_RESTRICTED = "port-restricted"
    #: Address-and-port-dependent mapping with random ports, and filtering.
    SYMMETRIC = "symmetric"
    #: Address-and-port-dependent mapping and filtering, ports handed out in sequence
    #: (one counter for every new flow, as many carrier and enterprise NATs do).
    SYMMETRIC_SEQUENTIAL = "symmetric-sequential"
    #: A port-restricted NAT whose firewall drops all outbound UDP.
    UDP_BLOCKED = "udp-blocked"
    #: A carrier-grade NAT (RFC 6598 space inside); put a home router behind it.
    CARRIER = "carrier"


class LabError(RuntimeError):
    """A lab command failed; carries the command and what it printed."""


@dataclass(frozen=True)
class Impairment:
    """What a userspace link does to frames in each direction."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    #: Let jitter reorder frames (otherwise delivery order is kept).
    reorder: bool = False
    #: Optional rate limit (tbf on the tap devices), e.g. "10mbit".
    rate: str | None = None
    #: Seed for the loss and jitter draws (None: random).
    seed: int | None = None

    def args(self) -> list[str]:
        """Command-line arguments for :mod:`peerpath.testing.linkd`."""
        out = ["--delay-ms", str(self.delay_ms), "--jitter-ms", str(self.jitter_ms), "--loss", str(self.loss)]
        if self.seed is not None:
            out += ["--seed", str(self.seed)]
        return [*out, "--reorder"] if self.reorder else out


def sh(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None) -> str:
    """Run a command in the root namespace; return stdout, raise :class:`LabError` on failure."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def available() -> str | None:
    """None if the lab can run here, else the reason it cannot."""
    if sys.platform != "linux":
        return "the lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces and nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the lab needs the {tool!r} command (apt-get install iproute2 nftables)"
    return None


def sweep_stale() -> list[str]:
    """Delete lab namespaces left behind by a killed run.

    Only ours (the pplab- prefix), and only those whose creating process is gone: a lab of
    a test run going on at the same time is left alone.
    """
    removed = []
    for line in sh(["ip", "netns", "list"], check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(NS_PREFIX):
            continue
        owner = name[len(NS_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and _alive(int(owner)):
            continue
        _kill_ns_processes(name)
        sh(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_processes(ns: str) -> None:
    for pid in sh(["ip", "netns", "pids", ns], check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@dataclass(eq=False)
class Node:
    """A namespace: a host or a router. Commands run inside it."""

    lab: Lab
    name: str
    ns: str
    addresses: list[str] = field(default_factory=list)

    @property
    def ip(self) -> str:
        """The node's first address."""
        return self.addresses[0]

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.ns, *cmd]

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None) -> str:
        """Run a command here to completion; return its stdout."""
        return sh(self.argv(cmd), check=check, timeout=timeout, input=input)

    def run_proc(self, cmd: Sequence[str], *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a command here; return the whole CompletedProcess (no check)."""
        return subprocess.run(self.argv(cmd), capture_output=True, text=True, timeout=timeout, check=False)

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start a long-running process here; the lab stops it on close."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(self.argv(cmd), text=True, **kwargs)
        self.lab._processes.append(proc)
        return proc

    def start(self, cmd: Sequence[str], *, ready: str, timeout: float = 15.0) -> subprocess.Popen[str]:
        """Start a process and wait until a line of its output matches the regex ``ready``."""
        proc = self.popen(cmd)
        if proc.stdout is None:
            raise LabError("start() needs the process's output on a pipe")
        pattern = re.compile(ready)
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        os.set_blocking(proc.stdout.fileno(), False)
        buffer = ""
        while time.monotonic() < deadline:
            chunk = _read_available(proc.stdout)
            if chunk:
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                seen.extend(lines)
                if any(pattern.search(line) for line in lines):
                    os.set_blocking(proc.stdout.fileno(), True)
                    _drain(proc, seen)
                    return proc
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.02)
        self.lab.stop(proc)
        raise LabError(f"{shlex.join(cmd)} in {self.name}: no line matching {ready!r}; output: {seen[-20:]}")

    def python(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``python -m ...`` (this interpreter) here."""
        return self.popen([sys.executable, *args], **kwargs)

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl inside this namespace."""
        self.run(["sysctl", "-qw", f"{key}={value}"])


def _read_available(stream: IO[str]) -> str:
    try:
        return stream.read() or ""
    except (BlockingIOError, TypeError):
        return ""


@dataclass(eq=False)
class Router(Node):
    """A namespace that routes between a WAN link and a LAN bridge, NATing if its kind says so."""

    kind: NatKind | None = None
    lan_prefix: str = ""
    lan_ip: str = ""
    wan_ip: str = ""
    hairpinning: bool = False
    _next_host: itertools.count[int] = field(default_factory=lambda: itertools.count(2))


class Lab:
    """Builds and tears down one topology. Use as a context manager."""

    def __init__(self) -> None:
        reason = available()
        if reason is not None:
            raise LabError(reason)
        # The creating process's PID is part of every namespace name: sweep_stale() spares
        # the labs of processes that are still running.
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.nodes: dict[str, Node] = {}
        self._processes: list[subprocess.Popen[str]] = []
        self._links = itertools.count(1)
        self._bridges = itertools.count(1)
        self._lan_numbers = itertools.count(1)
        self._public_hosts = itertools.count(20)
        self._servers = itertools.count(10)
        self._internet: Router | None = None

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process the lab started and delete every namespace it made."""
        for proc in reversed(self._processes):
            self.stop(proc)
        self._processes.clear()
        for node in reversed(list(self.nodes.values())):
            _kill_ns_processes(node.ns)
            sh(["ip", "netns", "del", node.ns], check=False)
        self.nodes.clear()
        self._internet = None

    def stop(self, proc: subprocess.Popen[str], timeout: float = 3.0) -> None:
        """Stop one process: SIGTERM, then SIGKILL after ``timeout``."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()

    # -- building -------------------------------------------------------------------

    def _namespace(self, name: str, cls: type[Node] = Node, **kwargs: Any) -> Any:
        if name in self.nodes:
            raise LabError(f"a node named {name!r} exists already")
        ns = f"{NS_PREFIX}{self.id}-{name}"
        sh(["ip", "netns", "add", ns])
        node = cls(self, name, ns, **kwargs)
        self.nodes[name] = node
        node.run(["ip", "link", "set", "lo", "up"])
        # Frames crossing a bridge must not pass through the IP filter hooks (br_netfilter).
        for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"):
            node.run(["sh", "-c", f"test -e /proc/sys/net/bridge/{key} && sysctl -qw net.bridge.{key}=0 || true"])
        return node

    @property
    def internet(self) -> Router:
        """The internet: a router namespace with one bridge for all public addresses."""
        if self._internet is None:
            inet: Router = self._namespace("inet", Router)
            self._bridge(inet)
            inet.run(["ip", "link", "set", "lan0", "up"])
            inet.run(["ip", "addr", "add", "203.0.113.1/24", "dev", "lan0"])
            inet.run(["ip", "addr", "add", "198.51.100.1/24", "dev", "lan0"])
            inet.sysctl("net.ipv4.ip_forward", "1")
            inet.addresses = ["203.0.113.1", "198.51.100.1"]
            self._internet = inet
        return self._internet

    def _bridge(self, node: Node) -> None:
        """Create ``node``'s LAN bridge with a fixed MAC.

        A bridge without one takes the lowest MAC of its ports, so attaching a host later
        could change the gateway's MAC under neighbours' cached ARP entries.
        """
        number = next(self._bridges)
        tag = self.id.rsplit("-", 1)[1][:2]
        mac = f"02:70:70:{tag}:{number >> 8:02x}:{number & 0xFF:02x}"
        node.run(["ip", "link", "add", "lan0", "address", mac, "type", "bridge"])

    def _link(self, node: Node, upstream: Router, ifname: str, impairment: Impairment | None) -> None:
        """Join ``node``'s ``ifname`` to ``upstream``'s LAN bridge."""
        peer = f"v{next(self._links)}"
        if impairment is None:
            node.run(["ip", "link", "add", ifname, "type", "veth", "peer", "name", peer, "netns", upstream.ns])
        else:
            node.run(["ip", "tuntap", "add", "dev", ifname, "mode", "tap"])
            upstream.run(["ip", "tuntap", "add", "dev", peer, "mode", "tap"])
            cmd = [
                sys.executable,
                "-m",
                "peerpath.testing.linkd",
                "--a",
                f"{node.ns}:{ifname}",
                "--b",
                f"{upstream.ns}:{peer}",
                *impairment.args(),
            ]
            # The forwarder enters both namespaces itself (setns); it runs in the root namespace.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self._processes.append(proc)
            line = proc.stdout.readline() if proc.stdout is not None else ""
            if "ready" not in line:
                self.stop(proc)
                raise LabError(f"link forwarder failed to start: {line.strip() or 'no output'}")
            if impairment.rate:
                for where, dev in ((node, ifname), (upstream, peer)):
                    tbf = ["tbf", "rate", impairment.rate, "burst", "32kbit", "latency", "400ms"]
                    where.run(["tc", "qdisc", "add", "dev", dev, "root", *tbf])
        upstream.run(["ip", "link", "set", peer, "master", "lan0", "up"])
        node.run(["ip", "link", "set", ifname, "up"])

    def _address_on(self, upstream: Router) -> tuple[str, str]:
        """A fresh address on ``upstream``'s LAN and its gateway."""
        if upstream is self._internet:
            return f"198.51.100.{next(self._public_hosts)}", "198.51.100.1"
        return f"{upstream.lan_prefix}.{next(upstream._next_host)}", upstream.lan_ip

    def public_host(self, name: str, addresses: Sequence[str] | None = None, link: Impairment | None = None) -> Node:
        """A host on the internet with public addresses (default: a fresh 198.51.100.x).

        Give two 203.0.113.x addresses for an RFC 5780 STUN server.
        """
        inet = self.internet
        host: Node = self._namespace(name)
        self._link(host, inet, "eth0", link)
        addrs = list(addresses) if addresses else [self._address_on(inet)[0]]
        for addr in addrs:
            host.run(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
        gateway = "203.0.113.1" if addrs[0].startswith("203.0.113.") else "198.51.100.1"
        host.run(["ip", "route", "add", "default", "via", gateway])
        host.addresses = addrs
        return host

    def router(
        self,
        name: str,
        kind: NatKind,
        *,
        upstream: Router | None = None,
        hairpinning: bool = False,
        link: Impairment | None = None,
        port_mapping: str | None = None,
    ) -> Router:
        """A NAT router of ``kind`` whose WAN side sits on ``upstream`` (default: the internet).

        ``port_mapping``, a comma-separated choice of "pcp", "nat-pmp" and "upnp", runs
        :mod:`peerpath.testing.pcpd` (PCP, NAT-PMP) and :mod:`peerpath.testing.igd` (a UPnP
        IGD) on the router, which then map ports on request."""
        up = upstream or self.internet
        number = next(self._lan_numbers)
        lan_prefix = f"100.64.{number}" if kind is NatKind.CARRIER else f"10.{number}.0"
        router: Router = self._namespace(
            name, Router, kind=kind, lan_prefix=lan_prefix, lan_ip=f"{lan_prefix}.1", hairpinning=hairpinning
        )
        self._link(router, up, "wan", link)
        wan_ip, gateway = self._address_on(up)
        router.wan_ip = wan_ip
        router.addresses = [wan_ip]
        router.run(["ip", "addr", "add", f"{wan_ip}/24", "dev", "wan"])
        router.run(["ip", "route", "add", "default", "via", gateway])
        self._bridge(router)
        router.run(["ip", "addr", "add", f"{router.lan_ip}/24", "dev", "lan0"])
        router.run(["ip", "link", "set", "lan0", "up"])
        router.sysctl("net.ipv4.ip_forward", "1")
        router.run(["nft", "-f", "-"], input=nat_ruleset(kind, wan_ip, hairpinning=hairpinning))
        wanted = set(port_mapping.split(",")) if port_mapping else set()
        where = ["--wan-ip", wan_ip, "--lan-ip", router.lan_ip]
        if wanted & {"pcp", "nat-pmp"}:
            protocols = ",".join(sorted(wanted & {"pcp", "nat-pmp"}))
            pcpd = [sys.executable, "-m", "peerpath.testing.pcpd", *where, "--protocols", protocols]
            router.start(pcpd, ready="^port mapping")
        if "upnp" in wanted:
            router.start([sys.executable, "-m", "peerpath.testing.igd", *where], ready="^UPnP IGD")
        return router

    def host(self, name: str, behind: Router, link: Impairment | None = None) -> Node:
        """A host on ``behind``'s LAN."""
        host: Node = self._namespace(name)
        self._link(host, behind, "eth0", link)
        addr, gateway = self._address_on(behind)
        host.run(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
        host.run(["ip", "route", "add", "default", "via", gateway])
        host.addresses = [addr]
        return host


#: The ports a SYMMETRIC_SEQUENTIAL router hands out, in turn.
SEQUENTIAL_FIRST_PORT = 20000
SEQUENTIAL_PORTS = 4096


def nat_ruleset(kind: NatKind, wan_ip: str, *, hairpinning: bool = False) -> str:
    """The nftables ruleset of a router of ``kind`` (WAN interface ``wan``, LAN bridge ``lan0``).

    Mainline Linux has no full-cone target, so endpoint-independent filtering is
    emulated: a map learned from outbound UDP (public port -> internal address and
    port) DNATs inbound packets; for address-dependent filtering only sources in a set
    of contacted (public port, remote address) pairs are let through. Unsolicited
    inbound is dropped in INPUT, as home routers do: otherwise the kernel would confirm
    a conntrack entry for it and later remap the port.
    """
    fully_random = " fully-random" if kind is NatKind.SYMMETRIC else ""
    if kind is NatKind.SYMMETRIC_SEQUENTIAL:
        # Each new flow takes the next port of one counter: 20000, 20001, ... 24095, then
        # around again. (The map turns numgen's host-order integer into a port; used as a
        # port directly it comes out byte-swapped, 256 apart.)
        ports = ", ".join(f"{i} : {SEQUENTIAL_FIRST_PORT + i}" for i in range(SEQUENTIAL_PORTS))
        counter = f"numgen inc mod {SEQUENTIAL_PORTS} map {{ {ports} }}"
        sequential = f'oifname "wan" meta l4proto {{ tcp, udp }} snat ip to {wan_ip} : {counter}'
    else:
        sequential = ""
    learn: list[str] = []
    dnat: list[str] = []
    if kind in (NatKind.FULL_CONE, NatKind.ADDRESS_RESTRICTED) or hairpinning:
        learn.append(
            'oifname "wan" meta l4proto udp update @eim { udp sport : ct original ip saddr . ct original proto-src }'
        )
    if kind is NatKind.FULL_CONE:
        dnat.append('iifname "wan" meta l4proto udp dnat ip to udp dport map @eim')
    if kind is NatKind.ADDRESS_RESTRICTED:
        learn.append('oifname "wan" meta l4proto udp update @contacted { udp sport . ip daddr }')
        dnat.append('iifname "wan" meta l4proto udp udp dport . ip saddr @contacted dnat ip to udp dport map @eim')
    if hairpinning:
        dnat.append(f'iifname "lan0" ip daddr {wan_ip} meta l4proto udp dnat ip to udp dport map @eim')
    block_udp = 'iifname "lan0" meta l4proto udp drop' if kind is NatKind.UDP_BLOCKED else ""
    hairpin_snat = 'iifname "lan0" oifname "lan0" ct status dnat masquerade' if hairpinning else ""
    return f"""
table ip lab {{
    map eim {{
        type inet_service : ipv4_addr . inet_service
        flags dynamic,timeout
        timeout 10m
    }}
    set contacted {{
        type inet_service . ipv4_addr
        flags dynamic,timeout
        timeout 10m
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        {block_udp}
        iifname "lan0" accept
        ct state established,related accept
        ct status dnat accept
    }}
    chain srcnat {{
        type nat hook postrouting priority srcnat; policy accept;
        {sequential}
        oifname "wan" masquerade{fully_random}
        {hairpin_snat}
    }}
    chain learn {{
        type filter hook postrouting priority 200; policy accept;
        {chr(10).join(learn)}
    }}
    chain dstnat {{
        type nat hook prerouting priority dstnat; policy accept;
        {chr(10).join(dnat)}
    }}
}}
"""


def every_router_kind(
    lab: Lab, *, impaired: Impairment | None = None, link: Impairment | None = None
) -> dict[str, Node]:
    """One host behind each router kind (and a public host), keyed by kind name.

    Keys: ``public``, ``full-cone``, ``address-restricted``, ``port-restricted``,
    ``symmetric``, ``udp-blocked``, ``cgnat`` (a port-restricted home router behind a
    carrier NAT), ``same-nat-1`` and ``same-nat-2`` (two hosts behind one hairpinning
    port-restricted router), and with ``impaired``, ``impaired`` (a port-restricted
    router whose WAN link is impaired). With ``link``, every router's WAN link and the
    public host's link are impaired that way.
    """
    hosts: dict[str, Node] = {"public": lab.public_host("public", link=link)}
    for kind in (
        NatKind.FULL_CONE,
        NatKind.ADDRESS_RESTRICTED,
        NatKind.PORT_RESTRICTED,
        NatKind.SYMMETRIC,
        NatKind.UDP_BLOCKED,
    ):
        hosts[kind.value] = lab.host(f"h-{kind.value}", behind=lab.router(kind.value, kind, link=link))
    carrier = lab.router("carrier", NatKind.CARRIER, link=link)
    hosts["cgnat"] = lab.host("h-cgnat", behind=lab.router("cg-home", NatKind.PORT_RESTRICTED, upstream=carrier))
    shared = lab.router("shared", NatKind.PORT_RESTRICTED, hairpinning=True, link=link)
    hosts["same-nat-1"] = lab.host("h-same-1", behind=shared)
    hosts["same-nat-2"] = lab.host("h-same-2", behind=shared)
    if impaired is not None:
        slow = lab.router("slow", NatKind.PORT_RESTRICTED, link=impaired)
        hosts["impaired"] = lab.host("h-impaired", behind=slow)
    return hosts


#: Lines of a started process's output kept after its ready line (for a failing test to show).
TAIL_LINES = 500


def _drain(proc: subprocess.Popen[str], seen: list[str]) -> None:
    """Keep reading a started process's output in a thread, the last :data:`TAIL_LINES` lines
    kept in ``proc.tail``: a process whose output nobody reads blocks once its pipe is full
    (a server that logs what an attack does would stop serving)."""
    tail: collections.deque[str] = collections.deque(seen, maxlen=TAIL_LINES)
    proc.tail = tail  # type: ignore[attr-defined]
    stream = proc.stdout

    def read() -> None:
        with contextlib.suppress(OSError, ValueError):  # the stream is closed when the lab stops the process
            for line in stream or ():
                tail.append(line.rstrip("\n"))

    threading.Thread(target=read, name=f"output of {proc.pid}", daemon=True).start()
