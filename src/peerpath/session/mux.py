"""What the streams of a session carry, sans-I/O: byte streams to service ports, messages,
requests and their replies, pings.

Every application stream starts with a header frame (:mod:`peerpath.session.control`):
:class:`~control.OpenStream` or :class:`~control.Message` or :class:`~control.Ping` from the
side that opens it, :class:`~control.Accept` or :class:`~control.Reply` from the other. The
:class:`Mux` keeps each stream's state (:class:`Kind`), parses headers, gathers message
payloads up to the size limit, and tells its driver what happened as :data:`Output` values;
the driver owns readers, futures and handlers, and the QUIC connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from peerpath.session import control


class Kind(enum.Enum):
    """Where a stream is in its life."""

    #: The peer's new stream; its header is still arriving.
    HEADER = "header"
    #: Our ``open_stream()``, waiting for the peer's Accept.
    AWAIT_ACCEPT = "await-accept"
    #: Our request or ping, waiting for (the rest of) the peer's Reply.
    AWAIT_REPLY = "await-reply"
    #: A byte stream (ours or the peer's): data goes to its reader.
    OPEN = "open"
    #: The peer's request or one-way message: its payload is arriving.
    MESSAGE = "message"
    #: Refused, cancelled, reset by us, or too large: what still arrives is dropped.
    DISCARD = "discard"


@dataclass(eq=False, slots=True)
class _Stream:
    kind: Kind
    header: control.FrameReader | None = None
    payload: bytearray | None = None
    reply: control.Reply | None = None
    request: bool = False
    topic: str = ""


# -- what the driver is told ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenRequested:
    """The peer opens a byte stream to ``port``: the driver accepts (:meth:`Mux.refuse`
    otherwise) and answers with an Accept frame."""

    stream_id: int
    port: int


@dataclass(frozen=True, slots=True)
class Answered:
    """The peer answered our ``open_stream()``."""

    stream_id: int
    accept: control.Accept


@dataclass(frozen=True, slots=True)
class Bytes:
    """Data of a byte stream, in order (``end``: the peer finished sending). Data of a stream
    the driver refused or dropped may still come: the driver ignores it."""

    stream_id: int
    data: bytes
    end: bool


@dataclass(frozen=True, slots=True)
class MessageIn:
    """A complete message from the peer (``request``: it waits for a reply on the stream)."""

    stream_id: int
    payload: bytes
    request: bool
    topic: str


@dataclass(frozen=True, slots=True)
class ReplyIn:
    """The complete reply to our request or ping."""

    stream_id: int
    reply: control.Reply
    payload: bytes


@dataclass(frozen=True, slots=True)
class PingIn:
    """The peer pings: the driver replies on the stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A message or reply grew past the size limit: the driver stops the stream (and resets
    it, when it is the peer's) and fails whoever waits for it."""

    stream_id: int
    local: bool


Output = OpenRequested | Answered | Bytes | MessageIn | ReplyIn | PingIn | TooLarge


class Mux:
    """The application streams of one session.

    ``initiator``: which side of the session this is (it decides which stream IDs are ours,
    RFC 9000 2.1). ``max_message_size`` bounds a message's or reply's payload.
    """

    def __init__(self, *, initiator: bool, max_message_size: int) -> None:
        self._initiator = initiator
        self.max_message_size = max_message_size
        self._streams: dict[int, _Stream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def kind(self, stream_id: int) -> Kind | None:
        """The stream's state, or None for a stream not (or no longer) known."""
        stream = self._streams.get(stream_id)
        return stream.kind if stream is not None else None

    def is_local(self, stream_id: int) -> bool:
        """Whether we opened the stream (the low bit is 0 for the initiator's)."""
        return (stream_id & 0x1 == 0) == self._initiator

    # -- what the driver does -----------------------------------------------------------

    def expect(self, stream_id: int, kind: Kind) -> None:
        """We opened a stream and wait for the peer's Accept or Reply on it (a one-way
        message expects nothing and is not registered: what comes back is dropped)."""
        if kind not in (Kind.AWAIT_ACCEPT, Kind.AWAIT_REPLY):
            raise ValueError(f"a local stream cannot wait in state {kind}")
        payload = bytearray() if kind is Kind.AWAIT_REPLY else None
        self._streams[stream_id] = _Stream(kind, header=control.FrameReader(), payload=payload)

    def forget(self, stream_id: int) -> None:
        """We gave up on a stream of ours (a timeout): what still arrives on it is dropped."""
        self._streams.pop(stream_id, None)

    def refuse(self, stream_id: int) -> None:
        """The driver refused the peer's stream (or reset it): drop what still arrives. It
        stays known until the peer ends or resets it, so late data is never taken for a new
        stream's header."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if self.is_local(stream_id):
            del self._streams[stream_id]
        else:
            stream.kind, stream.header, stream.payload = Kind.DISCARD, None, None

    def clear(self) -> None:
        """The session is over."""
        self._streams.clear()

    # -- what the peer sends ------------------------------------------------------------

    def on_data(self, stream_id: int, data: bytes, end: bool) -> list[Output]:
        """Stream data from the peer, in order. Raises :class:`~control.ControlError` on a
        malformed or misplaced header (the driver closes the session)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            if self.is_local(stream_id):
                return []  # a stream of ours we forgot: ignore what still arrives
            stream = self._streams[stream_id] = _Stream(Kind.HEADER, header=control.FrameReader())
        out: list[Output] = []
        if stream.header is not None:
            frame = stream.header.feed_header(data)
            if frame is None:
                if end:
                    raise control.ControlError("stream ended before its header")
                return out
            data = stream.header.take_rest()
            stream.header = None
            self._on_header(stream_id, stream, frame, out)
        self._on_payload(stream_id, stream, data, end, out)
        return out

    def on_reset(self, stream_id: int) -> None:
        """The peer reset the stream: it is gone (the driver fails its reader or waiter)."""
        self._streams.pop(stream_id, None)

    def _on_header(self, stream_id: int, stream: _Stream, frame: control.Frame, out: list[Output]) -> None:
        if stream.kind is Kind.AWAIT_ACCEPT and isinstance(frame, control.Accept):
            stream.kind = Kind.OPEN
            out.append(Answered(stream_id, frame))
        elif stream.kind is Kind.AWAIT_REPLY and isinstance(frame, control.Reply):
            stream.reply = frame
        elif stream.kind is not Kind.HEADER:
            raise control.ControlError(f"unexpected {type(frame).__name__} on stream {stream_id}")
        elif isinstance(frame, control.OpenStream):
            stream.kind = Kind.OPEN
            out.append(OpenRequested(stream_id, frame.port))
        elif isinstance(frame, control.Message):
            stream.kind, stream.payload = Kind.MESSAGE, bytearray()
            stream.request, stream.topic = frame.request, frame.topic
        elif isinstance(frame, control.Ping):
            stream.kind = Kind.DISCARD  # nothing more is read from it
            out.append(PingIn(stream_id))
        else:
            raise control.ControlError(f"unexpected {type(frame).__name__} opening stream {stream_id}")

    def _on_payload(self, stream_id: int, stream: _Stream, data: bytes, end: bool, out: list[Output]) -> None:
        if stream.kind is Kind.OPEN:
            if data or end:
                out.append(Bytes(stream_id, data, end))
            if end:
                del self._streams[stream_id]
            return
        if stream.payload is None:  # discarded: drop what still arrives
            if end:
                del self._streams[stream_id]
            return
        stream.payload += data
        if len(stream.payload) > self.max_message_size:
            stream.kind, stream.payload = Kind.DISCARD, None
            out.append(TooLarge(stream_id, self.is_local(stream_id)))
            return
        if not end:
            return
        del self._streams[stream_id]
        payload = bytes(stream.payload)
        if stream.kind is Kind.AWAIT_REPLY:
            if stream.reply is None:
                raise control.ControlError("reply without a header")
            out.append(ReplyIn(stream_id, stream.reply, payload))
        else:
            out.append(MessageIn(stream_id, payload, stream.request, stream.topic))
