"""Fuzz targets of the agent services: what a peer sends on a service's stream, and the sealed
letters that reach the messages service through the mailbox. Each runs the real service
code against an in-memory store, behind a fake node."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import time
from typing import Any

import msgspec

from peerpath import errors
from peerpath.identity import Address
from peerpath.node.events import Events
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.letters import make_letter
from peerpath.seal import seal
from peerpath.services import files as svc_files
from peerpath.services import messages as svc_messages
from peerpath.services import pubsub as svc_pubsub
from peerpath.services import tasks as svc_tasks
from peerpath.services.frames import FrameError, encode
from peerpath.wire import rendezvous as rv

from .harness import Target
from .targets import ALICE, BOB, CAROL, _loop, _run_catching, _tmpdir, register


class _ServiceNode:
    """What a service asks of its node, minus the network: BOB, who trusts ALICE."""

    def __init__(self) -> None:
        self.identity = BOB
        self.address = BOB.address
        self.trust = TrustStore(_tmpdir() / "trust.json")
        self.trust.add(ALICE.address, "alice")
        self.rendezvous = None
        self.events = Events()

    def is_trusted(self, address: Address) -> bool:
        return self.trust.is_trusted(address)

    def serve(self, port: int, handler: Any, *, allow: Any = None) -> None:
        pass

    def unserve(self, port: int) -> None:
        pass

    def on_letter(self, kind: str, handler: Any) -> None:
        pass

    async def connect(self, address: Address, *args: Any, **kwargs: Any) -> Any:
        raise errors.NetworkError("the fuzz node has no network")


class _StreamWriter:
    """A service stream's writer, from ALICE: collects what the service answers."""

    def __init__(self) -> None:
        self.written = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    async def drain(self) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def abort(self, reason: object = None) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ALICE.address if name == "peer_address" else default


@functools.cache
def _messages() -> svc_messages.Messages:
    service = svc_messages.Messages(_ServiceNode(), ":memory:")  # type: ignore[arg-type]
    _loop().run_until_complete(service.start())
    # A courier "on its way" to ALICE: receipts queue up without a task that would dial out.
    service._couriers[ALICE.address] = _loop().create_future()  # type: ignore[assignment]
    return service


def _items() -> list[svc_messages.Item]:
    return [
        svc_messages.Item(bytes(range(16)), "message", 1_800_000_000.5, msgspec.msgpack.encode({"task": "x", "n": 1})),
        svc_messages.Item(bytes(range(1, 17)), "message", 0.0, b""),
        svc_messages.Item(bytes(range(2, 18)), "receipt", 1.0),
    ]


_HELLO = encode(svc_messages.Hello(ALICE.public_key))


def _stream_seeds() -> list[bytes]:
    items = b"".join(encode(item) for item in _items())
    return [
        _HELLO + items,
        _HELLO + encode(svc_messages.Stored(bytes(16))),
        _HELLO + encode(svc_messages.Refused(bytes(16), "full", retry=True)),
        encode(svc_messages.Hello(CAROL.public_key)) + items,
    ]


def _stream_fixup(data: bytes, rng: random.Random) -> bytes:
    """Mostly keep a valid hello in front, so that mutations reach the items behind it."""
    if rng.random() < 0.3 or data.startswith(_HELLO):
        return data
    return _HELLO + data[len(_HELLO) :]


def _run_messages_stream(data: bytes, rng: random.Random) -> None:
    service = _messages()
    writer = _StreamWriter()

    async def serve() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        await service._serve(reader, writer)  # type: ignore[arg-type]

    _run_catching(svc_messages.__name__, serve)
    _trim(service)


def _trim(service: svc_messages.Messages) -> None:
    """Keep the in-memory store small across a long run."""
    store = service.store
    assert store is not None
    store._db.execute("DELETE FROM inbox WHERE seq < (SELECT MAX(seq) - 100 FROM inbox)")
    store._db.execute("DELETE FROM outbox WHERE seq < (SELECT MAX(seq) - 100 FROM outbox)")


register(
    Target(
        "messages-stream",
        _stream_seeds,
        _run_messages_stream,
        (),
        fixup=_stream_fixup,
        doc="services/messages.py Messages._serve on a peer's stream to the messages port (hello, items), "
        "with a real in-memory store; anything but closing the stream is a foreign exception",
    )
)


def _sealed_letters() -> list[rv.Letter]:
    now = time.time()
    context = svc_messages._SEAL_CONTEXT
    letters = []
    for sender in (ALICE, CAROL):
        for item in _items():
            box = seal(BOB.public_key, msgspec.msgpack.encode(item), context + sender.public_key)
            letters.append(make_letter(sender, "sealed", BOB.address, now=now - 60, sealed=box))
    letters.append(make_letter(ALICE, "sealed", BOB.address, now=now - 60, sealed=b"not a box" * 10))
    return letters


def _letter_seeds() -> list[bytes]:
    return [msgspec.msgpack.encode(letter) for letter in _sealed_letters()]


def _run_sealed_letter(data: bytes, rng: random.Random) -> None:
    try:
        letter = msgspec.msgpack.decode(data, type=rv.Letter)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise FrameError(str(exc)) from None
    service = _messages()

    async def receive() -> None:
        service._letter(letter)  # drops what is wrong; raises only to leave a letter in the mailbox

    _run_catching(svc_messages.__name__, receive)
    _trim(service)


register(
    Target(
        "messages-sealed",
        _letter_seeds,
        _run_sealed_letter,
        (FrameError,),
        dialect="msgpack",
        doc="services/messages.py Messages._letter on sealed letters from the mailbox (checked, opened, "
        "stored, a receipt queued); mutations mostly fail the signature, the seeds reach the store",
    )
)


# -- tasks ------------------------------------------------------------------------------------


@functools.cache
def _tasks() -> svc_tasks.Tasks:
    service = svc_tasks.Tasks(_ServiceNode(), ":memory:")  # type: ignore[arg-type]
    _loop().run_until_complete(service.start())

    async def echo(data: Any, context: svc_tasks.TaskContext) -> Any:
        context.progress(0.5, "half")
        return data

    service.register("echo", echo)
    return service


def _task_seeds() -> list[bytes]:
    frames: list[Any] = [
        svc_tasks.Submit(bytes(range(16)), "echo", msgspec.msgpack.encode({"x": 1}), 5.0),
        svc_tasks.Submit(bytes(range(1, 17)), "nothing", b"\xc0"),
        svc_tasks.Watch(bytes(range(16))),
        svc_tasks.Cancel(bytes(range(2, 18))),
        svc_tasks.Update(bytes(16), "running", 0.5, "half"),
        svc_tasks.Finished(bytes(16), "done", b"\xc0"),
        svc_tasks.Rejected(bytes(16), "no", retry=True),
    ]
    return [encode(frame) for frame in frames]


def _run_tasks_stream(data: bytes, rng: random.Random) -> None:
    service = _tasks()
    writer = _StreamWriter()

    async def serve() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        # A watched task streams updates until it ends: give it a moment, then move on.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(service._serve(reader, writer), 0.2)  # type: ignore[arg-type]

    _run_catching(svc_tasks.__name__, serve)
    store = service.store
    assert store is not None
    store._db.execute("DELETE FROM tasks WHERE seq < (SELECT MAX(seq) - 100 FROM tasks)")


register(
    Target(
        "tasks-stream",
        _task_seeds,
        _run_tasks_stream,
        (),
        doc="services/tasks.py Tasks._serve on a submitter's stream to the tasks port (submit, watch, "
        "cancel), with a real in-memory store and an echo handler",
    )
)


# -- pub/sub ----------------------------------------------------------------------------------


@functools.cache
def _pubsub() -> svc_pubsub.PubSub:
    service = svc_pubsub.PubSub(_ServiceNode())  # type: ignore[arg-type]
    _loop().run_until_complete(service.start())
    return service


def _pubsub_seeds() -> list[bytes]:
    frames: list[Any] = [
        svc_pubsub.Subscribe(["sensors.*.temp", "jobs.>"]),
        svc_pubsub.Publish("sensors.kitchen.temp", msgspec.msgpack.encode(21.5)),
        svc_pubsub.Subscribed([">"]),
        svc_pubsub.Published(3),
        svc_pubsub.Refused("no"),
        svc_pubsub.EventFrame("a.b", b"\xc0", bytes(16), 1.0, 7, 2),
    ]
    publishes = b"".join(encode(svc_pubsub.Publish(f"t.{i}", b"\xa1x")) for i in range(3))
    return [encode(frame) for frame in frames] + [publishes]


def _run_pubsub_stream(data: bytes, rng: random.Random) -> None:
    service = _pubsub()
    writer = _StreamWriter()

    async def serve() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        await service._serve(reader, writer)  # type: ignore[arg-type]

    _run_catching(svc_pubsub.__name__, serve)


register(
    Target(
        "pubsub-stream",
        _pubsub_seeds,
        _run_pubsub_stream,
        (),
        doc="services/pubsub.py PubSub._serve on a peer's stream to the pubsub port (subscribe, publish)",
    )
)


# -- files ------------------------------------------------------------------------------------


@functools.cache
def _files() -> svc_files.Files:
    directory = _tmpdir()
    service = svc_files.Files(_ServiceNode(), directory)  # type: ignore[arg-type]
    service.max_size = 64 * 1024
    _loop().run_until_complete(service.start())
    return service


def _files_seeds() -> list[bytes]:
    body = b"hello, file"
    offer = svc_files.Offer(bytes(range(16)), "../notes.txt", len(body), hashlib.sha256(body).digest())
    return [
        encode(offer) + body,
        encode(svc_files.Offer(bytes(range(1, 17)), "x", 3, bytes(32))) + b"abc",  # a wrong digest
        encode(svc_files.Offer(bytes(range(2, 18)), "big", 1 << 40, bytes(32))),
        encode(svc_files.Accept(0)),
        encode(svc_files.Saved("x")),
    ]


def _run_files_stream(data: bytes, rng: random.Random) -> None:
    service = _files()
    writer = _StreamWriter()

    async def serve() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        await service._serve(reader, writer)  # type: ignore[arg-type]

    _run_catching(svc_files.__name__, serve)
    store = service.store
    assert store is not None
    store._db.execute("DELETE FROM transfers")  # every input is a new transfer
    for saved in service.directory.rglob("*"):
        if saved.is_file():
            saved.unlink()


register(
    Target(
        "files-stream",
        _files_seeds,
        _run_files_stream,
        (),
        doc="services/files.py Files._serve on a sender's stream to the files port (offer, then the bytes), "
        "saving into a temporary directory",
    )
)
