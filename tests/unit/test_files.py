"""Files between agent nodes on loopback: integrity, names that cannot escape, limits, resume
after a broken session, a full disk, and malformed frames."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from peerpath import errors
from peerpath.services import files, ports
from peerpath.services.files import Decline, FileError, Offer, TransferState, codec, safe_name
from peerpath.services.frames import encode

from .conftest import Agents, eventually


def make_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize(
    ("offered", "saved"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("/absolute/path/x.txt", "x.txt"),
        ("..", "file"),
        (".bashrc", "bashrc"),
        ("a\x00b\x1b[2Jc\u202etxt.exe", "a_b_[2Jctxt.exe"),
        ("", "file"),
        ("x" * 300 + ".tar.gz", "x" * 252 + ".gz"),
    ],
)
def test_file_names_cannot_escape_or_deceive(offered: str, saved: str) -> None:
    assert safe_name(offered) == saved
    assert len(safe_name(offered).encode()) <= files.MAX_NAME


async def test_a_file_arrives_whole_and_is_listed_in_the_inbox(agents: Agents, tmp_path: Path) -> None:
    alice, bob = await agents.pair()
    data = make_file(tmp_path / "data.bin", 3 * 1024 * 1024 + 17)
    transfer_id = await alice.files.send("bob", tmp_path / "data.bin")
    sent = await alice.files.wait(transfer_id, timeout=60)
    assert (sent.state, sent.done_bytes) == (TransferState.DONE, len(data))
    received = bob.files.get(transfer_id)
    path = Path(received.path)
    assert path == bob.files.directory / str(alice.address) / "data.bin"
    assert await asyncio.to_thread(path.read_bytes) == data and received.sha256 == hashlib.sha256(data).hexdigest()
    [listed] = bob.messages.messages()
    assert listed.via == "file" and listed.data["file"] == "data.bin" and listed.data["size"] == len(data)
    # The same name again is kept beside the first, not over it.
    second = await alice.files.send(bob.address, tmp_path / "data.bin")
    await alice.files.wait(second, timeout=60)
    assert Path(bob.files.get(second).path).name == "data (2).bin"


async def test_a_transfer_resumes_after_the_receiver_restarts(
    agents: Agents, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = await agents.pair()
    data = make_file(tmp_path / "big.bin", 12 * 1024 * 1024)
    monkeypatch.setattr(files, "CHUNK", 64 * 1024)
    original = files.Files._receive
    cut = asyncio.Event()

    async def receive_then_stop(self, peer, offer, offset, reader):
        if cut.is_set():
            return await original(self, peer, offer, offset, reader)
        partial = self._partial(peer, offer.id)
        arrived = await reader.readexactly(5 * 1024 * 1024 + 1000)  # what arrived before the break
        await asyncio.to_thread(partial.write_bytes, arrived)
        cut.set()
        raise ConnectionError("the receiver went away")

    monkeypatch.setattr(files.Files, "_receive", receive_then_stop)
    transfer_id = await alice.files.send(bob.address, tmp_path / "big.bin")
    await asyncio.wait_for(cut.wait(), 30)
    await agents.stop("bob")
    bob = await agents.start("bob")
    sent = await alice.files.wait(transfer_id, timeout=90)
    assert sent.state is TransferState.DONE
    assert alice.files.counters["resumed"] == 1
    assert await asyncio.to_thread(Path(bob.files.get(transfer_id).path).read_bytes) == data


async def test_the_receiver_limits_size_and_space(agents: Agents, tmp_path: Path, monkeypatch) -> None:
    alice, bob = await agents.pair()
    make_file(tmp_path / "f.bin", 2048)
    bob.files.max_size = 1024
    too_big = await alice.files.send(bob.address, tmp_path / "f.bin")
    with pytest.raises(FileError, match="takes files up to 1024"):
        await alice.files.wait(too_big, timeout=30)
    bob.files.max_size = files.DEFAULT_MAX_SIZE
    full = True

    def usage(path):
        return shutil._ntuple_diskusage(10**9, 10**9, 0 if full else 10**9)

    monkeypatch.setattr(files.shutil, "disk_usage", usage)
    waiting = await alice.files.send(bob.address, tmp_path / "f.bin")
    await eventually(lambda: "disk has 0 bytes free" in alice.files.get(waiting).error)
    assert alice.files.get(waiting).state is TransferState.QUEUED  # it waits, and tries again
    full = False
    await alice.files.wait(waiting, timeout=60)


async def test_errors_before_sending_are_clear(agents: Agents, tmp_path: Path) -> None:
    alice, bob = await agents.pair()
    with pytest.raises(errors.LocalError, match="is not a file"):
        await alice.files.send(bob.address, tmp_path / "missing")
    with pytest.raises(errors.LocalError, match="is not a file"):
        await alice.files.send(bob.address, tmp_path)


async def test_a_corrupted_file_is_refused_and_sent_again(agents: Agents, tmp_path: Path, monkeypatch) -> None:
    alice, bob = await agents.pair()
    data = make_file(tmp_path / "c.bin", 100_000)
    corrupt = [True]
    original = files.Files._stream_file

    async def flip_a_bit(self, transfer, offset, writer):
        if corrupt.pop() if corrupt else False:
            writer.write(bytes([data[0] ^ 1]) + data[1:])
            return
        await original(self, transfer, offset, writer)

    monkeypatch.setattr(files.Files, "_stream_file", flip_a_bit)
    transfer_id = await alice.files.send(bob.address, tmp_path / "c.bin")
    await alice.files.wait(transfer_id, timeout=60)
    assert await asyncio.to_thread(Path(bob.files.get(transfer_id).path).read_bytes) == data


async def test_malformed_frames_close_the_stream_and_the_receiver_keeps_serving(agents: Agents, tmp_path) -> None:
    alice, bob = await agents.pair()
    conn = await alice.connect(bob.address)
    for garbage in [b"\x00\x00\x00\x01\xc1", encode(Decline("x")), encode(Offer(bytes(16), "x", 10, bytes(32))) + b"1"]:
        reader, writer = await conn.open_stream(ports.FILES)
        writer.write(garbage)
        writer.write_eof()
        with pytest.raises((errors.StreamResetError, ConnectionError)):
            while await reader.read(65536):
                pass
            raise ConnectionError("closed")
    reader, writer = await conn.open_stream(ports.FILES)
    writer.write(encode(Offer(bytes(range(16)), "big", 1 << 49, bytes(32))))
    answer = await codec.read(reader, 10)
    assert isinstance(answer, Decline) and "takes files up to" in answer.reason
    make_file(tmp_path / "ok.txt", 10)
    await alice.files.wait(await alice.files.send(bob.address, tmp_path / "ok.txt"), timeout=30)


async def test_a_file_that_changes_after_it_was_offered_fails_clearly(agents: Agents, tmp_path: Path) -> None:
    alice, bob = await agents.pair()
    path = tmp_path / "moving.txt"
    path.write_text("first version")
    bob_files = bob.files
    original = files.Files._consider

    def consider_then_change(self, peer, offer):
        path.write_text("second version, longer")  # the file changes under the sender
        return original(self, peer, offer)

    bob_files._consider = consider_then_change.__get__(bob_files)  # type: ignore[method-assign]
    transfer_id = await alice.files.send(bob.address, path)
    with pytest.raises(FileError, match="changed since it was offered"):
        await alice.files.wait(transfer_id, timeout=60)


def test_a_peer_keeps_at_most_a_few_unfinished_files(tmp_path: Path) -> None:
    service = files.Files.__new__(files.Files)
    service.directory = tmp_path
    partials = tmp_path / ".partial"
    partials.mkdir()
    peer = "pp1peer"
    for i in range(files.MAX_PARTIAL_PER_PEER + 3):
        stale = partials / f"{peer}-{i:032x}"
        stale.write_bytes(b"x")
        os.utime(stale, (1000 + i, 1000 + i))
    (partials / "pp1other-00").write_bytes(b"x")
    service._evict_partials(peer)  # type: ignore[arg-type]
    left = sorted(p.name for p in partials.glob(f"{peer}-*"))
    assert len(left) == files.MAX_PARTIAL_PER_PEER - 1 and left[-1].endswith("a")  # the newest kept
    assert (partials / "pp1other-00").exists()
