"""The agent services across real NATs, with a peer that goes offline and comes back: its
outbox is delivered, its inbox gets what was sent meanwhile, a file transfer it was sending
resumes, and the task it was waiting for completes (alice behind a port-restricted NAT, bob
behind a symmetric one, the server in between)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peerpath.testing.netlab import Lab, NatKind, Node

from .conftest import PEERPATH, SERVER_IPS, identity_of, start_peerpath_server, trust_in

SIZE = 96 << 20
#: A task that takes a while, reporting progress: the worker runs it per task.
SLOW_TASK = (
    "import json, sys, time\n"
    "job = json.load(sys.stdin)\n"
    "for i in range(job['seconds']):\n"
    "    print(f'progress {(i + 1) / job[\"seconds\"]} step {i + 1}', file=sys.stderr, flush=True)\n"
    "    time.sleep(1)\n"
    "print(json.dumps({'slept': job['seconds'], 'for': job['who']}))\n"
)


class Agent:
    """One agent of the test: its host, state directory and daemon."""

    def __init__(self, host: Node, state: Path, url: str) -> None:
        self.host, self.state, self.url = host, state, url
        self.address = identity_of(state)
        self.daemon: Any = None

    def cli(self, *args: str, timeout: float = 60.0) -> str:
        return self.host.run([*PEERPATH, *args, "--state-dir", str(self.state)], timeout=timeout)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def up(self) -> None:
        command = [*PEERPATH, "up", "--state-dir", str(self.state), "--rendezvous", self.url]
        self.daemon = self.host.start(command, ready="up on udp")

    def down(self) -> None:
        self.host.lab.stop(self.daemon)
        self.daemon = None

    def inbox(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.cli("inbox", "--json").splitlines()]


def until(what: str, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:g} s")


def test_a_peer_goes_offline_and_comes_back_and_everything_completes(tmp_path: Path) -> None:
    with Lab() as lab:
        url = start_peerpath_server(lab.public_host("server", SERVER_IPS))
        restricted, symmetric = lab.router("pr", NatKind.PORT_RESTRICTED), lab.router("sym", NatKind.SYMMETRIC)
        alice = Agent(lab.host("alice", behind=restricted), tmp_path / "alice", url)
        bob = Agent(lab.host("bob", behind=symmetric), tmp_path / "bob", url)
        trust_in(alice.state, bob.address, "bob")  # as `peerpath trust add ADDR --note bob` does
        trust_in(bob.state, alice.address, "alice")
        alice.up()
        bob.up()
        alice.cli("send", "bob", "hello", "--wait", "--timeout", "30")
        bob.cli("send", "alice", "hello back", "--wait", "--timeout", "30")

        # bob's outbox: written while alice is away, and bob goes away too before she is back.
        alice.down()
        waiting = bob.cli("send", "alice", "written while you were away").strip()
        bob.down()
        alice.up()
        bob.up()
        until("bob's outbox message delivered", lambda: bob.json("outbox")[0]["state"] == "delivered", 90)
        assert [m["data"] for m in alice.inbox() if m["id"] == waiting] == ["written while you were away"]

        # A task running on alice for bob, and a file on its way from bob, when bob goes away.
        script = tmp_path / "slow.py"
        script.write_text(SLOW_TASK)
        alice.host.start(
            [*PEERPATH, "task", "serve", "slow", "--state-dir", str(alice.state), "--", "python3", str(script)],
            ready="serving task",
        )
        task_id = bob.cli("task", "submit", "alice", "slow", "--input", '{"seconds": 8, "who": "bob"}').strip()
        until("the task runs", lambda: bob.json("task", "status", task_id)["state"] == "running")
        original = tmp_path / "big.bin"
        with original.open("wb") as f:
            for _ in range(SIZE >> 20):
                f.write(hashlib.sha256(f.tell().to_bytes(8, "big")).digest() * (1 << 15))
        [transfer] = bob.json("send-file", "alice", str(original), "--no-wait")
        until("some of the file sent", lambda: bob.json("files")[0]["bytes"] > 4 << 20, 60)
        bob.down()
        during = alice.cli("send", "bob", "sent while you were away").strip()
        time.sleep(2)
        bob.up()

        # Everything completes once bob is back.
        outcome = json.loads(bob.cli("task", "result", task_id, "--wait", "--json", timeout=120))
        assert (outcome["state"], outcome["result"]) == ("done", {"slept": 8, "for": "bob"})
        sent = until(
            "the file delivered",
            lambda: next(t for t in bob.json("files") if t["id"] == transfer["id"])["state"] == "done",
            180,
        )
        assert sent
        assert bob.json("status")["files"]["resumed"] == 1  # from where alice's copy stopped, not from 0
        received = next(t for t in alice.json("files") if t["id"] == transfer["id"])
        assert (
            hashlib.sha256(Path(received["path"]).read_bytes()).hexdigest()
            == hashlib.sha256(original.read_bytes()).hexdigest()
        )
        got = until("the message sent meanwhile", lambda: [m for m in bob.inbox() if m["id"] == during], 90)
        assert [m["data"] for m in got] == ["sent while you were away"]
        until("alice's outbox delivered", lambda: all(m["state"] == "delivered" for m in alice.json("outbox")), 90)
