"""Who may start a handshake with a node: limits on handshakes in progress, Retry for spoofable
sources, and a trusted peer that always gets in (issue 11, finding 5)."""

from __future__ import annotations

import asyncio
import os

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from peerpath.node.admission import (
    MAX_PENDING,
    MAX_PENDING_PER_SOURCE,
    RETRY_ABOVE,
    TOKEN_LIFETIME,
    Admission,
    Source,
    Verdict,
)
from peerpath.session import control

from .conftest import trust_each_other


def initial(admission: Admission, source: Source, token: bytes = b"", dcid: bytes | None = None, now: float = 0.0):
    return admission.decide(source, 1, dcid or os.urandom(8), os.urandom(8), token, now)


def test_spoofable_sources_must_prove_their_address_once_handshakes_pile_up() -> None:
    admission = Admission()
    verdicts = [initial(admission, Source(f"203.0.113.{i % 200}")).verdict for i in range(1000)]
    assert verdicts[:RETRY_ABOVE] == [Verdict.ADMIT] * RETRY_ABOVE
    assert set(verdicts[RETRY_ABOVE:]) == {Verdict.RETRY}  # no state for any of them
    assert admission.in_progress == RETRY_ABOVE


def test_a_retry_token_admits_its_source_and_connection_id_only() -> None:
    admission = Admission()
    for i in range(RETRY_ABOVE):
        initial(admission, Source(f"203.0.113.{i}"))
    client = Source("198.51.100.7")
    original = os.urandom(8)
    retry = admission.decide(client, 1, original, os.urandom(8), b"", 0.0)
    assert retry.verdict is Verdict.RETRY and retry.retry_packet
    # The Retry packet names its new connection ID and carries the token after it.
    scid = retry.retry_packet[6 + 1 + retry.retry_packet[5] : 6 + 1 + retry.retry_packet[5] + 8]
    token = retry.retry_packet[6 + 1 + retry.retry_packet[5] + 8 : -16]
    admitted = initial(admission, client, token, dcid=scid, now=1.0)
    assert admitted.verdict is Verdict.ADMIT and admitted.original_dcid == original and admitted.retry_scid == scid
    assert initial(admission, Source("198.51.100.8"), token, dcid=scid).verdict is Verdict.DROP  # another source
    assert initial(admission, client, token, now=1.0).verdict is Verdict.DROP  # another connection ID
    assert initial(admission, client, token, dcid=scid, now=TOKEN_LIFETIME + 1).verdict is Verdict.DROP  # expired
    assert initial(admission, client, os.urandom(40), dcid=scid).verdict is Verdict.DROP  # forged


def test_one_source_holds_few_slots_and_a_trusted_one_always_gets_in() -> None:
    admission = Admission()
    relay_sender = Source("ab" * 16, authenticated=True)
    verdicts = [initial(admission, relay_sender).verdict for _ in range(50)]
    assert verdicts.count(Verdict.ADMIT) == MAX_PENDING_PER_SOURCE
    for i in range(MAX_PENDING):  # strangers with many identities fill every slot
        initial(admission, Source(f"{i:032x}", authenticated=True))
    assert initial(admission, Source("cd" * 16, authenticated=True)).verdict is Verdict.DROP
    assert initial(admission, Source("ef" * 16, authenticated=True, trusted=True)).verdict is Verdict.ADMIT
    for _ in range(MAX_PENDING_PER_SOURCE):
        admission.finished(relay_sender.name)
    assert relay_sender.name not in admission.pending


def test_spoofing_an_address_cannot_take_its_slots() -> None:
    """Initials spoofed from X fill X's unproven slots; X itself still gets a Retry, and once
    it proves its address it has slots no spoofer can reach."""
    admission = Admission()
    victim = Source("198.51.100.7")
    for _ in range(MAX_PENDING_PER_SOURCE):
        assert initial(admission, victim).verdict is Verdict.ADMIT  # the spoofer's
    retry = initial(admission, victim)
    assert retry.verdict is Verdict.RETRY
    head = 6 + 1 + retry.retry_packet[5]
    scid, token = retry.retry_packet[head : head + 8], retry.retry_packet[head + 8 : -16]
    admitted = initial(admission, victim, token, dcid=scid)
    assert admitted.verdict is Verdict.ADMIT and admitted.slot != victim.name


async def flood_of_initials(target: tuple[str, int], sources: int, per_source: int) -> int:
    """Initials from many loopback addresses (all of 127/8 is this host), never completed."""
    loop = asyncio.get_running_loop()
    sent = 0
    for i in range(sources):
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=(f"127.0.{i // 250}.{i % 250 + 2}", 0)
        )
        try:
            for _ in range(per_source):
                quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[control.ALPN]))
                quic.connect(target, now=0.0)
                for datagram, _addr in quic.datagrams_to_send(now=0.0):
                    transport.sendto(datagram, target)
                    sent += len(datagram)
        finally:
            transport.close()
    return sent


async def test_a_flood_of_initials_does_not_lock_a_trusted_peer_out(make_node) -> None:
    a, b = await make_node("a"), await make_node("b")
    trust_each_other(a, b)
    sent = await flood_of_initials(b.local_endpoint, sources=50, per_source=6)
    assert sent > 300_000
    await asyncio.sleep(0.3)
    assert len(b.sessions.all) <= RETRY_ABOVE  # the rest got a stateless Retry
    conn = await a.connect(b.address, b.local_endpoint, timeout=5)  # through a Retry of its own
    assert await conn.ping() > 0
    assert b.admission.counters["retried_admitted"] >= 1
