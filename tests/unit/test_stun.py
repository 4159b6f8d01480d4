"""The STUN codec against RFC 5769's vectors, round trips, and malformed input."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerpath.wire import stun
from peerpath.wire.stun import Address, Attr, ChangeRequest, Class, ErrorCode, Message, StunError


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 2.1 Sample Request (short-term credentials).
SAMPLE_REQUEST = unhex("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf""")
# RFC 5769 2.2 Sample IPv4 Response.
SAMPLE_IPV4_RESPONSE = unhex("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96""")
# RFC 5769 2.3 Sample IPv6 Response.
SAMPLE_IPV6_RESPONSE = unhex("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c""")
# RFC 5769 2.4 Sample Request with Long-Term Authentication.
SAMPLE_LONG_TERM_REQUEST = unhex("""
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66""")

PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
TXID = unhex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")


def test_rfc5769_sample_request_parses_and_checks() -> None:
    msg = stun.parse(SAMPLE_REQUEST)
    assert (msg.method, msg.cls) == (stun.Method.BINDING, Class.REQUEST)
    assert msg.transaction_id == TXID
    assert msg.software == "STUN test client"
    assert msg.get(Attr.USERNAME) == b"evtj:h6vY"
    assert msg.get(0x0024) == unhex("6e 00 01 ff")  # PRIORITY, kept raw
    assert msg.fingerprint and msg.integrity
    assert stun.check_integrity(SAMPLE_REQUEST, PASSWORD)
    assert not stun.check_integrity(SAMPLE_REQUEST, b"wrong password")


def test_rfc5769_sample_request_serializes_byte_for_byte() -> None:
    msg = stun.parse(SAMPLE_REQUEST)
    # The RFC pads USERNAME with spaces; padding content is free (RFC 8489 14).
    assert msg.serialize(key=PASSWORD, fingerprint=True, pad=0x20) == SAMPLE_REQUEST


@pytest.mark.parametrize(
    ("vector", "expected"),
    [
        (SAMPLE_IPV4_RESPONSE, Address("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, Address("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
    ids=["ipv4", "ipv6"],
)
def test_rfc5769_responses_both_directions(vector: bytes, expected: Address) -> None:
    msg = stun.parse(vector)
    assert msg.cls is Class.SUCCESS
    assert msg.mapped_address == expected
    assert msg.software == "test vector"
    assert stun.check_integrity(vector, PASSWORD)
    # Build the same response from scratch: identical bytes (SOFTWARE padded with a space).
    built = Message(stun.Method.BINDING, Class.SUCCESS, TXID)
    attrs = ((Attr.SOFTWARE, b"test vector"), built.encode_address(Attr.XOR_MAPPED_ADDRESS, expected))
    rebuilt = Message(stun.Method.BINDING, Class.SUCCESS, TXID, attrs)
    assert rebuilt.serialize(key=PASSWORD, fingerprint=True, pad=0x20) == vector


def test_rfc5769_long_term_request() -> None:
    msg = stun.parse(SAMPLE_LONG_TERM_REQUEST)
    username = msg.get(Attr.USERNAME)
    assert username is not None
    assert username.decode() == "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    assert msg.get(Attr.REALM) == b"example.org"
    assert msg.get(Attr.NONCE) == b"f//499k954d6OL34oL9FSTvy64sA"
    assert not msg.fingerprint
    # SASLprep/OpaqueString of the RFC's password "The<U+00AD>M<U+00AA>tr<U+2168>" is "TheMatrIX".
    key = stun.long_term_key(username.decode(), "example.org", "TheMatrIX")
    assert stun.check_integrity(SAMPLE_LONG_TERM_REQUEST, key)
    assert msg.serialize(key=key) == SAMPLE_LONG_TERM_REQUEST


def test_message_integrity_sha256_round_trip() -> None:
    msg = Message.request(TXID, [(Attr.SOFTWARE, b"peerpath")])
    data = msg.serialize(key=b"k", sha256=True, fingerprint=True)
    assert stun.parse(data).integrity
    assert stun.check_integrity(data, b"k")
    assert not stun.check_integrity(data, b"other")


def test_message_without_integrity_does_not_check() -> None:
    data = Message.request(TXID).serialize()
    assert not stun.check_integrity(data, PASSWORD)


def test_rfc3489_message_without_cookie_parses_as_classic() -> None:
    data = struct.pack("!HHI", 0x0001, 8, 0xDEADBEEF) + TXID + struct.pack("!HHI", Attr.CHANGE_REQUEST, 4, 0x6)
    msg = stun.parse(data)
    assert msg.classic
    assert msg.change_request == ChangeRequest(change_ip=True, change_port=True)
    assert msg.full_transaction_id == struct.pack("!I", 0xDEADBEEF) + TXID
    with pytest.raises(StunError, match="magic cookie"):
        stun.parse(data, classic=False)
    with pytest.raises(StunError, match="XOR-MAPPED-ADDRESS"):
        msg.encode_address(Attr.XOR_MAPPED_ADDRESS, Address("192.0.2.1", 1))
    response = msg.response([msg.encode_address(Attr.MAPPED_ADDRESS, Address("192.0.2.1", 1))])
    assert stun.parse(response.serialize()).full_transaction_id == msg.full_transaction_id


def test_rfc5780_attributes_round_trip() -> None:
    req = Message.request(
        TXID,
        [
            (Attr.CHANGE_REQUEST, ChangeRequest(change_port=True).encode()),
            (Attr.RESPONSE_PORT, struct.pack("!HH", 4000, 0)),
            (Attr.PADDING, b"\0" * 100),
        ],
    )
    parsed = stun.parse(req.serialize(fingerprint=True))
    assert parsed.change_request == ChangeRequest(change_ip=False, change_port=True)
    assert parsed.response_port == 4000
    other = Address("203.0.113.2", 3479)
    origin = Address("203.0.113.1", 3478)
    resp = parsed.response(
        [
            parsed.encode_address(Attr.XOR_MAPPED_ADDRESS, Address("198.51.100.7", 41641)),
            parsed.encode_address(Attr.RESPONSE_ORIGIN, origin),
            parsed.encode_address(Attr.OTHER_ADDRESS, other),
        ]
    )
    got = stun.parse(resp.serialize())
    assert got.mapped_address == Address("198.51.100.7", 41641)
    assert got.address(Attr.RESPONSE_ORIGIN) == origin
    assert got.other_address == other


def test_error_response_and_unknown_attributes() -> None:
    req = stun.parse(Message.request(TXID, [(0x7F00, b"x"), (0xC000, b"y")]).serialize())
    assert req.unknown_required() == [0x7F00]
    err = req.error_response(ErrorCode(420, "Unknown Attribute"), [(Attr.UNKNOWN_ATTRIBUTES, b"\x7f\x00")])
    got = stun.parse(err.serialize())
    assert got.cls is Class.ERROR
    assert got.error_code == ErrorCode(420, "Unknown Attribute")


def test_ipv4_mapped_ipv6_is_carried_as_ipv4() -> None:
    assert Address("::ffff:192.0.2.7", 3478) == Address("192.0.2.7", 3478)


def test_message_types_interleave_method_and_class() -> None:
    for cls, value in (
        (Class.REQUEST, 0x0001),
        (Class.INDICATION, 0x0011),
        (Class.SUCCESS, 0x0101),
        (Class.ERROR, 0x0111),
    ):
        data = Message(1, cls, TXID).serialize()
        assert struct.unpack("!H", data[:2])[0] == value
        assert stun.parse(data).cls is cls
    data = Message(0xABC, Class.ERROR, TXID).serialize()
    assert stun.parse(data).method == 0xABC


def test_is_stun_demultiplexes() -> None:
    assert stun.is_stun(SAMPLE_REQUEST)
    assert not stun.is_stun(SAMPLE_REQUEST[:-1])
    assert not stun.is_stun(b"\x40" + SAMPLE_REQUEST[1:])
    assert not stun.is_stun(b"")


# -- malformed input ----------------------------------------------------------------


def _with(data: bytes, offset: int, patch: bytes) -> bytes:
    return data[:offset] + patch + data[offset + len(patch) :]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than a STUN header"),
        (SAMPLE_REQUEST[:19], "shorter than a STUN header"),
        (SAMPLE_REQUEST[:-4], "datagram carries"),
        (_with(SAMPLE_REQUEST, 2, b"\x00\x59"), "multiple of 4"),
        (_with(SAMPLE_REQUEST, 0, b"\xc0"), "most significant bits"),
        (_with(SAMPLE_REQUEST, 22, b"\x00\xff"), "claims 255 bytes"),
        (_with(SAMPLE_REQUEST, 30, b"X"), "FINGERPRINT does not match"),
        (SAMPLE_REQUEST + b"\x00\x01\x00\x00", "datagram carries"),
        (_with(SAMPLE_REQUEST, 2, b"\x00\x5c") + b"\x00\x01\x00\x00", "after FINGERPRINT"),
        (
            Message.request(TXID, [(Attr.XOR_MAPPED_ADDRESS, b"\x00\x07\x00\x01abcd")]).serialize(),
            "unknown address family",
        ),
        (
            Message.request(TXID, [(Attr.MAPPED_ADDRESS, b"\x00\x01\x00\x01abc")]).serialize(),
            "IPv4 address must be 4 bytes",
        ),
        (
            Message.request(TXID, [(Attr.MESSAGE_INTEGRITY, b"short")]).serialize(),
            "bad length",
        ),
    ],
    ids=[
        "empty",
        "truncated-header",
        "truncated-body",
        "length-not-aligned",
        "top-bits",
        "attribute-overruns",
        "bad-fingerprint",
        "trailing-bytes",
        "attribute-after-fingerprint",
        "bad-family",
        "bad-ipv4-length",
        "bad-integrity-length",
    ],
)
def test_malformed_input_raises_stun_error(data: bytes, reason: str) -> None:
    with pytest.raises(StunError, match=reason):
        stun.parse(data)


def test_malformed_attribute_values_raise_stun_error() -> None:
    msg = Message.request(TXID, [(Attr.CHANGE_REQUEST, b"\x00"), (Attr.ERROR_CODE, b"\x00\x00\x09\x00")])
    with pytest.raises(StunError, match="CHANGE-REQUEST"):
        _ = msg.change_request
    with pytest.raises(StunError, match="ERROR-CODE"):
        _ = msg.error_code
    with pytest.raises(StunError, match="transaction ID"):
        Message.request(b"short")
    with pytest.raises(StunError):
        Address("not-an-ip", 1)


@given(st.binary(max_size=200))
def test_garbage_raises_only_stun_error(data: bytes) -> None:
    with contextlib.suppress(StunError):
        stun.parse(data)


@given(st.binary(min_size=20, max_size=120))
def test_garbage_with_valid_header_raises_only_stun_error(tail: bytes) -> None:
    body = tail[20:]
    body = body[: len(body) - len(body) % 4]
    data = struct.pack("!HHI", 0x0101, len(body), stun.MAGIC_COOKIE) + tail[8:20].ljust(12, b"\0") + body
    try:
        msg = stun.parse(data)
        for attr_type, _ in msg.attributes:
            with contextlib.suppress(StunError):
                msg.address(attr_type)
        stun.check_integrity(data, b"key")
    except StunError:
        pass


_addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
).flatmap(lambda host: st.integers(0, 65535).map(lambda port: Address(host, port)))
_free_attrs = st.lists(
    st.tuples(st.sampled_from([Attr.SOFTWARE, Attr.USERNAME, Attr.PADDING, 0xC001]), st.binary(max_size=64)),
    max_size=5,
)


@given(
    method=st.integers(0, 0xFFF),
    cls=st.sampled_from(list(Class)),
    txid=st.binary(min_size=12, max_size=12),
    mapped=_addresses,
    attrs=_free_attrs,
    fingerprint=st.booleans(),
    key=st.one_of(st.none(), st.binary(min_size=1, max_size=32)),
    sha256=st.booleans(),
)
def test_round_trip(
    method: int,
    cls: Class,
    txid: bytes,
    mapped: Address,
    attrs: list[tuple[int, bytes]],
    fingerprint: bool,
    key: bytes | None,
    sha256: bool,
) -> None:
    blank = Message(method, cls, txid)
    msg = Message(method, cls, txid, (blank.encode_address(Attr.XOR_MAPPED_ADDRESS, mapped), *attrs))
    data = msg.serialize(key=key, sha256=sha256, fingerprint=fingerprint)
    got = stun.parse(data)
    assert got == msg
    assert got.mapped_address == mapped
    assert got.fingerprint == fingerprint
    if key is not None:
        assert stun.check_integrity(data, key)
