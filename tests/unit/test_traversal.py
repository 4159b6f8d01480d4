"""The direct-path controller as a timeline: no sockets, no event loop, time passed in."""

from __future__ import annotations

import random

import pytest

from peerpath.nat import traversal
from peerpath.nat.traversal import (
    BOTH_HARD,
    BOTH_HARD_SEQUENTIAL,
    ROUND_BACKOFF,
    ROUND_KEYS,
    SCAN_PORTS,
    SPRAY_SOCKETS,
    Answer,
    Go,
    LocalSide,
    Mode,
    Offer,
    Traversal,
    UdpRound,
    choose_mode,
)
from peerpath.wire import punch

EASY = LocalSide(["10.0.0.1:4000", "198.51.100.1:4000"], ["10.0.0.1:4000"], "198.51.100.1:4000", False, True)
HARD = LocalSide(["10.0.0.2:5000", "203.0.113.2:61000"], ["10.0.0.2:5000"], "203.0.113.2:61000", True, True)


def exchange(mine: LocalSide, theirs: LocalSide, *, failures: int = 0, go_at: float = 10.0):
    """A whole offer / answer / go between two controllers; their two plans."""
    initiator, responder = Traversal(initiator=True, failures=failures), Traversal(initiator=False)
    offer = initiator.offer(mine)
    wire = traversal.decode_message(traversal.encode_message(offer), Offer)
    responder.remember(wire.key)
    answer = traversal.decode_message(traversal.encode_message(responder.offered(wire, theirs, held=0.0)), Answer)
    go = initiator.answered(offer, answer, sent=go_at - 0.1, now=go_at)
    plan = initiator.begin(go_at)
    other = responder.go(traversal.decode_message(traversal.encode_message(go), Go), now=go_at + 0.05)
    assert other is not None
    return initiator, responder, plan, other


def test_the_hard_side_sprays_the_easy_side_scans_and_two_hard_ones_stay_on_the_relay() -> None:
    assert choose_mode(False, False) is Mode.NORMAL
    assert choose_mode(True, False) is Mode.SPRAY and choose_mode(False, True) is Mode.SCAN
    assert choose_mode(True, True) is Mode.NORMAL
    _, _, plan, other = exchange(HARD, EASY)
    assert plan.mode is Mode.SPRAY and other.mode is Mode.SCAN
    assert plan.target == ("198.51.100.1", 4000) and other.target == ("203.0.113.2", 61000)
    initiator, responder, plan, other = exchange(HARD, HARD)
    assert plan.relay_reason == other.relay_reason == BOTH_HARD
    assert initiator.relay_reason == responder.relay_reason == BOTH_HARD


def test_two_sequential_nats_are_told_apart_from_random_ones() -> None:
    sequential = LocalSide(HARD.candidates, HARD.tcp, HARD.reflexive, True, True, next_port=20010, port_step=1)
    _, _, plan, _ = exchange(sequential, sequential)
    assert plan.relay_reason == BOTH_HARD_SEQUENTIAL
    _, _, plan, _ = exchange(sequential, HARD)
    assert plan.relay_reason == BOTH_HARD


def test_the_initiator_starts_half_a_round_trip_after_go_and_the_responder_on_arrival() -> None:
    initiator = Traversal(initiator=True)
    offer = initiator.offer(EASY)
    # 0.3 s between offer and answer, of which the responder held it 0.1 s: the RTT is 0.2 s.
    answer = Answer(EASY.candidates, held=0.1)
    initiator.answered(offer, answer, sent=5.0, now=5.3)
    plan = initiator.begin(5.31)  # once go is sent
    assert plan.start == pytest.approx(5.41) and plan.key == offer.key
    # A long hold counts only up to what a responder may legitimately wait.
    initiator.answered(offer, Answer(EASY.candidates, held=60.0), sent=5.0, now=9.0)
    plan = initiator.begin(9.0)
    assert plan.start == pytest.approx(9.0 + (4.0 - traversal.NAT_WAIT - traversal.PREDICT_WAIT) / 2)
    _, _, _, other = exchange(EASY, EASY, go_at=7.0)
    assert other.start == pytest.approx(7.05)


def test_tcp_joins_when_udp_is_out_for_either_side_or_failed_last_time() -> None:
    no_udp = LocalSide([], ["10.0.0.3:6000"], None, False, False)
    _, _, plan, other = exchange(EASY, no_udp)
    assert plan.tcp == [("10.0.0.3", 6000)] and other.tcp == [("10.0.0.1", 4000)]  # each the other's
    assert not plan.udp and not other.udp  # no UDP candidates on one side: no UDP round
    _, _, plan, _ = exchange(EASY, EASY)
    assert plan.tcp == [] and plan.udp
    _, _, plan, other = exchange(EASY, EASY, failures=1)
    assert plan.tcp and other.tcp


def test_rounds_back_off_while_they_fail_and_start_over_once_one_succeeds() -> None:
    t = Traversal(initiator=True)
    assert t.round_due(0.0, on_relay=True, established=True, held_aside=False)
    assert not t.round_due(0.0, on_relay=False, established=True, held_aside=False)
    assert not t.round_due(0.0, on_relay=True, established=True, held_aside=True)
    assert not Traversal(initiator=False).round_due(0.0, on_relay=True, established=True, held_aside=False)
    now, waits = 0.0, []
    for _ in range(len(ROUND_BACKOFF) + 2):
        t.round_ended(False, now)
        waits.append(t.next_round - now)
        now = t.next_round
    assert waits == [*ROUND_BACKOFF, ROUND_BACKOFF[-1], ROUND_BACKOFF[-1]]
    t.round_ended(True, now)
    assert t.failures == 0 and t.round_due(now, on_relay=True, established=True, held_aside=False)


def test_a_scan_checks_the_predicted_ports_first_then_random_ones() -> None:
    sequential = LocalSide(HARD.candidates, HARD.tcp, HARD.reflexive, True, True, next_port=20010, port_step=2)
    _, _, plan, other = exchange(EASY, sequential)
    assert plan.mode is Mode.SCAN and plan.predicted[:3] == [20012, 20014, 20016]
    udp = UdpRound(plan, rng=random.Random(1))
    assert udp.predicted_scan and udp.sockets_wanted == 0
    checked = []
    now = plan.start
    while len(checked) < len(plan.predicted) + 10:
        checked += [addr[1] for sock, _, addr in udp.datagrams_to_send(now) if addr[0] == "203.0.113.2"]
        now += 0.004
    scanned = [p for p in checked if p != 61000]  # the candidate itself is checked too
    assert scanned[: len(plan.predicted)] == plan.predicted
    scan = udp.punchers[-1][0]
    assert len(scan.candidates) == len(set(scan.candidates)) <= len(plan.predicted) + SCAN_PORTS
    # The hard side sprays from the fresh socket and as many more as it can open.
    spray = UdpRound(other, fresh_socket=True)
    assert spray.birthday and spray.sockets_wanted == SPRAY_SOCKETS - 1
    spray.opened(3)
    assert sorted({sock for _, sock in spray.punchers}) == [0, 1, 2, 3]


def test_a_birthday_round_over_the_nodes_limit_punches_normally() -> None:
    _, _, _, other = exchange(EASY, HARD)
    deferred = UdpRound(other, birthday_allowed=False, fresh_socket=True)
    assert not deferred.birthday and deferred.mode is Mode.NORMAL and deferred.sockets_wanted == 0
    deferred.opened(5)
    assert [sock for _, sock in deferred.punchers] == [0]


def test_two_rounds_find_each_other_promote_each_address_once_and_linger() -> None:
    """The two sides' rounds over a toy network where only public addresses are reachable:
    each validates the other's public address (the answer comes from where the check went),
    promotes it once, stops, lingers for LINGER, and is then finished."""
    far = LocalSide(["10.0.0.9:4000", "198.51.100.9:4000"], ["10.0.0.9:4000"], "198.51.100.9:4000", False, True)
    _, _, plan, other = exchange(EASY, far)
    rounds = {("198.51.100.1", 4000): UdpRound(plan), ("198.51.100.9", 4000): UdpRound(other)}
    promoted: dict[tuple[str, int], list[tuple[str, int]]] = {public: [] for public in rounds}
    now = plan.start
    for _ in range(50):
        for public, udp in rounds.items():
            for sock, data, addr in udp.datagrams_to_send(now):
                assert sock == 0
                if addr in rounds:  # a private address of the other side goes nowhere
                    rounds[addr].receive(0, data, public)
        for public, udp in rounds.items():
            promoted[public] += [a for p in udp.poll(now) for a in p.addresses]
        now += 0.02
    assert promoted == {
        ("198.51.100.1", 4000): [("198.51.100.9", 4000)],
        ("198.51.100.9", 4000): [("198.51.100.1", 4000)],
    }
    udp = rounds[("198.51.100.1", 4000)]
    assert udp.validated and udp.kept == {0} and udp.linger_until is not None
    assert not udp.finished(udp.linger_until - 0.01) and udp.finished(udp.linger_until)
    assert udp.next_time() == udp.linger_until  # nothing more to send: only the linger's end


def test_checks_outside_rounds_are_answered_once_under_any_recent_key() -> None:
    t = Traversal(initiator=False)
    keys = [bytes([i]) * punch.KEY_BYTES for i in range(ROUND_KEYS + 1)]
    for key in keys:
        t.remember(key)
    source = ("198.51.100.7", 4000)
    check = punch.encode_check(keys[1], b"t" * punch.TID_BYTES)
    outcome = t.check(check, source, 1.0, known=True)
    assert outcome is not None and outcome.reply is not None
    assert punch.parse(keys[1], outcome.reply)[0] == punch.RESPONSE
    again = t.check(check, ("192.0.2.1", 9), 1.0, known=False)  # a copy from elsewhere: nothing sent
    assert again == traversal.CheckOutcome()
    assert t.check(punch.encode_check(keys[0], b"u" * punch.TID_BYTES), source, 1.0, known=True) is None  # aged out
    assert t.check(b"\x00" * 48, source, 1.0, known=True) is None


def test_probes_go_under_the_key_that_found_the_path_and_are_credited_to_their_path() -> None:
    t = Traversal(initiator=True)
    assert t.probe(("relay", "r")) is None  # no round yet: nothing to sign a probe with
    t.remember(b"a" * punch.KEY_BYTES)
    t.remember(b"b" * punch.KEY_BYTES)
    tid, datagram = t.probe(("relay", "r")) or (b"", b"")
    assert punch.parse(b"b" * punch.KEY_BYTES, datagram)[1] == tid  # the latest round's key
    t.found(b"a" * punch.KEY_BYTES)
    tid2, datagram = t.probe(("direct udp", "198.51.100.7:4000")) or (b"", b"")
    assert punch.parse(b"a" * punch.KEY_BYTES, datagram)[1] == tid2
    assert not t.probe_answered(tid2, ("relay", "r"))  # an answer over another path credits nothing
    assert t.probe_answered(tid2, ("direct udp", "198.51.100.7:4000"))
    assert not t.probe_answered(tid2, ("direct udp", "198.51.100.7:4000"))  # once
    answer = punch.encode_response(b"a" * punch.KEY_BYTES, tid, ("0.0.0.0", 0))
    outcome = t.check(answer, ("198.51.100.7", 4000), 1.0, known=True)
    assert outcome is not None and outcome.answered == tid


def test_a_rebound_peer_is_checked_in_turn_and_validated_by_the_answer_from_there() -> None:
    """Outside rounds: the peer's fresh check from a new port of the IP its direct path goes
    to, while that path is silent (its NAT rebound), is answered and checked in turn under
    the same key; only the answer from that very address validates it. Other sources, a
    path still heard from, and a spent budget get an answer and nothing more."""
    t = Traversal(initiator=False)
    old, new = b"o" * punch.KEY_BYTES, b"k" * punch.KEY_BYTES
    t.remember(old)
    t.remember(new)
    rebound = ("198.51.100.7", 20001)
    silent = [("198.51.100.7", 5.0)]  # the direct path to 198.51.100.7:4000, last heard at 5 s

    def check(tid: bytes, source, now: float, direct, key: bytes = old):
        return t.check(punch.encode_check(key, tid * punch.TID_BYTES), source, now, known=False, direct=direct)

    assert check(b"a", rebound, 6.0, silent).trigger is None  # heard 1 s ago: nothing wrong
    assert check(b"b", ("192.0.2.66", 20001), 10.0, silent).trigger is None  # another IP
    assert check(b"c", rebound, 10.0, []).trigger is None  # no direct path (or the wrong socket)
    first = check(b"d", rebound, 10.0, silent)
    assert first.reply is not None and first.trigger is not None
    _, tid, _ = punch.parse(old, first.trigger)  # under the key the peer's check came under
    answer = punch.encode_response(old, tid, ("0.0.0.0", 0))
    assert t.check(answer, ("192.0.2.66", 20001), 10.1, known=False).validated is None  # from elsewhere
    there = t.check(answer, rebound, 10.1, known=False)
    assert there is not None and there.validated == old
    assert t.check(answer, rebound, 10.2, known=False) == traversal.CheckOutcome(answered=tid)  # once
    # A budget per session, whatever the sources: a burst, then one a second.
    triggers = [check(bytes([i]), ("198.51.100.7", 20002 + i), 10.5, silent).trigger for i in range(10)]
    assert sum(x is not None for x in triggers) == traversal.TRIGGER_BURST - 1
    assert check(b"z", ("198.51.100.7", 30000), 11.6, silent).trigger is not None
    relayed = check(b"y", traversal.RELAY_OBSERVED, 20.0, silent)
    assert relayed.trigger is None  # over the relay: nowhere to check


def test_a_direct_path_silent_for_long_is_stale() -> None:
    assert not traversal.stale("direct udp", 0.0, traversal.UDP_STALE)
    assert traversal.stale("direct udp", 0.0, traversal.UDP_STALE + 0.1)
    assert traversal.stale("direct tcp", 0.0, traversal.TCP_IDLE + 0.1)
    assert not traversal.stale("relay", 0.0, 1e9)
