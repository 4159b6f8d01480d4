"""Trust requests: asking a peer to trust us, and answering the peers that ask us.

A request is a signed letter kept by the rendezvous server until the target is online.
Approving it trusts the requester and sends back a signed approval naming the request;
the requester trusts the approver only on an approval for a request it really made.
Requests and approvals are kept in ``trust-requests.json`` in the state directory.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from peerpath.errors import LocalError
from peerpath.identity import Address, Identity
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.letters import LetterError, check_letter, make_letter
from peerpath.wire import rendezvous as rv

log = logging.getLogger(__name__)

REQUESTS_FILE = "trust-requests.json"
#: Nonces of letters already acted on, kept to ignore replays.
SEEN_LIMIT = 4096


@dataclass
class Request:
    """A trust request, incoming or outgoing."""

    address: str
    note: str
    created: int
    nonce: str  # hex


class TrustRequests:
    """Incoming and outgoing trust requests of one node, backed by a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.incoming: dict[str, Request] = {}
        self.outgoing: dict[str, Request] = {}
        self.seen: list[str] = []
        self._load()

    def _load(self) -> None:
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise LocalError(f"trust request file {self.path} is unreadable: {exc}") from exc
        self.incoming = {k: Request(**v) for k, v in document.get("incoming", {}).items()}
        self.outgoing = {k: Request(**v) for k, v in document.get("outgoing", {}).items()}
        self.seen = list(document.get("seen", []))[-SEEN_LIMIT:]

    def save(self) -> None:
        """Write the file atomically (0600)."""
        document = {
            "incoming": {k: asdict(v) for k, v in self.incoming.items()},
            "outgoing": {k: asdict(v) for k, v in self.outgoing.items()},
            "seen": self.seen[-SEEN_LIMIT:],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".requests-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=2)
        os.replace(tmp, self.path)


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

    def receive(self, letter: rv.Letter, now: float | None = None) -> str:
        """Act on a delivered letter; return what was done (for logs and tests)."""
        try:
            sender, recipient = check_letter(letter, now)
        except LetterError as exc:
            return f"ignored: {exc}"
        if recipient != self.identity.address:
            return "ignored: not addressed to this node"
        nonce = letter.nonce.hex()
        if nonce in self.requests.seen:
            return "ignored: replayed"
        self.requests.seen.append(nonce)
        if letter.kind == "trust-request":
            if sender in self.trust:
                self.requests.save()
                return "ignored: already trusted"
            self.requests.incoming[str(sender)] = Request(str(sender), letter.note, letter.created, nonce)
            self.requests.save()
            log.info("trust request from %s: %s", sender, letter.note or "(no note)")
            return "pending"
        outgoing = self.requests.outgoing.get(str(sender))
        if outgoing is None or bytes.fromhex(outgoing.nonce) != letter.reply_to:
            self.requests.save()
            return "ignored: approval of no request of ours"
        del self.requests.outgoing[str(sender)]
        self.trust.add(sender, outgoing.note or "approved our request")
        self.requests.save()
        log.info("%s approved our trust request", sender)
        return "trusted"
