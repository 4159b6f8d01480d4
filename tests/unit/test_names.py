"""Names and tags, on loopback: real agent nodes on a real rendezvous server whose wall clock the
test turns (a claim is released after 30 days without its agent), the server's directory on
its own, and the trust store's pins."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from peerpath import errors
from peerpath.identity import Identity
from peerpath.node.trust import TrustStore, TrustStoreError
from peerpath.rendezvous.client import RendezvousError
from peerpath.rendezvous.directory import (
    NAME_IDLE_EXPIRY,
    PROFILE_KEEP,
    Directory,
    DirectoryError,
    InvalidNameError,
    InvalidTagError,
    check_name,
    check_tag,
    make_claim,
)
from peerpath.rendezvous.limits import ServerLimits
from peerpath.rendezvous.server import RendezvousServer
from peerpath.services.agent import AgentNode
from peerpath.services.names import (
    NameConflictError,
    ProfileError,
    UnknownNameError,
    UntrustedNameError,
    load_profile,
)
from peerpath.wire import rendezvous as rv

from .conftest import eventually

DAY = 24 * 3600
T0 = 1_800_000_000.0


class WallClock:
    """The server's wall clock, turned by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Agents:
    """Agent nodes with state directories of their own on one rendezvous server, which the
    test can restart (same state) and whose wall clock it turns."""

    def __init__(self, tmp_path: Path, limits: ServerLimits | None = None) -> None:
        self.tmp_path = tmp_path
        self.clock = WallClock()
        self.limits = limits
        self.server_identity = Identity.generate()
        self.server: RendezvousServer | None = None
        self.identities: dict[str, Identity] = {}
        self.running: dict[str, AgentNode] = {}

    async def start_server(self, port: int = 0) -> RendezvousServer:
        server = RendezvousServer(
            self.server_identity, self.tmp_path / "server", limits=self.limits, wall_clock=self.clock
        )
        await server.start(["127.0.0.1"], port)
        self.server = server
        return server

    async def start(self, name: str) -> AgentNode:
        assert self.server is not None
        state = self.tmp_path / name
        state.mkdir(exist_ok=True)
        node = await AgentNode.start(
            identity=self.identities.setdefault(name, Identity.generate()),
            trust=TrustStore(state / "trust.json"),
            host="127.0.0.1",
            rendezvous=self.server.url(),
            direct=False,
        )
        self.running[name] = node
        assert node.rendezvous is not None
        await node.rendezvous.wait_registered(5)
        return node

    async def stop(self, name: str) -> None:
        node = self.running.pop(name)
        await node.close()
        server = self.server
        assert server is not None
        await eventually(lambda: node.address.digest not in server.agents)


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    made = Agents(tmp_path)
    await made.start_server()
    try:
        yield made
    finally:
        for node in list(made.running.values()):
            await node.close()
        if made.server is not None:
            await made.server.close()


async def published(node: AgentNode) -> None:
    """Wait until the node has told the server its name and tags (after a registration)."""
    await eventually(lambda: not node.profile._tasks)


# -- names -----------------------------------------------------------------------------------


async def test_a_claimed_name_resolves_to_its_agent_checked_by_the_resolver(agents: Agents) -> None:
    alice, bob = await agents.start("alice"), await agents.start("bob")
    assert await alice.profile.claim("Planner") == "planner"  # names are lower case
    claimed = await bob.names.lookup("planner")
    assert claimed is not None and claimed.address == alice.address
    assert claimed.claim.public_key == alice.identity.public_key
    assert await bob.names.lookup("nobody-has-this") is None
    assert json.loads((agents.tmp_path / "alice" / "profile.json").read_text())["name"] == "planner"


async def test_a_name_taken_by_another_agent_is_refused(agents: Agents) -> None:
    alice, bob = await agents.start("alice"), await agents.start("bob")
    await alice.profile.claim("planner")
    with pytest.raises(RendezvousError, match="cannot claim 'planner': name taken"):
        await bob.profile.claim("planner")
    assert bob.profile.profile.name == ""
    await alice.profile.claim("planner")  # its own claim again: a renewal, not a conflict


async def test_one_name_per_agent_claiming_another_releases_the_first(agents: Agents) -> None:
    alice, bob = await agents.start("alice"), await agents.start("bob")
    await alice.profile.claim("planner")
    await alice.profile.claim("scheduler")
    assert await bob.names.lookup("planner") is None
    await bob.profile.claim("planner")
    assert await alice.profile.release() == "scheduler"
    assert await bob.names.lookup("scheduler") is None


async def test_a_name_is_released_after_a_long_absence_and_renewed_at_each_registration(agents: Agents) -> None:
    await (await agents.start("alice")).profile.claim("planner")
    bob = await agents.start("bob")
    await agents.stop("alice")
    # Back after 29 days: its registration renews the claim, so it holds for 30 days from then.
    agents.clock.now = T0 + 29 * DAY
    await published(await agents.start("alice"))
    await agents.stop("alice")
    agents.clock.now = T0 + 58 * DAY
    with pytest.raises(RendezvousError, match="name taken"):
        await bob.profile.claim("planner")
    agents.clock.now = T0 + 29 * DAY + NAME_IDLE_EXPIRY + 1
    assert await bob.names.lookup("planner") is None  # released: nobody holds it
    await bob.profile.claim("planner")
    # Alice comes back: the name is bob's now, and alice's node says so.
    alice = await agents.start("alice")
    await published(alice)
    assert "name taken" in (alice.profile.claim_error or "")
    claimed = await alice.names.lookup("planner")
    assert claimed is not None and claimed.address == bob.address


async def test_an_agent_online_keeps_its_name_however_long(agents: Agents) -> None:
    alice = await agents.start("alice")
    await alice.profile.claim("planner")
    agents.clock.now = T0 + 3 * NAME_IDLE_EXPIRY
    bob = await agents.start("bob")
    with pytest.raises(RendezvousError, match="name taken"):
        await bob.profile.claim("planner")


async def test_names_outlive_a_server_restart(agents: Agents) -> None:
    alice = await agents.start("alice")
    await alice.profile.claim("planner")
    await agents.stop("alice")
    assert agents.server is not None
    port = agents.server.port
    await agents.server.close()
    await agents.start_server(port)
    bob = await agents.start("bob")
    claimed = await bob.names.lookup("planner")
    assert claimed is not None and claimed.address == alice.address


async def test_a_name_resolving_to_an_untrusted_address_says_how_to_trust_it(agents: Agents) -> None:
    alice, bob = await agents.start("alice"), await agents.start("bob")
    await alice.profile.claim("planner")
    with pytest.raises(UntrustedNameError) as refused:
        await bob.resolve("planner")
    assert f"peerpath trust add {alice.address} --note planner" in str(refused.value)
    with pytest.raises(UnknownNameError, match="no agent claims it at the rendezvous server"):
        await bob.resolve("nobody")
    bob.trust.add(alice.address)
    assert await bob.resolve("planner") == alice.address
    assert bob.trust.pinned("planner") == alice.address  # trusted and found by the name: pinned


async def test_a_pinned_name_stands_and_a_servers_new_answer_is_reported_as_a_conflict(agents: Agents) -> None:
    alice, bob, carol = await agents.start("alice"), await agents.start("bob"), await agents.start("carol")
    await alice.profile.claim("planner")
    carol.trust.add(alice.address, "planner")
    carol.trust.pin("planner", alice.address)
    await alice.profile.release()
    await bob.profile.claim("planner")
    with pytest.raises(NameConflictError) as conflict:
        await carol.names.lookup("planner")
    assert str(alice.address) in str(conflict.value) and str(bob.address) in str(conflict.value)
    assert await carol.resolve("planner") == alice.address  # never redirected
    # Resolution order: an address, a pinned name, a petname, then the server.
    carol.trust.add(bob.address, "helper")
    assert await carol.resolve("helper") == bob.address
    assert await carol.resolve(str(bob.address)) == bob.address


async def test_claims_are_signed_and_checked_by_the_server(agents: Agents) -> None:
    alice, bob = await agents.start("alice"), await agents.start("bob")
    client = alice.rendezvous
    assert client is not None and agents.server is not None
    forged = make_claim(bob.identity, "planner", agents.server.address)  # bob's claim, sent by alice
    elsewhere = make_claim(alice.identity, "planner", Identity.generate().address)  # for another server
    tampered = msgspec.structs.replace(make_claim(alice.identity, "planner", agents.server.address), name="plann3r")
    for claim, reason in [(forged, "whose key signs"), (elsewhere, "does not verify"), (tampered, "does not verify")]:
        with pytest.raises(RendezvousError, match=reason):
            await client._ask(lambda i, c=claim: rv.ClaimName(i, c), rv.Outcome, "claim", 5)
    assert await bob.names.lookup("planner") is None
    assert alice.address.digest in agents.server.agents  # refused, not disconnected


# -- tags and the directory ------------------------------------------------------------------


async def test_find_lists_public_agents_with_every_tag_and_nothing_of_private_ones(agents: Agents) -> None:
    alice, bob, carol, dave = [await agents.start(n) for n in ("alice", "bob", "carol", "dave")]
    await alice.profile.claim("planner")
    await alice.profile.add_tags(["gpu", "Region=EU"], public=True)
    await bob.profile.claim("secret-agent")
    await bob.profile.add_tags(["gpu", "region=eu"])  # private: the default
    await carol.profile.add_tags(["gpu", "region=us"])
    await carol.profile.set_public(True)
    found, more = await dave.profile.find(["gpu"])
    assert not more
    assert sorted((str(a.address), a.name, a.tags, a.online) for a in found) == sorted(
        [
            (str(alice.address), "planner", ["gpu", "region=eu"], True),
            (str(carol.address), "", ["gpu", "region=us"], True),
        ]
    )
    assert [a.address for a in (await dave.profile.find(["region=eu", "gpu"]))[0]] == [alice.address]
    assert (await dave.profile.find(["secret-agent"]))[0] == []
    assert all(a.address != bob.address for a in (await dave.profile.find(["region=eu"]))[0])
    # Going private takes an agent out at once; going offline shows it offline, for a while.
    await carol.profile.set_public(False)
    assert [a.address for a in (await dave.profile.find(["gpu"]))[0]] == [alice.address]
    await agents.stop("alice")
    [offline] = (await dave.profile.find(["gpu"]))[0]
    assert (offline.address, offline.online, offline.name) == (alice.address, False, "planner")
    agents.clock.now = T0 + PROFILE_KEEP + 1
    assert (await dave.profile.find(["gpu"]))[0] == []


async def test_tags_survive_a_restart_and_are_sent_again_at_registration(agents: Agents) -> None:
    alice = await agents.start("alice")
    await alice.profile.add_tags(["gpu"], public=True)
    await agents.stop("alice")
    assert agents.server is not None
    agents.server.directory.set_profile(alice.address, [], False, T0)  # as a server that forgot
    path = agents.tmp_path / "alice" / "profile.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    alice = await agents.start("alice")
    await published(alice)
    bob = await agents.start("bob")
    assert [a.address for a in (await bob.profile.find(["gpu"]))[0]] == [alice.address]
    await alice.profile.remove_tags(["gpu"])
    assert (await bob.profile.find(["gpu"]))[0] == []


async def test_bad_names_and_tags_are_refused_with_the_reason(agents: Agents) -> None:
    for text, reason in [
        ("", "cannot be empty"),
        ("pp1qlv26tgca", "looks like an address"),
        ("9lives", "does not start with a letter"),
        ("my agent", "lower-case letters, digits and '-'"),
        ("agent_1", "not '_'"),
        ("a" * 64, "at most 63 characters"),
    ]:
        with pytest.raises(InvalidNameError, match=reason):
            check_name(text)
    for text, reason in [
        ("=eu", "KEY cannot be empty"),
        ("region=", "a tag's value"),
        ("region=e u", "not ' '"),
        ("-gpu", "starts with a letter or digit"),
        ("k" * 33, "its key 32"),
        ("gpu=" + "v" * 61, "at most 64 characters"),
    ]:
        with pytest.raises(InvalidTagError, match=reason):
            check_tag(text)
    alice = await agents.start("alice")
    with pytest.raises(InvalidNameError):
        await alice.profile.claim("Not A Name")
    await alice.profile.add_tags([f"t{i}" for i in range(8)])
    with pytest.raises(errors.LocalError, match="at most 8 tags"):
        await alice.profile.add_tags(["one-more"])
    with pytest.raises(errors.LocalError, match="no tag absent"):
        await alice.profile.remove_tags(["absent"])


async def test_directory_requests_over_quota_are_refused_and_counted(tmp_path: Path) -> None:
    made = Agents(tmp_path, ServerLimits(name_rate=0.0, name_burst=2.0, find_rate=0.0, find_burst=1.0))
    await made.start_server()
    try:
        alice = await made.start("alice")
        await alice.profile.claim("planner")
        await alice.profile.add_tags(["gpu"])
        with pytest.raises(RendezvousError, match="too many name and tag changes"):
            await alice.profile.claim("planner")
        await alice.profile.find(["gpu"])
        with pytest.raises(RendezvousError, match="too many searches"):
            await alice.profile.find(["gpu"])
        assert made.server is not None and made.server.counters["directory_dropped_quota"] == 2
    finally:
        for node in list(made.running.values()):
            await node.close()
        if made.server is not None:
            await made.server.close()


# -- the directory on its own ----------------------------------------------------------------


def test_the_directory_caps_names_and_profiles() -> None:
    server = Identity.generate().address
    directory = Directory(server, ServerLimits(max_names=2, max_profiles=1))
    directory.open(":memory:")
    a, b, c = (Identity.generate() for _ in range(3))
    for identity in (a, b, c):
        directory.arrived(identity.address, identity.public_key, 0.0)
    directory.claim(a.address, make_claim(a, "alpha", server), T0)
    directory.claim(b.address, make_claim(b, "beta", server), T0)
    with pytest.raises(DirectoryError, match="too many names"):
        directory.claim(c.address, make_claim(c, "gamma", server), T0)
    directory.claim(b.address, make_claim(b, "bravo", server), T0)  # a change, not one more
    directory.set_profile(a.address, ["gpu"], True, T0)
    with pytest.raises(DirectoryError, match="directory is full"):
        directory.set_profile(b.address, ["gpu"], True, T0)
    directory.left(a.address, T0)  # an offline agent's profile gives way to an online one's
    directory.set_profile(b.address, ["gpu"], True, T0)
    assert [listing.public_key for listing in directory.find(["gpu"], T0)[0]] == [b.public_key]
    assert directory.describe() == {"names": 2, "profiles": 1}
    directory.close()


# -- wire and trust store --------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        rv.ResolveName(1, "pp1abc"),
        rv.ResolveName(1, "Planner"),
        rv.ResolveName(1, "a" * 64),
        rv.ClaimName(1, rv.NameClaim("planner\n", bytes(32), bytes(64))),
        rv.ClaimName(1, rv.NameClaim("planner", bytes(65), bytes(64))),
        rv.Find(1, []),
        rv.Find(1, [f"t{i}" for i in range(9)]),
        rv.Find(1, ["gpu\x1b[2J"]),
        rv.SetProfile(1, ["x" * 65]),
        rv.Found(1, [rv.Listing(bytes(32), [], True)] * (rv.MAX_FOUND + 1)),
    ],
)
def test_malformed_directory_messages_are_a_frame_error(message: rv.Message) -> None:
    with pytest.raises(rv.FrameError, match="malformed control message"):
        rv.FrameDecoder().feed(rv.encode_control(message))


def test_the_largest_search_answer_fits_a_frame() -> None:
    claim = rv.NameClaim("p" + "x" * (rv.MAX_NAME - 1), bytes(64), bytes(64))
    tags = ["k" * rv.MAX_TAG_KEY + "=" + "v" * (rv.MAX_TAG - rv.MAX_TAG_KEY - 1)] * rv.MAX_TAGS
    found = rv.Found((1 << 63) - 1, [rv.Listing(bytes(64), tags, True, claim)] * rv.MAX_FOUND, True)
    [(decoded, _)] = rv.FrameDecoder().feed(rv.encode_control(found))
    assert decoded == found


def test_pins_are_kept_in_the_trust_file_and_older_files_have_none(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    peer = Identity.generate().address
    path.write_text(json.dumps({"version": 1, "peers": {str(peer): {"note": "old", "added": ""}}}))
    store = TrustStore(path)
    assert store.pins() == {} and store.is_trusted(peer)
    assert store.pin("planner", peer) is None
    other = Identity.generate().address
    store.add(other)
    assert store.pin("planner", other) == peer  # re-pinned: the old address is said
    assert TrustStore(path).pinned("planner") == other
    assert json.loads(path.read_text())["names"] == {"planner": str(other)}
    store.remove(other)
    assert store.pins() == {}  # untrusting a peer drops its pins
    path.write_text(json.dumps({"version": 1, "peers": {}, "names": {"Bad Name": str(peer)}}))
    with pytest.raises(TrustStoreError, match="is not a name"):
        TrustStore(path)


def test_a_malformed_profile_file_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"name": "pp1nope", "tags": []}))
    with pytest.raises(ProfileError, match=str(path)):
        load_profile(path)
