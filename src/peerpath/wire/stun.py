"""STUN messages (RFC 8489), with the RFC 5780 and RFC 3489 attributes.

Sans-I/O: bytes in, :class:`Message` out, and back. Nothing here opens a socket
or reads a clock. Every malformed input raises :class:`StunError`.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "HEADER_LENGTH",
    "MAGIC_COOKIE",
    "Address",
    "Attr",
    "ChangeRequest",
    "Class",
    "ErrorCode",
    "Message",
    "Method",
    "StunError",
    "check_integrity",
    "is_stun",
    "long_term_key",
    "parse",
]

MAGIC_COOKIE = 0x2112A442
HEADER_LENGTH = 20
_FINGERPRINT_XOR = 0x5354554E
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
#: RFC 8489 says a STUN message fits a datagram; we refuse anything larger.
MAX_MESSAGE_LENGTH = 65535


class StunError(ValueError):
    """Bytes that are not a well-formed STUN message, or an attribute that is malformed."""


class Class(enum.IntEnum):
    """The message class (RFC 8489 5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Method(enum.IntEnum):
    """STUN methods this codec names; others parse as plain ints."""

    BINDING = 0x001


class Attr(enum.IntEnum):
    """Attribute types (RFC 8489 18.3, RFC 5780 7, RFC 3489 11.2)."""

    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002  # RFC 3489, deprecated
    CHANGE_REQUEST = 0x0003  # RFC 5780 7.2
    SOURCE_ADDRESS = 0x0004  # RFC 3489, deprecated
    CHANGED_ADDRESS = 0x0005  # RFC 3489, deprecated
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PADDING = 0x0026  # RFC 5780 7.6
    RESPONSE_PORT = 0x0027  # RFC 5780 7.5
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B  # RFC 5780 7.3
    OTHER_ADDRESS = 0x802C  # RFC 5780 7.4


_ADDRESS_ATTRS = frozenset(
    {
        Attr.MAPPED_ADDRESS,
        Attr.RESPONSE_ADDRESS,
        Attr.SOURCE_ADDRESS,
        Attr.CHANGED_ADDRESS,
        Attr.ALTERNATE_SERVER,
        Attr.RESPONSE_ORIGIN,
        Attr.OTHER_ADDRESS,
    }
)
_KNOWN_ATTRS = frozenset(int(a) for a in Attr)


def is_comprehension_required(attr_type: int) -> bool:
    """True for attribute types 0x0000-0x7FFF, which an agent must understand (RFC 8489 14)."""
    return attr_type < 0x8000


@dataclass(frozen=True, slots=True)
class Address:
    """A transport address as carried by the (XOR-)MAPPED-ADDRESS family of attributes."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise StunError(f"port {self.port} out of range")
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError as exc:
            raise StunError(f"not an IP address: {self.host!r}") from exc
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; carry them as IPv4.
            object.__setattr__(self, "host", str(ip.ipv4_mapped))
        else:
            object.__setattr__(self, "host", str(ip))

    @property
    def family(self) -> int:
        """1 for IPv4, 2 for IPv6 (RFC 8489 14.1)."""
        return 1 if ":" not in self.host else 2

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == 2 else f"{self.host}:{self.port}"

    @classmethod
    def from_tuple(cls, addr: tuple[str, int] | tuple[str, int, int, int]) -> Address:
        """Build from a socket address tuple as asyncio and ``socket`` return them."""
        return cls(addr[0], addr[1])

    def as_tuple(self) -> tuple[str, int]:
        """The ``(host, port)`` tuple sockets take."""
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class ChangeRequest:
    """CHANGE-REQUEST flags (RFC 5780 7.2)."""

    change_ip: bool = False
    change_port: bool = False

    def encode(self) -> bytes:
        """The four-byte attribute value."""
        return struct.pack("!I", (0x4 if self.change_ip else 0) | (0x2 if self.change_port else 0))

    @classmethod
    def decode(cls, value: bytes) -> ChangeRequest:
        """Parse the four-byte attribute value."""
        if len(value) != 4:
            raise StunError(f"CHANGE-REQUEST must be 4 bytes, got {len(value)}")
        (flags,) = struct.unpack("!I", value)
        return cls(change_ip=bool(flags & 0x4), change_port=bool(flags & 0x2))


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """ERROR-CODE (RFC 8489 14.8)."""

    code: int
    reason: str = ""

    def encode(self) -> bytes:
        """The attribute value: class/number and a UTF-8 reason phrase."""
        if not 300 <= self.code <= 699:
            raise StunError(f"error code {self.code} out of range 300-699")
        reason = self.reason.encode()
        if len(reason) > 763:
            raise StunError("error reason phrase longer than 763 bytes")
        return struct.pack("!HBB", 0, self.code // 100, self.code % 100) + reason

    @classmethod
    def decode(cls, value: bytes) -> ErrorCode:
        """Parse the attribute value."""
        if len(value) < 4:
            raise StunError(f"ERROR-CODE must be at least 4 bytes, got {len(value)}")
        klass, number = value[2] & 0x07, value[3]
        if not 3 <= klass <= 6 or number > 99:
            raise StunError(f"malformed ERROR-CODE class {klass} number {number}")
        try:
            reason = value[4:].decode()
        except UnicodeDecodeError as exc:
            raise StunError("ERROR-CODE reason is not UTF-8") from exc
        return cls(klass * 100 + number, reason)


def _message_type(method: int, cls: int) -> int:
    # RFC 8489 5: the class bits C1 C0 sit at bits 8 and 4, the method fills the rest.
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def _split_type(message_type: int) -> tuple[int, int]:
    method = (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
    cls = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    return method, cls


def _pad(length: int) -> int:
    return (4 - length % 4) % 4


def _encode_address(addr: Address, xor_with: bytes | None) -> bytes:
    packed_ip = ipaddress.ip_address(addr.host).packed
    port = addr.port
    if xor_with is not None:
        port ^= MAGIC_COOKIE >> 16
        packed_ip = bytes(a ^ b for a, b in zip(packed_ip, xor_with, strict=False))
    return struct.pack("!BBH", 0, addr.family, port) + packed_ip


def _decode_address(value: bytes, xor_with: bytes | None, name: str) -> Address:
    if len(value) < 4:
        raise StunError(f"{name} too short ({len(value)} bytes)")
    family, port = value[1], struct.unpack("!H", value[2:4])[0]
    raw = value[4:]
    if family == 1:
        if len(raw) != 4:
            raise StunError(f"{name}: IPv4 address must be 4 bytes, got {len(raw)}")
    elif family == 2:
        if len(raw) != 16:
            raise StunError(f"{name}: IPv6 address must be 16 bytes, got {len(raw)}")
    else:
        raise StunError(f"{name}: unknown address family {family}")
    if xor_with is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_with, strict=False))
    host = str(ipaddress.ip_address(raw))
    return Address(host, port)


@dataclass(frozen=True, slots=True)
class Message:
    """One STUN message.

    ``attributes`` holds every attribute in wire order as ``(type, value)`` pairs,
    except MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT, which
    :meth:`serialize` computes and :func:`parse` checks. ``cookie`` is the magic
    cookie, or for an RFC 3489 message the first four bytes of its 128-bit
    transaction ID.
    """

    method: int
    cls: Class
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()
    cookie: int = MAGIC_COOKIE
    #: Set by :func:`parse`: the message carried a FINGERPRINT (which checked out).
    fingerprint: bool = field(default=False, compare=False)
    #: Set by :func:`parse`: MESSAGE-INTEGRITY(-SHA256) was present (check it with the key).
    integrity: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.transaction_id) != 12:
            raise StunError(f"transaction ID must be 12 bytes, got {len(self.transaction_id)}")
        if not 0 <= self.method <= 0xFFF:
            raise StunError(f"method {self.method:#x} out of range")
        for attr_type, value in self.attributes:
            if not 0 <= attr_type <= 0xFFFF or len(value) > 0xFFFF:
                raise StunError(f"attribute {attr_type:#06x} does not fit the wire format")

    # -- construction -------------------------------------------------------------

    @classmethod
    def request(
        cls, transaction_id: bytes, attributes: Iterable[tuple[int, bytes]] = (), method: int = Method.BINDING
    ) -> Message:
        """A request of ``method`` (Binding by default)."""
        return cls(method, Class.REQUEST, transaction_id, tuple(attributes))

    def response(self, attributes: Iterable[tuple[int, bytes]] = ()) -> Message:
        """A success response to this request, with the same transaction ID and cookie."""
        return Message(self.method, Class.SUCCESS, self.transaction_id, tuple(attributes), self.cookie)

    def error_response(self, error: ErrorCode, attributes: Iterable[tuple[int, bytes]] = ()) -> Message:
        """An error response to this request carrying ERROR-CODE first."""
        attrs = ((Attr.ERROR_CODE, error.encode()), *attributes)
        return Message(self.method, Class.ERROR, self.transaction_id, attrs, self.cookie)

    def encode_address(self, attr_type: int, address: Address) -> tuple[int, bytes]:
        """An address attribute for this message (XOR-encoded where the type says so)."""
        if attr_type == Attr.XOR_MAPPED_ADDRESS:
            if self.classic:
                raise StunError("XOR-MAPPED-ADDRESS needs the magic cookie; this is an RFC 3489 message")
            return attr_type, _encode_address(address, _COOKIE_BYTES + self.transaction_id)
        return attr_type, _encode_address(address, None)

    # -- reading ----------------------------------------------------------------------

    @property
    def classic(self) -> bool:
        """True for an RFC 3489 message (no magic cookie)."""
        return self.cookie != MAGIC_COOKIE

    @property
    def full_transaction_id(self) -> bytes:
        """The 16 bytes after the length field: cookie and transaction ID."""
        return struct.pack("!I", self.cookie) + self.transaction_id

    def get(self, attr_type: int) -> bytes | None:
        """The value of the first attribute of this type, or None."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def get_all(self, attr_type: int) -> Iterator[bytes]:
        """Every value of this attribute type, in order."""
        return (v for t, v in self.attributes if t == attr_type)

    def address(self, attr_type: int) -> Address | None:
        """Decode an address attribute, XOR-MAPPED-ADDRESS included; None if absent."""
        value = self.get(attr_type)
        if value is None:
            return None
        name = _attr_name(attr_type)
        if attr_type == Attr.XOR_MAPPED_ADDRESS:
            return _decode_address(value, self.full_transaction_id, name)
        return _decode_address(value, None, name)

    @property
    def mapped_address(self) -> Address | None:
        """The reflexive address: XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS (RFC 8489 12)."""
        return self.address(Attr.XOR_MAPPED_ADDRESS) or self.address(Attr.MAPPED_ADDRESS)

    @property
    def other_address(self) -> Address | None:
        """OTHER-ADDRESS, else RFC 3489's CHANGED-ADDRESS."""
        return self.address(Attr.OTHER_ADDRESS) or self.address(Attr.CHANGED_ADDRESS)

    @property
    def change_request(self) -> ChangeRequest:
        """CHANGE-REQUEST flags (both false when absent)."""
        value = self.get(Attr.CHANGE_REQUEST)
        return ChangeRequest.decode(value) if value is not None else ChangeRequest()

    @property
    def response_port(self) -> int | None:
        """RESPONSE-PORT (RFC 5780 7.5), or None."""
        value = self.get(Attr.RESPONSE_PORT)
        if value is None:
            return None
        if len(value) != 4:
            raise StunError(f"RESPONSE-PORT must be 4 bytes, got {len(value)}")
        return int(struct.unpack("!H", value[:2])[0])

    @property
    def error_code(self) -> ErrorCode | None:
        """ERROR-CODE, or None."""
        value = self.get(Attr.ERROR_CODE)
        return ErrorCode.decode(value) if value is not None else None

    @property
    def software(self) -> str | None:
        """SOFTWARE as text, or None."""
        value = self.get(Attr.SOFTWARE)
        return value.decode("utf-8", "replace") if value is not None else None

    def unknown_required(self) -> list[int]:
        """Comprehension-required attribute types this codec does not know (RFC 8489 6.3.1)."""
        return [t for t, _ in self.attributes if is_comprehension_required(t) and t not in _KNOWN_ATTRS]

    # -- encoding ------------------------------------------------------------------------

    def serialize(
        self,
        *,
        key: bytes | None = None,
        sha256: bool = False,
        fingerprint: bool = False,
        pad: int = 0,
    ) -> bytes:
        """Encode the message.

        With ``key`` it appends MESSAGE-INTEGRITY (HMAC-SHA1) or, with ``sha256``,
        MESSAGE-INTEGRITY-SHA256; with ``fingerprint`` a FINGERPRINT last. ``pad`` is the
        byte value that pads attributes to 32 bits (RFC 8489 14: any value is allowed).
        """
        body = bytearray()
        pad_byte = bytes([pad])
        for attr_type, value in self.attributes:
            body += struct.pack("!HH", attr_type, len(value)) + value + pad_byte * _pad(len(value))
        head_type = _message_type(self.method, self.cls)
        tid = self.full_transaction_id
        if key is not None:
            mi_type, digest, mi_len = (
                (Attr.MESSAGE_INTEGRITY_SHA256, hashlib.sha256, 32)
                if sha256
                else (Attr.MESSAGE_INTEGRITY, hashlib.sha1, 20)
            )
            # RFC 8489 14.5: the length field covers the MESSAGE-INTEGRITY attribute itself.
            header = struct.pack("!HH", head_type, len(body) + 4 + mi_len) + tid
            mac = hmac.new(key, header + body, digest).digest()
            body += struct.pack("!HH", mi_type, mi_len) + mac
        if fingerprint:
            header = struct.pack("!HH", head_type, len(body) + 8) + tid
            crc = (binascii.crc32(header + body) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
            body += struct.pack("!HHI", Attr.FINGERPRINT, 4, crc)
        if len(body) > MAX_MESSAGE_LENGTH:
            raise StunError("message body longer than 65535 bytes")
        return struct.pack("!HH", head_type, len(body)) + tid + bytes(body)


def _attr_name(attr_type: int) -> str:
    try:
        return Attr(attr_type).name.replace("_", "-")
    except ValueError:
        return f"attribute {attr_type:#06x}"


def is_stun(data: bytes) -> bool:
    """A cheap test for demultiplexing: does this look like an RFC 8489 STUN message?

    Checks the two leading zero bits, the magic cookie and a length that matches.
    """
    return (
        len(data) >= HEADER_LENGTH
        and data[0] & 0xC0 == 0
        and data[4:8] == _COOKIE_BYTES
        and struct.unpack("!H", data[2:4])[0] + HEADER_LENGTH == len(data)
    )


def _walk(data: bytes) -> Iterator[tuple[int, int, int]]:
    """Yield (type, value offset, value length) for each attribute, checking bounds."""
    offset = HEADER_LENGTH
    end = len(data)
    while offset < end:
        if end - offset < 4:
            raise StunError(f"truncated attribute header at offset {offset}")
        attr_type, length = struct.unpack_from("!HH", data, offset)
        start = offset + 4
        if start + length > end:
            raise StunError(
                f"{_attr_name(attr_type)} at offset {offset} claims {length} bytes; only {end - start} remain"
            )
        yield attr_type, start, length
        offset = start + length + _pad(length)
    if offset != end:
        raise StunError("attribute padding runs past the end of the message")


def parse(data: bytes, *, classic: bool = True) -> Message:
    """Parse one STUN message; raise :class:`StunError` if it is malformed.

    A FINGERPRINT, when present, must be last and must check out. Attributes after
    MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored
    (RFC 8489 14.5). With ``classic`` (the default) RFC 3489 messages without the magic
    cookie are accepted too.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StunError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_LENGTH:
        raise StunError(f"{len(data)} bytes is shorter than a STUN header")
    message_type, length, cookie = struct.unpack_from("!HHI", data, 0)
    if message_type & 0xC000:
        raise StunError("the two most significant bits of a STUN message must be zero")
    if length % 4:
        raise StunError(f"message length {length} is not a multiple of 4")
    if length + HEADER_LENGTH != len(data):
        raise StunError(f"header says {length} bytes of attributes, datagram carries {len(data) - HEADER_LENGTH}")
    if cookie != MAGIC_COOKIE and not classic:
        raise StunError("no magic cookie (an RFC 3489 message)")
    method, cls = _split_type(message_type)
    attributes: list[tuple[int, bytes]] = []
    seen_integrity = False
    seen_fingerprint = False
    for attr_type, start, attr_len in _walk(data):
        if seen_fingerprint:
            raise StunError("attribute after FINGERPRINT")
        value = data[start : start + attr_len]
        if attr_type == Attr.FINGERPRINT:
            if attr_len != 4:
                raise StunError(f"FINGERPRINT must be 4 bytes, got {attr_len}")
            header = data[:2] + struct.pack("!H", start + 4 - HEADER_LENGTH) + data[4:20]
            expected = (binascii.crc32(header + data[HEADER_LENGTH : start - 4]) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
            if struct.unpack("!I", value)[0] != expected:
                raise StunError("FINGERPRINT does not match the message")
            seen_fingerprint = True
        elif attr_type in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256):
            # RFC 8489 14.6: MESSAGE-INTEGRITY-SHA256 may be truncated to 16..32 bytes (x4).
            bad = (
                attr_len != 20
                if attr_type == Attr.MESSAGE_INTEGRITY
                else not (16 <= attr_len <= 32 and attr_len % 4 == 0)
            )
            if bad:
                raise StunError(f"{_attr_name(attr_type)} has bad length {attr_len}")
            seen_integrity = True
        elif not seen_integrity:
            if attr_type in _ADDRESS_ATTRS or attr_type == Attr.XOR_MAPPED_ADDRESS:
                _decode_address(value, None, _attr_name(attr_type))  # shape check only
            attributes.append((attr_type, value))
    return Message(
        method=method,
        cls=Class(cls),
        transaction_id=data[8:20],
        attributes=tuple(attributes),
        cookie=cookie,
        fingerprint=seen_fingerprint,
        integrity=seen_integrity,
    )


def check_integrity(data: bytes, key: bytes) -> bool:
    """Verify MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY, with ``key``.

    Returns False when the message carries neither or the MAC is wrong; raises
    :class:`StunError` for malformed input. Constant-time comparison.
    """
    parse(data)  # structure and fingerprint first
    found: dict[int, tuple[int, int]] = {}
    for attr_type, start, attr_len in _walk(data):
        if attr_type in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256) and attr_type not in found:
            found[attr_type] = (start, attr_len)
    for attr_type, digest in ((Attr.MESSAGE_INTEGRITY_SHA256, hashlib.sha256), (Attr.MESSAGE_INTEGRITY, hashlib.sha1)):
        if attr_type not in found:
            continue
        start, attr_len = found[attr_type]
        header = data[:2] + struct.pack("!H", start + attr_len - HEADER_LENGTH) + data[4:20]
        mac = hmac.new(key, header + data[HEADER_LENGTH : start - 4], digest).digest()[:attr_len]
        return hmac.compare_digest(mac, data[start : start + attr_len])
    return False


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """The long-term credential key MD5(username ":" realm ":" password) (RFC 8489 9.2.2).

    The password must already be OpaqueString-prepared.
    """
    return hashlib.md5(f"{username}:{realm}:{password}".encode(), usedforsecurity=False).digest()
