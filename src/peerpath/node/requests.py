"""Trust requests: asking a peer to trust us, and answering the peers that ask us.

A request is a signed letter kept by the rendezvous server until the target is online.
Approving it trusts the requester and sends back a signed approval naming the request;
the requester trusts the approver only on an approval for a request it really made.
Requests and approvals are kept in ``trust-requests.json`` in the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peerpath.errors import LocalError
from peerpath.identity import Address, Identity
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.letters import LetterError, check_letter, make_letter
from peerpath.wire import rendezvous as rv

log = logging.getLogger(__name__)

REQUESTS_FILE = "trust-requests.json"
#: Nonces of letters already acted on, kept to ignore replays (the oldest is forgotten first).
SEEN_LIMIT = 4096
#: Incoming requests kept waiting for an answer, in total (one per sender); a new one past this drops
#: the one that arrived first, so a flood of throwaway identities costs memory and disk no more than this.
MAX_PENDING = 256
#: Seconds between writes of the file while letters arrive: a burst of letters is one write, and a
#: crash loses at most the letters of this last moment.
SAVE_DELAY = 0.5


@dataclass
class Request:
    """A trust request, incoming or outgoing."""

    address: str
    note: str
    created: int
    nonce: str  # hex


class TrustRequests:
    """Incoming and outgoing trust requests of one node, backed by a JSON file.

    :meth:`save` writes at once; :meth:`save_soon` (for letters from the network) coalesces
    writes and does them in a worker thread, off the event loop. :meth:`close` writes what is
    left. Writes are serialised, and an older state never replaces a newer one on disk.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        #: By sender, in order of arrival (the first is dropped first).
        self.incoming: dict[str, Request] = {}
        self.outgoing: dict[str, Request] = {}
        #: Nonces acted on, as an ordered set (oldest first).
        self.seen: dict[str, None] = {}
        self._changes = 0  # counts changes; the file holds the state as of change number _written
        self._written = 0
        self._write_lock = threading.Lock()
        self._saver: asyncio.Task[None] | None = None
        self._load()

    def _load(self) -> None:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise LocalError(f"trust request file {self.path} is unreadable: {exc}") from exc
        try:
            incoming = {str(k): Request(**v) for k, v in document.get("incoming", {}).items()}
            outgoing = {str(k): Request(**v) for k, v in document.get("outgoing", {}).items()}
            seen = [str(nonce) for nonce in document.get("seen", [])]
        except (AttributeError, TypeError) as exc:
            raise LocalError(f"trust request file {self.path} is malformed: {exc}") from exc
        self.incoming = dict(list(incoming.items())[-MAX_PENDING:])
        self.outgoing = outgoing
        self.seen = dict.fromkeys(seen[-SEEN_LIMIT:])

    def add_incoming(self, request: Request) -> None:
        """Keep ``request`` as its sender's pending one (replacing an earlier one), within :data:`MAX_PENDING`."""
        self.incoming.pop(request.address, None)  # re-inserted last: it is the newest
        self.incoming[request.address] = request
        while len(self.incoming) > MAX_PENDING:
            dropped = self.incoming.pop(next(iter(self.incoming)))
            log.debug("too many pending trust requests: dropped the oldest, from %s", dropped.address)

    def remember(self, nonce: str) -> bool:
        """Record a letter's nonce; False if it was seen already (a replay)."""
        if nonce in self.seen:
            return False
        self.seen[nonce] = None
        while len(self.seen) > SEEN_LIMIT:
            del self.seen[next(iter(self.seen))]
        return True

    def _document(self) -> dict[str, Any]:
        return {
            "incoming": {k: asdict(v) for k, v in self.incoming.items()},
            "outgoing": {k: asdict(v) for k, v in self.outgoing.items()},
            "seen": list(self.seen),
        }

    def _write(self, document: dict[str, Any], change: int) -> None:
        """Write ``document`` (the state as of ``change``) atomically, mode 0600; from any thread."""
        with self._write_lock:
            if change <= self._written:
                return  # a newer state is on disk already
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".requests-", suffix=".json")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(document, f, indent=2, ensure_ascii=False)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._written = change

    def save(self) -> None:
        """Write the file now, atomically (0600)."""
        self._changes += 1
        self._write(self._document(), self._changes)

    def save_soon(self) -> None:
        """Write the file within :data:`SAVE_DELAY`, off the event loop (at once when no loop runs)."""
        self._changes += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.save()
            return
        if self._saver is None or self._saver.done():
            self._saver = loop.create_task(self._save_later())

    def flush(self) -> None:
        """Write the file now if it is behind."""
        if self._written < self._changes:
            self.save()

    async def close(self) -> None:
        """Stop the delayed writer and write what is left."""
        saver, self._saver = self._saver, None
        if saver is not None and not saver.done():
            saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await saver
        await asyncio.to_thread(self.flush)

    async def _save_later(self) -> None:
        try:
            while self._written < self._changes:
                await asyncio.sleep(SAVE_DELAY)
                # The snapshot is taken here, on the loop; only the encoding and the write leave it.
                await asyncio.to_thread(self._write, self._document(), self._changes)
        except asyncio.CancelledError:
            # Closing (or the loop ending): write the rest now rather than lose it.
            try:
                self.flush()
            except OSError as exc:
                log.warning("could not save trust requests to %s: %s", self.path, exc)
            raise
        except OSError as exc:
            log.warning("could not save trust requests to %s: %s (retrying on the next change)", self.path, exc)


class TrustBroker:
    """Sends, receives and answers trust requests for a node."""

    def __init__(self, identity: Identity, trust: TrustStore, path: Path) -> None:
        self.identity = identity
        self.trust = trust
        self.requests = TrustRequests(path)

    def request(self, target: Address, note: str = "") -> rv.Letter:
        """A signed request to ``target``; remembered so that its approval is accepted."""
        if target == self.identity.address:
            raise LocalError("cannot ask this node to trust itself")
        if len(note) > rv.MAX_NOTE:
            raise LocalError(f"a note is at most {rv.MAX_NOTE} characters, this one has {len(note)}")
        letter = make_letter(self.identity, "trust-request", target, note)
        self.requests.outgoing[str(target)] = Request(str(target), note, letter.created, letter.nonce.hex())
        self.requests.save()
        return letter

    def approve(self, requester: Address) -> rv.Letter:
        """Trust ``requester`` and return the signed approval to send back."""
        pending = self.requests.incoming.pop(str(requester), None)
        if pending is None:
            raise LocalError(f"no trust request from {requester} is pending")
        self.trust.add(requester, pending.note)
        self.requests.save()
        return make_letter(self.identity, "trust-approval", requester, reply_to=bytes.fromhex(pending.nonce))

    def deny(self, requester: Address) -> None:
        """Drop a pending request without answering it."""
        if self.requests.incoming.pop(str(requester), None) is None:
            raise LocalError(f"no trust request from {requester} is pending")
        self.requests.save()

    def pending(self) -> list[Request]:
        """Incoming requests waiting for an answer, oldest first."""
        return sorted(self.requests.incoming.values(), key=lambda r: r.created)

    async def close(self) -> None:
        """Write the requests still unsaved; call when the node closes."""
        await self.requests.close()

    def receive(self, letter: rv.Letter, now: float | None = None) -> str:
        """Act on a delivered letter; return what was done (for logs and tests).

        Letters come from strangers: what they change is bounded (:data:`MAX_PENDING`,
        :data:`SEEN_LIMIT`) and saved a moment later, off the event loop."""
        try:
            sender, recipient = check_letter(letter, now)
        except LetterError as exc:
            return f"ignored: {exc}"
        if recipient != self.identity.address:
            return "ignored: not addressed to this node"
        nonce = letter.nonce.hex()
        if not self.requests.remember(nonce):
            return "ignored: replayed"
        outcome = self._act(letter, sender, nonce)
        self.requests.save_soon()  # the nonce at least is new
        return outcome

    def _act(self, letter: rv.Letter, sender: Address, nonce: str) -> str:
        if letter.kind == "trust-request":
            if sender in self.trust:
                return "ignored: already trusted"
            current = self.requests.incoming.get(str(sender))
            if current is not None and current.created > letter.created:
                return "ignored: a newer request from this sender is pending"
            self.requests.add_incoming(Request(str(sender), letter.note, letter.created, nonce))
            log.info("trust request from %s: %r", sender, letter.note)
            return "pending"
        outgoing = self.requests.outgoing.get(str(sender))
        if outgoing is None or bytes.fromhex(outgoing.nonce) != letter.reply_to:
            return "ignored: approval of no request of ours"
        del self.requests.outgoing[str(sender)]
        self.trust.add(sender, outgoing.note or "approved our request")
        self.requests.save()  # we trust the sender now: the request it answered must not come back
        log.info("%s approved our trust request", sender)
        return "trusted"
