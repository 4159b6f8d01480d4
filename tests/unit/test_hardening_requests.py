"""Trust requests from strangers are bounded, and saving them never blocks the event loop per letter."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from peerpath import errors
from peerpath.identity import Address, Identity
from peerpath.node import requests
from peerpath.node.requests import MAX_PENDING, SAVE_DELAY, TrustBroker, TrustRequests
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.letters import make_letter
from peerpath.wire import rendezvous as rv


def broker_in(tmp_path: Path, identity: Identity | None = None) -> TrustBroker:
    identity = identity or Identity.generate()
    return TrustBroker(identity, TrustStore(tmp_path / "trust.json"), tmp_path / requests.REQUESTS_FILE)


def strangers_asking(broker: TrustBroker, count: int) -> list[rv.Letter]:
    """Valid requests from ``count`` fresh identities (throwaway keys cost nothing)."""
    return [make_letter(Identity.generate(), "trust-request", broker.identity.address, "hi") for _ in range(count)]


def sender_of(letter: rv.Letter) -> str:
    return str(Address.from_public_key(letter.sender_key))


def count_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every write of the requests file, by the name of the thread that made it."""
    writers: list[str] = []
    real_replace = os.replace

    def replace(src: str, dst: Path) -> None:
        if Path(dst).name == requests.REQUESTS_FILE:
            writers.append(threading.current_thread().name)
        real_replace(src, dst)

    monkeypatch.setattr(requests.os, "replace", replace)
    return writers


async def test_pending_requests_are_bounded_and_the_oldest_go_first(tmp_path: Path) -> None:
    broker = broker_in(tmp_path)
    letters = strangers_asking(broker, MAX_PENDING + 50)
    for letter in letters:
        assert broker.receive(letter) == "pending"
    pending = broker.pending()
    assert len(pending) == MAX_PENDING
    senders = [sender_of(letter) for letter in letters]
    assert {p.address for p in pending} == set(senders[50:])  # the first 50 to arrive were dropped
    await broker.close()
    assert len(json.loads((tmp_path / requests.REQUESTS_FILE).read_text())["incoming"]) == MAX_PENDING


async def test_one_request_per_sender_and_the_newest_is_kept(tmp_path: Path) -> None:
    broker = broker_in(tmp_path)
    alice = Identity.generate()
    now = time.time()
    newer = make_letter(alice, "trust-request", broker.identity.address, "second thoughts", now=now)
    older = make_letter(alice, "trust-request", broker.identity.address, "first try", now=now - 60)
    assert broker.receive(newer) == "pending"
    assert broker.receive(older).startswith("ignored: a newer request")  # delivered late, out of order
    (pending,) = broker.pending()
    assert pending.note == "second thoughts" and pending.nonce == newer.nonce.hex()
    assert broker.receive(make_letter(alice, "trust-request", broker.identity.address, "third")) == "pending"
    assert [p.note for p in broker.pending()] == ["third"]
    await broker.close()


async def test_seen_nonces_are_bounded_in_memory_and_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requests, "SEEN_LIMIT", 10)
    broker = broker_in(tmp_path)
    letters = strangers_asking(broker, 25)
    for letter in letters:
        broker.receive(letter)
    assert list(broker.requests.seen) == [letter.nonce.hex() for letter in letters[-10:]]
    assert broker.receive(letters[-1]) == "ignored: replayed"
    await broker.close()
    assert len(json.loads((tmp_path / requests.REQUESTS_FILE).read_text())["seen"]) == 10


async def test_a_flood_of_letters_is_saved_in_few_writes_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers = count_writes(monkeypatch)
    broker = broker_in(tmp_path)
    for letter in strangers_asking(broker, 300):
        broker.receive(letter)
    assert writers == []  # nothing written while the letters arrive back to back
    await asyncio.sleep(SAVE_DELAY * 3)
    assert len(writers) == 1 and writers[0] != threading.main_thread().name
    on_disk = json.loads((tmp_path / requests.REQUESTS_FILE).read_text())
    assert len(on_disk["incoming"]) == len(broker.pending())
    assert stat.S_IMODE((tmp_path / requests.REQUESTS_FILE).stat().st_mode) == 0o600
    await broker.close()
    assert len(writers) == 1  # nothing left to write


async def test_three_thousand_throwaway_identities_cost_little(tmp_path: Path) -> None:
    broker = broker_in(tmp_path)
    letters = strangers_asking(broker, 3000)
    started = time.process_time()
    for letter in letters:
        assert broker.receive(letter) == "pending"
    await broker.close()
    assert time.process_time() - started < 10  # was 64 s of CPU: a rewrite of the whole file per letter
    assert len(TrustRequests(tmp_path / requests.REQUESTS_FILE).incoming) == MAX_PENDING


async def test_close_writes_what_arrived_last(tmp_path: Path) -> None:
    broker = broker_in(tmp_path)
    (letter,) = strangers_asking(broker, 1)
    broker.receive(letter)
    await broker.close()  # well before SAVE_DELAY
    reloaded = TrustRequests(tmp_path / requests.REQUESTS_FILE)
    assert list(reloaded.incoming) == [sender_of(letter)]
    assert letter.nonce.hex() in reloaded.seen


async def test_an_older_write_never_replaces_a_newer_one(tmp_path: Path) -> None:
    """The owner's answers are written at once; a delayed write of letters must not undo them."""
    broker = broker_in(tmp_path)
    (letter,) = strangers_asking(broker, 1)
    broker.receive(letter)  # a delayed write is now due
    broker.deny(Address.from_public_key(letter.sender_key))
    await asyncio.sleep(SAVE_DELAY * 3)
    await broker.close()
    assert TrustRequests(tmp_path / requests.REQUESTS_FILE).incoming == {}


def test_without_an_event_loop_letters_are_saved_at_once(tmp_path: Path) -> None:
    broker = broker_in(tmp_path)
    (letter,) = strangers_asking(broker, 1)
    assert broker.receive(letter) == "pending"
    assert sender_of(letter) in TrustRequests(tmp_path / requests.REQUESTS_FILE).incoming


def test_an_oversized_or_malformed_file_is_bounded_or_refused(tmp_path: Path) -> None:
    path = tmp_path / requests.REQUESTS_FILE
    request = {"note": "", "created": 1, "nonce": "00"}
    incoming = {f"pp1{i}": {"address": f"pp1{i}", **request} for i in range(MAX_PENDING + 10)}
    path.write_text(json.dumps({"incoming": incoming, "seen": [str(i) for i in range(requests.SEEN_LIMIT + 10)]}))
    loaded = TrustRequests(path)
    assert len(loaded.incoming) == MAX_PENDING and f"pp1{MAX_PENDING + 9}" in loaded.incoming  # the newest kept
    assert len(loaded.seen) == requests.SEEN_LIMIT
    for garbage in ['{"incoming": {"x": {"address": "x"}}}', '{"incoming": []}', '{"incoming": {"x": 1}}']:
        path.write_text(garbage)
        with pytest.raises(errors.LocalError, match="malformed"):
            TrustRequests(path)
