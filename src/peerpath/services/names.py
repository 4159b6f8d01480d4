"""Names for peers, and this node's own name and tags at the rendezvous server.

A name is a convenience, never an identity. What a user types for a peer resolves, first
match wins, as:

(a) an address: itself;
(b) a name pinned in the trust store: once a peer found by a name is trusted, the name stands
    for that address here, whatever a server says later;
(c) a petname: the note given to a trusted peer at ``trust add``, matched case aside;
(d) the name as claimed at the rendezvous server: its signed claim is checked here and the
    address derived from its key; only a trusted address is accepted (and the name is then
    pinned to it), otherwise the error says how to trust it.

:class:`ProfileService` claims this node's name and publishes its tags (``profile.json`` in
the state directory, sent again at every registration); :class:`NamesControl` is its part of
the daemon's control API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec

from peerpath import errors
from peerpath.identity import ADDRESS_PREFIX, Address, AddressError
from peerpath.node import control
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.client import RendezvousClient, RendezvousError
from peerpath.rendezvous.directory import Claimed, Listed, check_name, check_tags, is_name
from peerpath.tasks import spawn
from peerpath.wire.rendezvous import MAX_TAGS

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
#: Seconds a lookup at the rendezvous server may take.
LOOKUP_TIMEOUT = 5.0


class UnknownNameError(errors.LocalError):
    """A name that stands for no peer (or for more than one)."""


class UntrustedNameError(errors.NotTrustedError):
    """A name the rendezvous server resolves to an address this node does not trust."""


class NameConflictError(errors.RemoteError):
    """The rendezvous server says a name pinned here belongs to another address now."""


class ProfileError(errors.LocalError):
    """The profile file is unreadable or malformed."""


class Names:
    """Resolves what users type into addresses (see the module's docstring for the order).

    ``rendezvous`` returns the node's rendezvous client (or None): without it, names are only
    pins and petnames.
    """

    def __init__(
        self,
        trust: TrustStore,
        rendezvous: Callable[[], RendezvousClient | None] | None = None,
        *,
        timeout: float = LOOKUP_TIMEOUT,
    ) -> None:
        self.trust = trust
        self._rendezvous = rendezvous
        self.timeout = timeout

    def petname(self, address: Address) -> str:
        """The note this node gave ``address`` when trusting it ("" if none)."""
        for entry in self.trust.entries():
            if entry.address == address:
                return entry.note
        return ""

    def client(self) -> RendezvousClient:
        """The rendezvous client names are claimed and looked up at."""
        client = self._rendezvous() if self._rendezvous is not None else None
        if client is None:
            raise errors.LocalError("names are claimed and looked up at a rendezvous server; start with one")
        return client

    async def lookup(self, name: str) -> Claimed | None:
        """Who claims ``name`` at the rendezvous server (the claim checked here), or None.
        :class:`NameConflictError` if ``name`` is pinned here to another address."""
        name = check_name(name)
        claimed = await self.client().resolve_name(name, self.timeout)
        pinned = self.trust.pinned(name)
        if claimed is not None and pinned is not None and pinned != claimed.address:
            raise NameConflictError(
                f"{name!r} is pinned to {pinned} here, but the rendezvous server says it is {claimed.address} now; "
                f"the pin stands (to follow the server: peerpath trust add {claimed.address} --note {name})"
            )
        return claimed

    async def resolve(self, text: Address | str) -> Address:
        """The address ``text`` stands for; UnknownNameError if it stands for none, and
        :class:`UntrustedNameError` if only for an untrusted address at the rendezvous server."""
        if isinstance(text, Address):
            return text
        text = text.strip()
        try:
            return Address.parse(text)
        except AddressError as exc:
            if text.lower().startswith(ADDRESS_PREFIX + "1") and len(text) > 20:
                raise  # a mistyped address: say what is wrong with it
            failure = exc
        name = text.lower()
        pinned = self.trust.pinned(name) if is_name(name) else None
        if pinned is not None:
            return pinned
        wanted = text.casefold()
        matches = [entry.address for entry in self.trust.entries() if entry.note.strip().casefold() == wanted]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            listed = ", ".join(str(m) for m in matches)
            raise UnknownNameError(f"{text!r} is the note of {len(matches)} trusted peers ({listed}); use an address")
        unknown = f"{text!r} is neither an address nor the name of a trusted peer"
        if not is_name(name) or self._rendezvous is None or self._rendezvous() is None:
            raise UnknownNameError(unknown) from failure
        try:
            claimed = await self.lookup(name)  # not pinned (that came first), so no conflict either
        except (errors.NetworkError, RendezvousError) as exc:
            raise UnknownNameError(f"{unknown}, and the rendezvous server could not be asked: {exc}") from exc
        if claimed is None:
            raise UnknownNameError(f"{unknown}, and no agent claims it at the rendezvous server") from failure
        if not self.trust.is_trusted(claimed.address):
            raise UntrustedNameError(
                f"{name!r} is {claimed.address} at the rendezvous server, and this node does not trust it; "
                f"if that is the peer you mean, trust it: peerpath trust add {claimed.address} --note {name}"
            )
        self.trust.pin(name, claimed.address)  # trusted and found by this name: the name is its own now
        return claimed.address


# -- this node's name and tags ------------------------------------------------------------------


class Profile(msgspec.Struct, frozen=True):
    """This node's name (claimed at the rendezvous server), tags, and whether searches list it."""

    name: str = ""
    tags: list[str] = []
    public: bool = False

    def describe(self) -> dict[str, Any]:
        """As JSON."""
        return {"name": self.name or None, "tags": list(self.tags), "public": self.public}


def load_profile(path: Path) -> Profile:
    """The profile in ``path`` (an empty one if there is no file); :class:`ProfileError` if malformed."""
    try:
        profile = msgspec.json.decode(path.read_bytes(), type=Profile)
        tags = check_tags(profile.tags)
        if len(tags) > MAX_TAGS:
            raise ValueError(f"{len(tags)} tags, at most {MAX_TAGS}")
        return Profile(check_name(profile.name) if profile.name else "", tags, profile.public)
    except FileNotFoundError:
        return Profile()
    except (OSError, ValueError, msgspec.DecodeError) as exc:
        raise ProfileError(f"profile file {path} is unreadable: {exc}") from exc


def save_profile(path: Path, profile: Profile) -> None:
    """Write ``profile`` to ``path`` atomically, mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".profile-", suffix=".json")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(profile), indent=2) + b"\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class ProfileService:
    """This node's name and tags at the rendezvous server: kept in ``profile.json`` and sent
    again after every registration (which renews the name's claim)."""

    def __init__(self, node: Node, path: Path, names: Names | None = None) -> None:
        self.node = node
        self.path = path
        self.names = names or Names(node.trust, lambda: node.rendezvous)
        self.profile = Profile()
        #: Why the server refused the name at the last registration (another agent took it
        #: while this one was away, say); None while it holds it.
        self.claim_error: str | None = None
        self._lock = asyncio.Lock()  # one conversation with the server at a time, in order
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unlisten: Callable[[], None] | None = None

    async def start(self) -> None:
        """Load the profile, and send it now (if registered) and after every registration."""
        self.profile = load_profile(self.path)
        client = self.node.rendezvous
        if client is not None:
            self._unlisten = client.add_registered_listener(lambda registered: self._publish_soon())
            if client.registered.is_set():
                self._publish_soon()

    async def close(self) -> None:
        """Stop sending."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        """For status."""
        return {**self.profile.describe(), "claim_error": self.claim_error}

    def _save(self, profile: Profile) -> None:
        save_profile(self.path, profile)
        self.profile = profile

    def _publish_soon(self) -> None:
        spawn(self._publish(), "sending the name and tags to the rendezvous server", self._tasks)

    async def _publish(self) -> None:
        """Claim (renew) or release the name, and send the tags: what the server must know of us."""
        async with self._lock:
            client = self.names.client()
            profile = self.profile
            if profile == Profile() and not self.path.exists():
                return  # a node that never had a name or tags has nothing to tell
            try:
                if profile.name:
                    await client.claim_name(profile.name)
                    self.claim_error = None
                else:
                    await client.release_name()
            except errors.RemoteError as exc:
                self.claim_error = str(exc)
                log.warning("%s", exc)
            except errors.NetworkError as exc:
                log.info("the name goes again at the next registration: %s", exc)
                return
            try:
                await client.set_profile(list(profile.tags), profile.public)
            except errors.PeerpathError as exc:
                log.warning("the tags go again at the next registration: %s", exc)

    async def claim(self, name: str) -> str:
        """Claim ``name`` at the rendezvous server (releasing this node's previous name); the name
        as claimed. Raises if it is taken or malformed."""
        name = check_name(name)
        async with self._lock:
            await self.names.client().claim_name(name)
            self._save(msgspec.structs.replace(self.profile, name=name))
            self.claim_error = None
        return name

    async def release(self) -> str:
        """Give up this node's name; the name it was."""
        name = self.profile.name
        if not name:
            raise errors.LocalError("this node has no name (claim one with: peerpath name set NAME)")
        async with self._lock:
            self._save(msgspec.structs.replace(self.profile, name=""))  # released at the next registration if not now
            self.claim_error = None
            client = self.node.rendezvous
            if client is not None and client.registered.is_set():
                await client.release_name()
        return name

    async def add_tags(self, tags: list[str], public: bool | None = None) -> Profile:
        """Add tags (and make the node public or private, if ``public`` is given)."""
        added = check_tags(tags)
        merged = list(dict.fromkeys([*self.profile.tags, *added]))
        if len(merged) > MAX_TAGS:
            raise errors.LocalError(
                f"a node has at most {MAX_TAGS} tags, and this one would have {len(merged)}; "
                "remove some with: peerpath tag remove TAG"
            )
        listed = self.profile.public if public is None else public
        return await self._update(msgspec.structs.replace(self.profile, tags=merged, public=listed))

    async def remove_tags(self, tags: list[str]) -> Profile:
        """Remove tags (every one must be there)."""
        removed = check_tags(tags)
        missing = [tag for tag in removed if tag not in self.profile.tags]
        if missing:
            raise errors.LocalError(f"this node has no tag {', '.join(missing)} (see: peerpath tag list)")
        kept = [tag for tag in self.profile.tags if tag not in removed]
        return await self._update(msgspec.structs.replace(self.profile, tags=kept))

    async def set_public(self, public: bool) -> Profile:
        """Let searches list this node (its address, name, tags), or not."""
        return await self._update(msgspec.structs.replace(self.profile, public=public))

    async def _update(self, profile: Profile) -> Profile:
        """Keep ``profile``, and send it now if registered (else it goes at the next registration)."""
        async with self._lock:
            self._save(profile)
            client = self.node.rendezvous
            if client is not None and client.registered.is_set():
                await client.set_profile(list(profile.tags), profile.public)
        return profile

    async def find(self, tags: list[str]) -> tuple[list[Listed], bool]:
        """The public agents with every one of ``tags``, and whether the server left some out."""
        return await self.names.client().find(tags)


# -- the control API (``peerpath name``, ``tag``, ``listing``, ``find``) ------------------------

_Text = Annotated[str, msgspec.Meta(max_length=256)]
_TagTexts = Annotated[list[_Text], msgspec.Meta(max_length=64)]


class NameSetOp(control.Op, tag="name-set", frozen=True):
    """Claim a name for this node at the rendezvous server."""

    name: _Text


class NameReleaseOp(control.Op, tag="name-release", frozen=True):
    """Give up this node's name."""


class NameLookupOp(control.Op, tag="name-lookup", frozen=True):
    """Who claims a name at the rendezvous server (checked), and whether this node trusts it."""

    name: _Text


class ProfileOp(control.Op, tag="profile", frozen=True):
    """This node's name, tags and listing."""


class TagAddOp(control.Op, tag="tag-add", frozen=True):
    """Add tags; with ``public`` given, also list the node in searches (or stop)."""

    tags: _TagTexts
    public: bool | None = None


class TagRemoveOp(control.Op, tag="tag-remove", frozen=True):
    """Remove tags."""

    tags: _TagTexts


class ListingOp(control.Op, tag="listing", frozen=True):
    """List this node in searches (``public``), or not."""

    public: bool


class FindOp(control.Op, tag="find-agents", frozen=True):
    """The public agents with every one of these tags."""

    tags: _TagTexts


class NamesControl:
    """The names and tags ops on the daemon's control socket."""

    def __init__(self, profile: ProfileService) -> None:
        self.service = profile

    def control_ops(self) -> dict[type[control.Op], control.OpHandler]:
        """The ops, each with its handler."""
        return {
            NameSetOp: self._name_set,
            NameReleaseOp: self._name_release,
            NameLookupOp: self._name_lookup,
            ProfileOp: self._profile,
            TagAddOp: self._tag_add,
            TagRemoveOp: self._tag_remove,
            ListingOp: self._listing,
            FindOp: self._find,
        }

    def describe(self) -> dict[str, Any]:
        """What status shows."""
        return self.service.describe()

    def _shown(self, profile: Profile) -> dict[str, Any]:
        return {
            **profile.describe(),
            "address": str(self.service.node.address),
            "claim_error": self.service.claim_error,
        }

    async def _name_set(self, op: NameSetOp) -> AsyncGenerator[dict[str, Any], None]:
        name = await self.service.claim(op.name)
        yield {"name": name, "address": str(self.service.node.address)}

    async def _name_release(self, op: NameReleaseOp) -> AsyncGenerator[dict[str, Any], None]:
        yield {"released": await self.service.release()}

    async def _name_lookup(self, op: NameLookupOp) -> AsyncGenerator[dict[str, Any], None]:
        names = self.service.names
        claimed = await names.lookup(op.name)
        if claimed is None:
            raise UnknownNameError(f"no agent claims {check_name(op.name)!r} at the rendezvous server")
        yield {
            "name": claimed.name,
            "address": str(claimed.address),
            "public_key": claimed.claim.public_key.hex(),
            "signature": claimed.claim.signature.hex(),
            "trusted": names.trust.is_trusted(claimed.address),
            "pinned": names.trust.pinned(claimed.name) == claimed.address,
        }

    async def _profile(self, op: ProfileOp) -> AsyncGenerator[dict[str, Any], None]:
        yield self._shown(self.service.profile)

    async def _tag_add(self, op: TagAddOp) -> AsyncGenerator[dict[str, Any], None]:
        yield self._shown(await self.service.add_tags(list(op.tags), op.public))

    async def _tag_remove(self, op: TagRemoveOp) -> AsyncGenerator[dict[str, Any], None]:
        yield self._shown(await self.service.remove_tags(list(op.tags)))

    async def _listing(self, op: ListingOp) -> AsyncGenerator[dict[str, Any], None]:
        yield self._shown(await self.service.set_public(op.public))

    async def _find(self, op: FindOp) -> AsyncGenerator[dict[str, Any], None]:
        if not op.tags:
            raise errors.LocalError("search by one tag at least")
        found, more = await self.service.find(list(op.tags))
        for agent in found:
            yield {
                "address": str(agent.address),
                "name": agent.name or None,
                "tags": agent.tags,
                "online": agent.online,
            }
        if more:
            yield {"more": True}
