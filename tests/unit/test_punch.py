"""Connectivity checks: the codec, and two punchers finding each other through fake NATs."""

from __future__ import annotations

import os

import pytest

from peerpath.nat.punch import MAX_PEER_REFLEXIVE, Puncher
from peerpath.nat.traversal import predicted_ports as _predicted_ports
from peerpath.wire import punch

KEY = bytes(range(32))


def test_check_and_response_round_trip() -> None:
    tid = os.urandom(12)
    assert punch.parse(KEY, punch.encode_check(KEY, tid)) == (punch.CHECK, tid, None)
    for observed in (("198.51.100.7", 41641), ("2001:db8::1", 443)):
        kind, got_tid, address = punch.parse(KEY, punch.encode_response(KEY, tid, observed))
        assert (kind, got_tid, address) == (punch.RESPONSE, tid, observed)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (punch.encode_check(bytes(32), b"t" * 12), "not made with this session's key"),
        (punch.encode_check(KEY, b"t" * 12)[:-1], "wrong size"),
        (punch.encode_response(bytes(32), b"t" * 12, ("10.0.0.1", 1)), "not made with this session's key"),
        (bytes([0xAF]) + bytes(40), "unknown check kind"),
        (b"\x40hello", "not a check"),
    ],
)
def test_forged_and_malformed_checks_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(punch.CheckError, match=reason):
        punch.parse(KEY, data)


def test_tampered_observed_address_is_refused() -> None:
    response = bytearray(punch.encode_response(KEY, b"t" * 12, ("10.0.0.1", 1)))
    response[-1] ^= 1
    with pytest.raises(punch.CheckError):
        punch.parse(KEY, bytes(response))


def test_a_round_leaves_answers_to_other_checks_to_the_session() -> None:
    """A liveness probe under the round's key, answered while the round is under way, is
    not the round's: the puncher hands it back so the probe is counted, not lost."""
    peer = ("198.51.100.7", 41641)
    puncher = Puncher(KEY, [peer], 0.0)
    ours = [punch.parse(KEY, data)[1] for data, _ in puncher.datagrams_to_send(0.0)]
    assert ours
    assert not puncher.receive(punch.encode_response(KEY, b"p" * 12, peer), peer)
    assert puncher.receive(punch.encode_response(KEY, ours[0], peer), peer)
    assert puncher.validated == [peer]


class Nat:
    """Endpoint-independent mapping; filtering open (full cone) or by contacted address+port."""

    def __init__(self, public_ip: str, *, restricted: bool, symmetric: bool = False) -> None:
        self.public_ip, self.restricted, self.symmetric = public_ip, restricted, symmetric
        self.ports: dict[tuple, int] = {}
        self.allowed: set[tuple[int, tuple[str, int]]] = set()
        self.next_port = 40000

    def out(self, dest: tuple[str, int]) -> tuple[str, int]:
        key = (dest,) if self.symmetric else ()
        if key not in self.ports:
            self.next_port += 7
            self.ports[key] = self.next_port
        port = self.ports[key]
        self.allowed.add((port, dest))
        return (self.public_ip, port)

    def inbound(self, port: int, source: tuple[str, int]) -> bool:
        return not self.restricted or (port, source) in self.allowed


def run(a_nat: Nat, b_nat: Nat) -> tuple[Puncher, Puncher]:
    """Both sides know the other's reflexive address (as STUN toward a server showed it)."""
    a_reflexive = (a_nat.public_ip, 39999) if a_nat.symmetric else a_nat.out(("203.0.113.10", 3478))
    b_reflexive = (b_nat.public_ip, 39998) if b_nat.symmetric else b_nat.out(("203.0.113.10", 3478))
    a = Puncher(KEY, [b_reflexive], start=0.0)
    b = Puncher(KEY, [a_reflexive], start=0.0)
    sides = {"a": (a, a_nat), "b": (b, b_nat)}
    now = 0.0
    while now < 2.5 and not (a.validated and b.validated):
        for name, (puncher, nat) in sides.items():
            other, other_nat = sides["b" if name == "a" else "a"]
            for data, dest in puncher.datagrams_to_send(now):
                source = nat.out(dest)
                if dest[0] == other_nat.public_ip and other_nat.inbound(dest[1], source):
                    other.receive(data, source)
        now += 0.005
    return a, b


@pytest.mark.parametrize(
    ("a_restricted", "b_restricted"), [(False, False), (True, False), (True, True)], ids=["open", "one", "both"]
)
def test_endpoint_independent_nats_punch_through(a_restricted: bool, b_restricted: bool) -> None:
    a, b = run(Nat("198.51.100.1", restricted=a_restricted), Nat("198.51.100.2", restricted=b_restricted))
    assert a.validated and b.validated
    assert a.validated[0][0] == "198.51.100.2" and b.validated[0][0] == "198.51.100.1"


def test_symmetric_reaches_full_cone_through_a_peer_reflexive_candidate() -> None:
    a, b = run(Nat("198.51.100.1", restricted=False), Nat("198.51.100.2", restricted=True, symmetric=True))
    assert a.validated and b.validated
    # Found at the port the symmetric NAT chose toward a (peer-reflexive), not the one STUN saw.
    assert a.candidates == [("198.51.100.2", 39998)] and a.validated[0] != a.candidates[0]
    assert a.validated[0] in a.triggered


def test_symmetric_against_port_restricted_needs_more_than_checks() -> None:
    a, b = run(Nat("198.51.100.1", restricted=True), Nat("198.51.100.2", restricted=True, symmetric=True))
    assert not a.validated and not b.validated
    assert a.done and b.done


def test_a_round_without_candidates_still_ends_on_time() -> None:
    puncher = Puncher(os.urandom(32), [], start=10.0, duration=2.0)
    assert not puncher.done and puncher.next_time() is not None and puncher.next_time() > 12.0  # type: ignore[operator]
    assert puncher.datagrams_to_send(11.0) == [] and not puncher.done
    assert puncher.datagrams_to_send(12.5) == [] and puncher.done and puncher.next_time() is None


def test_port_prediction_meets_a_sequential_symmetric_nat_from_a_port_restricted_one() -> None:
    """The hard side asks two STUN addresses where its NAT maps it (two ports a step apart);
    the easy side checks the ports that sequence predicts, which opens its filter for the
    one the hard side's next mapping gets, and the hard side's check comes through."""
    easy_nat, hard_nat = Nat("198.51.100.1", restricted=True), Nat("198.51.100.2", restricted=True, symmetric=True)
    first = hard_nat.out(("203.0.113.10", 3478))[1]
    last = hard_nat.out(("203.0.113.11", 3478))[1]
    predicted = _predicted_ports(last, last - first)
    assert predicted[:2] == [last + 7, last + 14] and len(predicted) == 64
    easy_reflexive = easy_nat.out(("203.0.113.10", 3478))
    hard = Puncher(KEY, [easy_reflexive], start=0.0)
    easy = Puncher(KEY, [(hard_nat.public_ip, port) for port in predicted], start=0.0, interval=0.004, per_tick=2)
    sides = {"hard": (hard, hard_nat, easy, easy_nat), "easy": (easy, easy_nat, hard, hard_nat)}
    now = 0.0
    while now < 2.0 and not (hard.validated and easy.validated):
        for puncher, nat, other, other_nat in sides.values():
            for data, dest in puncher.datagrams_to_send(now):
                source = nat.out(dest)
                if dest[0] == other_nat.public_ip and other_nat.inbound(dest[1], source):
                    other.receive(data, source)
        now += 0.004
    assert hard.validated == [easy_reflexive]
    assert easy.validated and easy.validated[0] in [(hard_nat.public_ip, p) for p in predicted[:2]]
    assert now < 0.5  # the first few predicted ports, not a scan of thousands


def test_ports_that_do_not_step_predict_nothing() -> None:
    assert _predicted_ports(40000, 0) == [] and _predicted_ports(40000, -3) == []
    assert _predicted_ports(40000, 2000) == []  # a random allocator's two ports far apart
    assert _predicted_ports(65530, 1) == [65531, 65532, 65533, 65534, 65535]


def test_a_finished_round_sends_no_more_checks_but_still_answers() -> None:
    puncher = Puncher(KEY, [("198.51.100.2", 4000)], start=0.0)
    assert puncher.datagrams_to_send(0.0)
    puncher.finish()
    assert puncher.done and puncher.next_time() is None and puncher.datagrams_to_send(0.5) == []
    assert puncher.receive(punch.encode_check(KEY, b"\x01" * punch.TID_BYTES), ("198.51.100.2", 4000))
    answers = puncher.datagrams_to_send(0.6)
    assert [dest for _, dest in answers] == [("198.51.100.2", 4000)]
    assert punch.parse(KEY, answers[0][0])[0] == punch.RESPONSE


def test_a_check_replayed_from_spoofed_sources_costs_no_more_than_it_brings() -> None:
    """One authentic check, copied to us from 50 spoofed sources during a round: the first
    copy is answered (and its source checked, as a peer-reflexive candidate would be), the
    other 49 get nothing, and no answer is larger than what came in."""
    peer = ("198.51.100.2", 4000)
    puncher = Puncher(KEY, [peer], start=0.0)
    check = punch.encode_check(KEY, b"\x07" * punch.TID_BYTES)
    received = sent = 0
    now = 0.0
    spoofed = [(f"203.0.113.{i}", 5000 + i) for i in range(50)]
    while now < 2.5:
        if now == 0.0:
            for source in spoofed:
                puncher.receive(check, source)
                received += len(check)
        for data, dest in puncher.datagrams_to_send(now):
            if dest != peer:
                sent += len(data)
        now = round(now + 0.02, 2)
    assert sent <= received  # the 103x of before: every source a candidate checked every 20 ms
    assert len(punch.encode_response(KEY, b"\x07" * punch.TID_BYTES, peer)) <= len(check)


def test_a_round_checks_few_peer_reflexive_candidates() -> None:
    puncher = Puncher(KEY, [("198.51.100.2", 4000)], start=0.0)
    for i in range(100):  # authentic checks (each its own tid) from 100 addresses
        puncher.receive(punch.encode_check(KEY, i.to_bytes(punch.TID_BYTES, "big")), (f"203.0.113.{i}", 5000))
    assert len(puncher.triggered) == MAX_PEER_REFLEXIVE
    triggered = [dest for data, dest in puncher.datagrams_to_send(0.0) if punch.parse(KEY, data)[0] == punch.CHECK]
    assert len(set(triggered) - {("198.51.100.2", 4000)}) == MAX_PEER_REFLEXIVE


def test_a_peer_offers_at_most_max_candidates() -> None:
    import msgspec

    from peerpath import errors
    from peerpath.nat.punch import MAX_CANDIDATES
    from peerpath.nat.traversal import Offer, decode_message

    offer = {"key": bytes(32), "candidates": [f"198.51.100.{i}:4000" for i in range(MAX_CANDIDATES)]}
    assert len(decode_message(msgspec.msgpack.encode(offer), Offer).candidates) == MAX_CANDIDATES
    offer["candidates"].append("198.51.100.200:4000")
    with pytest.raises(errors.RemoteError, match="malformed offer"):
        decode_message(msgspec.msgpack.encode(offer), Offer)
