"""The sans-I/O parts of a session on their own: the identity proof and the stream multiplexer."""

from __future__ import annotations

import pytest

from peerpath.certs import self_signed_certificate
from peerpath.identity import Address, Identity
from peerpath.session import control, mux
from peerpath.session.auth import InitiatorAuth, Refused, ResponderAuth

# -- the proof ----------------------------------------------------------------------------


def run_proof(
    initiator: Identity, responder: Identity, trusted: set[Address]
) -> tuple[InitiatorAuth, ResponderAuth, list[str]]:
    """Both halves exchanging frames until one is done or refuses; what happened, in order."""
    a = InitiatorAuth(initiator, responder.address)
    b = ResponderAuth(responder, lambda address: address in trusted)
    log: list[str] = []
    to_b = [a.handshake_done(self_signed_certificate(responder))]
    to_a = [b.handshake_done()]
    while to_a or to_b:
        for frame in to_b:
            step = b.on_frame(frame)
            log.append(f"b<-{type(frame).__name__}")
            to_a += [step.reply] if step.reply else []
            log += ["b done"] if step.done else []
        to_b = []
        for frame in to_a:
            step = a.on_frame(frame)
            log.append(f"a<-{type(frame).__name__}")
            to_b += [step.reply] if step.reply else []
            log += ["a done"] if step.done else []
        to_a = []
    return a, b, log


def test_a_trusted_initiator_proves_itself() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    _, b, log = run_proof(alice, bob, {alice.address})
    assert b.peer == alice.address
    assert log == ["b<-Hello", "a<-Challenge", "b<-Auth", "b done", "a<-Welcome", "a done"]


def test_an_untrusted_initiator_is_refused_without_authentication_failure() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    with pytest.raises(Refused, match="does not trust") as refused:
        run_proof(alice, bob, set())
    assert not refused.value.authentication


def test_the_initiator_refuses_a_responder_that_is_not_the_one_dialled() -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    with pytest.raises(Refused, match="not") as refused:
        InitiatorAuth(alice, bob.address).handshake_done(self_signed_certificate(mallory))
    assert refused.value.authentication
    with pytest.raises(Refused, match="not a peerpath node"):
        InitiatorAuth(alice, bob.address).handshake_done(None)


def test_a_signature_for_another_nonce_or_key_is_refused() -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    b = ResponderAuth(bob, lambda _: True)
    nonce = b.handshake_done()
    assert isinstance(nonce, control.Challenge)
    b.on_frame(control.Hello(control.PROTOCOL_VERSION, alice.public_key))  # claims alice's key
    forged = mallory.sign(control.auth_payload(nonce.nonce, alice.address, bob.address))
    with pytest.raises(Refused, match="bad signature") as refused:
        b.on_frame(control.Auth(forged))
    assert refused.value.authentication and b.peer is None


def test_frames_out_of_place_are_protocol_errors() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    b = ResponderAuth(bob, lambda _: True)
    b.handshake_done()
    with pytest.raises(control.ControlError):
        b.on_frame(control.Auth(b"x" * 64))  # before any Hello
    with pytest.raises(Refused, match="version"):
        ResponderAuth(bob, lambda _: True).on_frame(control.Hello(99, alice.public_key))
    a = InitiatorAuth(alice, bob.address)
    with pytest.raises(control.ControlError):
        a.on_frame(control.Welcome())  # a welcome before any challenge


# -- the multiplexer ----------------------------------------------------------------------

# Stream 0 is the initiator's, 1 the responder's (RFC 9000 2.1).
PEERS_STREAM, OUR_STREAM = 1, 4


def test_a_byte_stream_opened_by_the_peer_is_announced_then_its_data_flows() -> None:
    m = mux.Mux(initiator=True, max_message_size=100)
    header = control.encode(control.OpenStream(22))
    assert m.on_data(PEERS_STREAM, header[:3], False) == []  # header still arriving
    assert m.on_data(PEERS_STREAM, header[3:] + b"abc", False) == [
        mux.OpenRequested(PEERS_STREAM, 22),
        mux.Bytes(PEERS_STREAM, b"abc", False),
    ]
    assert m.on_data(PEERS_STREAM, b"", True) == [mux.Bytes(PEERS_STREAM, b"", True)]
    assert len(m) == 0  # ended streams are forgotten


def test_a_refused_stream_drops_what_still_arrives_until_it_ends() -> None:
    m = mux.Mux(initiator=True, max_message_size=100)
    m.on_data(PEERS_STREAM, control.encode(control.OpenStream(22)), False)
    m.refuse(PEERS_STREAM)
    # Data that looks like a header is not taken for one.
    assert m.on_data(PEERS_STREAM, control.encode(control.Message(request=True)), False) == []
    assert m.kind(PEERS_STREAM) is mux.Kind.DISCARD
    assert m.on_data(PEERS_STREAM, b"", True) == [] and len(m) == 0


def test_a_request_and_its_reply() -> None:
    responder = mux.Mux(initiator=False, max_message_size=100)
    initiator = mux.Mux(initiator=True, max_message_size=100)
    initiator.expect(0, mux.Kind.AWAIT_REPLY)
    request = control.encode(control.Message(request=True, topic="t")) + b"question"
    assert responder.on_data(0, request, True) == [mux.MessageIn(0, b"question", True, "t")]
    reply = control.encode(control.Reply(True)) + b"answer"
    assert initiator.on_data(0, reply[:5], False) == []
    assert initiator.on_data(0, reply[5:], True) == [mux.ReplyIn(0, control.Reply(True), b"answer")]


def test_a_message_past_the_limit_is_cut_off_once() -> None:
    m = mux.Mux(initiator=True, max_message_size=10)
    header = control.encode(control.Message(request=False))
    assert m.on_data(PEERS_STREAM, header + bytes(8), False) == []
    assert m.on_data(PEERS_STREAM, bytes(8), False) == [mux.TooLarge(PEERS_STREAM, local=False)]
    assert m.on_data(PEERS_STREAM, bytes(8), True) == []


def test_headers_out_of_place_are_protocol_errors() -> None:
    m = mux.Mux(initiator=True, max_message_size=100)
    with pytest.raises(control.ControlError):
        m.on_data(PEERS_STREAM, control.encode(control.Accept(True)), False)  # an answer opening a stream
    m.expect(OUR_STREAM, mux.Kind.AWAIT_ACCEPT)
    with pytest.raises(control.ControlError):
        m.on_data(OUR_STREAM, control.encode(control.Reply(True)), False)  # a reply to an open
    with pytest.raises(control.ControlError, match="before its header"):
        m.on_data(5, b"\x00\x00", True)


def test_what_arrives_on_a_forgotten_stream_of_ours_is_ignored() -> None:
    m = mux.Mux(initiator=True, max_message_size=100)
    m.expect(OUR_STREAM, mux.Kind.AWAIT_ACCEPT)
    m.forget(OUR_STREAM)
    assert m.on_data(OUR_STREAM, control.encode(control.Accept(True)), False) == []
    assert m.on_data(8, b"anything", False) == []  # never ours to begin with: not a new stream
