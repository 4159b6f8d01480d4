"""Messages with an inbox: ``send`` puts a message in the outbox, a courier per peer delivers
it, and it lands exactly once in the peer's inbox, acknowledged back to the sender.

Delivery goes directly, over a stream to the peer's messages port, whenever a session can
be had. While the peer is offline, each message is also posted to the rendezvous server's
mailbox sealed to the peer's key (:mod:`peerpath.seal`), so the server keeps what it cannot
read, and the peer finds it when it comes online and sends a receipt back. Both ends keep
their state in SQLite (:mod:`peerpath.services.mailstore`), so nothing is lost to a restart,
and ids make every resend harmless.

On the messages port each side first says who it is (its public key, for sealing), then the
opener sends items (a message, or a receipt) and the host answers each: stored, or refused
(and whether to try again later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from peerpath import errors
from peerpath.identity import Address
from peerpath.node import control
from peerpath.node.node import Node
from peerpath.rendezvous.letters import LetterError, check_letter, make_letter
from peerpath.seal import OVERHEAD, SealError, open_sealed, seal
from peerpath.services import ports
from peerpath.services.frames import FrameCodec, FrameError, check_data, encode
from peerpath.services.mailstore import Kind, MailStore, Message, Outgoing, Refusal, State
from peerpath.services.names import Names
from peerpath.session.streams import StreamWriter
from peerpath.storage import StorageError
from peerpath.tasks import cancel_all, spawn
from peerpath.wire import rendezvous as rv

log = logging.getLogger(__name__)

#: Largest message (its content, msgpack-encoded). Larger things are files.
MAX_MESSAGE = 1024 * 1024
#: Largest frame on the messages port: a message and its envelope.
MAX_FRAME = MAX_MESSAGE + 1024
#: Items an opener may send before it waits for the answers.
WINDOW = 32
#: Seconds a courier waits for a session, a stream, or an answer.
DELIVERY_TIMEOUT = 15.0
#: Seconds a host waits for the opener's first frame, and between frames.
HELLO_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
#: A courier's pause after a failed delivery: doubling from the first to the last.
RETRY = (1.0, 30.0)
#: Seconds between the outbox's prunings of old delivered messages.
PRUNE_EVERY = 3600.0
_LETTER_KIND = "sealed"
_SEAL_CONTEXT = b"peerpath-message-v1\x00"

_Id = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
_Key = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
_Time = Annotated[float, msgspec.Meta(ge=0, le=1e11)]


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """Each side's first frame: its public key (the other checks it matches the session)."""

    key: _Key


class Item(msgspec.Struct, tag="item", frozen=True):
    """A message for the inbox, or a receipt for one (``id`` is then the message's)."""

    id: _Id
    kind: Literal["message", "receipt"]
    created: _Time
    body: Annotated[bytes, msgspec.Meta(max_length=MAX_MESSAGE)] = b""


class Stored(msgspec.Struct, tag="stored", frozen=True):
    """The host's answer: the item is stored (or was already)."""

    id: _Id


class Refused(msgspec.Struct, tag="refused", frozen=True):
    """The host's answer: the item is not taken, and why; with ``retry``, try it later."""

    id: _Id
    reason: Annotated[str, msgspec.Meta(max_length=512)]
    retry: bool


Frame = Hello | Item | Stored | Refused
codec: FrameCodec[Frame] = FrameCodec(Frame, MAX_FRAME)
_item_decoder = msgspec.msgpack.Decoder(Item)
_encoder = msgspec.msgpack.Encoder()


class DeliveryError(errors.RemoteError):
    """A message the peer refused for good (the reason says why)."""


class _Later(Exception):
    """The peer is there but asks us to try later (its inbox or its disk is full)."""


class Messages:
    """The messages service of one node: its outbox, its inbox, and the couriers between."""

    def __init__(self, node: Node, path: Path | str, names: Names | None = None) -> None:
        self.node = node
        self.path = path
        self.names = names or Names(node.trust)
        self.store: MailStore | None = None
        self._couriers: dict[Address, asyncio.Task[None]] = {}
        self._wake: dict[Address, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._arrivals: set[asyncio.Future[None]] = set()
        self._finished: dict[bytes, list[asyncio.Future[Outgoing]]] = {}
        self.counters = {
            "delivered": 0,
            "received": 0,
            "duplicates": 0,
            "refused": 0,
            "posted": 0,
            "letters_dropped": 0,
            "streams_failed": 0,
        }

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, serve the messages port, take sealed letters, and resume every
        courier with something to deliver."""
        self.store = MailStore(self.path)
        self.node.serve(ports.MESSAGES, self._serve)
        self.node.on_letter(_LETTER_KIND, self._letter)
        for peer in {item.peer for item in self.store.pending()}:
            self._dispatch(peer)
        spawn(self._upkeep(), "pruning the message store", self._tasks)

    async def close(self) -> None:
        """Stop the couriers and close the database."""
        self.node.unserve(ports.MESSAGES)
        self.node.on_letter(_LETTER_KIND, None)
        for waiting in self._arrivals:  # followers of the inbox end with the service
            if not waiting.done():
                waiting.set_exception(errors.LocalError("the node closed"))
        self._arrivals.clear()
        await cancel_all([*self._couriers.values(), *self._tasks])
        if self.store is not None:
            self.store.close()
            self.store = None

    def _db(self) -> MailStore:
        if self.store is None:
            raise errors.LocalError("the messages service is not running (start the node first)")
        return self.store

    def _event(self, kind: str, details: dict[str, Any]) -> None:
        self.node.events.emit(kind, **details)

    # -- sending --------------------------------------------------------------------------

    async def send(self, peer: Address | str, data: Any, *, wait: bool = False, timeout: float = 60.0) -> str:
        """Send ``data`` (anything msgpack can carry: str, bytes, numbers, lists, dicts) to
        ``peer``'s inbox; return the message id. It is in the outbox (on disk) when this
        returns, and delivered as soon as the peer can be reached; with ``wait``, return
        once the peer has stored it (or raise :class:`DeliveryError` if it refused it, or
        TimeoutError after ``timeout`` seconds, the message still in the outbox). ``peer`` is
        an address or the name of a trusted peer."""
        address = await self.names.resolve(peer)
        if address == self.node.address:
            raise errors.LocalError("cannot send a message to this node itself")
        if not self.node.is_trusted(address):
            raise errors.NotTrustedError(f"{address} is not trusted; run: peerpath trust add {address}")
        try:
            body = _encoder.encode(data)
        except (TypeError, ValueError) as exc:
            raise errors.LocalError(f"cannot send this data: {exc}") from None
        if len(body) > MAX_MESSAGE:
            raise errors.LocalError(
                f"message of {len(body)} bytes exceeds the limit of {MAX_MESSAGE}; send a file instead"
            )
        message_id = os.urandom(16)
        finished = self._watch(message_id) if wait else None
        self._db().queue(address, Kind.MESSAGE, message_id, time.time(), body)
        self._dispatch(address)
        if finished is not None:
            await self._wait(message_id, finished, timeout)
        return message_id.hex()

    def _watch(self, item_id: bytes) -> asyncio.Future[Outgoing]:
        future: asyncio.Future[Outgoing] = asyncio.get_running_loop().create_future()
        self._finished.setdefault(item_id, []).append(future)
        return future

    async def _wait(self, item_id: bytes, future: asyncio.Future[Outgoing], timeout: float) -> Outgoing:
        try:
            outcome = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"message {item_id.hex()} not delivered within {timeout:g} s; it stays in the outbox"
            ) from None
        finally:
            waiting = self._finished.get(item_id, [])
            with contextlib.suppress(ValueError):
                waiting.remove(future)
            if not waiting:
                self._finished.pop(item_id, None)
        if outcome.state is State.FAILED:
            raise DeliveryError(f"{outcome.peer} refused message {outcome.id}: {outcome.error}")
        return outcome

    async def wait_delivered(self, message_id: str, timeout: float = 60.0) -> Outgoing:
        """Wait until the message ``message_id`` (from :meth:`send`) is delivered; raise
        DeliveryError if it failed, TimeoutError if it is still on its way after ``timeout``."""
        try:
            item_id = bytes.fromhex(message_id)
        except ValueError:
            raise errors.LocalError(f"not a message id: {message_id!r}") from None
        future = self._watch(item_id)
        item = self._db().outgoing(Kind.MESSAGE, item_id)
        if item is None:
            self._finished.pop(item_id, None)
            raise errors.LocalError(f"no message {message_id} in the outbox")
        if item.state is not State.QUEUED and not future.done():
            future.set_result(item)
        return await self._wait(item_id, future, timeout)

    def outbox(self, limit: int = 1000) -> list[Outgoing]:
        """Messages sent, newest first: undelivered, delivered and failed."""
        return self._db().outbox(limit)

    def _finish(self, item: Outgoing, state: State, error: str = "") -> None:
        kind, item_id = item.kind, bytes.fromhex(item.id)
        if not self._db().finish(kind, item_id, state, error):
            return
        if kind is Kind.MESSAGE:
            self.counters["delivered" if state is State.DELIVERED else "refused"] += 1
            self._event(
                "message-delivered" if state is State.DELIVERED else "message-failed",
                {"id": item.id, "to": str(item.peer), **({"error": error} if error else {})},
            )
        done = self._db().outgoing(kind, item_id)
        for future in self._finished.pop(item_id, []) if kind is Kind.MESSAGE else []:
            if not future.done() and done is not None:
                future.set_result(done)

    # -- couriers ---------------------------------------------------------------------------

    def _dispatch(self, peer: Address) -> None:
        """Make sure a courier is on its way to ``peer`` (and wake it if it waits)."""
        wake = self._wake.setdefault(peer, asyncio.Event())
        wake.set()
        if peer not in self._couriers:
            task = spawn(self._courier(peer), f"delivering messages to {peer}")
            self._couriers[peer] = task
            task.add_done_callback(lambda done: self._couriers.pop(peer) if self._couriers.get(peer) is done else None)

    async def _courier(self, peer: Address) -> None:
        """Deliver everything queued for ``peer``: directly when possible, through the
        mailbox (sealed) while it is not; retrying with backoff until done."""
        pause = RETRY[0]
        wake = self._wake.setdefault(peer, asyncio.Event())
        while True:
            wake.clear()
            items = self._db().pending(peer, limit=WINDOW * 4)
            if not items:
                # Out of the table now, not when the done-callback runs: a send() in between
                # must start a new courier rather than count on this one.
                self._wake.pop(peer, None)
                if self._couriers.get(peer) is asyncio.current_task():
                    del self._couriers[peer]
                return
            try:
                await self._deliver(peer, items)
                pause = RETRY[0]
                continue
            except errors.NotTrustedError as exc:
                for item in items:
                    self._finish(item, State.FAILED, str(exc))
                continue
            except _Later as exc:
                log.info("%s asks to deliver later: %s", peer, exc)
                self._db().attempted([item.seq for item in items], error=str(exc))
            except (errors.PeerpathError, OSError, TimeoutError) as exc:
                log.info("cannot deliver to %s now (%s: %s)", peer, type(exc).__name__, exc)
                waiting = self._db().pending(peer, limit=WINDOW * 4)
                self._db().attempted([item.seq for item in waiting], error=str(exc) or type(exc).__name__)
                await self._post_sealed(peer, [item for item in waiting if not item.posted])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), pause)
            pause = min(pause * 2, RETRY[1])

    async def _deliver(self, peer: Address, items: list[Outgoing]) -> None:
        """Hand ``items`` to ``peer`` over one stream, a window at a time."""
        connection = await self.node.connect(peer, timeout=DELIVERY_TIMEOUT)
        reader, writer = await connection.open_stream(ports.MESSAGES, timeout=DELIVERY_TIMEOUT)
        try:
            writer.write(encode(Hello(self.node.identity.public_key)))
            hello = await codec.read(reader, DELIVERY_TIMEOUT)
            if not isinstance(hello, Hello) or not peer.matches(hello.key):
                raise FrameError(f"{peer} did not say who it is on its messages port")
            self._db().learn_key(peer, hello.key)
            for start in range(0, len(items), WINDOW):
                window = {bytes.fromhex(item.id): item for item in items[start : start + WINDOW]}
                for item in window.values():
                    writer.write(encode(Item(bytes.fromhex(item.id), item.kind.value, item.created, item.body)))
                await writer.drain()
                while window:
                    answer = await codec.read(reader, DELIVERY_TIMEOUT)
                    if answer is None:
                        raise errors.SessionClosedError(f"{peer} closed its messages stream")
                    if not isinstance(answer, Stored | Refused) or answer.id not in window:
                        raise FrameError(f"{peer} answered an item it was not sent")
                    item = window.pop(answer.id)
                    if isinstance(answer, Stored):
                        self._finish(item, State.DELIVERED)
                    elif answer.retry:
                        raise _Later(answer.reason)
                    else:
                        self._finish(item, State.FAILED, answer.reason)
            writer.write_eof()
        except BaseException:
            writer.abort()
            raise

    async def _post_sealed(self, peer: Address, items: list[Outgoing]) -> None:
        """Post ``items`` to the rendezvous mailbox, sealed to ``peer``'s key, if we know it
        and they fit in a letter (the rest wait for a direct delivery)."""
        client = self.node.rendezvous
        key = self._db().key_of(peer)
        if client is None or key is None or not items:
            return
        for item in items:
            inner = _encoder.encode(Item(bytes.fromhex(item.id), item.kind.value, item.created, item.body))
            if len(inner) + OVERHEAD > rv.MAX_SEALED:
                continue
            box = seal(key, inner, _SEAL_CONTEXT + self.node.identity.public_key)
            try:
                await client.post(make_letter(self.node.identity, _LETTER_KIND, peer, sealed=box))
            except errors.PeerpathError as exc:
                log.info("the mailbox did not take a message for %s: %s", peer, exc)
                return
            self._db().attempted([item.seq], posted=True)
            self.counters["posted"] += 1

    # -- receiving --------------------------------------------------------------------------

    def _accept(self, sender: Address, item: Item, via: str) -> Stored | Refused:
        """Take one item from ``sender``: a message into the inbox, a receipt into the outbox."""
        store = self._db()
        if item.kind == "receipt":
            outgoing = store.outgoing(Kind.MESSAGE, item.id)
            if outgoing is not None and outgoing.peer == sender:
                self._finish(outgoing, State.DELIVERED)
            return Stored(item.id)
        try:
            check_data(item.body)
        except FrameError as exc:
            return Refused(item.id, f"the message's {exc}", retry=False)
        try:
            fresh = store.receive(sender, item.id, item.created, item.body, via)
        except Refusal as refusal:
            return Refused(item.id, str(refusal), refusal.retry)
        if not fresh:
            self.counters["duplicates"] += 1
            return Stored(item.id)
        self.counters["received"] += 1
        self._event("message", {"id": item.id.hex(), "from": str(sender), "via": via, "bytes": len(item.body)})
        self._wake_followers()
        return Stored(item.id)

    async def _serve(self, reader: asyncio.StreamReader, writer: StreamWriter) -> None:
        """A peer's stream to the messages port: its items, each answered."""
        peer: Address = writer.get_extra_info("peer_address")
        try:
            hello = await codec.read(reader, HELLO_TIMEOUT)
            if not isinstance(hello, Hello) or not peer.matches(hello.key):
                raise FrameError("the first frame on the messages port is a hello with the sender's key")
            self._db().learn_key(peer, hello.key)
            writer.write(encode(Hello(self.node.identity.public_key)))
            self._dispatch_if_waiting(peer)
            while (frame := await codec.read(reader, IDLE_TIMEOUT)) is not None:
                if not isinstance(frame, Item):
                    raise FrameError(f"unexpected {type(frame).__name__} on the messages port")
                writer.write(encode(self._accept(peer, frame, "direct")))
                await writer.drain()
            writer.write_eof()
        except (FrameError, TimeoutError, StorageError) as exc:
            self.counters["streams_failed"] += 1
            log.info("closed a messages stream from %s: %s", peer, exc)
            writer.abort()
        except (errors.PeerpathError, ConnectionError):
            self.counters["streams_failed"] += 1

    def _dispatch_if_waiting(self, peer: Address) -> None:
        """``peer`` is online: hurry its courier, if one waits to retry."""
        if peer in self._couriers:
            self._wake.setdefault(peer, asyncio.Event()).set()

    def _letter(self, letter: rv.Letter) -> None:
        """A sealed letter from the mailbox: a message (or receipt) from a peer who found us
        offline. Anything wrong with it drops it; a full disk leaves it in the mailbox."""
        try:
            sender, recipient = check_letter(letter)
            if recipient != self.node.address:
                raise LetterError("addressed to someone else")
            if not self.node.is_trusted(sender):
                raise LetterError(f"from {sender}, who is not trusted")
            item = _item_decoder.decode(
                open_sealed(self.node.identity, letter.sealed, _SEAL_CONTEXT + letter.sender_key)
            )
        except (LetterError, SealError, msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            self.counters["letters_dropped"] += 1
            log.info("dropped a sealed letter: %s", exc)
            return
        self._db().learn_key(sender, letter.sender_key)
        answer = self._accept(sender, item, "mailbox")
        if isinstance(answer, Refused):
            if answer.retry:
                raise StorageError(answer.reason)  # not acknowledged: the server delivers it again later
            return
        if item.kind == "message":
            self._db().queue(sender, Kind.RECEIPT, item.id, time.time(), b"")
            self._dispatch(sender)

    def note_file(self, sender: Address, transfer_id: bytes, note: bytes) -> None:
        """List a file ``sender`` sent in the inbox (``note`` says what and where; via "file")."""
        try:
            fresh = self._db().receive(sender, transfer_id, time.time(), note, "file")
        except Refusal as refusal:
            raise StorageError(str(refusal)) from None
        if fresh:
            self._wake_followers()

    def _wake_followers(self) -> None:
        for waiting in self._arrivals:
            if not waiting.done():
                waiting.set_result(None)
        self._arrivals.clear()

    # -- the inbox --------------------------------------------------------------------------

    def messages(self, *, acked: bool = False, limit: int = 1000) -> list[Message]:
        """Messages in the inbox, oldest first (acknowledged ones too if ``acked``)."""
        return self._db().messages(acked=acked, limit=limit)

    async def inbox(self, *, follow: bool = True, after: int = 0) -> AsyncIterator[Message]:
        """Unacknowledged messages, oldest first; with ``follow``, then every new one as it
        arrives (until the caller stops iterating)."""
        while True:
            batch = self._db().messages(after=after, limit=100)
            for message in batch:
                after = message.seq
                yield message
            if batch:
                continue
            if not follow:
                return
            arrival: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._arrivals.add(arrival)
            try:
                await arrival
            finally:
                self._arrivals.discard(arrival)

    def find(self, message_id: str) -> Message:
        """The inbox message with this id (or a unique prefix of it, 6 hex digits at least)."""
        try:
            return self._db().find(message_id)
        except LookupError as exc:
            raise errors.LocalError(str(exc)) from None

    def ack(self, message: Message | str) -> Message:
        """Acknowledge a message: it is handled, and leaves the inbox's listing."""
        found = self.find(message) if isinstance(message, str) else message
        self._db().ack(found.seq)
        return found

    def describe(self) -> dict[str, Any]:
        """For status: counts and counters."""
        counts = self.store.counts() if self.store is not None else {}
        return {**counts, **self.counters, "couriers": len(self._couriers)}

    async def _upkeep(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY)
            try:
                self._db().prune()
            except StorageError as exc:
                log.warning("could not prune the message store: %s", exc)


# -- the control API (``peerpath send``, ``peerpath inbox``) -----------------------------------

_Text = Annotated[str, msgspec.Meta(max_length=256)]


class SendOp(control.Op, tag="send", frozen=True):
    """Send a message: ``data`` is any JSON value. With ``wait``, answer once delivered."""

    peer: _Text
    data: Any
    wait: bool = False
    timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0


class InboxOp(control.Op, tag="inbox", frozen=True):
    """List the inbox (acknowledged messages too with ``all``); with ``follow``, then stream new ones."""

    follow: bool = False
    all: bool = False
    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000


class AckOp(control.Op, tag="inbox-ack", frozen=True):
    """Acknowledge an inbox message by its id (or a unique prefix of it)."""

    id: _Text


class OutboxOp(control.Op, tag="outbox", frozen=True):
    """List sent messages, newest first, with where each is."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100


class MessagesControl:
    """The messages service's ops on the daemon's control socket."""

    def __init__(self, messages: Messages) -> None:
        self.messages = messages

    def control_ops(self) -> dict[type[control.Op], control.OpHandler]:
        """The ops, each with its handler."""
        return {SendOp: self._send, InboxOp: self._inbox, AckOp: self._ack, OutboxOp: self._outbox}

    def describe(self) -> dict[str, Any]:
        """What status shows."""
        return self.messages.describe()

    async def _send(self, op: SendOp) -> AsyncGenerator[dict[str, Any], None]:
        peer = await self.messages.names.resolve(op.peer)
        message_id = await self.messages.send(peer, op.data, wait=op.wait, timeout=op.timeout)
        yield {"id": message_id, "to": str(peer), "state": "delivered" if op.wait else "queued"}

    async def _inbox(self, op: InboxOp) -> AsyncGenerator[dict[str, Any], None]:
        listed = self.messages.messages(acked=op.all, limit=op.limit)
        for message in listed:
            yield message.describe()
        if op.follow:
            after = listed[-1].seq if listed else 0
            async for message in self.messages.inbox(after=after):
                yield message.describe()

    async def _ack(self, op: AckOp) -> AsyncGenerator[dict[str, Any], None]:
        yield self.messages.ack(op.id).describe()

    async def _outbox(self, op: OutboxOp) -> AsyncGenerator[dict[str, Any], None]:
        for item in self.messages.outbox(op.limit):
            yield item.describe()
