"""The rendezvous server's directory: the names agents claim, and the tags of the agents that
chose to be listed.

A name is first come, first served, one per agent, and signed by its claimant's key together
with the server's address (:func:`make_claim`): the server checks a claim before it keeps it,
and whoever resolves the name checks it again (:func:`check_claim`), deriving the address from
the key, so a server can refuse to answer but never make a name stand for an agent that did
not claim it. Claims live in SQLite (they outlive restarts) and are released by their owner,
or after :data:`NAME_IDLE_EXPIRY` without their agent. Tags live in memory, for the agents
that asked to be public, while they are registered and :data:`PROFILE_KEEP` after; a private
agent's tags are not kept at all.

Pure apart from SQLite: time comes in as ``now`` (seconds since the epoch for names and
profiles; the server's clock for quotas).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from peerpath import errors
from peerpath.identity import ADDRESS_PREFIX, Address, Identity, verify
from peerpath.ratelimit import TokenBucket
from peerpath.rendezvous.limits import ServerLimits
from peerpath.storage import open_database
from peerpath.wire import rendezvous as rv

log = logging.getLogger(__name__)

#: A claim whose agent has not been registered for this long is released (30 days).
NAME_IDLE_EXPIRY = 30 * 24 * 3600
#: A public agent's tags stay listed this long after it goes offline (shown as offline).
PROFILE_KEEP = 24 * 3600
#: Expired claims are deleted at most this often, this many at a time (until then they are
#: simply not answered).
PRUNE_INTERVAL = 3600.0
PRUNE_BATCH = 1000

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_TAG_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
_TAG_VALUE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._:/+-")
_NAME_RE = re.compile(rv.NAME_PATTERN)
_TAG_RE = re.compile(rv.TAG_PATTERN)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    agent BLOB NOT NULL UNIQUE,
    public_key BLOB NOT NULL,
    signature BLOB NOT NULL,
    claimed INTEGER NOT NULL,
    active INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS names_active ON names (active);
"""

DirectoryRequest = rv.ClaimName | rv.ReleaseName | rv.ResolveName | rv.SetProfile | rv.Find
#: The per-agent quota each kind of request spends, beyond the control quota every message spends:
#: "names" for what writes (claims, releases, profiles), "find" for searches.
QUOTAS: dict[type[rv.Message], str] = {
    rv.ClaimName: "names",
    rv.ReleaseName: "names",
    rv.SetProfile: "names",
    rv.Find: "find",
}


class InvalidNameError(errors.LocalError, ValueError):
    """Text that cannot be a name; the message says why."""


class InvalidTagError(errors.LocalError, ValueError):
    """Text that cannot be a tag; the message says why."""


class ClaimError(ValueError):
    """A name claim whose signature or key does not hold up."""


class DirectoryError(ValueError):
    """A directory request the server refuses; the message (sent to the agent) says why."""


# -- names and tags, as users type them ------------------------------------------------------


def _shown(chars: set[str]) -> str:
    return ", ".join(repr(c) for c in sorted(chars)[:5])


def check_name(text: str) -> str:
    """``text`` as a name (lower-cased); :class:`InvalidNameError` saying what is wrong with it."""
    name = text.strip().lower()
    if not name:
        raise InvalidNameError("a name cannot be empty")
    if len(name) > rv.MAX_NAME:
        raise InvalidNameError(f"a name is at most {rv.MAX_NAME} characters, not {len(name)}")
    if name.startswith(ADDRESS_PREFIX + "1"):
        raise InvalidNameError(f"{name!r} looks like an address (they start with '{ADDRESS_PREFIX}1'); choose another")
    bad = set(name) - _NAME_CHARS
    if bad:
        raise InvalidNameError(f"a name has only lower-case letters, digits and '-', not {_shown(bad)}")
    if not name[0].isalpha():
        raise InvalidNameError(f"{name!r} does not start with a letter (a name does)")
    if not _NAME_RE.match(name):  # the rules above are the pattern's; this keeps them in step
        raise InvalidNameError(f"{name!r} is not a name")
    return name


def is_name(text: str) -> bool:
    """Whether ``text`` is a name as it is (what a rendezvous server can be asked about)."""
    return bool(_NAME_RE.match(text))


def check_tag(text: str) -> str:
    """``text`` as a tag, ``key`` or ``key=value`` (lower-cased); :class:`InvalidTagError` saying
    what is wrong with it."""
    tag = text.strip().lower()
    key, has_value, value = tag.partition("=")
    if not key:
        raise InvalidTagError(f"{tag!r}: a tag is KEY or KEY=VALUE, and KEY cannot be empty")
    if len(tag) > rv.MAX_TAG or len(key) > rv.MAX_TAG_KEY:
        raise InvalidTagError(f"{tag[:80]!r}: a tag is at most {rv.MAX_TAG} characters, its key {rv.MAX_TAG_KEY}")
    bad_key = set(key) - _TAG_KEY_CHARS
    if bad_key or not key[0].isalnum():
        raise InvalidTagError(
            f"{tag!r}: a tag's key has lower-case letters, digits, '.', '_' and '-' and starts with a letter "
            f"or digit" + (f", not {_shown(bad_key)}" if bad_key else "")
        )
    bad_value = set(value) - _TAG_VALUE_CHARS
    if has_value and (not value or bad_value):
        raise InvalidTagError(
            f"{tag!r}: a tag's value has lower-case letters, digits and '.', '_', ':', '/', '+', '-'"
            + (f", not {_shown(bad_value)}" if bad_value else "")
        )
    if not _TAG_RE.match(tag):
        raise InvalidTagError(f"{tag!r} is not a tag")
    return tag


def check_tags(texts: list[str]) -> list[str]:
    """Several tags, checked, lower-cased and without repeats (in the order given)."""
    return list(dict.fromkeys(check_tag(text) for text in texts))


# -- signed claims ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A name and the agent that claims it, checked: ``address`` is derived from the claim's key."""

    name: str
    address: Address
    claim: rv.NameClaim


@dataclass(frozen=True)
class Listed:
    """An agent a search found: its address (from its key), its name if its claim holds up, its
    tags, and whether it is online."""

    address: Address
    name: str
    tags: list[str]
    online: bool


def make_claim(identity: Identity, name: str, server: Address) -> rv.NameClaim:
    """``identity``'s signed claim of ``name`` at ``server``."""
    payload = rv.name_claim_payload(name, identity.public_key, server.digest)
    return rv.NameClaim(name, identity.public_key, identity.sign(payload))


def check_claim(claim: rv.NameClaim, server: Address) -> Claimed:
    """A claim's name and claimant, if its signature by its own key, at ``server``, holds up;
    :class:`ClaimError` if not."""
    if not is_name(claim.name):
        raise ClaimError(f"{claim.name!r} is not a name")
    try:
        address = Address.from_public_key(claim.public_key)
    except ValueError as exc:
        raise ClaimError(f"the claim of {claim.name!r} carries a malformed key: {exc}") from None
    if not verify(
        claim.public_key, claim.signature, rv.name_claim_payload(claim.name, claim.public_key, server.digest)
    ):
        raise ClaimError(f"the claim of {claim.name!r} does not verify")
    return Claimed(claim.name, address, claim)


# -- the server's directory -------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Member:
    """An agent online, as the directory knows it: its key and its directory quotas."""

    public_key: bytes
    quotas: dict[str, TokenBucket]


@dataclass(eq=False)
class _Profile:
    public_key: bytes
    tags: list[str]


class Directory:
    """Names (in SQLite, opened by :meth:`open`) and public profiles (in memory) of one server.

    The server tells it who comes online (:meth:`arrived`) and who leaves (:meth:`left`), and
    hands it every directory request (:meth:`answer`).
    """

    def __init__(self, server: Address, limits: ServerLimits) -> None:
        self.server = server
        self.limits = limits
        #: The agents online, by address digest.
        self.members: dict[bytes, Member] = {}
        self._db: sqlite3.Connection | None = None
        self._pruned = float("-inf")
        self._profiles: dict[bytes, _Profile] = {}
        self._by_tag: dict[str, set[bytes]] = {}
        #: Profiles of agents that went offline, by when they left (oldest first).
        self._left: OrderedDict[bytes, float] = OrderedDict()

    def open(self, path: Path | str) -> None:
        """Open (or create) the names database."""
        self._db = open_database(path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the names database."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def describe(self) -> dict[str, int | None]:
        """For the server's status: names kept (None if the database cannot say), public profiles listed."""
        names: int | None = 0
        if self._db is not None:
            try:
                names = int(self._db.execute("SELECT COUNT(*) FROM names").fetchone()[0])
            except sqlite3.Error:
                names = None
        return {"names": names, "profiles": len(self._profiles)}

    def _database(self) -> sqlite3.Connection:
        if self._db is None:
            raise DirectoryError("the server is not keeping names now; try again later")
        return self._db

    # -- presence ------------------------------------------------------------------------------

    def arrived(self, agent: Address, public_key: bytes, clock_now: float) -> None:
        """``agent`` registered (with fresh directory quotas, as its other quotas are)."""
        limits = self.limits
        self.members[agent.digest] = Member(
            public_key,
            {
                "names": TokenBucket(limits.name_rate, limits.name_burst, clock_now),
                "find": TokenBucket(limits.find_rate, limits.find_burst, clock_now),
            },
        )
        self._left.pop(agent.digest, None)

    def left(self, agent: Address, now: float) -> None:
        """``agent`` went offline: its claim counts from now, its profile stays a while."""
        self.members.pop(agent.digest, None)
        if agent.digest in self._profiles:
            self._left[agent.digest] = now
            self._left.move_to_end(agent.digest)
        if self._db is not None:
            try:
                self._db.execute("UPDATE names SET active = ? WHERE agent = ?", (int(now), agent.digest))
            except sqlite3.Error as exc:
                log.warning("could not renew the name of %s: %s", agent, exc)

    def take(self, agent: Address, request: rv.Message, clock_now: float) -> str | None:
        """Spend what ``request`` costs of ``agent``'s directory quotas; the quota's name if it is
        spent already (the request is then refused), else None."""
        quota = QUOTAS.get(type(request))
        member = self.members.get(agent.digest)
        if quota is None or member is None:
            return None
        return None if member.quotas[quota].take(1, clock_now) else quota

    def answer(self, agent: Address, request: DirectoryRequest, now: float) -> rv.Message:
        """The answer to one of ``agent``'s requests; a refusal is an :class:`~rv.Outcome` saying why."""
        try:
            if isinstance(request, rv.ClaimName):
                self.claim(agent, request.claim, now)
            elif isinstance(request, rv.ReleaseName):
                self.release(agent)
            elif isinstance(request, rv.ResolveName):
                return rv.NameResolved(request.id, request.name, self.resolve(request.name, now))
            elif isinstance(request, rv.SetProfile):
                self.set_profile(agent, request.tags, request.public, now)
            else:
                agents, more = self.find(request.tags, now)
                return rv.Found(request.id, agents, more)
        except DirectoryError as exc:
            return rv.Outcome(request.id, False, str(exc))
        except sqlite3.Error as exc:  # a full disk, say: the agent is told, the server goes on
            log.warning("the names database failed: %s", exc)
            return rv.Outcome(request.id, False, "the server cannot store names now; try again later")
        return rv.Outcome(request.id, True)

    # -- names ---------------------------------------------------------------------------------

    def _live(self, agent: bytes, active: int, now: float) -> bool:
        return agent in self.members or active >= now - NAME_IDLE_EXPIRY

    def claim(self, agent: Address, claim: rv.NameClaim, now: float) -> None:
        """Give ``claim.name`` to ``agent`` (releasing its previous name), or renew it; raise
        :class:`DirectoryError` if the name is taken, the claim is not the agent's, or the
        directory is full."""
        try:
            claimant = check_claim(claim, self.server).address
        except ClaimError as exc:
            raise DirectoryError(str(exc)) from None
        if claimant != agent:
            raise DirectoryError("a name must be claimed by the agent whose key signs the claim")
        db = self._database()
        self.prune(now)
        with db:
            db.execute("BEGIN IMMEDIATE")  # the checks and the change are one step
            holder = db.execute("SELECT agent, active, claimed FROM names WHERE name = ?", (claim.name,)).fetchone()
            claimed = int(now)
            if holder is not None and holder[0] != agent.digest:
                if self._live(holder[0], holder[1], now):
                    raise DirectoryError("name taken")
                db.execute("DELETE FROM names WHERE name = ?", (claim.name,))  # expired: free again
            elif holder is not None:
                claimed = holder[2]  # a renewal keeps the date of the first claim
            had = db.execute("SELECT 1 FROM names WHERE agent = ?", (agent.digest,)).fetchone()
            if had is None:
                (count,) = db.execute("SELECT COUNT(*) FROM names").fetchone()
                if count >= self.limits.max_names:
                    raise DirectoryError("the server keeps too many names; try again later")
            db.execute("DELETE FROM names WHERE agent = ?", (agent.digest,))
            db.execute(
                "INSERT INTO names (name, agent, public_key, signature, claimed, active) VALUES (?, ?, ?, ?, ?, ?)",
                (claim.name, agent.digest, claim.public_key, claim.signature, claimed, int(now)),
            )

    def release(self, agent: Address) -> bool:
        """Forget ``agent``'s name; False if it had none."""
        return self._database().execute("DELETE FROM names WHERE agent = ?", (agent.digest,)).rowcount > 0

    def resolve(self, name: str, now: float) -> rv.NameClaim | None:
        """The claim of ``name``, if someone holds it."""
        row = (
            self._database()
            .execute("SELECT agent, public_key, signature, active FROM names WHERE name = ?", (name,))
            .fetchone()
        )
        if row is None or not self._live(row[0], row[3], now):
            return None
        return rv.NameClaim(name, row[1], row[2])

    def name_of(self, agent: bytes, now: float) -> rv.NameClaim | None:
        """The claim ``agent`` holds, if any."""
        row = (
            self._database()
            .execute("SELECT name, public_key, signature, active FROM names WHERE agent = ?", (agent,))
            .fetchone()
        )
        if row is None or not self._live(agent, row[3], now):
            return None
        return rv.NameClaim(row[0], row[1], row[2])

    def prune(self, now: float) -> None:
        """Delete claims released by absence (a batch at most, at most every PRUNE_INTERVAL)."""
        if self._db is None or now - self._pruned < PRUNE_INTERVAL:
            return
        self._pruned = now
        rows = self._db.execute(
            "SELECT agent FROM names WHERE active < ? LIMIT ?", (int(now - NAME_IDLE_EXPIRY), PRUNE_BATCH)
        ).fetchall()
        gone = [(agent,) for (agent,) in rows if agent not in self.members]
        with self._db:
            self._db.executemany("DELETE FROM names WHERE agent = ?", gone)

    # -- tags ----------------------------------------------------------------------------------

    def set_profile(self, agent: Address, tags: list[str], public: bool, now: float) -> None:
        """Keep ``agent``'s tags for searches if it is ``public`` (and forget them if not)."""
        member = self.members.get(agent.digest)
        self._drop_profile(agent.digest)
        if not public or not tags or member is None:
            return
        self._prune_profiles(now)
        if len(self._profiles) >= self.limits.max_profiles:
            if not self._left:
                raise DirectoryError("the directory is full; try again later")
            self._drop_profile(next(iter(self._left)))
        profile = _Profile(member.public_key, sorted(set(tags)))
        self._profiles[agent.digest] = profile
        for tag in profile.tags:
            self._by_tag.setdefault(tag, set()).add(agent.digest)

    def _drop_profile(self, agent: bytes) -> None:
        profile = self._profiles.pop(agent, None)
        self._left.pop(agent, None)
        if profile is None:
            return
        for tag in profile.tags:
            holders = self._by_tag.get(tag)
            if holders is not None:
                holders.discard(agent)
                if not holders:
                    del self._by_tag[tag]

    def _prune_profiles(self, now: float) -> None:
        while self._left:
            agent, since = next(iter(self._left.items()))
            if since >= now - PROFILE_KEEP:
                return
            self._drop_profile(agent)

    def find(self, tags: list[str], now: float) -> tuple[list[rv.Listing], bool]:
        """The public agents with every one of ``tags`` (online ones first), at most MAX_FOUND;
        and whether more were left out."""
        self._prune_profiles(now)
        holders = sorted((self._by_tag.get(tag, set()) for tag in set(tags)), key=len)
        if not holders or not holders[0]:
            return [], False
        found = holders[0].intersection(*holders[1:])
        ordered = sorted(found, key=lambda agent: (agent not in self.members, agent))
        listings = []
        for agent in ordered[: rv.MAX_FOUND]:
            profile = self._profiles[agent]
            claim = None
            with contextlib.suppress(DirectoryError):
                claim = self.name_of(agent, now)
            listings.append(rv.Listing(profile.public_key, list(profile.tags), agent in self.members, claim))
        return listings, len(ordered) > rv.MAX_FOUND
