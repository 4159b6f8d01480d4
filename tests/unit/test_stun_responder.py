"""The STUN server core: RFC 5780 answers, RFC 3489 answers, and no harm from bad input."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from peerpath.nat.stun_responder import MAX_AMPLIFICATION_BYTES, SocketKey, StunResponder
from peerpath.ratelimit import RateLimiter
from peerpath.wire import stun
from peerpath.wire.stun import Address, Attr, ChangeRequest, Class, Message

TXID = bytes(range(12))
CLIENT = Address("198.51.100.7", 41641)
PRIMARY = SocketKey(0, 0)


def responder(ips: list[str] | None = None) -> StunResponder:
    return StunResponder(ips or ["203.0.113.10", "203.0.113.11"], (3478, 3479))


def binding(*attrs: tuple[int, bytes]) -> bytes:
    return Message.request(TXID, attrs).serialize(fingerprint=True)


def test_binding_response_carries_rfc5780_attributes() -> None:
    reply = responder().handle(binding(), CLIENT, PRIMARY, 0.0)
    assert reply is not None and reply.via == PRIMARY and reply.to == CLIENT
    msg = stun.parse(reply.data)
    assert msg.cls is Class.SUCCESS and msg.transaction_id == TXID and msg.fingerprint
    assert msg.mapped_address == CLIENT
    assert msg.address(Attr.RESPONSE_ORIGIN) == Address("203.0.113.10", 3478)
    assert msg.address(Attr.OTHER_ADDRESS) == Address("203.0.113.11", 3479)


def test_change_request_is_honoured_from_the_right_socket() -> None:
    server = responder()
    for change, via in [
        (ChangeRequest(change_ip=True, change_port=True), SocketKey(1, 1)),
        (ChangeRequest(change_port=True), SocketKey(0, 1)),
        (ChangeRequest(change_ip=True), SocketKey(1, 0)),
    ]:
        reply = server.handle(binding((Attr.CHANGE_REQUEST, change.encode())), CLIENT, PRIMARY, 0.0)
        assert reply is not None and reply.via == via
        assert stun.parse(reply.data).address(Attr.RESPONSE_ORIGIN) == server.address_of(via)


def test_response_port_redirects_to_the_same_ip() -> None:
    reply = responder().handle(binding((Attr.RESPONSE_PORT, struct.pack("!HH", 5000, 0))), CLIENT, PRIMARY, 0.0)
    assert reply is not None and reply.to == Address(CLIENT.host, 5000)


def test_rfc3489_client_gets_classic_attributes() -> None:
    data = struct.pack("!HHI", 0x0001, 8, 0x01020304) + TXID + struct.pack("!HHI", Attr.CHANGE_REQUEST, 4, 2)
    reply = responder().handle(data, CLIENT, PRIMARY, 0.0)
    assert reply is not None and reply.via == SocketKey(0, 1)
    msg = stun.parse(reply.data)
    assert msg.classic and msg.full_transaction_id == data[4:20]
    assert msg.address(Attr.MAPPED_ADDRESS) == CLIENT
    assert msg.address(Attr.SOURCE_ADDRESS) == Address("203.0.113.10", 3479)
    assert msg.address(Attr.CHANGED_ADDRESS) == Address("203.0.113.11", 3479)
    assert msg.get(Attr.XOR_MAPPED_ADDRESS) is None


def test_single_address_server_refuses_change_request_with_420() -> None:
    server = responder(["203.0.113.10"])
    reply = server.handle(binding((Attr.CHANGE_REQUEST, ChangeRequest(change_ip=True).encode())), CLIENT, PRIMARY, 0)
    assert reply is not None
    error = stun.parse(reply.data).error_code
    assert error is not None and error.code == 420
    plain = server.handle(binding(), CLIENT, PRIMARY, 0.0)
    assert plain is not None and stun.parse(plain.data).other_address is None


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    reply = responder().handle(binding((0x7777, b"x")), CLIENT, PRIMARY, 0.0)
    assert reply is not None
    msg = stun.parse(reply.data)
    assert msg.error_code is not None and msg.error_code.code == 420
    assert msg.get(Attr.UNKNOWN_ATTRIBUTES) == b"\x77\x77"


def test_change_request_over_tcp_is_refused() -> None:
    data = binding((Attr.CHANGE_REQUEST, ChangeRequest(change_port=True).encode()))
    reply = responder().handle(data, CLIENT, PRIMARY, 0.0, tcp=True)
    assert reply is not None and reply.error and reply.via == PRIMARY


def test_responses_and_indications_and_garbage_are_dropped_and_counted() -> None:
    server = responder()
    assert server.handle(b"GET / HTTP/1.1\r\n\r\n", CLIENT, PRIMARY, 0.0) is None
    assert server.handle(Message(1, Class.SUCCESS, TXID).serialize(), CLIENT, PRIMARY, 0.0) is None
    assert server.handle(Message(1, Class.INDICATION, TXID).serialize(), CLIENT, PRIMARY, 0.0) is None
    c = server.counters
    assert (c.received, c.dropped_malformed, c.dropped_not_request, c.answered) == (3, 1, 2, 0)


def test_rate_limit_per_source() -> None:
    server = StunResponder(["203.0.113.10"], (3478, 3479), rate_limiter=RateLimiter(rate=10, burst=5))
    answered = sum(server.handle(binding(), CLIENT, PRIMARY, 0.0) is not None for _ in range(20))
    assert answered == 5
    other = Address("198.51.100.8", 1)
    assert server.handle(binding(), other, PRIMARY, 0.0) is not None  # another source is unaffected
    assert server.handle(binding(), CLIENT, PRIMARY, 0.5) is not None  # tokens come back with time
    assert server.counters.dropped_rate_limited == 15


def test_rate_limiter_table_is_bounded() -> None:
    limiter = RateLimiter(rate=1, burst=1, max_sources=100)
    for i in range(1000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter._buckets) == 100


@given(
    st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=6),
    st.booleans(),
)
def test_no_amplification_and_no_crash(attrs: list[tuple[int, bytes]], classic: bool) -> None:
    server = StunResponder(["2001:db8::1", "2001:db8::2"], (3478, 3479), rate_limiter=RateLimiter(burst=1e9))
    data = Message.request(TXID, attrs, method=1).serialize()
    if classic:
        data = data[:4] + b"\x01\x02\x03\x04" + data[8:]
    reply = server.handle(data, Address("2001:db8::99", 1), PRIMARY, 0.0)
    if reply is not None:
        assert len(reply.data) <= len(data) + MAX_AMPLIFICATION_BYTES


@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    responder().handle(data, CLIENT, PRIMARY, 0.0)
