"""Shared by the command groups: options, state directories, identities, running a command's
coroutine, talking to the daemon, and printing a stranger's text safely."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from peerpath import errors
from peerpath.identity import ADDRESS_PREFIX, Identity
from peerpath.identity import Address as PeerAddress
from peerpath.node import control
from peerpath.node.state import default_state_dir
from peerpath.node.trust import TrustStore
from peerpath.rendezvous.url import RendezvousUrl

T = TypeVar("T")


URL_FILE = "rendezvous.url"


options = {"debug": False}


log = logging.getLogger("peerpath")


StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        metavar="DIR",
        envvar="PEERPATH_STATE_DIR",
        help="Where the identity key, trust store and control socket live [default: per-user data dir].",
    ),
]


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line ``peerpath: MESSAGE`` on stderr and exit with ``code``."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"peerpath: {message}", markup=False)
    raise typer.Exit(code)


def run_command(coro: Awaitable[T]) -> T:
    """Run ``coro``; expected failures become one line on stderr and exit code 1."""

    async def main() -> T:
        return await coro

    try:
        return run_event_loop(main())
    except errors.PeerpathError as exc:
        if options["debug"]:
            raise
        fail(str(exc))
    except OSError as exc:
        if options["debug"]:
            raise
        fail(str(exc.strerror or exc))


def run_event_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop where it is installed (several times the UDP packet rate), else asyncio."""
    try:
        import uvloop  # noqa: PLC0415  (optional: the CLI runs without it)
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def resolve_state_dir(value: Path | None) -> Path:
    return value if value is not None else default_state_dir()


def load_identity(state_dir: Path) -> Identity:
    try:
        return Identity.load_or_create(state_dir)
    except errors.PeerpathError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot use state directory {state_dir}: {exc.strerror or exc}")


def parse_peer(text: str) -> PeerAddress:
    try:
        return PeerAddress.parse(text)
    except ValueError as exc:
        fail(str(exc), 2)


def peer_argument(text: str) -> str:
    """A PEER argument as the daemon takes it: an address (checked here, so a typo is a usage
    error) or a peer's name (the node resolves it)."""
    text = text.strip()
    if text.lower().startswith(ADDRESS_PREFIX + "1") and len(text) > len(ADDRESS_PREFIX) + 10:
        return str(parse_peer(text))
    if not text or len(text) > 64 or any(c.isspace() or not c.isprintable() for c in text):
        fail(f"{printable(text)!r} is neither an address nor a peer's name", 2)
    return text


def parse_rendezvous(value: str, option: str = "--rendezvous") -> RendezvousUrl:
    text = value
    if not value.startswith("pp://"):
        try:
            text = Path(value).read_text().strip()
        except OSError as exc:
            fail(f"{option} {value!r} is neither a pp:// URL nor a readable file: {exc.strerror or exc}", 2)
    try:
        return RendezvousUrl.parse(text)
    except ValueError as exc:
        fail(f"{option}: {exc}", 2)


def open_trust_store(state_dir: Path) -> TrustStore:
    try:
        return TrustStore.in_state_dir(state_dir)
    except errors.PeerpathError as exc:
        fail(str(exc))


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def daemon_call(state_dir: Path | None, request: dict[str, Any]) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return [answer async for answer in control.call(resolve_state_dir(state_dir), request)]

    return run_command(run())


#: Code points a stranger's text must not send to the terminal as they are: bidirectional marks,
#: embeddings, overrides (U+202A-U+202E) and isolates (U+2066-U+2069), and line and paragraph separators.
_UNSAFE_FORMATTING = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")


def printable(text: str) -> str:
    """``text`` safe to print: C0 and C1 controls and DEL (so escape sequences, newlines and tabs too),
    bidi controls, separators and lone surrogates are shown as visible escapes such as ``\\x1b``."""

    def shown(char: str) -> str:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"\\x{code:02x}"
        if char in _UNSAFE_FORMATTING or 0xD800 <= code <= 0xDFFF:
            return f"\\u{code:04x}"
        return char

    return "".join(shown(char) for char in text)


def given_data(what: str, text: str | None, json_data: str | None, stdin: bool, binary_hint: str = "") -> Any:
    """What ``send`` or ``publish`` sends: the TEXT argument, the ``--json`` value or standard
    input (UTF-8 text), exactly one of them; a usage error (exit 2) otherwise."""
    if sum((text is not None, json_data is not None, stdin)) != 1:
        fail(f"give the {what} once: TEXT, --json OBJ or --stdin", 2)
    if json_data is not None:
        try:
            return json.loads(json_data)
        except ValueError as exc:
            fail(f"--json: not JSON: {exc}", 2)
    if stdin:
        try:
            return sys.stdin.buffer.read().decode()
        except UnicodeDecodeError:
            fail(f"standard input is not UTF-8 text{binary_hint}", 2)
    return text
