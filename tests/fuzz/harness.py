"""The fuzzing engine: targets, deterministic mutations, and the record of what broke.

A :class:`Target` is one decoder of untrusted bytes: valid seeds made by peerpath's own
encoders, a ``run`` that feeds bytes to the real decoder (and to the code that consumes
what it decoded, where that code is sans-I/O), and the exception types that are the
decoder's own way of saying "malformed" (``ours``). Any other exception that escapes
``run`` is a *foreign* exception: a bug (an ``IndexError``, ``struct.error``,
``RecursionError``, ``OverflowError``, a ``TypeError`` ... that the caller does not expect
and does not catch).

Everything is deterministic: input ``i`` of target ``t`` under run seed ``s`` is built by a
``random.Random`` seeded from ``(s, t, i)``, so a run can be repeated and split across
processes in any way. Stream decoders get their input cut at random points; the cut is
drawn from ``split_seed``, kept with each reproducer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import re
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

import peerpath

#: Inputs longer than this are cut (every decoder here caps its input well below it).
MAX_INPUT = 70_000
#: Reproducers kept per distinct foreign exception.
KEEP_EXAMPLES = 3
#: An input that takes longer than this is reported as slow (a possible denial of service).
SLOW_SECONDS = 1.0
_SRC = str(Path(peerpath.__file__).resolve().parent)

Run = Callable[[bytes, random.Random], object]
Fixup = Callable[[bytes, random.Random], bytes]


@dataclass
class Target:
    """One decoder of untrusted bytes."""

    name: str
    #: Valid inputs, made by the package's own encoders (built once per process, on first use).
    make_seeds: Callable[[], list[bytes]]
    #: Feeds one input to the real decoder; ``rng`` draws where a stream is cut.
    run: Run
    #: The decoder's own "malformed input" exceptions.
    ours: tuple[type[BaseException], ...]
    #: ``binary``, ``text``, ``msgpack`` (seeds are msgpack documents) or ``json`` (JSON
    #: documents): which structure-aware mutations and raw tokens apply.
    dialect: str = "binary"
    #: Repairs a mutated input so it gets past length and MAC checks to deeper code.
    fixup: Fixup | None = None
    doc: str = ""
    #: Whether every seed must be accepted (False where some seeds are meant to be refused,
    #: such as a server-only message handed to the client).
    seeds_valid: bool = True
    _seeds: list[bytes] | None = field(default=None, repr=False)

    @property
    def seeds(self) -> list[bytes]:
        if self._seeds is None:
            self._seeds = [bytes(s) for s in self.make_seeds()]
            if not self._seeds:
                raise ValueError(f"target {self.name} has no seeds")
        return self._seeds


def targets() -> dict[str, Target]:
    """Every registered target, by name."""
    from . import targets as registry

    return registry.TARGETS


# -- mutations ---------------------------------------------------------------------------

INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x10, 0x20, 0x40, 0xC0, 0xC1)
INTERESTING_16 = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0xFFFE, 0x4000)
INTERESTING_32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x00FFFFFF, 0x01000000, 0x10000, 0x4000, 0x10001)
INTERESTING_64 = (0, 2**63 - 1, 2**63, 2**64 - 1, 2**32)

#: Raw msgpack tokens a structured mutation may put anywhere a value goes.
MSGPACK_TOKENS = (
    b"\x91" * 1000 + b"\xc0",  # 1000 nested arrays
    b"\x91" * 5000 + b"\xc0",
    b"\x81\xa1k" * 1000 + b"\xc0",  # 1000 nested maps
    b"\xcf" + b"\xff" * 8,  # uint64 max
    b"\xd3\x80" + b"\x00" * 7,  # int64 min
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN
    b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # +inf
    b"\xcb\xff\xf0\x00\x00\x00\x00\x00\x00",  # -inf
    b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
    b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 G elements
    b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 G pairs
    b"\xdd\x00\x01\x00\x00" + b"\xc0" * 65536,  # array of 65536 nils
    b"\xd6\xff\x00\x00\x00\x00",  # timestamp ext
    b"\xc7\x0c\xff" + b"\xff" * 12,  # timestamp96 with nanoseconds out of range
    b"\xd4\x01\x00",  # fixext1, application type 1
    b"\xc1",  # never-used marker
    b"\xa2\xed\xa0",  # str with invalid UTF-8 (a surrogate)
    b"\xc4\x00",  # empty bin
    b"\xc0",  # nil
)
#: Raw JSON tokens.
JSON_TOKENS = (
    b"[" * 10000,
    b"[" * 10000 + b"]" * 10000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b"1" * 5000,
    b"1" * 400,
    b"-" + b"9" * 400,
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"1.5",
    b"-0",
    b'"\\ud800"',
    b'"\\u0000"',
    b'"inf"',
    b'"nan"',
    b'"-1"',
    b'"\xc3\xa9\xc2\xb2"',  # "é²": a digit to str.isdigit(), not to int()
    b"null",
    b"true",
    b"[]",
    b"{}",
    b'"' + b"a" * 70000 + b'"',
)
#: Raw text tokens (for decoders of text: addresses, URLs, endpoints).
_TEXT = (
    "\u00b2",  # superscript two: str.isdigit() says yes, int() says no
    "\u2460",  # circled one: likewise
    "\u0663",  # Arabic-Indic three: a digit to int() too
    "\u0130",  # a capital whose lower() is two characters
    "\u00df",
    ":",
    "::",
    "[",
    "]",
    "@",
    "?",
    "?wss=",
    "&",
    "=",
    "/",
    "pp1",
    "pp://",
    "\x00",
    " ",
    "\t",
    "0",
    "65535",
    "65536",
    "-1",
    "+1",
    "1_0",
    "9" * 5000,
    "\U0001f600",
)
TEXT_TOKENS = (*(t.encode() for t in _TEXT), b"\xff", b"\xc3")
_PLACEHOLDER = "\x00fuzz-raw-{}\x00"


class _Raw:
    """A raw token standing in a mutated tree; substituted after encoding."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _hostile_value(rng: random.Random, old: Any, strings: Sequence[str], dialect: str) -> Any:
    """A value to put where ``old`` was: interesting numbers, wrong types, raw tokens."""
    choice = rng.randrange(12)
    if choice == 0:
        return _Raw(rng.choice(MSGPACK_TOKENS if dialect == "msgpack" else JSON_TOKENS))
    if choice == 1:
        return rng.choice((*INTERESTING_64, -1, -(2**63), 4294967295, 65535, 65536, 1 << 53))
    if choice == 2:
        return rng.choice((0.0, -0.0, 1e308, -1e308, 5e-324, 1.5, -1.0, 1e18))
    if choice == 3:
        return rng.choice(strings) if strings else ""
    if choice == 4:
        return rng.choice(
            ("", "x" * rng.randrange(1, 5000), "\u00e9\u00b2", "\U0001f600", "0", "-1", "a:b:c", "[::1]:1")
        )
    if choice == 5:
        return rng.randbytes(rng.choice((0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 300)))
    if choice == 6:
        return rng.choice((None, True, False, [], {}))
    if choice == 7:
        return [old] * rng.randrange(0, 40)
    if choice == 8:
        return {"k": old, rng.choice(strings) if strings else "x": old}
    if choice == 9 and isinstance(old, int) and not isinstance(old, bool):
        return old + rng.choice((-1, 1, 2**32, -(2**32), 2**63))
    if choice == 10 and isinstance(old, str | bytes) and old:
        return old[: rng.randrange(len(old))]
    return rng.randrange(-(2**63), 2**64)


def _slots(obj: Any, out: list[tuple[Any, Any]]) -> None:
    """Every (container, key) position in a decoded document."""
    if isinstance(obj, dict):
        for key in list(obj):
            out.append((obj, key))
            _slots(obj[key], out)
    elif isinstance(obj, list):
        for i in range(len(obj)):
            out.append((obj, i))
            _slots(obj[i], out)


def _mutate_tree(doc: Any, rng: random.Random, strings: Sequence[str], dialect: str) -> Any:
    slots: list[tuple[Any, Any]] = []
    _slots(doc, slots)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(10)
        if op == 0 and isinstance(doc, dict):  # an unknown field with a hostile value
            doc[rng.choice(("x", "zz", *strings[:50]))] = _hostile_value(rng, None, strings, dialect)
        elif op == 1 and slots:  # drop a field or element
            container, key = rng.choice(slots)
            if isinstance(container, dict):
                container.pop(key, None)
            elif key < len(container):
                del container[key]
            slots = []
            _slots(doc, slots)
        elif slots:
            container, key = rng.choice(slots)
            present = key in container if isinstance(container, dict) else key < len(container)
            if present:
                container[key] = _hostile_value(rng, container[key], strings, dialect)
        elif not isinstance(doc, dict | list):
            doc = _hostile_value(rng, doc, strings, dialect)
    return doc


def _encode_tree(doc: Any, dialect: str) -> bytes:
    raws: list[bytes] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, _Raw):
            raws.append(obj.data)
            return _PLACEHOLDER.format(len(raws) - 1)
        raise NotImplementedError(type(obj))

    if dialect == "msgpack":
        data = msgspec.msgpack.Encoder(enc_hook=default).encode(doc)
        for i, raw in enumerate(raws):
            data = data.replace(msgspec.msgpack.encode(_PLACEHOLDER.format(i)), raw, 1)
    else:
        data = msgspec.json.Encoder(enc_hook=default).encode(doc)
        for i, raw in enumerate(raws):
            data = data.replace(msgspec.json.encode(_PLACEHOLDER.format(i)), raw, 1)
    return data


def _decode_tree(data: bytes, dialect: str) -> Any:
    if dialect == "msgpack":
        return msgspec.msgpack.decode(data)
    return msgspec.json.decode(data)


def _strings(seeds: Sequence[bytes], dialect: str) -> list[str]:
    """Every string in the seeds (field names, tags, addresses): a dictionary for mutations."""
    found: set[str] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, str):
            found.add(obj)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(key)
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    for seed in seeds:
        try:
            walk(_decode_tree(seed, dialect))
        except (msgspec.DecodeError, RecursionError):
            continue
    return sorted(found)


def _put_int(buf: bytearray, rng: random.Random, size: int, value: int) -> None:
    if len(buf) < size:
        return
    at = rng.randrange(len(buf) - size + 1)
    buf[at : at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, rng.choice(("big", "big", "little")))


def _byte_op(buf: bytearray, rng: random.Random, pool: Sequence[bytes], dialect: str) -> bytearray:
    op = rng.randrange(15)
    n = len(buf)
    if op == 0 and n:  # bit flips
        for _ in range(rng.randrange(1, 5)):
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
    elif op == 1 and n:  # interesting byte
        buf[rng.randrange(n)] = rng.choice((*INTERESTING_8, n & 0xFF, rng.randrange(256)))
    elif op == 2:  # interesting 16-bit value, lengths included
        _put_int(buf, rng, 2, rng.choice((*INTERESTING_16, n, n - 1, n + 1, n - 4, n - 20)))
    elif op == 3:  # interesting 32-bit value / a length field
        _put_int(buf, rng, 4, rng.choice((*INTERESTING_32, n, n - 4, n + 1, n << 8)))
    elif op == 4:
        _put_int(buf, rng, 8, rng.choice(INTERESTING_64))
    elif op == 5 and n:  # truncate
        del buf[rng.randrange(n) :]
    elif op == 6:  # extend with random bytes
        buf += rng.randbytes(rng.choice((1, 2, 3, 4, 8, 16, 64, 256, 2000)))
    elif op == 7 and pool:  # splice two seeds
        other = rng.choice(pool)
        cut, cut2 = rng.randrange(n + 1), rng.randrange(len(other) + 1)
        buf = buf[:cut] + other[cut2:]
    elif op == 8 and n:  # duplicate a chunk
        start = rng.randrange(n)
        end = min(n, start + rng.randrange(1, 64))
        at = rng.randrange(n + 1)
        buf[at:at] = buf[start:end] * rng.choice((1, 1, 2, 16))
    elif op == 9 and n:  # delete a chunk
        start = rng.randrange(n)
        del buf[start : start + rng.randrange(1, 32)]
    elif op == 10:  # insert random bytes
        at = rng.randrange(n + 1)
        buf[at:at] = rng.randbytes(rng.randrange(1, 16))
    elif op == 11:  # a hostile token of the dialect, spliced in raw
        tokens = {"json": JSON_TOKENS, "text": TEXT_TOKENS}.get(dialect, MSGPACK_TOKENS)
        at = rng.randrange(n + 1)
        token = rng.choice(tokens)
        if rng.random() < 0.5:
            buf[at:at] = token
        else:
            buf[at : at + len(token)] = token
    elif op == 12 and n >= 4:  # the leading length/type word: huge, zero, off by one
        word = rng.choice((0xFFFFFFFF, 0x00FFFFFF, 0x01FFFFFF, 0x02FFFFFF, 0, n, n - 4, n - 3, 0x7FFFFFFF))
        buf[0:4] = word.to_bytes(4, "big")
    elif op == 13 and n:  # repeat one byte
        i = rng.randrange(n)
        buf[i:i] = buf[i : i + 1] * rng.randrange(1, 200)
    elif n:  # random byte
        buf[rng.randrange(n)] = rng.randrange(256)
    return buf


def mutate(target: Target, rng: random.Random, strings: Sequence[str]) -> bytes:
    """A mutated input for ``target`` (never one of its seeds verbatim by construction)."""
    seeds = target.seeds
    data = rng.choice(seeds)
    if target.dialect in ("msgpack", "json") and rng.random() < 0.6:
        try:
            doc = _mutate_tree(_decode_tree(data, target.dialect), rng, strings, target.dialect)
            data = _encode_tree(doc, target.dialect)
        except (msgspec.DecodeError, msgspec.EncodeError, OverflowError, RecursionError, TypeError):
            pass
        rounds = rng.choice((0, 0, 0, 1))
    else:
        rounds = rng.choice((1, 1, 1, 2, 2, 3, 4, 8))
    buf = bytearray(data)
    for _ in range(rounds):
        buf = _byte_op(buf, rng, seeds, target.dialect)
    out = bytes(buf[:MAX_INPUT])
    if target.fixup is not None and rng.random() < 0.7:
        out = target.fixup(out, rng)[:MAX_INPUT]
    return out


def split(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` cut at random points, as a stream may deliver it."""
    if not data or rng.random() < 0.3:
        return [data]
    if len(data) < 300 and rng.random() < 0.1:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 6)))
    points = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- running -----------------------------------------------------------------------------


@dataclass
class Example:
    """One reproducer: the input and the seed of its stream cuts."""

    data: bytes
    split_seed: int


@dataclass
class Finding:
    """One distinct foreign exception (by target, type and place raised)."""

    target: str
    type: str
    message: str
    where: str
    innermost: str
    count: int = 0
    examples: list[Example] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        if self.where.startswith("src/"):
            return (self.target, self.type, self.where)
        # Raised by the harness itself (a broken invariant): tell the invariants apart.
        return (self.target, self.type, f"{self.where} {re.sub(r'[0-9]+', 'N', self.message)}")

    def describe(self, hex_limit: int = 160) -> str:
        lines = [f"{self.target}: {self.type}: {self.message}", f"  raised at {self.where}"]
        if self.innermost:
            lines.append(f"  innermost frame {self.innermost}")
        lines.append(f"  {self.count} input(s); reproduce with scripts/fuzz --reproduce {self.target} HEX [SPLIT_SEED]")
        for example in self.examples:
            text = example.data.hex()
            if len(text) > hex_limit:
                text = f"{text[:hex_limit]}... ({len(example.data)} bytes)"
            lines.append(f"  {text} {example.split_seed}")
        return "\n".join(lines)


@dataclass
class Stats:
    """What one batch (or a merge of batches) did."""

    inputs: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    findings: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    slow: list[tuple[str, float, Example]] = field(default_factory=list)

    def merge(self, other: Stats) -> None:
        for name, n in other.inputs.items():
            self.inputs[name] = self.inputs.get(name, 0) + n
        for name, n in other.rejected.items():
            self.rejected[name] = self.rejected.get(name, 0) + n
        for name, s in other.seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + s
        for key, finding in other.findings.items():
            mine = self.findings.get(key)
            if mine is None:
                self.findings[key] = finding
            else:
                mine.count += finding.count
                mine.examples = sorted(mine.examples + finding.examples, key=lambda e: len(e.data))[:KEEP_EXAMPLES]
        self.slow += other.slow

    @property
    def foreign(self) -> int:
        return sum(f.count for f in self.findings.values())


def _where(exc: BaseException) -> tuple[str, str]:
    """(the deepest frame in peerpath's source with its line of code, the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?", "?"
    last = frames[-1]
    inner = f"{last.filename}:{last.lineno} in {last.name}"
    for frame in reversed(frames):
        if frame.filename.startswith(_SRC):
            rel = "src/peerpath" + frame.filename[len(_SRC) :]
            where = f"{rel}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
            return where, "" if frame is last else inner
    return inner, ""


def _record(stats: Stats, target: Target, exc: BaseException, example: Example) -> None:
    where, inner = _where(exc)
    finding = Finding(target.name, type(exc).__qualname__, str(exc)[:300], where, inner)
    mine = stats.findings.setdefault(finding.key, finding)
    mine.count += 1
    if len(mine.examples) < KEEP_EXAMPLES:
        mine.examples.append(example)
    elif len(example.data) < max(len(e.data) for e in mine.examples):
        mine.examples = sorted([*mine.examples, example], key=lambda e: len(e.data))[:KEEP_EXAMPLES]


def input_rng(target: Target, seed: int, index: int) -> random.Random:
    """The generator of input ``index`` of ``target`` under run seed ``seed``."""
    return random.Random((seed * 0x9E3779B97F4A7C15 + zlib.crc32(target.name.encode()) * 0x100000001 + index) % 2**128)


def run_one(target: Target, data: bytes, split_seed: int) -> BaseException | None:
    """Feed one input; the foreign exception it raised, or None (accepted or rejected as ours)."""
    with quiet():
        return _run_one(target, data, split_seed)


def _run_one(target: Target, data: bytes, split_seed: int) -> BaseException | None:
    try:
        target.run(data, random.Random(split_seed))
    except target.ours:
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return exc
    return None


_STRINGS: dict[str, list[str]] = {}


@contextlib.contextmanager
def quiet() -> Any:
    """Silence the loggers the code under test writes to while it is fed garbage (each one:
    a disabled parent does not silence its children)."""
    names = [name for name in logging.root.manager.loggerDict if name.startswith("peerpath.")]
    loggers = [logging.getLogger(name) for name in ("peerpath", "asyncio", *names)]
    saved = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, saved, strict=True):
            logger.disabled = disabled


def fuzz(target: Target, count: int, seed: int = 0, start: int = 0) -> Stats:
    """Feed inputs ``start`` to ``start + count`` of ``target``; the seeds come first, verbatim."""
    stats = Stats()
    seeds = target.seeds
    strings = _STRINGS.get(target.name)
    if strings is None:
        structured = target.dialect in ("msgpack", "json")
        strings = _STRINGS[target.name] = _strings(seeds, target.dialect) if structured else []
    rejected = 0
    began = time.perf_counter()
    with quiet():
        rejected = _loop(target, stats, count, seed, start, strings)
    stats.inputs[target.name] = count
    stats.rejected[target.name] = rejected
    stats.seconds[target.name] = time.perf_counter() - began
    return stats


def _loop(target: Target, stats: Stats, count: int, seed: int, start: int, strings: Sequence[str]) -> int:
    seeds = target.seeds
    rejected = 0
    for index in range(start, start + count):
        rng = input_rng(target, seed, index)
        data = seeds[index] if index < len(seeds) else mutate(target, rng, strings)
        split_seed = rng.getrandbits(48)
        t0 = time.perf_counter()
        try:
            target.run(data, random.Random(split_seed))
        except target.ours:
            rejected += 1
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            _record(stats, target, exc, Example(data, split_seed))
        took = time.perf_counter() - t0
        if took > SLOW_SECONDS:
            stats.slow.append((target.name, took, Example(data, split_seed)))
    return rejected


def check_seeds(target: Target) -> tuple[list[str], int]:
    """(problems, seeds accepted): no seed may raise a foreign exception, and where the
    target says its seeds are valid, none may be rejected either."""
    problems = []
    accepted = 0
    with quiet():
        for i, seed in enumerate(target.seeds):
            try:
                target.run(seed, random.Random(i))
                accepted += 1
            except target.ours as exc:
                if target.seeds_valid:
                    problems.append(f"{target.name} seed {i} ({seed[:40].hex()}...) rejected: {exc}")
            except Exception as exc:
                problems.append(f"{target.name} seed {i} ({seed[:40].hex()}...): {type(exc).__name__}: {exc}")
    return problems, accepted


def rate(stats: Stats, name: str) -> float:
    """Inputs per second of one process for one target."""
    seconds = stats.seconds.get(name, 0.0)
    return stats.inputs.get(name, 0) / seconds if seconds > 0 else math.inf
