"""The trust store: the addresses this node accepts sessions from and connects to.

Deny by default. The store is a JSON file in the state directory (mode 0600), written
atomically; a running node re-reads it when it changes, so ``peerpath trust add`` takes
effect without a restart.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peerpath.errors import LocalError
from peerpath.identity import Address

TRUST_FILE = "trust.json"


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
            self._entries, self._stamp = {}, None
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
        except (OSError, ValueError, AttributeError) as exc:
            raise TrustStoreError(f"trust file {self.path} is unreadable: {exc}") from exc
        self._entries, self._stamp = entries, stamp

    def _save(self) -> None:
        document = {
            "version": 1,
            "peers": {str(e.address): {"note": e.note, "added": e.added} for e in self._entries.values()},
        }
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
        """Stop trusting ``address``; False if it was not trusted."""
        self._load()
        if self._entries.pop(address, None) is None:
            return False
        self._save()
        return True

    def entries(self) -> list[TrustEntry]:
        """Every trusted peer, in address order."""
        self._load()
        return sorted(self._entries.values(), key=lambda e: str(e.address))
