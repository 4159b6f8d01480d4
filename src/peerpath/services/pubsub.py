"""Publish/subscribe: a node hosts topics, peers subscribe to patterns of them, and the host fans
every event out to the subscribers whose patterns match.

Topics are dot-separated tokens (``sensors.kitchen.temp``). A pattern may use ``*`` for one
token and ``>`` (last) for one or more (``sensors.*.temp``, ``jobs.>``), as NATS does. Who may
publish and who may subscribe is decided per topic by the host's rules (``pubsub.json`` in its
state directory; by default every trusted peer may do both). Delivery is at most once and
live: a subscriber that is slow has its own bounded queue, and what does not fit is dropped
and counted (and the count is sent along), so no subscriber slows the others.

On the pubsub port a peer opens a stream and sends ``Subscribe`` (and then only reads
``Event`` frames) or ``Publish`` frames (each answered ``Published`` or ``Refused``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec

from peerpath import errors
from peerpath.identity import Address
from peerpath.node import control
from peerpath.node.node import Node
from peerpath.services import ports
from peerpath.services.frames import FrameCodec, FrameError, check_data, encode
from peerpath.services.names import Names
from peerpath.session.streams import StreamWriter
from peerpath.tasks import cancel_all, spawn

log = logging.getLogger(__name__)

#: Largest event (its data, msgpack-encoded).
MAX_EVENT = 256 * 1024
MAX_FRAME = MAX_EVENT + 1024
#: Longest topic or pattern, and most tokens in one.
MAX_TOPIC = 200
MAX_TOKENS = 16
#: Patterns one subscription may hold; subscriptions one peer may have open; all of them on a host.
MAX_PATTERNS = 16
MAX_SUBSCRIPTIONS_PER_PEER = 64
MAX_SUBSCRIPTIONS = 4096
#: Events queued for one subscriber before the newest are dropped, and their bytes; and the
#: bytes queued for all subscribers of a host together.
QUEUE = 1024
QUEUE_BYTES = 4 * 1024 * 1024
HOST_QUEUE_BYTES = 256 * 1024 * 1024
#: Seconds a host waits for a stream's first frame; a subscriber's pause between reconnections.
HELLO_TIMEOUT = 10.0
RETRY = (0.5, 15.0)
CONNECT_TIMEOUT = 15.0
#: The wildcards of patterns: one part, and (last) the rest.
ONE, REST = "*", ">"
_TOKEN = re.compile(r"^[a-z0-9_-]{1,64}$")
RULES_FILE = "pubsub.json"

_Topic = Annotated[str, msgspec.Meta(max_length=MAX_TOPIC)]


class TopicError(errors.LocalError, ValueError):
    """A topic or pattern that is not well formed; the message says why."""


def check_topic(topic: str, *, pattern: bool = False) -> str:
    """``topic`` if it is a valid topic (or, with ``pattern``, a valid pattern); TopicError otherwise."""
    what = "pattern" if pattern else "topic"
    if not topic or len(topic) > MAX_TOPIC:
        raise TopicError(f"a {what} is 1 to {MAX_TOPIC} characters")
    tokens = topic.split(".")
    if len(tokens) > MAX_TOKENS:
        raise TopicError(f"a {what} has at most {MAX_TOKENS} dot-separated parts")
    for i, part in enumerate(tokens):
        if pattern and (part == ONE or (part == REST and i == len(tokens) - 1)):
            continue
        if not _TOKEN.match(part):
            wild = "; '*' stands for one part, '>' (last) for the rest" if pattern else " (no wildcards)"
            raise TopicError(f"bad {what} {topic!r}: parts are lower-case letters, digits, '_' and '-'{wild}")
    return topic


def matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` is one of the topics ``pattern`` stands for."""
    wanted, tokens = pattern.split("."), topic.split(".")
    for i, part in enumerate(wanted):
        if part == ">":
            return len(tokens) > i
        if i >= len(tokens) or (part != "*" and part != tokens[i]):
            return False
    return len(tokens) == len(wanted)


# -- the rules: who may publish and subscribe --------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Who may publish and subscribe to the topics ``pattern`` matches: ``None`` is every trusted
    peer, a set is those addresses alone (empty: nobody but the host)."""

    pattern: str
    publishers: frozenset[Address] | None = None
    subscribers: frozenset[Address] | None = None

    def describe(self) -> dict[str, Any]:
        """As stored in pubsub.json."""

        def who(group: frozenset[Address] | None) -> str | list[str]:
            return "trusted" if group is None else sorted(str(a) for a in group)

        return {"pattern": self.pattern, "publishers": who(self.publishers), "subscribers": who(self.subscribers)}


class Rules:
    """The host's rules, first match wins, read from ``pubsub.json`` again when it changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._rules: list[Rule] = []
        self._stamp: tuple[int, int] | None = None
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._rules, self._stamp = [], None
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            document = json.loads(self.path.read_text())
            self._rules = [_rule(item) for item in document.get("rules", [])]
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.error("ignoring %s, which is unreadable (%s): only trusted peers' defaults apply", self.path, exc)
            self._rules = []
        self._stamp = stamp

    @property
    def rules(self) -> list[Rule]:
        """The rules, in order."""
        self._load()
        return list(self._rules)

    def rule_for(self, topic: str) -> Rule:
        """The first rule whose pattern matches ``topic`` (or the default: trusted peers)."""
        for rule in self.rules:
            if matches(rule.pattern, topic) or rule.pattern == topic:
                return rule
        return Rule(">")

    def may_publish(self, peer: Address, topic: str) -> bool:
        """Whether ``peer`` may publish to ``topic``."""
        publishers = self.rule_for(topic).publishers
        return publishers is None or peer in publishers

    def may_subscribe(self, peer: Address, pattern: str) -> bool:
        """Whether ``peer`` may subscribe to ``pattern``: to every topic it could match, so the
        rules of patterns that overlap it are checked too."""
        for rule in [*self.rules, Rule(">")]:
            if _overlap(rule.pattern, pattern) and rule.subscribers is not None and peer not in rule.subscribers:
                return False
        return True

    def set(self, rule: Rule) -> None:
        """Add (or replace) the rule for ``rule.pattern``, and save."""
        if self.path is None:
            raise errors.LocalError("these rules are not kept in a file")
        rules = [r for r in self.rules if r.pattern != rule.pattern] + [rule]
        rules.sort(key=lambda r: (r.pattern.count(">") + r.pattern.count("*"), -len(r.pattern)))
        text = json.dumps({"version": 1, "rules": [r.describe() for r in rules]}, indent=2) + "\n"
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)
        tmp.replace(self.path)
        self._stamp = None


def _rule(item: dict[str, Any]) -> Rule:
    def who(value: Any) -> frozenset[Address] | None:
        if value == "trusted":
            return None
        if value == "host":
            return frozenset()
        if not isinstance(value, list):
            raise ValueError(f"expected 'trusted', 'host' or a list of addresses, not {value!r}")
        return frozenset(Address.parse(str(a)) for a in value)

    return Rule(
        check_topic(str(item["pattern"]), pattern=True),
        who(item.get("publishers", "trusted")),
        who(item.get("subscribers", "trusted")),
    )


def _overlap(a: str, b: str) -> bool:
    """Whether some topic matches both patterns."""
    x, y = a.split("."), b.split(".")
    for i in range(max(len(x), len(y))):
        if i < len(x) and x[i] == ">":
            return len(y) > i
        if i < len(y) and y[i] == ">":
            return len(x) > i
        if i >= len(x) or i >= len(y):
            return False
        if x[i] != y[i] and "*" not in (x[i], y[i]):
            return False
    return True


# -- the wire ---------------------------------------------------------------------------------


class Subscribe(msgspec.Struct, tag="subscribe", frozen=True):
    """Send me the events of topics these patterns match."""

    patterns: Annotated[list[_Topic], msgspec.Meta(min_length=1, max_length=MAX_PATTERNS)]


class Subscribed(msgspec.Struct, tag="subscribed", frozen=True):
    """The subscription stands; events follow."""

    patterns: Annotated[list[_Topic], msgspec.Meta(max_length=MAX_PATTERNS)]


class Publish(msgspec.Struct, tag="publish", frozen=True):
    """Publish ``data`` (msgpack) to ``topic``."""

    topic: _Topic
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_EVENT)]


class Published(msgspec.Struct, tag="published", frozen=True):
    """The event went to ``subscribers`` subscribers' queues."""

    subscribers: Annotated[int, msgspec.Meta(ge=0)]


class Refused(msgspec.Struct, tag="refused", frozen=True):
    """The request is refused, and why; with ``retry``, for now only (the host is full)."""

    reason: Annotated[str, msgspec.Meta(max_length=512)]
    retry: bool = False


class EventFrame(msgspec.Struct, tag="event", frozen=True):
    """One event: its topic, data, publisher, when, and how many of this subscriber's were dropped so far."""

    topic: _Topic
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_EVENT)]
    publisher: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    published: Annotated[float, msgspec.Meta(ge=0, le=1e11)]
    seq: Annotated[int, msgspec.Meta(ge=0)]
    dropped: Annotated[int, msgspec.Meta(ge=0)] = 0


Frame = Subscribe | Subscribed | Publish | Published | Refused | EventFrame
codec: FrameCodec[Frame] = FrameCodec(Frame, MAX_FRAME)
_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True)
class Event:
    """An event as a subscriber gets it."""

    host: Address
    topic: str
    data: Any
    publisher: Address
    published: float
    seq: int
    #: Events of this subscription dropped so far because the subscriber was slow.
    dropped: int = 0

    def describe(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "host": str(self.host),
            "topic": self.topic,
            "data": msgspec.to_builtins(self.data),
            "publisher": str(self.publisher),
            "published": self.published,
            "seq": self.seq,
            "dropped": self.dropped,
        }


@dataclass(eq=False)
class _Subscriber:
    peer: Address
    patterns: list[str]
    queue: asyncio.Queue[EventFrame] = field(default_factory=lambda: asyncio.Queue(QUEUE))
    queued_bytes: int = 0
    dropped: int = 0
    delivered: int = 0


class PubSub:
    """The pub/sub service of one node: the topics it hosts, and its subscriptions to others'."""

    def __init__(self, node: Node, rules_path: Path | None = None, names: Names | None = None) -> None:
        self.node = node
        self.names = names or Names(node.trust)
        self.rules = Rules(rules_path)
        self._subscribers: set[_Subscriber] = set()
        self._queued_bytes = 0
        self._seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters = {
            "published": 0,
            "delivered": 0,
            "dropped": 0,
            "refused": 0,
            "streams_failed": 0,
            "undecodable": 0,
        }

    async def start(self) -> None:
        """Serve the pubsub port."""
        self.node.serve(ports.PUBSUB, self._serve)

    async def close(self) -> None:
        """Stop serving; end the subscriptions."""
        self.node.unserve(ports.PUBSUB)
        await cancel_all(self._tasks)

    # -- hosting ----------------------------------------------------------------------------------

    def publish_local(self, topic: str, data: Any) -> int:
        """Publish ``data`` to ``topic`` on this node; return how many subscribers it was queued for."""
        check_topic(topic)
        body = _encode(data)
        return self._fan_out(topic, body, self.node.address)

    def _fan_out(self, topic: str, body: bytes, publisher: Address) -> int:
        self._seq += 1
        self.counters["published"] += 1
        event = EventFrame(topic, body, publisher.digest, time.time(), self._seq)
        queued = 0
        size = len(body)
        for subscriber in self._subscribers:
            if not any(matches(p, topic) for p in subscriber.patterns):
                continue
            full = subscriber.queued_bytes + size > QUEUE_BYTES or self._queued_bytes + size > HOST_QUEUE_BYTES
            try:
                if full:
                    raise asyncio.QueueFull
                subscriber.queue.put_nowait(event)
            except asyncio.QueueFull:
                subscriber.dropped += 1
                self.counters["dropped"] += 1
                continue
            subscriber.queued_bytes += size
            self._queued_bytes += size
            queued += 1
        return queued

    async def _next(self, subscriber: _Subscriber) -> EventFrame:
        """The next event queued for ``subscriber`` (its bytes no longer counted as queued)."""
        event = await subscriber.queue.get()
        subscriber.queued_bytes -= len(event.data)
        self._queued_bytes -= len(event.data)
        return event

    async def _serve(self, reader: asyncio.StreamReader, writer: StreamWriter) -> None:
        peer: Address = writer.get_extra_info("peer_address")
        try:
            first = await codec.read(reader, HELLO_TIMEOUT)
            if isinstance(first, Subscribe):
                await self._serve_subscriber(peer, first, reader, writer)
            elif isinstance(first, Publish):
                frame: Frame | None = first
                while frame is not None:
                    if not isinstance(frame, Publish):
                        raise FrameError(f"unexpected {type(frame).__name__} from a publisher")
                    writer.write(encode(self._publish_from(peer, frame)))
                    await writer.drain()
                    frame = await codec.read(reader)
                writer.write_eof()
            elif first is not None:
                raise FrameError(f"unexpected {type(first).__name__} on the pubsub port")
        except (FrameError, TimeoutError) as exc:
            self.counters["streams_failed"] += 1
            log.info("closed a pubsub stream from %s: %s", peer, exc)
            writer.abort()
        except (errors.PeerpathError, ConnectionError):
            self.counters["streams_failed"] += 1

    def _publish_from(self, peer: Address, frame: Publish) -> Published | Refused:
        try:
            check_topic(frame.topic)
            check_data(frame.data)
        except (TopicError, FrameError) as exc:
            return Refused(str(exc))
        if not self.rules.may_publish(peer, frame.topic):
            self.counters["refused"] += 1
            return Refused(f"{peer} may not publish to {frame.topic!r} here")
        return Published(self._fan_out(frame.topic, frame.data, peer))

    async def _serve_subscriber(
        self, peer: Address, request: Subscribe, reader: asyncio.StreamReader, writer: StreamWriter
    ) -> None:
        try:
            for pattern in request.patterns:
                check_topic(pattern, pattern=True)
                if not self.rules.may_subscribe(peer, pattern):
                    raise TopicError(f"{peer} may not subscribe to {pattern!r} here")
        except TopicError as exc:
            self.counters["refused"] += 1
            writer.write(encode(Refused(str(exc))))
            writer.write_eof()
            return
        busy = ""
        if sum(1 for s in self._subscribers if s.peer == peer) >= MAX_SUBSCRIPTIONS_PER_PEER:
            busy = f"{peer} has {MAX_SUBSCRIPTIONS_PER_PEER} subscriptions here already"
        elif len(self._subscribers) >= MAX_SUBSCRIPTIONS:
            busy = "this host has too many subscribers; try later"
        if busy:
            self.counters["refused"] += 1
            writer.write(encode(Refused(busy, retry=True)))
            writer.write_eof()
            return
        subscriber = _Subscriber(peer, list(request.patterns))
        self._subscribers.add(subscriber)
        gone = asyncio.ensure_future(reader.read(1))  # a subscriber sends nothing more: data or EOF ends it
        try:
            writer.write(encode(Subscribed(list(request.patterns))))
            while True:
                getting = asyncio.ensure_future(self._next(subscriber))
                done, _ = await asyncio.wait({getting, gone}, return_when=asyncio.FIRST_COMPLETED)
                if getting not in done:
                    getting.cancel()
                    return
                event = getting.result()
                if subscriber.dropped:
                    event = msgspec.structs.replace(event, dropped=subscriber.dropped)
                writer.write(encode(event))
                subscriber.delivered += 1
                self.counters["delivered"] += 1
                await writer.drain()
        finally:
            gone.cancel()
            if gone.done() and not gone.cancelled():
                gone.exception()  # a reset is how a subscriber leaves: nothing to report
            self._leave(subscriber)

    # -- subscribing and publishing to others -------------------------------------------------------

    async def subscribe(self, target: str, *more: str) -> AsyncIterator[Event]:
        """Events of the topics that ``target`` (``PEER/PATTERN``; a bare ``PATTERN`` is this
        node's) and ``more`` patterns on the same host match, as they are published. Broken
        sessions are resumed (events published meanwhile are missed); a refusal raises."""
        host, pattern = await self._split(target)
        patterns = [pattern, *(check_topic(p, pattern=True) for p in more)]
        if host == self.node.address:
            async for event in self._subscribe_local(patterns):
                yield event
            return
        pause = RETRY[0]
        while True:
            try:
                async for event in self._subscribe_remote(host, patterns):
                    pause = RETRY[0]
                    yield event
                return
            except (errors.PeerRefusedError, errors.LocalError):
                raise  # the host's rules say no, or this node cannot ask: trying again changes nothing
            except (errors.PeerpathError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.info("subscription to %s broke (%s); resuming", host, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY[1])

    async def _subscribe_local(self, patterns: list[str]) -> AsyncIterator[Event]:
        subscriber = _Subscriber(self.node.address, patterns)
        self._subscribers.add(subscriber)
        try:
            while True:
                frame = await self._next(subscriber)
                event = _event(self.node.address, frame, subscriber.dropped)
                if event is not None:
                    yield event
        finally:
            self._leave(subscriber)

    def _leave(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)
        self._queued_bytes -= subscriber.queued_bytes
        subscriber.queued_bytes = 0

    async def _subscribe_remote(self, host: Address, patterns: list[str]) -> AsyncIterator[Event]:
        connection = await self.node.connect(host, timeout=CONNECT_TIMEOUT)
        reader, writer = await connection.open_stream(ports.PUBSUB, timeout=CONNECT_TIMEOUT)
        try:
            writer.write(encode(Subscribe(patterns)))
            answer = await codec.read(reader, CONNECT_TIMEOUT)
            if isinstance(answer, Refused):
                if answer.retry:
                    raise errors.NetworkError(f"{host} has no room for the subscription now: {answer.reason}")
                raise errors.PeerRefusedError(f"{host} refused the subscription: {answer.reason}")
            if not isinstance(answer, Subscribed):
                raise FrameError(f"{host} did not answer the subscription")
            while (frame := await codec.read(reader)) is not None:
                if not isinstance(frame, EventFrame):
                    raise FrameError(f"unexpected {type(frame).__name__} from {host}")
                event = _event(host, frame, frame.dropped)
                if event is None:
                    self.counters["undecodable"] += 1  # the host's fault, not the subscription's
                    continue
                yield event
            raise errors.SessionClosedError(f"{host} ended the subscription")
        finally:
            writer.abort()

    async def publish(self, target: str, data: Any) -> int:
        """Publish ``data`` to ``target`` (``PEER/TOPIC``, or a bare ``TOPIC`` on this node);
        return how many subscribers it was queued for."""
        host, topic = await self._split(target, pattern=False)
        if host == self.node.address:
            return self.publish_local(topic, data)
        body = _encode(data)
        connection = await self.node.connect(host, timeout=CONNECT_TIMEOUT)
        reader, writer = await connection.open_stream(ports.PUBSUB, timeout=CONNECT_TIMEOUT)
        try:
            writer.write(encode(Publish(topic, body)))
            answer = await codec.read(reader, CONNECT_TIMEOUT)
        finally:
            writer.write_eof()
        if isinstance(answer, Refused):
            raise errors.PeerRefusedError(f"{host} refused the event: {answer.reason}")
        if not isinstance(answer, Published):
            raise FrameError(f"{host} did not answer the event")
        return answer.subscribers

    async def _split(self, target: str, *, pattern: bool = True) -> tuple[Address, str]:
        peer, sep, topic = target.rpartition("/")
        if not sep:
            return self.node.address, check_topic(topic, pattern=pattern)
        return await self.names.resolve(peer), check_topic(topic, pattern=pattern)

    def describe(self) -> dict[str, Any]:
        """For status: subscribers and counters."""
        return {
            "subscribers": len(self._subscribers),
            "rules": [rule.describe() for rule in self.rules.rules],
            **self.counters,
        }


def _encode(data: Any) -> bytes:
    try:
        body = _encoder.encode(data)
    except (TypeError, ValueError) as exc:
        raise errors.LocalError(f"cannot publish this data: {exc}") from None
    if len(body) > MAX_EVENT:
        raise errors.LocalError(f"event of {len(body)} bytes exceeds the limit of {MAX_EVENT}")
    return body


def _event(host: Address, frame: EventFrame, dropped: int) -> Event | None:
    """The event a frame carries; None if its data does not decode (it is skipped)."""
    try:
        data = check_data(frame.data)
    except FrameError:
        return None
    return Event(host, frame.topic, data, Address(frame.publisher), frame.published, frame.seq, dropped)


# -- the control API (``peerpath publish``, ``peerpath subscribe``, ``peerpath topic``) ----------------

_Target = Annotated[str, msgspec.Meta(max_length=512)]
#: Seconds between keepalive lines of a subscription with nothing to say.
KEEPALIVE = 5.0


class PublishOp(control.Op, tag="publish", frozen=True):
    """Publish ``data`` to ``target`` (``PEER/TOPIC`` or a topic of this node)."""

    target: _Target
    data: Any = None


class SubscribeOp(control.Op, tag="subscribe", frozen=True):
    """Stream the events of ``targets`` (``PEER/PATTERN`` or patterns of this node)."""

    targets: Annotated[list[_Target], msgspec.Meta(min_length=1, max_length=MAX_PATTERNS)]


class AllowOp(control.Op, tag="topic-allow", frozen=True):
    """Set who may publish and subscribe to the topics ``pattern`` matches."""

    pattern: _Topic
    publishers: Annotated[list[_Target], msgspec.Meta(max_length=1024)] | None = None
    subscribers: Annotated[list[_Target], msgspec.Meta(max_length=1024)] | None = None


class RulesOp(control.Op, tag="topic-rules", frozen=True):
    """The rules, in order."""


class PubSubControl:
    """The pub/sub service's ops on the daemon's control socket."""

    def __init__(self, pubsub: PubSub) -> None:
        self.pubsub = pubsub

    def control_ops(self) -> dict[type[control.Op], control.OpHandler]:
        """The ops, each with its handler."""
        return {PublishOp: self._publish, SubscribeOp: self._subscribe, AllowOp: self._allow, RulesOp: self._rules}

    def describe(self) -> dict[str, Any]:
        """What status shows."""
        return self.pubsub.describe()

    async def _publish(self, op: PublishOp) -> AsyncGenerator[dict[str, Any], None]:
        yield {"subscribers": await self.pubsub.publish(op.target, op.data)}

    async def _subscribe(self, op: SubscribeOp) -> AsyncGenerator[dict[str, Any], None]:
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue(QUEUE)
        owner: set[asyncio.Task[Any]] = set()

        async def pump(target: str) -> None:
            try:
                async for event in self.pubsub.subscribe(target):
                    if not events.full():
                        events.put_nowait(event)
            except Exception as exc:
                await events.put(exc)

        for target in op.targets:
            spawn(pump(target), f"subscription to {target}", owner)
        try:
            yield {"subscribed": list(op.targets)}
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), KEEPALIVE)
                except TimeoutError:
                    yield {"keepalive": True}
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item.describe()
        finally:
            for task in owner:
                task.cancel()
            await asyncio.gather(*owner, return_exceptions=True)

    async def _allow(self, op: AllowOp) -> AsyncGenerator[dict[str, Any], None]:
        pattern = check_topic(op.pattern, pattern=True)

        async def who(values: list[str] | None) -> frozenset[Address] | None:
            if values is None or values == ["trusted"]:
                return None
            if values == ["host"]:
                return frozenset()
            return frozenset([await self.pubsub.names.resolve(v) for v in values])

        rule = Rule(pattern, await who(op.publishers), await who(op.subscribers))
        self.pubsub.rules.set(rule)
        yield rule.describe()

    async def _rules(self, op: RulesOp) -> AsyncGenerator[dict[str, Any], None]:
        for rule in self.pubsub.rules.rules:
            yield rule.describe()
