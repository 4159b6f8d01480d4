"""The trust store: the addresses this node accepts sessions from and connects to.

Deny by default. The store is a JSON file in the state directory (mode 0600), written
atomically; a running node re-reads it when it changes, so ``peerpath trust add`` takes
effect without a restart.

It also pins names: once a peer found by a name is trusted, the name stands for that address
here, whatever a rendezvous server says later (``"names": {"planner": "pp1..."}``; a file
without the key has no pins).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peerpath.errors import LocalError
from peerpath.identity import Address
from peerpath.wire.rendezvous import NAME_PATTERN

TRUST_FILE = "trust.json"
_NAME = re.compile(NAME_PATTERN)


class TrustStoreError(LocalError):
    """The trust file is unreadable or malformed."""


@dataclass(frozen=True)
class TrustEntry:
    """One trusted peer."""

    address: Address
    note: str = ""
    added: str = ""


class TrustStore:
    """A set of trusted addresses backed by ``state_dir/trust.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[Address, TrustEntry] = {}
        self._names: dict[str, Address] = {}
        self._stamp: tuple[int, int] | None = None
        self._load()

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> TrustStore:
        """The store of a state directory."""
        return cls(state_dir / TRUST_FILE)

    def _load(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._entries, self._names, self._stamp = {}, {}, None
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            document = json.loads(self.path.read_text())
            entries = {}
            for text, meta in document.get("peers", {}).items():
                address = Address.parse(text)
                entries[address] = TrustEntry(address, str(meta.get("note", "")), str(meta.get("added", "")))
            names = {}
            for name, text in document.get("names", {}).items():
                if not isinstance(name, str) or not _NAME.match(name):
                    raise ValueError(f"{name!r} is not a name")
                names[name] = Address.parse(text)
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise TrustStoreError(f"trust file {self.path} is unreadable: {exc}") from exc
        self._entries, self._names, self._stamp = entries, names, stamp

    def _save(self) -> None:
        document: dict[str, object] = {
            "version": 1,
            "peers": {str(e.address): {"note": e.note, "added": e.added} for e in self._entries.values()},
        }
        if self._names:  # absent when empty: the file stays what older versions wrote
            document["names"] = {name: str(address) for name, address in self._names.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".trust-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        self._stamp = None
        self._load()

    def __contains__(self, address: object) -> bool:
        self._load()
        return address in self._entries

    def is_trusted(self, address: Address) -> bool:
        """Whether ``address`` is trusted (re-reads the file if it changed)."""
        return address in self

    def add(self, address: Address, note: str = "") -> bool:
        """Trust ``address``; False if it was trusted already (its note is updated)."""
        self._load()
        existed = address in self._entries
        added = (
            self._entries[address].added
            if existed
            else datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        )
        self._entries[address] = TrustEntry(address, note or (self._entries[address].note if existed else ""), added)
        self._save()
        return not existed

    def remove(self, address: Address) -> bool:
        """Stop trusting ``address`` and drop the names pinned to it; False if it was not trusted."""
        self._load()
        if self._entries.pop(address, None) is None:
            return False
        self._names = {name: pinned for name, pinned in self._names.items() if pinned != address}
        self._save()
        return True

    def pin(self, name: str, address: Address) -> Address | None:
        """Make ``name`` stand for ``address`` here, whatever a server says later; the address it
        stood for before, if another. ``name`` must be a name (lower-case, as a server takes it)."""
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a name")
        self._load()
        previous = self._names.get(name)
        if previous != address:
            self._names[name] = address
            self._save()
        return previous if previous != address else None

    def unpin(self, name: str) -> bool:
        """Forget the pin of ``name``; False if it had none."""
        self._load()
        if self._names.pop(name, None) is None:
            return False
        self._save()
        return True

    def pinned(self, name: str) -> Address | None:
        """The address ``name`` is pinned to, if it is."""
        self._load()
        return self._names.get(name)

    def pins(self) -> dict[str, Address]:
        """Every pinned name and its address, by name."""
        self._load()
        return dict(sorted(self._names.items()))

    def entries(self) -> list[TrustEntry]:
        """Every trusted peer, in address order."""
        self._load()
        return sorted(self._entries.values(), key=lambda e: str(e.address))
