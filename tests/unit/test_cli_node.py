"""`peerpath address | trust | up | ping | status` as a user runs them."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from peerpath.identity import Address, Identity
from peerpath.node.trust import TrustStore

PEERPATH = [sys.executable, "-m", "peerpath"]


@pytest.fixture(autouse=True)
def private_local_rendezvous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons in these tests share a local rendezvous of their own, not the user's."""
    monkeypatch.setenv("PEERPATH_LOCAL_RENDEZVOUS_DIR", str(tmp_path / "local-rendezvous"))
    monkeypatch.setenv("PEERPATH_LOCAL_RENDEZVOUS_PORT", str(free_tcp_and_udp_port()))


def free_tcp_and_udp_port() -> int:
    """A port number free for both TCP and UDP on 127.0.0.1 (the rendezvous binds both)."""
    for _ in range(100):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both TCP and UDP")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PEERPATH, *args], capture_output=True, text=True, timeout=timeout, check=False)


def run_each(commands: Sequence[Sequence[str]], timeout: float = 60) -> list[subprocess.CompletedProcess[str]]:
    """``run(*args)`` for every command, all at once; the results in the order given.

    Only for commands that are independent of each other (usage errors, lookups that fail
    and change nothing): each is still a `peerpath` process of its own, as a user runs it,
    but their interpreter start-ups overlap instead of queueing.
    """
    with ThreadPoolExecutor(max_workers=len(commands) or 1) as pool:
        return list(pool.map(lambda args: run(*args, timeout=timeout), commands))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_address_creates_a_private_identity_once(tmp_path: Path) -> None:
    first = run("address", "--state-dir", str(tmp_path))
    assert first.returncode == 0 and first.stdout.startswith("pp1")
    assert stat.S_IMODE((tmp_path / "identity.key").stat().st_mode) == 0o600
    assert run("address", "--state-dir", str(tmp_path)).stdout == first.stdout
    as_json = json.loads(run("address", "--json", "--state-dir", str(tmp_path)).stdout)
    assert as_json["address"] == first.stdout.strip()


def test_key_file_readable_by_others_is_refused_with_a_fix(tmp_path: Path) -> None:
    run("address", "--state-dir", str(tmp_path))
    os.chmod(tmp_path / "identity.key", 0o644)
    proc = run("address", "--state-dir", str(tmp_path))
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"peerpath: key file {tmp_path / 'identity.key'} is readable by others; run chmod 600 on it"
    )


def test_trust_add_list_remove(tmp_path: Path) -> None:
    other = run("address", "--state-dir", str(tmp_path / "other")).stdout.strip()
    state = ["--state-dir", str(tmp_path / "me")]
    assert run("trust", "list", *state).stdout.startswith("no trusted peers")
    assert run("trust", "add", other, "--note", "build agent", *state).stdout.strip() == f"trusted {other}"
    assert "already" in run("trust", "add", other.upper(), *state).stdout
    listed = json.loads(run("trust", "list", "--json", *state).stdout)
    assert [(e["address"], e["note"]) for e in listed] == [(other, "build agent")]
    assert run("trust", "remove", other, *state).returncode == 0
    proc = run("trust", "remove", other, *state)
    assert proc.returncode == 1 and "not trusted" in proc.stderr


def test_mistyped_address_is_a_usage_error_that_says_typo(tmp_path: Path) -> None:
    good = run("address", "--state-dir", str(tmp_path / "x")).stdout.strip()
    typo = good[:-3] + ("q" if good[-3] != "q" else "p") + good[-2:]
    state = ["--state-dir", str(tmp_path)]
    trusted, pinged, unnamed, hostless = run_each(
        [
            ["trust", "add", typo, *state],
            ["ping", typo, *state],
            ["ping", "no name\x1b[2J", *state],
            ["ping", f"{good}@nohost", *state],
        ]
    )
    assert trusted.returncode == 2
    assert "a typo?" in trusted.stderr and "Traceback" not in trusted.stderr
    assert pinged.returncode == 2 and "a typo?" in pinged.stderr
    assert unnamed.returncode == 2 and "neither an address nor a peer's name" in unnamed.stderr
    assert hostless.returncode == 2 and "HOST:PORT" in hostless.stderr


def test_up_refuses_a_keepalive_longer_than_the_idle_timeout(tmp_path: Path) -> None:
    proc = run("up", "--state-dir", str(tmp_path), "--idle-timeout", "5", "--keepalive", "10")
    assert proc.returncode == 2 and "--keepalive must be shorter" in proc.stderr


def test_commands_that_need_the_daemon_say_how_to_start_it(tmp_path: Path) -> None:
    good = run("address", "--state-dir", str(tmp_path / "x")).stdout.strip()
    commands = (["status"], ["ping", good])
    for proc in run_each([[*args, "--state-dir", str(tmp_path)] for args in commands]):
        assert proc.returncode == 1
        assert "no node is running" in proc.stderr and "peerpath up" in proc.stderr


def new_identity(state: Path) -> str:
    """The address of ``state``'s identity, created on first use: what ``peerpath address
    --state-dir STATE`` prints, done in this process (fixtures' setup, not a command under test)."""
    return str(Identity.load_or_create(state).address)


def trust_before_start(state: Path, address: str, name: str = "") -> None:
    """What ``peerpath trust add ADDRESS [--note NAME]`` writes to ``state``'s trust store (the
    peer trusted; a note that is a name pinned to it), done in this process before the node
    starts (fixtures' setup, not a command under test)."""
    store = TrustStore.in_state_dir(state)
    peer = Address.parse(address)
    store.add(peer, name)
    if name:
        store.pin(name, peer)


def daemons(
    tmp_path: Path, befriend: bool, one_calls_two: str = ""
) -> Iterator[tuple[list[tuple[Path, str, int]], list[subprocess.Popen[str]]]]:
    """Two running daemons, "one" and "two", on state directories under ``tmp_path``;
    trusting each other if ``befriend``, one knowing two by the name ``one_calls_two`` if
    given. Identities and trust are written in this process before the daemons start (the
    same files `peerpath address` and `peerpath trust add` write, without an interpreter
    start-up each); both daemons are stopped at the end, also when the test fails."""
    nodes, procs = [], []
    try:
        for name in ("one", "two"):
            state = tmp_path / name
            nodes.append((state, new_identity(state), free_udp_port()))
        if befriend:
            trust_before_start(nodes[0][0], nodes[1][1], one_calls_two)
            trust_before_start(nodes[1][0], nodes[0][1])
        for state, _, port in nodes:
            procs.append(
                subprocess.Popen(
                    [*PEERPATH, "up", "--state-dir", str(state), "--host", "127.0.0.1", "--port", str(port)],
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for (state, _, _), proc in zip(nodes, procs, strict=True):
            deadline = time.monotonic() + 20
            while not (state / "control.sock").exists():
                if proc.poll() is not None:
                    raise AssertionError(f"the daemon exited: {proc.stderr.read() if proc.stderr else ''}")
                assert time.monotonic() < deadline, "the daemon did not start"
                time.sleep(0.05)
        yield nodes, procs
    finally:
        for proc in procs:  # both told to stop first, then both waited for: they stop side by side
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()


@pytest.fixture
def two_daemons(tmp_path: Path) -> Iterator[tuple[list[tuple[Path, str, int]], list[subprocess.Popen[str]]]]:
    yield from daemons(tmp_path, befriend=True)


@pytest.fixture
def two_strangers(tmp_path: Path) -> Iterator[tuple[list[tuple[Path, str, int]], list[subprocess.Popen[str]]]]:
    yield from daemons(tmp_path, befriend=False)


def test_trust_request_pending_approve(two_strangers) -> None:
    nodes, _ = two_strangers
    (one, one_address, _), (two, two_address, _) = nodes
    proc = run("trust", "request", two_address, "--note", "one, the build agent", "--state-dir", str(one))
    assert proc.returncode == 0, proc.stderr
    assert "trusted back when it approves" in proc.stdout
    deadline = time.monotonic() + 10
    while not json.loads(run("trust", "pending", "--json", "--state-dir", str(two)).stdout):
        assert time.monotonic() < deadline, "the request never arrived"
        time.sleep(0.1)
    human = run("trust", "pending", "--state-dir", str(two)).stdout
    assert one_address in human and "one, the build agent" in human
    assert run("trust", "approve", one_address, "--state-dir", str(two)).returncode == 0
    assert one_address in run("trust", "list", "--state-dir", str(two)).stdout
    deadline = time.monotonic() + 10
    while two_address not in run("trust", "list", "--state-dir", str(one)).stdout:
        assert time.monotonic() < deadline, "the approval never arrived"
        time.sleep(0.1)
    ping = run("ping", two_address, "-c", "1", "--state-dir", str(one))
    assert ping.returncode == 0, ping.stderr
    again = run("trust", "approve", one_address, "--state-dir", str(two))
    assert again.returncode == 1 and "no trust request" in again.stderr


def test_up_ping_status(two_daemons) -> None:
    nodes, _ = two_daemons
    (one, _, _), (_, two_address, two_port) = nodes
    proc = run("ping", f"{two_address}@127.0.0.1:{two_port}", "-c", "3", "-i", "0.1", "--state-dir", str(one))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"pong from {two_address} via direct udp 127.0.0.1:{two_port}: seq=1 time=")
    assert lines[-1].startswith("3 sent, 3 received, 0% loss")
    # Now that a session exists, the address alone is enough.
    summary = json.loads(run("ping", two_address, "-c", "1", "--json", "--state-dir", str(one)).stdout)
    assert summary["received"] == 1 and summary["replies"][0]["path"] == f"direct udp 127.0.0.1:{two_port}"
    status = json.loads(run("status", "--json", "--state-dir", str(one)).stdout)
    assert [s["peer"] for s in status["sessions"]] == [two_address]
    human = run("status", "--state-dir", str(one)).stdout
    assert two_address in human and "direct udp" in human
    # A second daemon on the same state directory is refused.
    again = run("up", "--state-dir", str(one), "--port", "0", timeout=30)
    assert again.returncode == 1 and "already running" in again.stderr


def test_daemons_find_each_other_by_address_through_the_local_rendezvous(two_daemons) -> None:
    nodes, _ = two_daemons
    (one, _, _), (two, two_address, _) = nodes
    proc = run("ping", two_address, "-c", "2", "-i", "0.1", "--json", "--state-dir", str(one))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["received"] == 2
    # Over the relay the server offered; on a loaded machine the punch round, which starts
    # with the session, may already have moved it to a direct path by the first reply.
    assert summary["replies"][0]["path"].startswith(("relay 127.0.0.1:", "direct udp 127.0.0.1:")), summary
    status = json.loads(run("status", "--json", "--state-dir", str(two)).stdout)
    assert status["rendezvous"]["registered"] is True


def test_demo_runs_two_agents_end_to_end() -> None:
    proc = run("demo")
    assert proc.returncode == 0, proc.stderr
    assert "alice and bob trust each other" in proc.stdout
    assert "hello alice, this is bob (you said: hi bob)" in proc.stdout
    assert "1 MiB echoed intact" in proc.stdout


def test_ping_an_untrusted_peer_fails_clearly(two_daemons, tmp_path: Path) -> None:
    nodes, _ = two_daemons
    (one, one_address, _), (two, _, two_port) = nodes
    run("trust", "remove", one_address, "--state-dir", str(two))
    stranger = run("address", "--state-dir", str(tmp_path / "stranger")).stdout.strip()
    proc = run("ping", f"{stranger}@127.0.0.1:{two_port}", "--state-dir", str(one))
    assert proc.returncode == 1 and "is not trusted; run: peerpath trust add" in proc.stderr
    two_address = nodes[1][1]
    proc = run("ping", f"{two_address}@127.0.0.1:{two_port}", "-c", "1", "--state-dir", str(one))
    assert proc.returncode == 1 and "refused the session" in proc.stderr and "does not trust" in proc.stderr


#: A stranger's note that would clear the screen, retitle the window, fake a second line and
#: reverse the text after it, were it printed as it is.
HOSTILE_NOTE = "hi\x1b[2J\x1b]0;owned\x07\r\nfake line\x9b31m\u202etxt.exe\u2066\x7f\x00end"


def test_trust_pending_escapes_a_strangers_note_for_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from peerpath import cli
    from peerpath.cli import trust

    pending = [{"address": "pp1stranger\x1b[1m", "note": HOSTILE_NOTE, "created": 1_700_000_000}]
    monkeypatch.setattr(trust, "daemon_call", lambda state_dir, request: pending)
    human = CliRunner().invoke(cli.app, ["trust", "pending"])
    assert human.exit_code == 0, human.output
    line = human.output.rstrip("\n")
    assert "\n" not in line  # one request, one line
    for char in "\x1b\x07\r\x9b\u202e\u2066\x7f\x00":
        assert char not in line, repr(char)
    assert "hi\\x1b[2J\\x1b]0;owned\\x07\\x0d\\x0afake line\\x9b31m\\u202etxt.exe\\u2066\\x7f\\x00end" in line
    assert line.startswith("pp1stranger\\x1b[1m  2023-11-14 22:13  ")
    as_json = CliRunner().invoke(cli.app, ["trust", "pending", "--json"])
    assert json.loads(as_json.output) == pending  # JSON carries the note exactly (escaped by JSON itself)
    assert "\x1b" not in as_json.output


def test_printable_leaves_ordinary_text_alone() -> None:
    from peerpath.cli.common import printable as _printable

    text = "planner agent: café, 日本語, emoji 👩‍💻, quotes \"'\\ and spaces\u00a0ok"
    assert _printable(text) == text


def test_a_hostile_note_through_the_daemon_is_escaped(two_strangers) -> None:
    nodes, _ = two_strangers
    (one, _, _), (two, two_address, _) = nodes
    note = HOSTILE_NOTE.replace("\x00", "")  # a command line cannot carry NUL
    proc = run("trust", "request", two_address, "--note", note, "--state-dir", str(one))
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 10
    while not (pending := json.loads(run("trust", "pending", "--json", "--state-dir", str(two)).stdout)):
        assert time.monotonic() < deadline, "the request never arrived"
        time.sleep(0.1)
    assert pending[0]["note"] == note
    human = run("trust", "pending", "--state-dir", str(two)).stdout
    assert "\x1b" not in human and "\u202e" not in human and "\\x1b[2J" in human and "\\u202etxt.exe" in human
