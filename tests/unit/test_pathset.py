"""The path set: which path carries the session's datagrams."""

from __future__ import annotations

import pytest

from peerpath.session.pathset import Path, PathKind, PathSet


def path(kind: PathKind, remote: str, sent: list[tuple[str, bytes]]) -> Path:
    return Path(kind, remote, lambda d: sent.append((remote, d)))


def relay_and_direct() -> tuple[PathSet, Path, Path]:
    """A path set with a relay path and a direct path validated at 0 s (the current one)."""
    paths = PathSet()
    relay = paths.add(path(PathKind.RELAY, "relay-1", []))
    direct = paths.add_validated(path(PathKind.DIRECT_UDP, "198.51.100.7:1", []), now=0.0)
    return paths, relay, direct


def test_first_path_becomes_current_and_carries_datagrams() -> None:
    sent: list[tuple[str, bytes]] = []
    paths = PathSet()
    assert not paths.send(b"x")
    paths.add(path(PathKind.DIRECT_UDP, "198.51.100.7:41641", sent))
    assert paths.send(b"hello")
    assert sent == [("198.51.100.7:41641", b"hello")]
    assert paths.current is not None and paths.current.describe() == "direct udp 198.51.100.7:41641"
    assert paths.current.bytes_sent == 5 and paths.current.datagrams_sent == 1


def test_direct_is_preferred_over_relay() -> None:
    sent: list[tuple[str, bytes]] = []
    changes: list[tuple[str | None, str]] = []
    paths = PathSet(on_change=lambda old, new: changes.append((old and old.remote, new.remote)))
    relay = paths.add(path(PathKind.RELAY, "relay-1", sent))
    direct = path(PathKind.DIRECT_UDP, "198.51.100.7:1", sent)
    paths.received(direct, 100, now=1.0)
    assert paths.current is not None and paths.current.remote == "198.51.100.7:1"
    assert changes == [(None, "relay-1"), ("relay-1", "198.51.100.7:1")]
    paths.remove(paths.current)
    assert paths.current is relay


def test_same_kind_path_takes_over_only_after_the_current_goes_quiet() -> None:
    sent: list[tuple[str, bytes]] = []
    paths = PathSet()
    first = path(PathKind.DIRECT_UDP, "198.51.100.7:1", sent)
    other = path(PathKind.DIRECT_UDP, "198.51.100.7:2", sent)
    paths.received(first, 10, now=10.0)
    paths.received(other, 10, now=10.5)  # one packet from elsewhere: no move
    assert paths.current is first
    paths.received(first, 10, now=11.0)
    paths.received(other, 10, now=15.0)  # first silent for 4 s: a rebinding
    assert paths.current is other
    assert first.datagrams_received == 2 and other.bytes_received == 20


def test_direct_path_that_goes_silent_hands_over_to_the_relay_and_comes_back() -> None:
    sent: list[tuple[str, bytes]] = []
    paths = PathSet()
    relay = paths.add(path(PathKind.RELAY, "relay-1", sent))
    direct = paths.add_validated(path(PathKind.DIRECT_UDP, "198.51.100.7:1", sent), now=10.0)
    assert paths.current is direct
    paths.tick(now=12.0)
    assert paths.current is direct  # quiet for 2 s: still fine
    paths.tick(now=13.5)
    assert paths.current is relay  # 3.5 s of silence: the relay takes over
    paths.received(direct, 100, now=20.0)  # heard from again (checks or QUIC)
    assert paths.current is direct


def probe(paths: PathSet, p: Path, now: float, rtt: float | None) -> None:
    """One probe on ``p`` at ``now``, answered ``rtt`` later (None: lost)."""
    tid = f"{p.remote}-{now}".encode()
    p.probe_sent(tid, now)
    if rtt is not None:
        paths.probe_answered(p, tid, now + rtt)


def test_probe_round_trips_are_smoothed_as_rfc_6298_says() -> None:
    paths = PathSet()
    direct = paths.add(path(PathKind.DIRECT_UDP, "198.51.100.7:1", []))
    probe(paths, direct, 1.0, 0.100)
    assert direct.srtt == pytest.approx(0.100) and direct.rttvar == pytest.approx(0.050)
    probe(paths, direct, 2.0, 0.020)
    assert direct.rttvar == pytest.approx(0.75 * 0.050 + 0.25 * 0.080)
    assert direct.srtt == pytest.approx(0.875 * 0.100 + 0.125 * 0.020)
    # An unknown or duplicate answer is no sample.
    assert paths.probe_answered(direct, b"never sent", 3.0) is None
    quality = direct.quality(3.0)
    assert quality["rtt_ms"] == round(direct.srtt * 1000, 2) and quality["loss"] == 0.0


def test_unanswered_probes_count_as_recent_loss_once_they_time_out() -> None:
    paths = PathSet()
    direct = paths.add(path(PathKind.DIRECT_UDP, "198.51.100.7:1", []))
    for t in range(10):
        probe(paths, direct, float(t), 0.01 if t % 2 else None)
    # Nine outcomes so far (the probe sent at 8.0 is not overdue yet): no verdict on a few.
    assert direct.recent_loss(9.5) is None and direct.quality(9.5)["recent_loss"] is None
    assert direct.recent_loss(10.5) == 0.5
    assert direct.quality(10.5)["recent_loss"] == 0.5


def test_probes_lost_just_after_validation_are_not_held_against_the_path() -> None:
    """The peer may not have the round's key yet when the first probes arrive."""
    paths, relay, direct = relay_and_direct()
    for t in range(3):
        probe(paths, relay, float(t), 0.010)
        probe(paths, direct, float(t), None)  # within the grace period
        paths.received(direct, 1200, now=t + 0.1)  # QUIC traffic keeps it alive
    for t in range(3, 13):
        probe(paths, relay, float(t), 0.010)
        probe(paths, direct, float(t), 0.005 if t % 4 else None)  # 3 of 10 lost
        paths.tick(t + 0.5)
    assert direct.recent_loss(14.5) == 0.3
    assert paths.current is direct and direct.degraded is None


def test_a_lossy_direct_path_is_set_aside_for_the_relay_without_flapping() -> None:
    changes: list[str] = []
    paths = PathSet(on_change=lambda old, new: changes.append(new.kind.value), hold_down=30.0)
    relay = paths.add(path(PathKind.RELAY, "relay-1", []))
    direct = paths.add_validated(path(PathKind.DIRECT_UDP, "198.51.100.7:1", []), now=0.0)
    assert paths.current is direct
    # 70 % of probes lost for a minute: a few seconds to tell, then it stays on the relay.
    aside_at: int | None = None
    for t in range(60):
        now = float(t)
        probe(paths, relay, now, 0.010)
        probe(paths, direct, now, 0.005 if t % 10 in (0, 4, 7) else None)
        paths.tick(now + 0.5)
        if aside_at is None and direct.degraded is not None:
            aside_at, moves = t, len(changes)
    assert aside_at is not None and aside_at <= 16, aside_at  # a full window of outcomes
    assert "lost" in str(direct.degraded)
    assert paths.current is relay and len(changes) == moves  # no move after it was set aside
    # The loss ends: back to direct once the hold-down is over and the record is clean.
    for t in range(60, 100):
        now = float(t)
        probe(paths, relay, now, 0.010)
        probe(paths, direct, now, 0.005)
        paths.tick(now + 0.5)
        if paths.current is direct:
            break
    assert paths.current is direct and direct.degraded is None
    assert 65 <= t < 75, t  # most of the window clean again
    assert len(changes) == moves + 1


def test_a_direct_path_much_slower_than_the_relay_is_set_aside() -> None:
    paths = PathSet(hold_down=10.0)
    relay = paths.add(path(PathKind.RELAY, "relay-1", []))
    direct = paths.add_validated(path(PathKind.DIRECT_UDP, "198.51.100.7:1", []), now=0.0)
    for t in range(10):
        probe(paths, relay, float(t), 0.020)
        probe(paths, direct, float(t), 0.300)  # around the world, while the relay is near
        paths.tick(t + 0.5)
    assert paths.current is relay and "rtt" in str(direct.degraded)
    # A somewhat slower direct path is not "clearly worse": it is kept.
    other = PathSet()
    relay2 = other.add(path(PathKind.RELAY, "relay-1", []))
    direct2 = other.add_validated(path(PathKind.DIRECT_UDP, "198.51.100.7:1", []), now=0.0)
    for t in range(10):
        probe(other, relay2, float(t), 0.020)
        probe(other, direct2, float(t), 0.045)
        other.tick(t + 0.5)
    assert other.current is direct2 and direct2.degraded is None


def test_a_path_back_from_silence_is_taken_at_once() -> None:
    """A cut path that comes back is not held down for the probes lost while it was cut."""
    paths, relay, direct = relay_and_direct()
    for t in range(1, 12):
        probe(paths, direct, float(t), None)  # cut
        paths.tick(t + 0.5)
    assert paths.current is relay
    probe(paths, direct, 12.0, 0.005)  # restored
    paths.tick(12.5)
    assert paths.current is direct and direct.degraded is None


def test_without_a_relay_a_bad_direct_path_is_still_used() -> None:
    paths = PathSet()
    direct = paths.add_validated(path(PathKind.DIRECT_UDP, "198.51.100.7:1", []), now=0.0)
    for t in range(10):
        probe(paths, direct, float(t), 0.01 if t % 3 == 0 else None)
        paths.tick(t + 0.5)
    assert paths.current is direct and direct.degraded is None


def test_a_path_lossy_before_it_went_silent_keeps_its_losses() -> None:
    paths, relay, direct = relay_and_direct()
    for t in range(3, 16):  # lossy (3 of 6 lost), then silent from 9 s on
        probe(paths, direct, float(t), 0.005 if t in (3, 5, 8) else None)
        if t < 9:
            paths.received(direct, 1200, now=t + 0.1)  # QUIC traffic until the silence
        paths.tick(t + 0.5)
        assert direct.degraded is None  # too few outcomes while heard, then silent: no verdict
    assert paths.current is relay
    probe(paths, direct, 16.0, 0.005)  # back after a silence, but it was bad before it too
    assert paths.current is relay and "fell silent" in str(direct.degraded)  # not even for a moment
    paths.tick(16.5)
    assert paths.current is relay and direct.degraded is not None


def test_a_loaded_path_is_judged_by_its_base_rtt_not_its_queue() -> None:
    """A bulk transfer queues behind itself on the direct path while the relay idles: the
    lowest recent sample, not the smoothed RTT, is what is compared."""
    paths, relay, direct = relay_and_direct()
    for t in range(10):
        probe(paths, relay, float(t), 0.030)
        probe(paths, direct, float(t), 0.010 if t % 5 == 0 else 0.250)
        paths.tick(t + 0.5)
    assert direct.srtt is not None and direct.srtt > 2 * 0.030 + 0.020
    assert paths.current is direct and direct.degraded is None


def test_a_path_that_keeps_falling_silent_is_not_forgiven_each_time() -> None:
    """Answers more than stale_after apart, nothing but losses between them: only the first
    silence is forgiven, so the losses pile up and the path is set aside."""
    paths, relay, direct = relay_and_direct()
    for t in range(3, 40):
        probe(paths, direct, float(t), 0.005 if t % 4 == 0 else None)  # heard every 4 s
        paths.tick(t + 0.5)
    assert paths.current is relay and direct.degraded is not None


def test_a_path_silent_again_soon_after_a_forgiven_silence_is_set_aside() -> None:
    """Its first silence looks like a cut and is forgiven; heard for a moment, it falls silent
    again for the rest of the loss. That silence's losses count: when it is heard from
    again, it is set aside (the silence alone fills the window, so nothing before it is left
    to show it was lossy)."""
    paths, relay, direct = relay_and_direct()
    for t in range(1, 6):
        probe(paths, direct, float(t), 0.005 if t < 3 else None)  # good, then silent from 2 s
        paths.tick(t + 0.5)
    assert paths.current is relay
    probe(paths, direct, 6.0, 0.005)  # back: a cut, forgiven
    paths.tick(6.5)
    assert paths.current is direct and direct.degraded is None
    for t in range(7, 25):
        probe(paths, direct, float(t), None)  # silent again at once, for long
        paths.tick(t + 0.5)
    assert paths.current is relay and direct.degraded is None  # a silent path is not judged
    probe(paths, direct, 25.0, 0.005)
    assert paths.current is relay and direct.degraded is not None


def test_a_young_path_is_set_aside_once_half_a_window_of_probes_is_lost() -> None:
    """A path with only a few probes behind it starts losing most of them: the verdict comes
    with the fifth loss, the one that makes half of any full window lost, not when ten
    outcomes have piled up."""
    paths, relay, direct = relay_and_direct()
    verdict_at = None
    for t in range(4, 20):
        probe(paths, direct, float(t), 0.005 if t in (4, 5, 8) else None)
        paths.received(direct, 1200, now=t + 0.1)  # QUIC traffic keeps it heard from
        paths.tick(t + 0.5)
        if direct.degraded is not None and verdict_at is None:
            verdict_at = t
    # Lost: 6, 7, 9, 10, 11 (each counted 2 s after it left), against 3 answered.
    assert verdict_at == 13 and direct.degraded == "lost 62% of recent probes"
    assert paths.current is relay


def test_two_early_losses_do_not_set_a_path_aside() -> None:
    paths = PathSet()
    paths.add(path(PathKind.RELAY, "relay-1", []))
    direct = paths.add_validated(path(PathKind.DIRECT_UDP, "198.51.100.7:1", []), now=0.0)
    for t in range(4, 20):
        probe(paths, direct, float(t), None if t in (4, 5) else 0.005)
        paths.tick(t + 0.5)
    assert paths.current is direct and direct.degraded is None


def test_a_path_the_peer_checks_cross_while_ours_are_lost_is_lossy_not_cut() -> None:
    """Silent to our probes, yet the peer's checks keep arriving over it: not a cut. It is
    judged while still silent and stays aside when it is heard from again."""
    paths, relay, direct = relay_and_direct()
    for t in range(1, 4):
        probe(paths, direct, float(t), 0.005)
    for t in range(4, 13):
        probe(paths, direct, float(t), None)
        if t % 3 == 0:
            paths.peer_checked(direct, t + 0.3)  # a third of the peer's probes get through
        paths.tick(t + 0.5)
    assert paths.current is relay and direct.degraded == "lost 62% of recent probes"  # judged while silent
    probe(paths, direct, 13.0, 0.005)  # heard from again: still aside
    paths.tick(13.5)
    assert paths.current is relay and direct.degraded is not None


def test_a_cut_that_ends_with_the_peers_check_is_still_a_cut() -> None:
    """When a cut ends, the peer's check may come through a moment before the answer to
    ours: the path is taken back at once all the same."""
    paths, relay, direct = relay_and_direct()
    for t in range(1, 4):
        probe(paths, direct, float(t), 0.005)
    for t in range(4, 12):
        probe(paths, direct, float(t), None)  # cut
        paths.tick(t + 0.5)
    assert paths.current is relay
    paths.peer_checked(direct, 11.7)  # restored: the peer's probe first
    paths.tick(11.8)
    probe(paths, direct, 12.0, 0.005)  # then the answer to ours
    paths.tick(12.5)
    assert paths.current is direct and direct.degraded is None


@pytest.mark.parametrize("lossy", [False, True], ids=["cut", "lossy"])
def test_a_path_a_round_finds_again_after_a_silence_is_judged_like_one_heard_again(lossy: bool) -> None:
    """A punch round may prove a silent path again before any probe is answered: a cut's
    losses are forgotten as when it speaks again; a lossy path's are not."""
    paths, relay, direct = relay_and_direct()
    for t in range(1, 4):
        probe(paths, direct, float(t), 0.005 if not lossy or t == 1 else None)
        paths.received(direct, 1200, now=t + 0.1)
    for t in range(4, 12):
        probe(paths, direct, float(t), None)
        paths.tick(t + 0.5)
    assert paths.current is relay
    again = paths.add_validated(path(PathKind.DIRECT_UDP, "198.51.100.7:1", []), now=12.0)
    assert again is direct
    if lossy:
        assert paths.current is relay and direct.degraded is not None
    else:
        assert paths.current is direct and direct.degraded is None
        assert direct.recent_outcomes(12.0) == (0, 3)


def test_a_check_that_came_before_a_cut_does_not_make_it_lossy() -> None:
    """On an idle session the peer's probe may be the last thing to arrive before a cut:
    only checks that cross while the path is silent count against it."""
    paths, relay, direct = relay_and_direct()
    for t in range(1, 5):
        probe(paths, direct, float(t), 0.005)
        paths.peer_checked(direct, t + 0.3)
    for t in range(5, 16):
        probe(paths, direct, float(t), None)  # cut just after the peer's last check
        paths.tick(t + 0.5)
    assert paths.current is relay and direct.degraded is None
    probe(paths, direct, 16.0, 0.005)  # restored
    paths.tick(16.5)
    assert paths.current is direct and direct.degraded is None
