"""A short fuzzing budget over every decoder of untrusted bytes, the engine's own checks, and
hostile inputs that broke decoders once (issue 11). ``scripts/fuzz`` runs the long budget."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable

import msgspec
import pytest

from peerpath import errors
from peerpath.nat import traversal
from peerpath.rendezvous.letters import LetterError, check_letter
from peerpath.session import control as session
from peerpath.wire import rendezvous as rv

from . import targets as peers
from .harness import Target, check_seeds, fuzz, mutate, run_one, split, targets
from .harness import _where as where

#: Inputs per target: a few thousand, all targets together well under 30 s.
BUDGET = 3000
SEED = 11
NAMES = list(targets())
UINT64_MAX = 2**64 - 1


def _assert_clean(name: str, data: bytes, splits: int = 4) -> None:
    """``data`` raises nothing foreign in ``name``'s decoder, however the stream is cut."""
    target = targets()[name]
    for split_seed in range(splits):
        exc = run_one(target, data, split_seed)
        if exc is not None:
            text = data.hex()
            shown = text if len(text) <= 200 else f"{text[:200]}... ({len(data)} bytes)"
            pytest.fail(
                f"{name}: foreign {type(exc).__name__}: {exc}\n  raised at {where(exc)[0]}\n"
                f"  reproduce: scripts/fuzz --reproduce {name} {shown} {split_seed}",
                pytrace=False,
            )


# -- the targets -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_seeds_reach_the_decoder_and_are_accepted(name: str) -> None:
    problems, accepted = check_seeds(targets()[name])
    assert not problems, "\n".join(problems)
    assert accepted > 0, f"{name}: its decoder accepts none of its seeds"


@pytest.mark.parametrize("name", NAMES)
def test_no_foreign_exception(name: str) -> None:
    stats = fuzz(targets()[name], BUDGET, seed=SEED)
    assert stats.inputs[name] == BUDGET
    if stats.findings:
        findings = "\n\n".join(f.describe() for f in stats.findings.values())
        pytest.fail(f"{stats.foreign} of {BUDGET} inputs raised foreign exceptions:\n\n{findings}", pytrace=False)
    # The budget must get past the first checks: some inputs rejected, and (where the
    # decoder can refuse anything) not all of them.
    if targets()[name].ours:
        assert 0 < stats.rejected[name] < BUDGET, f"{name}: {stats.rejected[name]} of {BUDGET} rejected"


def test_the_expected_decoders_are_covered() -> None:
    expected = {
        "stun",
        "rendezvous-frames",
        "rendezvous-control",
        "rendezvous-server",
        "rendezvous-client",
        "rendezvous-connection",
        "udp-relay",
        "udp-server",
        "udp-client",
        "punch",
        "portmap-response",
        "portmap-request",
        "session-frames",
        "session-control",
        "letters",
        "direct-offer",
        "node-control",
    }
    assert expected <= set(NAMES)


# -- the engine ----------------------------------------------------------------------------


def _planted(bug_after: int) -> Target:
    """A decoder with a planted bug: any input longer than ``bug_after`` bytes indexes past its end."""

    def run(data: bytes, rng: random.Random) -> None:
        if not data:
            raise ValueError("empty")
        if len(data) > bug_after:
            _ = data[len(data)]

    return Target("planted", lambda: [b"abc", b"abcdef"], run, (ValueError,))


def test_the_engine_reports_a_foreign_exception_with_a_reproducer() -> None:
    stats = fuzz(_planted(6), 500, seed=1)
    assert stats.foreign > 0
    ((finding),) = stats.findings.values()
    assert finding.type == "IndexError" and finding.target == "planted"
    assert finding.examples and all(len(e.data) > 6 for e in finding.examples)
    assert run_one(_planted(6), finding.examples[0].data, finding.examples[0].split_seed) is not None
    assert "IndexError" in finding.describe() and finding.examples[0].data[:20].hex() in finding.describe()


def test_the_engine_does_not_count_the_decoders_own_errors() -> None:
    stats = fuzz(_planted(10**9), 500, seed=1)
    assert stats.foreign == 0 and stats.rejected["planted"] > 0


def test_inputs_are_deterministic_and_mutated() -> None:
    target = targets()["rendezvous-control"]
    first = [mutate(target, random.Random(i), ["type", "ping"]) for i in range(200)]
    again = [mutate(target, random.Random(i), ["type", "ping"]) for i in range(200)]
    assert first == again
    assert sum(data not in target.seeds for data in first) > 150


def test_stream_cuts_keep_every_byte() -> None:
    rng = random.Random(3)
    data = bytes(range(256)) * 3
    for _ in range(100):
        chunks = split(data, rng)
        assert b"".join(chunks) == data
    assert any(len(split(data, random.Random(i))) > 1 for i in range(10))


# -- hostile inputs that broke decoders --------------------------------------------------

NESTED_ARRAYS = b"\x91" * 1000 + b"\xc0"
NESTED_MAPS = b"\x81\xa1k" * 1000 + b"\xc0"


def _msgpack_map(*pairs: tuple[str, bytes]) -> bytes:
    """A msgpack map of already-encoded values."""
    return bytes([0x80 | len(pairs)]) + b"".join(msgspec.msgpack.encode(k) + v for k, v in pairs)


@pytest.mark.parametrize("nested", [NESTED_ARRAYS, NESTED_MAPS], ids=["arrays", "maps"])
@pytest.mark.parametrize("name", ["rendezvous-control", "rendezvous-server", "rendezvous-client"])
def test_deeply_nested_msgpack_in_a_control_frame(name: str, nested: bytes) -> None:
    ping = msgspec.msgpack.encode("ping")
    registered = msgspec.msgpack.encode("registered")
    bodies = [
        _msgpack_map(("type", ping), ("id", b"\x01"), ("x", nested)),  # an unknown field
        _msgpack_map(("type", ping), ("id", nested)),
        # NatReport is gone: its tag is unknown now, and its nested field must still be no trouble.
        _msgpack_map(("type", msgspec.msgpack.encode("nat-report")), ("nat", _msgpack_map(("a", nested)))),
        _msgpack_map(("type", msgspec.msgpack.encode("nat-report")), ("nat", nested)),
        _msgpack_map(("type", registered), ("observed", msgspec.msgpack.encode("1.2.3.4:5")), ("relays", nested)),
        _msgpack_map(("type", registered), ("observed", msgspec.msgpack.encode("1.2.3.4:5")), ("x", nested)),
        _msgpack_map(
            ("type", msgspec.msgpack.encode("post")), ("id", b"\x01"), ("letter", _msgpack_map(("x", nested)))
        ),
        _msgpack_map(("x", nested), ("type", ping), ("id", b"\x01")),
        nested,
    ]
    for body in bodies:
        _assert_clean(name, body)
        with pytest.raises(rv.FrameError):  # the decoder's own error, whoever reads the frame
            rv.decode_control(body)


@pytest.mark.parametrize("nested", [NESTED_ARRAYS, NESTED_MAPS], ids=["arrays", "maps"])
def test_deeply_nested_msgpack_in_a_session_control_frame(nested: bytes) -> None:
    bodies = [
        _msgpack_map(("type", msgspec.msgpack.encode("welcome")), ("x", nested)),
        _msgpack_map(("type", msgspec.msgpack.encode("hello")), ("version", b"\x01"), ("public_key", nested)),
        _msgpack_map(("x", nested), ("type", msgspec.msgpack.encode("ping"))),
        nested,
    ]
    for body in bodies:
        _assert_clean("session-control", body)
        _assert_clean("session-frames", struct.pack("!I", len(body)) + body)


@pytest.mark.parametrize("nested", [NESTED_ARRAYS, NESTED_MAPS], ids=["arrays", "maps"])
def test_deeply_nested_msgpack_in_a_letter_and_a_punch_offer(nested: bytes) -> None:
    _assert_clean("letters", _msgpack_map(("kind", msgspec.msgpack.encode("trust-request")), ("x", nested)))
    offers = [
        _msgpack_map(("key", msgspec.msgpack.encode(bytes(32))), ("x", nested)),
        _msgpack_map(("candidates", nested)),
        nested,
    ]
    for body in offers:
        _assert_clean("direct-offer", body)
        # What a round's handler expects of a peer: the decoder's RemoteError, for every kind.
        with pytest.raises(errors.RemoteError):
            traversal.decode_message(body, traversal.Offer)
        with pytest.raises(errors.RemoteError):
            traversal.decode_message(body, traversal.Answer)
        with pytest.raises(errors.RemoteError):
            traversal.decode_message(body, traversal.Go)


def _with_int_field(seed: bytes, value: int) -> list[tuple[str, bytes]]:
    """``seed`` (a msgpack map, nested maps included) with each int field in turn set to ``value``."""
    document = msgspec.msgpack.decode(seed)
    out = []

    def walk(node: object, path: list[str]) -> None:
        if not isinstance(node, dict):
            return
        for key, item in node.items():
            if isinstance(item, int) and not isinstance(item, bool):
                copy = msgspec.msgpack.decode(seed)
                inner = copy
                for step in path:
                    inner = inner[step]
                inner[key] = value
                out.append((".".join([*path, key]), msgspec.msgpack.encode(copy)))
            walk(item, [*path, key])

    walk(document, [])
    return out


@pytest.mark.parametrize("value", [UINT64_MAX, 2**63, -(2**63)], ids=["uint64-max", "2**63", "int64-min"])
@pytest.mark.parametrize(
    "name",
    ["rendezvous-control", "rendezvous-server", "rendezvous-client", "session-control", "letters", "direct-offer"],
)
def test_extreme_integers_in_every_int_field(name: str, value: int) -> None:
    target = targets()[name]
    cases = [case for seed in target.seeds for case in _with_int_field(seed, value)]
    assert cases, f"{name}: no int field in its seeds"
    checked = 0
    for path, body in cases:
        _assert_clean(name, body)
        low, high = BOUNDS.get(path.rpartition(".")[2], (-(2**63), UINT64_MAX))
        if not low <= value <= high:  # out of the field's bounds: refused by the decoder, as its own error
            decode, ours = _decoder(name, body)
            with pytest.raises(ours):
                decode()
            checked += 1
    if value == UINT64_MAX:
        assert checked, f"{name}: no bounded int field in its seeds"


#: The bounds of the int fields peers fill (a field not named here is any 64-bit int).
BOUNDS = {
    "id": (0, 2**63 - 1),  # request and letter ids: SQLite's and msgpack's common range
    "letter_id": (0, 2**63 - 1),
    "created": (-(2**63), 2**63 - 1),
    "port": (0, 0xFFFF),
    "next_port": (0, 0xFFFF),
    "port_step": (0, 0xFFFF),
}


def _decoder(name: str, body: bytes) -> tuple[Callable[[], object], type[Exception]]:
    """The real decoder of ``name``'s inputs on ``body``, and its own error."""
    if name.startswith("rendezvous-"):
        return (lambda: rv.decode_control(body)), rv.FrameError
    if name == "letters":
        return (lambda: rv.decode_control(peers._DELIVER_HEAD + body)), rv.FrameError
    if name == "direct-offer":
        if "key" in msgspec.msgpack.decode(body):
            return (lambda: traversal.decode_message(body, traversal.Offer)), errors.RemoteError
        return (lambda: traversal.decode_message(body, traversal.Answer)), errors.RemoteError
    if name == "session-control":
        return (lambda: session.FrameReader().feed(struct.pack("!I", len(body)) + body)), session.ControlError
    raise AssertionError(f"no decoder for {name}")


@pytest.mark.parametrize("letter_id", [UINT64_MAX, 2**63, -1], ids=["uint64-max", "2**63", "minus-one"])
def test_received_with_a_letter_id_out_of_range(letter_id: int) -> None:
    body = msgspec.msgpack.encode({"type": "received", "letter_id": letter_id})
    if letter_id == UINT64_MAX:
        assert body.endswith(b"\xcf" + b"\xff" * 8)
    with pytest.raises(rv.FrameError):
        rv.decode_control(body)
    _assert_clean("rendezvous-server", body)


def test_received_with_the_largest_letter_id() -> None:
    body = msgspec.msgpack.encode({"type": "received", "letter_id": 2**63 - 1})
    assert rv.decode_control(body) == rv.Received(2**63 - 1)
    _assert_clean("rendezvous-server", body)
    assert run_one(targets()["rendezvous-server"], body, 0) is None


def test_the_largest_letter_fits_a_deliver_frame_and_a_longer_note_is_refused() -> None:
    blob = bytes(64)
    largest = rv.Letter("x" * 64, blob, "x" * 64, -(2**63), blob, "\U0001f600" * rv.MAX_NOTE, blob, blob)
    body = msgspec.msgpack.encode(rv.Deliver(2**63 - 1, largest))
    assert rv.decode_control(body) == rv.Deliver(2**63 - 1, largest)
    assert len(rv.encode_control(rv.Deliver(2**63 - 1, largest))) <= 4 + rv.MAX_CONTROL
    for note in ("n" * (rv.MAX_NOTE + 1), "n" * 64 * 1024):
        letter = msgspec.msgpack.encode(msgspec.structs.replace(largest, note=note))
        with pytest.raises(rv.FrameError):
            rv.decode_control(peers._DELIVER_HEAD + letter)
        _assert_clean("letters", letter)
        post = msgspec.msgpack.encode(rv.Post(1, msgspec.structs.replace(largest, note=note)))
        _assert_clean("rendezvous-server", post)


# -- the UDP relay receivers ---------------------------------------------------------------


def _feed_seeds(name: str, splits: int = 20) -> None:
    target = targets()[name]
    for i, seed in enumerate(target.seeds):
        for split_seed in range(splits):
            assert run_one(target, seed, i * splits + split_seed) is None


def test_the_udp_seeds_get_past_the_servers_mac_check() -> None:
    server = peers._server("udp")
    before = dict(server.counters)
    _feed_seeds("udp-server")
    grew = {k for k, v in server.counters.items() if v > before[k]}
    # Relayed (from a confirmed endpoint), refused for a wrong key, a stranger's token, an unconfirmed endpoint.
    assert {"udp_frames", "relay_frames", "udp_unauthentic", "udp_unknown_token", "udp_unconfirmed"} <= grew, grew


def test_the_udp_seeds_get_past_the_clients_mac_check() -> None:
    client, _ = peers._client("udp")
    before = dict(client.counters)
    _feed_seeds("udp-client")
    assert client.counters["relay_received_udp"] > before["relay_received_udp"]
    assert client.counters["udp_dropped"] > before["udp_dropped"]  # the agent's own kinds, the wrong source


def test_mutated_udp_frames_are_sealed_again() -> None:
    frame = rv.encode_udp_relay(peers.UDP_TOKEN, peers.UDP_KEY, bytes(16), b"datagram")
    flipped = frame[:30] + bytes([frame[30] ^ 1]) + frame[31:]
    assert not rv.udp_authentic(peers.UDP_KEY, flipped)
    assert rv.udp_authentic(peers.UDP_KEY, peers._udp_seal(flipped))
    bob = rv.encode_udp_hello(peers.BOB_TOKEN, peers.BOB_KEY)
    assert rv.udp_authentic(peers.BOB_KEY, peers._udp_seal(bob[:-1] + b"\x00"))
    sealed = [peers._udp_fixup(flipped, random.Random(i)) for i in range(100)]
    assert sum(rv.udp_authentic(peers.UDP_KEY, s) for s in sealed) > 50


@pytest.mark.parametrize("name", ["udp-server", "udp-client"])
def test_a_bug_past_the_udp_mac_check_is_foreign(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in what runs once a frame is authentic escapes the receiver, and the target reports it."""

    def bug(*args: object) -> None:
        raise IndexError("planted")

    if name == "udp-server":
        monkeypatch.setattr(peers._server("udp").udp_relay, "_relay", bug)
    else:
        monkeypatch.setattr(peers._client("udp")[0], "_deliver", bug)
    kind = rv.UDP_TO_SERVER if name == "udp-server" else rv.UDP_FROM_SERVER
    seed = next(s for s in targets()[name].seeds if s[0] == kind)
    found = [run_one(targets()[name], seed, split_seed) for split_seed in range(30)]
    assert any(isinstance(exc, IndexError) for exc in found), found


def test_a_strangers_registration_is_signed_over_the_servers_challenge() -> None:
    """The connection target gets past the registration's signature (so the frames after it are
    handled by an agent), and a registration it must not sign is refused."""
    server = peers._server("connection")
    target = targets()["rendezvous-connection"]
    registered, lookups, posted = (server.counters[k] for k in ("registered", "lookups", "letters_posted"))
    for split_seed in range(20):
        assert run_one(target, target.seeds[1], split_seed) is None
    assert server.counters["registered"] - registered >= 10
    assert server.counters["lookups"] > lookups and server.counters["letters_posted"] > posted
    refused = server.counters["refused"]
    unsigned = rv.encode_control(rv.Register(peers.SERVER.public_key, bytes(64)))
    assert run_one(target, unsigned, 0) is None
    assert server.counters["refused"] == refused + 1


#: The all-zero Ed25519 public key, a point of small order: no one holds its private key, and
#: OpenSSL verifies an all-zero signature under it for about one message in four. Found by the
#: rendezvous-connection target; peerpath.identity.is_usable_key refuses such keys.
SMALL_ORDER_KEY = bytes(32)


def test_a_small_order_key_cannot_register(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "urandom", lambda n: bytes([12]) * n)  # the server's challenge nonce, among others
    server = peers._server("connection")
    before = dict(server.counters)
    exc = run_one(targets()["rendezvous-connection"], rv.encode_control(rv.Register(SMALL_ORDER_KEY, bytes(64))), 0)
    assert exc is None
    assert server.counters["registered"] == before["registered"], "registered without a private key"
    assert server.counters["refused"] == before["refused"] + 1


def test_a_small_order_key_cannot_sign_a_letter() -> None:
    letter = rv.Letter("trust-request", SMALL_ORDER_KEY, str(peers.BOB.address), peers.NOW - 60, bytes([13]) * 16)
    letter = msgspec.structs.replace(letter, signature=bytes(64))
    with pytest.raises(LetterError):
        check_letter(letter, peers.NOW)


def test_a_bug_in_a_connections_handler_is_foreign(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the server's catch-all logs (a bug it survives) is reported as a foreign exception."""

    def bug(*args: object) -> None:
        raise KeyError("planted")

    monkeypatch.setattr(peers._server("connection"), "_lookup", bug)
    target = targets()["rendezvous-connection"]
    found = [run_one(target, target.seeds[3], split_seed) for split_seed in range(10)]
    assert any(isinstance(exc, KeyError) for exc in found), found


ALICE = str(peers.ALICE.address)


_PING = b'{"op":"ping","address":"' + ALICE.encode() + b'"'


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"[" * 10000, id="10000-open-brackets"),
        pytest.param(b"[" * 10000 + b"]" * 10000, id="10000-nested-arrays"),
        pytest.param(b'{"op":"status","x":' + b"[" * 10000 + b"]" * 10000 + b"}", id="nested-unknown-field"),
        pytest.param(b'{"op":' + b"[" * 10000, id="nested-op"),
        pytest.param(_PING + b',"timeout":null}', id="ping-timeout-null"),
        pytest.param(_PING + b',"count":null}', id="ping-count-null"),
        pytest.param(_PING + b',"interval":[1]}', id="ping-interval-list"),
        pytest.param(_PING + b',"timeout":' + b"9" * 400 + b"}", id="ping-timeout-400-digits"),
        pytest.param(_PING + b',"count":1e300,"interval":0}', id="ping-count-1e300"),
        pytest.param(_PING + b',"timeout":"nan"}', id="ping-timeout-nan"),
        pytest.param(_PING + b',"via":"127.0.0.1:\xc2\xb2"}', id="ping-via-superscript-port"),
        pytest.param(b'{"op":"trust-request","address":null,"note":{"a":1}}', id="trust-request-wrong-types"),
        pytest.param(b'{"op":{"x":1}}', id="op-object"),
        pytest.param(b"[1,2,3]", id="array"),
        pytest.param(b'"status"', id="string"),
        pytest.param(b'{"op":"status","pad":"' + b"a" * 70000 + b'"}', id="line-over-64KiB"),
    ],
)
def test_hostile_control_socket_lines(line: bytes) -> None:
    _assert_clean("node-control", line + b"\n", splits=1)
    _assert_clean("node-control", line + b'\n{"op":"status"}\n', splits=1)


def test_a_ping_with_a_null_timeout_is_answered_with_an_error() -> None:
    request = b'{"op":"ping","address":"' + ALICE.encode() + b'","timeout":null}\n'
    answers = peers.control_answers(request + b'{"op":"status"}\n')
    assert len(answers) >= 2 and "error" in answers[0], answers
    assert answers[-1] == {"done": True}, answers
