"""Path MTU discovery (peerpath.session.pmtu) and its probes (padded checks)."""

from __future__ import annotations

import socket
import sys

import pytest

from peerpath import net
from peerpath.session import pmtu
from peerpath.session.pmtu import BASE_DATAGRAM, MtuSearch
from peerpath.wire import punch

KEY = bytes(range(32))


def run(search: MtuSearch, fits: int, seconds: float, start: float = 0.0) -> float:
    """Probe once a second for ``seconds`` over a path that carries datagrams up to ``fits``
    bytes; the clock at the end."""
    now = start
    for step in range(int(seconds)):
        now = start + step
        size = search.due(now)
        if size is None:
            continue
        tid = f"{now:012.1f}".encode()[:12]
        search.sent(tid, size, now)
        if size <= fits:
            search.answered(tid, now + 0.01)
    return now


def test_a_loopback_path_climbs_the_whole_ladder() -> None:
    search = MtuSearch.for_host("127.0.0.1")
    run(search, fits=65535, seconds=5)
    assert search.size == pmtu.MAX_DATAGRAM


@pytest.mark.parametrize(("host", "fits", "expected"), [("10.0.0.2", 1500 - 28, 1472), ("fd00::2", 1500 - 48, 1452)])
def test_an_ethernet_path_stops_below_the_rung_that_does_not_fit(host: str, fits: int, expected: int) -> None:
    search = MtuSearch.for_host(host)
    run(search, fits=fits, seconds=30)
    assert search.size == expected
    assert not search.searching
    # Searching again only after the raise interval; meanwhile only confirmations go out.
    assert search.due(40.0) is None or search.due(40.0) == expected


def test_a_path_that_carries_no_more_than_the_base_stays_there() -> None:
    search = MtuSearch.for_host("192.0.2.1")
    run(search, fits=1400, seconds=30)
    assert search.size == BASE_DATAGRAM


def test_a_path_that_shrinks_falls_back_to_the_base_and_searches_again() -> None:
    search = MtuSearch.for_host("127.0.0.1")
    now = run(search, fits=65535, seconds=5)
    assert search.size == pmtu.MAX_DATAGRAM
    # A route change: now only 1472 bytes get through; the next confirmations are lost.
    now = run(search, fits=1472, seconds=pmtu.CONFIRM_INTERVAL * 4, start=now + 1)
    assert search.size == 1472


def test_answers_to_unknown_probes_change_nothing() -> None:
    search = MtuSearch.for_host("127.0.0.1")
    assert search.answered(b"x" * 12, 0.0) is False
    assert search.size == BASE_DATAGRAM


def test_a_padded_check_is_a_check_and_its_response_stays_small() -> None:
    tid = b"t" * 12
    probe = punch.encode_check(KEY, tid, 8972)
    assert len(probe) == 8972
    assert punch.parse(KEY, probe) == (punch.CHECK, tid, None)
    assert len(punch.encode_response(KEY, tid, ("198.51.100.7", 4000))) == punch.SIZE


@pytest.mark.parametrize("size", [punch.SIZE - 1, punch.MAX_SIZE + 1])
def test_checks_outside_the_sizes_cannot_be_made_or_parsed(size: int) -> None:
    with pytest.raises(ValueError, match="bytes"):
        punch.encode_check(KEY, b"t" * 12, size)
    data = (punch.encode_check(KEY, b"t" * 12) + bytes(punch.MAX_SIZE))[:size]
    with pytest.raises(punch.CheckError):
        punch.parse(KEY, data)


def test_padding_must_be_zeros_and_responses_are_never_padded() -> None:
    tid = b"t" * 12
    probe = bytearray(punch.encode_check(KEY, tid, 2000))
    probe[-1] = 1
    with pytest.raises(punch.CheckError, match="padding"):
        punch.parse(KEY, bytes(probe))
    response = punch.encode_response(KEY, tid, ("198.51.100.7", 4000))
    with pytest.raises(punch.CheckError, match="size"):
        punch.parse(KEY, response + bytes(100))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's path MTU discovery modes")
def test_a_probe_leaves_unfragmented_and_the_socket_keeps_its_mode() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
    ):
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(2)
        mode = sender.getsockopt(socket.IPPROTO_IP, net._IP_MTU_DISCOVER)
        net.send_unfragmented(sender, bytes(8972), receiver.getsockname())
        assert len(receiver.recv(65535)) == 8972  # loopback carries it whole
        assert sender.getsockopt(socket.IPPROTO_IP, net._IP_MTU_DISCOVER) == mode  # QUIC's datagrams: as before
