"""Files: a node sends a file to a peer, which saves it (under its state directory, or where its
owner chose) and lists it in its inbox.

On the files port the sender offers the file (its name, size and SHA-256); the receiver
answers where to start: 0, or how much of it a broken transfer already brought. The sender
then streams the bytes from there and half-closes; the receiver checks the SHA-256 of the
whole file, moves it into place under a name that cannot leave its directory, and says so.
Both ends record each transfer (``files.db``), so a transfer broken by a lost session or a
restart resumes from where it stopped, and the receiver's limits (largest file, free space,
transfers at once) are checked before any byte is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import hashlib
import logging
import os
import re
import shutil
import time
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from peerpath import errors
from peerpath.identity import Address
from peerpath.node import control
from peerpath.node.node import Node
from peerpath.services import ports
from peerpath.services.frames import FrameCodec, FrameError, encode
from peerpath.services.names import Names
from peerpath.session.streams import StreamWriter
from peerpath.storage import StorageError, one_by_prefix, open_database, write
from peerpath.tasks import cancel_all, spawn

log = logging.getLogger(__name__)

#: Largest file a receiver takes unless its owner says otherwise.
DEFAULT_MAX_SIZE = 4 * 1024**3
#: Bytes a receiver keeps free on its disk beyond the file.
DISK_MARGIN = 64 * 1024**2
#: Transfers a receiver takes at once, from one peer and from everybody.
MAX_INCOMING_PER_PEER = 4
MAX_INCOMING = 32
#: Bytes read from the file, and from the stream, at a time.
CHUNK = 256 * 1024
#: A resumed transfer restarts at a multiple of this (what was surely written whole).
RESUME_GRAIN = 1024 * 1024
#: Seconds to wait for a session, a stream, an answer, or the next bytes.
TIMEOUT = 20.0
RETRY = (1.0, 30.0)
#: Days a partial file waits for its transfer to resume, and a finished transfer is listed.
KEEP_DAYS = 7
#: Longest file name kept (bytes of UTF-8).
MAX_NAME = 255
#: Times a file may arrive with the wrong SHA-256 before the sender gives up (it is changing).
MAX_MISMATCHES = 3
#: Unfinished files a receiver keeps per peer (the oldest goes first), and seconds between
#: clean-ups of expired ones.
MAX_PARTIAL_PER_PEER = 8
UPKEEP_EVERY = 3600.0

_Id = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
_Reason = Annotated[str, msgspec.Meta(max_length=512)]


class Offer(msgspec.Struct, tag="offer", frozen=True):
    """The sender: I have this file for you."""

    id: _Id
    name: Annotated[str, msgspec.Meta(max_length=1024)]
    size: Annotated[int, msgspec.Meta(ge=0, le=1 << 50)]
    sha256: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class Accept(msgspec.Struct, tag="accept", frozen=True):
    """The receiver: send the bytes from ``offset`` on."""

    offset: Annotated[int, msgspec.Meta(ge=0, le=1 << 50)]


class Decline(msgspec.Struct, tag="decline", frozen=True):
    """The receiver does not take the file (now, with ``retry``; or ever)."""

    reason: _Reason
    retry: bool = False


class Saved(msgspec.Struct, tag="saved", frozen=True):
    """The receiver has the whole file, checked, under ``name``."""

    name: Annotated[str, msgspec.Meta(max_length=1024)]


Frame = Offer | Accept | Decline | Saved
codec: FrameCodec[Frame] = FrameCodec(Frame, 4096)


class FileError(errors.RemoteError):
    """A file the peer declined, or a transfer that failed; the message says why."""


class Direction(enum.StrEnum):
    """Which way a transfer goes."""

    OUT = "out"
    IN = "in"


class TransferState(enum.StrEnum):
    """Where a transfer is."""

    QUEUED = "queued"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Transfer:
    """One file transfer, as one side knows it."""

    id: str
    direction: Direction
    peer: Address
    name: str
    path: str
    size: int
    sha256: str
    state: TransferState
    done_bytes: int
    error: str
    created: float
    updated: float

    def describe(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "id": self.id,
            "direction": self.direction.value,
            "peer": str(self.peer),
            "name": self.name,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "state": self.state.value,
            "bytes": self.done_bytes,
            "failure": self.error or None,
            "created": self.created,
            "updated": self.updated,
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
    direction TEXT NOT NULL,
    id BLOB NOT NULL,
    peer TEXT NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    state TEXT NOT NULL,
    done_bytes INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (direction, id)
);
CREATE VIEW IF NOT EXISTS transfer_rows AS
    SELECT id, direction, peer, name, path, size, sha256, state, done_bytes, error, created, updated FROM transfers;
"""


def _transfer(row: tuple[Any, ...]) -> Transfer:
    id_, direction, peer, name, path, size, sha256, state, done, error, created, updated = row
    return Transfer(bytes(id_).hex(), Direction(direction), Address.parse(peer), name, path, size, bytes(sha256).hex(),
                    TransferState(state), done, error, created, updated)  # fmt: skip


class TransferStore:
    """The transfers of one node, both ways."""

    def __init__(self, path: Path | str) -> None:
        self._db = open_database(path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def put(self, transfer: Transfer) -> None:
        """Record a new transfer (or replace one)."""
        self._write(
            "INSERT OR REPLACE INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (transfer.direction, bytes.fromhex(transfer.id), str(transfer.peer), transfer.name, transfer.path,
             transfer.size, bytes.fromhex(transfer.sha256), transfer.state, transfer.done_bytes, transfer.error,
             transfer.created, transfer.updated),
        )  # fmt: skip

    def get(self, direction: Direction, transfer_id: bytes) -> Transfer | None:
        """One transfer."""
        row = self._db.execute(
            "SELECT * FROM transfer_rows WHERE direction = ? AND id = ?", (direction, transfer_id)
        ).fetchone()
        return _transfer(row) if row else None

    def update(self, direction: Direction, transfer_id: bytes, **fields: Any) -> Transfer | None:
        """Change a transfer's state, bytes done, error or path."""
        current = self.get(direction, transfer_id)
        if current is None:
            return None
        changed = {
            "state": fields.get("state", current.state),
            "done_bytes": fields.get("done_bytes", current.done_bytes),
            "error": fields.get("error", current.error),
            "path": fields.get("path", current.path),
        }
        self._write(
            "UPDATE transfers SET state = ?, done_bytes = ?, error = ?, path = ?, updated = ? "
            "WHERE direction = ? AND id = ?",
            (changed["state"], changed["done_bytes"], changed["error"], changed["path"], time.time(), direction,
             transfer_id),
        )  # fmt: skip
        return self.get(direction, transfer_id)

    def listing(self, direction: Direction | None = None, limit: int = 100) -> list[Transfer]:
        """Transfers, newest first."""
        rows = self._db.execute(
            "SELECT * FROM transfer_rows WHERE (? IS NULL OR direction = ?) ORDER BY updated DESC LIMIT ?",
            (direction, direction, limit),
        ).fetchall()
        return [_transfer(row) for row in rows]

    def unfinished(self, direction: Direction) -> list[Transfer]:
        """Transfers that are neither done nor failed."""
        rows = self._db.execute(
            "SELECT * FROM transfer_rows WHERE direction = ? AND state IN ('queued', 'sending') ORDER BY created",
            (direction,),
        ).fetchall()
        return [_transfer(row) for row in rows]

    def find(self, prefix: str) -> Transfer:
        """The transfer whose id starts with ``prefix`` (6 hex digits at least)."""
        sql = "SELECT * FROM transfer_rows WHERE hex(id) LIKE ? ORDER BY updated DESC LIMIT 2"
        return _transfer(one_by_prefix(self._db, sql, prefix, (), "transfer"))

    def prune(self, now: float | None = None) -> None:
        """Forget finished transfers older than :data:`KEEP_DAYS`."""
        cutoff = (now if now is not None else time.time()) - KEEP_DAYS * 86400
        self._write("DELETE FROM transfers WHERE state IN ('done', 'failed') AND updated < ?", (cutoff,))

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        write(self._db, sql, args, "the transfer")


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


def safe_name(name: str) -> str:
    """A file name to save ``name`` as: its last part, without separators, control characters
    or leading dots, at most :data:`MAX_NAME` bytes; never empty, ``.`` or ``..``."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("_", "".join(c for c in name if unicodedata.category(c) not in ("Cf", "Zl", "Zp")))
    name = name.strip().lstrip(".").strip()
    while len(name.encode()) > MAX_NAME:
        stem, dot, suffix = name.rpartition(".")
        name = (stem[:-1] + dot + suffix) if dot and len(suffix) < 16 and stem else name[:-1]
    return name or "file"


def _unique(directory: Path, name: str) -> Path:
    """``directory/name``, or ``name (2)`` and so on if that exists; always inside ``directory``."""
    candidate = directory / name
    stem, dot, suffix = name.rpartition(".")
    if not stem:
        stem, dot, suffix = name, "", ""
    n = 1
    while candidate.exists():
        n += 1
        candidate = directory / f"{stem} ({n}){dot}{suffix}"
    if not candidate.resolve().is_relative_to(directory.resolve()):
        raise FileError(f"refusing a file name that leaves {directory}: {name!r}")
    return candidate


def file_digest(path: Path) -> bytes:
    """The SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.digest()


class Files:
    """The files service of one node: files it sends, and files it receives."""

    def __init__(
        self,
        node: Node,
        state_dir: Path,
        announce: Callable[[Address, bytes, bytes], None] | None = None,
        names: Names | None = None,
    ) -> None:
        self.node = node
        self.state_dir = state_dir
        self.names = names or Names(node.trust)
        #: Where received files are saved (a folder per sender inside it), and the largest taken.
        self.directory = (state_dir / "files").absolute()
        self.max_size = DEFAULT_MAX_SIZE
        #: Lists a received file in the inbox: ``announce(sender, id, note)`` (the messages service).
        self._announce_to = announce
        self.store: TransferStore | None = None
        self._couriers: dict[bytes, asyncio.Task[None]] = {}
        self._mismatches: dict[bytes, int] = {}
        self._reserved: dict[bytes, int] = {}
        self._incoming: dict[bytes, Address] = {}
        self._changed: dict[bytes, set[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters = {"sent": 0, "received": 0, "declined": 0, "resumed": 0, "streams_failed": 0}

    async def start(self) -> None:
        """Open the database, serve the files port, resume unfinished sends."""
        self.store = TransferStore(self.state_dir / "files.db")
        self.node.serve(ports.FILES, self._serve)
        for transfer in self.store.unfinished(Direction.OUT):
            self._dispatch(transfer)
        spawn(self._upkeep(), "cleaning up old transfers", self._tasks)

    async def close(self) -> None:
        """Stop transfers (they resume at the next start) and close the database."""
        self.node.unserve(ports.FILES)
        await cancel_all([*self._couriers.values(), *self._tasks])
        if self.store is not None:
            self.store.close()
            self.store = None

    def _db(self) -> TransferStore:
        if self.store is None:
            raise errors.LocalError("the files service is not running (start the node first)")
        return self.store

    def _update(self, direction: Direction, transfer_id: bytes, **fields: Any) -> Transfer | None:
        transfer = self._db().update(direction, transfer_id, **fields)
        for waiting in self._changed.pop(transfer_id, set()):
            if not waiting.done():
                waiting.set_result(None)
        return transfer

    # -- sending --------------------------------------------------------------------------------

    async def send(self, peer: Address | str, path: str | Path, *, name: str | None = None) -> str:
        """Send the file at ``path`` to ``peer``; return the transfer's id at once (follow it
        with :meth:`progress` or :meth:`wait`). It resumes after broken sessions and restarts."""
        address = await self.names.resolve(peer)
        if not self.node.is_trusted(address):
            raise errors.NotTrustedError(f"{address} is not trusted; run: peerpath trust add {address}")
        source = await asyncio.to_thread(lambda: Path(path).expanduser().resolve())
        if not await asyncio.to_thread(source.is_file):
            raise errors.LocalError(f"{path} is not a file")
        try:
            size = (await asyncio.to_thread(source.stat)).st_size
            digest = await asyncio.to_thread(file_digest, source)
        except OSError as exc:
            raise errors.LocalError(f"cannot read {path}: {exc.strerror or exc}") from None
        now = time.time()
        transfer = Transfer(os.urandom(16).hex(), Direction.OUT, address, name or source.name, str(source), size,
                            digest.hex(), TransferState.QUEUED, 0, "", now, now)  # fmt: skip
        self._db().put(transfer)
        self._dispatch(transfer)
        return transfer.id

    def _dispatch(self, transfer: Transfer) -> None:
        key = bytes.fromhex(transfer.id)
        if key not in self._couriers:
            task = spawn(self._courier(key), f"sending {transfer.name} to {transfer.peer}")
            self._couriers[key] = task
            task.add_done_callback(lambda _t: self._couriers.pop(key, None))

    async def _courier(self, key: bytes) -> None:
        pause = RETRY[0]
        while True:
            transfer = self._db().get(Direction.OUT, key)
            if transfer is None or transfer.state in (TransferState.DONE, TransferState.FAILED):
                return
            try:
                await self._send_once(transfer)
                return
            except FileError as exc:
                self._update(Direction.OUT, key, state=TransferState.FAILED, error=str(exc))
                self.node.events.emit("file-failed", id=transfer.id, to=str(transfer.peer), error=str(exc))
                return
            except _Later as exc:
                if "SHA-256" in str(exc):
                    self._mismatches[key] = self._mismatches.get(key, 0) + 1
                self._update(Direction.OUT, key, state=TransferState.QUEUED, error=str(exc))
            except (errors.PeerpathError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.info("sending %s to %s stopped: %s", transfer.name, transfer.peer, exc)
                self._update(Direction.OUT, key, state=TransferState.QUEUED, error=str(exc) or type(exc).__name__)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY[1])

    async def _send_once(self, transfer: Transfer) -> None:
        key = bytes.fromhex(transfer.id)
        try:
            size = (await asyncio.to_thread(os.stat, transfer.path)).st_size
        except OSError as exc:
            raise FileError(f"cannot read {transfer.path}: {exc.strerror or exc}") from None
        if size != transfer.size or self._mismatches.get(key, 0) >= MAX_MISMATCHES:
            raise FileError(f"{transfer.path} changed since it was offered; send it again")
        connection = await self.node.connect(transfer.peer, timeout=TIMEOUT)
        reader, writer = await connection.open_stream(ports.FILES, timeout=TIMEOUT)
        try:
            writer.write(encode(Offer(key, transfer.name, transfer.size, bytes.fromhex(transfer.sha256))))
            answer = await codec.read(reader, TIMEOUT)
            if isinstance(answer, Saved):
                writer.write_eof()
                self._update(Direction.OUT, key, state=TransferState.DONE, done_bytes=transfer.size, error="")
                return
            if isinstance(answer, Decline):
                if answer.retry:
                    raise _Later(f"{transfer.peer} declined for now: {answer.reason}")
                raise FileError(f"{transfer.peer} declined {transfer.name}: {answer.reason}")
            if not isinstance(answer, Accept) or answer.offset > transfer.size:
                raise FrameError(f"{transfer.peer} did not answer the offer")
            if answer.offset:
                self.counters["resumed"] += 1
            self._update(Direction.OUT, key, state=TransferState.SENDING, done_bytes=answer.offset, error="")
            await self._stream_file(transfer, answer.offset, writer)
            writer.write_eof()
            outcome = await codec.read(reader, TIMEOUT * 3)
            if isinstance(outcome, Decline):
                if outcome.retry:
                    raise _Later(outcome.reason)
                raise FileError(f"{transfer.peer} did not keep {transfer.name}: {outcome.reason}")
            if not isinstance(outcome, Saved):
                raise errors.SessionClosedError(f"{transfer.peer} did not confirm {transfer.name}")
        except BaseException:
            writer.abort()
            raise
        self.counters["sent"] += 1
        self._update(Direction.OUT, key, state=TransferState.DONE, done_bytes=transfer.size, error="")
        self.node.events.emit(
            "file-sent", id=transfer.id, to=str(transfer.peer), name=transfer.name, size=transfer.size
        )

    async def _stream_file(self, transfer: Transfer, offset: int, writer: StreamWriter) -> None:
        key = bytes.fromhex(transfer.id)
        sent, reported = offset, time.monotonic()
        try:
            source = await asyncio.to_thread(open, transfer.path, "rb")
        except OSError as exc:
            raise FileError(f"cannot read {transfer.path}: {exc.strerror or exc}") from None
        with source:
            source.seek(offset)
            while sent < transfer.size:
                chunk = await asyncio.to_thread(source.read, min(CHUNK, transfer.size - sent))
                if not chunk:
                    raise FileError(f"{transfer.path} got shorter while it was sent")
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
                if time.monotonic() - reported > 0.25:
                    reported = time.monotonic()
                    self._update(Direction.OUT, key, done_bytes=sent)

    # -- receiving ------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: StreamWriter) -> None:
        peer: Address = writer.get_extra_info("peer_address")
        key = b""
        try:
            offer = await codec.read(reader, TIMEOUT)
            if not isinstance(offer, Offer):
                raise FrameError("the first frame on the files port is an offer")
            key = offer.id
            answer = self._consider(peer, offer)
            writer.write(encode(answer))
            if not isinstance(answer, Accept):
                self.counters["declined"] += isinstance(answer, Decline)
                writer.write_eof()
                return
            self._incoming[key] = peer
            writer.write(encode(await self._receive(peer, offer, answer.offset, reader)))
            writer.write_eof()
        except (FrameError, TimeoutError, asyncio.IncompleteReadError) as exc:
            self.counters["streams_failed"] += 1
            log.info("closed a files stream from %s: %s", peer, exc)
            writer.abort()
        except (errors.PeerpathError, ConnectionError):
            self.counters["streams_failed"] += 1
        finally:
            if self._incoming.get(key) == peer:
                del self._incoming[key]
                self._reserved.pop(key, None)

    def _partial(self, peer: Address, key: bytes) -> Path:
        return self.directory / ".partial" / f"{peer}-{key.hex()}"

    def _evict_partials(self, peer: Address) -> None:
        """Make room for one more unfinished file of ``peer``'s: its oldest ones beyond
        :data:`MAX_PARTIAL_PER_PEER` go (a peer cannot fill the disk with abandoned starts)."""
        partials = sorted(
            (self.directory / ".partial").glob(f"{peer}-*"), key=lambda p: p.stat().st_mtime, reverse=True
        )
        for stale in partials[MAX_PARTIAL_PER_PEER - 1 :]:
            stale.unlink(missing_ok=True)

    def _upkeep_once(self, now: float | None = None) -> None:
        """Forget old transfers, and unfinished files nobody resumed for :data:`KEEP_DAYS`."""
        now = time.time() if now is None else now
        self._db().prune(now)
        for partial in (self.directory / ".partial").glob("*"):
            with contextlib.suppress(OSError):
                if partial.stat().st_mtime < now - KEEP_DAYS * 86400:
                    partial.unlink()

    async def _upkeep(self) -> None:
        while True:
            await asyncio.sleep(UPKEEP_EVERY)
            try:
                await asyncio.to_thread(self._upkeep_once)
            except (OSError, StorageError) as exc:
                log.warning("could not clean up old transfers: %s", exc)

    def _consider(self, peer: Address, offer: Offer) -> Accept | Decline | Saved:
        """Whether to take an offered file, and from where (or that it is here already)."""
        if offer.size > self.max_size:
            return Decline(f"the file is {offer.size} bytes; this node takes files up to {self.max_size}")
        if offer.id in self._incoming:
            return Decline("this transfer is running already", retry=True)
        if sum(1 for p in self._incoming.values() if p == peer) >= MAX_INCOMING_PER_PEER:
            return Decline(f"{MAX_INCOMING_PER_PEER} of your files are on their way already", retry=True)
        if len(self._incoming) >= MAX_INCOMING:
            return Decline("too many files are on their way here; try later", retry=True)
        known = self._db().get(Direction.IN, offer.id)
        if known is not None and known.peer != peer:
            return Decline("that transfer id is taken")
        if known is not None and known.state is TransferState.DONE:
            return Saved(Path(known.path).name)  # the sender's retry after a lost "saved"
        partial = self._partial(peer, offer.id)
        partial.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        have = partial.stat().st_size if partial.exists() else 0
        if not have:
            self._evict_partials(peer)
        offset = min(have - have % RESUME_GRAIN, offer.size)
        try:
            free = shutil.disk_usage(partial.parent).free
        except OSError:
            free = 0
        promised = sum(self._reserved.values())  # what transfers under way will still write
        if free < promised + offer.size - offset + DISK_MARGIN:
            return Decline(f"the receiver's disk has {free} bytes free", retry=True)
        self._reserved[offer.id] = offer.size - offset
        now = time.time()
        self._db().put(Transfer(offer.id.hex(), Direction.IN, peer, safe_name(offer.name), str(partial), offer.size,
                                offer.sha256.hex(), TransferState.SENDING, offset, "", now, now))  # fmt: skip
        return Accept(offset)

    async def _receive(self, peer: Address, offer: Offer, offset: int, reader: asyncio.StreamReader) -> Saved | Decline:
        partial = self._partial(peer, offer.id)
        got, reported = offset, time.monotonic()
        try:
            mode = "r+b" if await asyncio.to_thread(partial.exists) else "wb"
            with await asyncio.to_thread(open, partial, mode) as out:
                out.truncate(offset)
                out.seek(offset)
                while got < offer.size:
                    chunk = await asyncio.wait_for(reader.read(min(CHUNK, offer.size - got)), TIMEOUT)
                    if not chunk:
                        raise FrameError(f"the stream ended after {got} of {offer.size} bytes")
                    await asyncio.to_thread(out.write, chunk)
                    got += len(chunk)
                    if time.monotonic() - reported > 0.25:
                        reported = time.monotonic()
                        self._update(Direction.IN, offer.id, done_bytes=got)
                await asyncio.to_thread(_flush, out)
            if await asyncio.wait_for(reader.read(1), TIMEOUT):
                raise FrameError("more bytes than offered")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._update(Direction.IN, offer.id, done_bytes=got, state=TransferState.QUEUED, error="disk full")
                return Decline("the receiver's disk is full", retry=True)
            raise
        finally:
            self._update(Direction.IN, offer.id, done_bytes=got)
        if await asyncio.to_thread(file_digest, partial) != offer.sha256:
            partial.unlink(missing_ok=True)
            self._update(Direction.IN, offer.id, state=TransferState.FAILED, error="SHA-256 mismatch")
            return Decline("the file's SHA-256 does not match; send it again", retry=True)
        folder = self.directory / str(peer)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = _unique(folder, safe_name(offer.name))
        partial.replace(final)
        self.counters["received"] += 1
        self._update(Direction.IN, offer.id, state=TransferState.DONE, path=str(final), done_bytes=offer.size)
        self._announce(peer, offer, final)
        self.node.events.emit(
            "file-received", id=offer.id.hex(), **{"from": str(peer)}, path=str(final), size=offer.size
        )
        return Saved(final.name)

    def _announce(self, peer: Address, offer: Offer, final: Path) -> None:
        """List the file in the inbox."""
        if self._announce_to is None:
            return
        note = {"file": final.name, "path": str(final), "size": offer.size, "sha256": offer.sha256.hex()}
        try:
            self._announce_to(peer, offer.id, msgspec.msgpack.encode(note))
        except errors.PeerpathError as exc:
            log.warning("received %s from %s but could not list it in the inbox: %s", final, peer, exc)

    # -- following transfers ------------------------------------------------------------------------

    def get(self, transfer_id: str) -> Transfer:
        """A transfer by id (or a unique prefix of 6 hex digits or more)."""
        try:
            return self._db().find(transfer_id)
        except LookupError as exc:
            raise errors.LocalError(str(exc)) from None

    def list(self, direction: Direction | None = None, limit: int = 100) -> list[Transfer]:
        """Transfers, newest first."""
        return self._db().listing(direction, limit)

    async def progress(self, transfer_id: str) -> AsyncIterator[Transfer]:
        """The transfer as it is, then at each change (at most every quarter second), until it ends."""
        transfer = self.get(transfer_id)
        key = bytes.fromhex(transfer.id)
        while True:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._changed.setdefault(key, set()).add(future)
            current = self._db().get(transfer.direction, key)
            if current is None:
                return
            yield current
            if current.state in (TransferState.DONE, TransferState.FAILED):
                return
            await future

    async def wait(self, transfer_id: str, timeout: float | None = None) -> Transfer:
        """The transfer once it is done; FileError if it failed."""
        async with asyncio.timeout(timeout):
            async for transfer in self.progress(transfer_id):
                if transfer.state is TransferState.DONE:
                    return transfer
                if transfer.state is TransferState.FAILED:
                    raise FileError(transfer.error)
        raise errors.LocalError(f"transfer {transfer_id} is gone")

    def describe(self) -> dict[str, Any]:
        """For status."""
        return {"directory": str(self.directory), "max_size": self.max_size, "sending": len(self._couriers),
                "receiving": len(self._incoming), **self.counters}  # fmt: skip


def _flush(out: Any) -> None:
    """Everything written to ``out`` on the disk."""
    out.flush()
    os.fsync(out.fileno())


class _Later(Exception):
    """The receiver asks to try again later."""


# -- the control API (``peerpath send-file``, ``peerpath files``) --------------------------------------


class SendFileOp(control.Op, tag="file-send", frozen=True):
    """Send files; with ``wait``, answer their progress until each is done."""

    peer: Annotated[str, msgspec.Meta(max_length=256)]
    paths: Annotated[list[Annotated[str, msgspec.Meta(max_length=4096)]], msgspec.Meta(min_length=1, max_length=1000)]
    wait: bool = True


class FilesOp(control.Op, tag="files", frozen=True):
    """Transfers, newest first."""

    direction: Literal["in", "out"] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 50


class FilesControl:
    """The files service's ops on the daemon's control socket."""

    def __init__(self, files: Files) -> None:
        self.files = files

    def control_ops(self) -> dict[type[control.Op], control.OpHandler]:
        """The ops, each with its handler."""
        return {SendFileOp: self._send, FilesOp: self._list}

    def describe(self) -> dict[str, Any]:
        """What status shows."""
        return self.files.describe()

    async def _send(self, op: SendFileOp) -> AsyncGenerator[dict[str, Any], None]:
        ids = [await self.files.send(op.peer, path) for path in op.paths]
        for transfer_id in ids:
            if not op.wait:
                yield self.files.get(transfer_id).describe()
                continue
            async for transfer in self.files.progress(transfer_id):
                yield transfer.describe()

    async def _list(self, op: FilesOp) -> AsyncGenerator[dict[str, Any], None]:
        for transfer in self.files.list(Direction(op.direction) if op.direction else None, op.limit):
            yield transfer.describe()
