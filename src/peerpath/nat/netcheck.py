"""NAT behaviour discovery (RFC 5780 4), reported in RFC 4787 terms.

:func:`netcheck` runs, one after the other: mapping tests I-III on one socket,
filtering tests I-III on a second socket that has talked only to the server's
primary address (so the mapping tests cannot open its filter), hairpinning, and
port preservation. Sockets come from an injectable factory, so the logic runs
over an in-memory network in unit tests and over real sockets everywhere else.
"""

from __future__ import annotations

import asyncio
import enum
import socket
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from peerpath.clock import Clock, monotonic
from peerpath.nat.ports import port_step
from peerpath.nat.stun_client import StunTransport, UdpStunSocket, new_transaction_id
from peerpath.wire.endpoint import parse_endpoint
from peerpath.wire.stun import Address, Attr, ChangeRequest

DEFAULT_STUN_PORT = 3478
#: How long to wait for the first answer from the server before declaring UDP blocked.
DEFAULT_TIMEOUT = 3.0


class Behaviour(enum.StrEnum):
    """RFC 4787 mapping and filtering behaviours."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


@dataclass
class NetcheckResult:
    """What netcheck found. ``None`` means "could not tell"."""

    server: str
    udp: bool = False
    nat: bool | None = None
    local_address: str | None = None
    public_address: str | None = None
    mapping: Behaviour | None = None
    filtering: Behaviour | None = None
    hairpinning: bool | None = None
    port_preserving: bool | None = None
    #: Behind a NAT that maps per destination: the step between the ports it gave one
    #: socket toward the server's addresses in turn, when small (ports handed out in
    #: sequence, so the next one can be predicted); 0 when they look random.
    port_step: int | None = None
    rtt_ms: float | None = None
    elapsed_s: float = 0.0
    other_address: str | None = None
    #: Tests that could not run, with the reason.
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (the ``--json`` output)."""
        out = asdict(self)
        out["mapping"] = self.mapping.value if self.mapping else None
        out["filtering"] = self.filtering.value if self.filtering else None
        out["direct"] = self.verdict()
        return out

    def verdict(self) -> str:
        """One line, in plain words, on what this means for direct connections."""
        if not self.udp:
            return "UDP is blocked: peers reach you only through a relay over TCP/TLS"
        if self.nat is False and self.filtering in (None, Behaviour.ENDPOINT_INDEPENDENT):
            return "no NAT and open to inbound UDP: direct UDP with every peer"
        if self.nat is False:
            return "no NAT, but a firewall filters inbound UDP: direct UDP likely with most peers (hole punching)"
        if self.mapping is Behaviour.ENDPOINT_INDEPENDENT:
            if self.filtering is Behaviour.ENDPOINT_INDEPENDENT:
                return "easy NAT (full cone): direct UDP with almost every peer"
            return "easy NAT: direct UDP likely with most peers (hole punching)"
        if self.mapping is None:
            return "NAT behaviour unknown (the server has one address): direct UDP may work; relay as fallback"
        if self.port_step:
            return (
                f"hard NAT, but its ports come in sequence (step {self.port_step}): direct UDP with peers behind "
                "easy NATs through port prediction; needs a relay with peers behind hard NATs"
            )
        return (
            "hard NAT (mapping depends on the destination): direct UDP with peers behind easy NATs "
            "through port probing; needs a relay with peers behind the same kind of NAT"
        )


Opener = Callable[[Address], Awaitable[StunTransport]]


async def _open_udp(toward: Address) -> StunTransport:
    return await UdpStunSocket.open(toward)


async def resolve(server: str, default_port: int = DEFAULT_STUN_PORT) -> Address:
    """``HOST``, ``HOST:PORT``, ``IPv6`` or ``[IPv6]:PORT`` to an :class:`Address`.

    Raises ValueError with a message a user can act on.
    """
    host, port = parse_endpoint(server, default_port)
    try:
        return Address(host, port)
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ValueError(f"cannot resolve STUN server {host!r}: {exc.strerror or exc}") from exc
    family_order = sorted(infos, key=lambda info: info[0] != socket.AF_INET)
    return Address(str(family_order[0][4][0]), port)


def _negative_wait(rtt: float) -> float:
    """How long a test waits before it counts a missing answer as "filtered".

    Scaled to the measured round trip, never shorter than 0.3 s nor longer than 1.5 s.
    """
    return min(1.5, max(0.3, 4 * rtt + 0.2))


async def netcheck(
    server: Address,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    open_socket: Opener = _open_udp,
    clock: Clock = monotonic,
) -> NetcheckResult:
    """Discover this host's NAT mapping and filtering behaviour against one STUN server."""
    start = clock()
    result = NetcheckResult(server=str(server))
    sockets = [await open_socket(server)]
    try:
        min_rtt = await _mapping_tests(result, sockets[0], server, timeout)
        if result.udp:
            sockets.append(await open_socket(server))
            sockets.append(await open_socket(server))
            wait = _negative_wait(min_rtt)
            # The hairpinning probe travels between the first and a third socket, so it
            # cannot open the filter of the second; both waits overlap.
            await asyncio.gather(
                _filtering_tests(result, sockets[1], server, wait),
                _hairpinning_test(result, sockets[0], sockets[2], wait),
            )
    finally:
        for sock in sockets:
            sock.close()
    result.elapsed_s = round(clock() - start, 3)
    return result


async def _mapping_tests(result: NetcheckResult, sock: StunTransport, server: Address, timeout: float) -> float:
    """Run mapping tests I-III; return the smallest round trip seen (the first may include ARP)."""
    # RFC 5780 4.3, test I: the mapped address toward the primary address.
    first = await sock.request(server, timeout=timeout, rto=0.1)
    if first is None:
        result.skipped.append("all tests: no STUN answer over UDP")
        return 0.0
    result.udp = True
    rtts = [first.rtt]

    def done() -> float:
        result.rtt_ms = round(min(rtts) * 1000, 2)
        return min(rtts)

    mapped1 = first.message.mapped_address
    if mapped1 is None:
        result.skipped.append("all tests: the server's answer carries no mapped address")
        return done()
    local = sock.local_address
    result.local_address = str(local)
    result.public_address = str(mapped1)
    result.nat = mapped1 != local
    result.port_preserving = mapped1.port == local.port
    other = first.message.other_address
    if other is None:
        result.skipped.append("mapping tests II and III: the server has no OTHER-ADDRESS (one IP)")
        if not result.nat:
            result.mapping = Behaviour.ENDPOINT_INDEPENDENT
        return done()
    result.other_address = str(other)
    rto = max(0.05, 2 * first.rtt)
    wait = _negative_wait(first.rtt) * 2
    # Test II: the alternate IP, the primary port.
    second = await sock.request(Address(other.host, server.port), timeout=wait, rto=rto)
    if second is None or second.message.mapped_address is None:
        result.skipped.append("mapping test II: no answer from the alternate address")
        return done()
    rtts.append(second.rtt)
    mapped2 = second.message.mapped_address
    if mapped2 == mapped1:
        result.mapping = Behaviour.ENDPOINT_INDEPENDENT
        return done()
    # Test III: the alternate IP and port.
    third = await sock.request(other, timeout=wait, rto=rto)
    if third is None or third.message.mapped_address is None:
        result.skipped.append("mapping test III: no answer from the alternate address and port")
        return done()
    rtts.append(third.rtt)
    mapped3 = third.message.mapped_address
    result.mapping = Behaviour.ADDRESS_DEPENDENT if mapped3 == mapped2 else Behaviour.ADDRESS_AND_PORT_DEPENDENT
    ports = [mapped1.port, mapped2.port] + ([mapped3.port] if mapped3 != mapped2 else [])
    result.port_step = port_step(ports)
    return done()


async def _filtering_tests(result: NetcheckResult, sock: StunTransport, server: Address, wait: float) -> None:
    rto = max(0.05, wait / 4)
    # RFC 5780 4.4, test I: open the filter toward the primary address only.
    first = await sock.request(server, timeout=wait * 2, rto=rto)
    if first is None:
        result.skipped.append("filtering tests: the second socket got no answer")
        return
    if result.other_address is None:
        result.skipped.append("filtering tests II and III: the server has no alternate address")
        return
    # Test II: ask for the answer from the other IP and port.
    change_both = (Attr.CHANGE_REQUEST, ChangeRequest(change_ip=True, change_port=True).encode())
    if await sock.request(server, [change_both], timeout=wait, rto=rto) is not None:
        result.filtering = Behaviour.ENDPOINT_INDEPENDENT
        return
    # Test III: the answer from the same IP, other port.
    change_port = (Attr.CHANGE_REQUEST, ChangeRequest(change_port=True).encode())
    if await sock.request(server, [change_port], timeout=wait, rto=rto) is not None:
        result.filtering = Behaviour.ADDRESS_DEPENDENT
    else:
        result.filtering = Behaviour.ADDRESS_AND_PORT_DEPENDENT


async def _hairpinning_test(result: NetcheckResult, target: StunTransport, sender: StunTransport, wait: float) -> None:
    # RFC 5780 4.5: send to the first socket's public mapping from the second socket.
    if result.public_address is None:
        return
    if not result.nat:
        result.hairpinning = None
        result.skipped.append("hairpinning: no NAT on the path")
        return
    host, port = parse_endpoint(result.public_address)
    mapped = Address(host, port)
    transaction_id = new_transaction_id()
    waiter = asyncio.ensure_future(target.probe_received(transaction_id, wait))
    await asyncio.sleep(0)
    for delay in (0.0, wait / 4, wait / 4):
        await asyncio.sleep(delay)
        if waiter.done():
            break
        sender.send_probe(mapped, transaction_id)
    result.hairpinning = await waiter
