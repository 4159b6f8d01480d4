"""`peerpath send | inbox | outbox` as a user runs them, against two running daemons."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from .test_cli_node import PEERPATH, daemons, private_local_rendezvous, run, run_each  # noqa: F401

pytestmark = pytest.mark.usefixtures("private_local_rendezvous")


@pytest.fixture
def pair(tmp_path):
    """Two daemons that trust each other, one knowing the other as "planner" (a pinned note,
    as `peerpath trust add ADDR --note planner` leaves it); fresh ones for every test."""
    yield from daemons(tmp_path, befriend=True, one_calls_two="planner")


def test_send_by_name_then_read_and_acknowledge_the_inbox(pair) -> None:
    (one, one_address, _), (two, two_address, _) = pair[0]
    sent = run("send", "planner", "summarize the logs", "--wait", "--timeout", "20", "--state-dir", str(one))
    assert sent.returncode == 0, sent.stderr
    message_id = sent.stdout.strip()
    assert len(message_id) == 32 and f"delivered to {two_address}" in sent.stderr
    payload = {"task": "summarize", "files": ["a.log", "b.log"], "n": 2}
    assert run("send", two_address, "--json", json.dumps(payload), "--wait", "--state-dir", str(one)).returncode == 0
    listed = [json.loads(line) for line in run("inbox", "--json", "--state-dir", str(two)).stdout.splitlines()]
    assert [(m["from"], m["data"]) for m in listed] == [(one_address, "summarize the logs"), (one_address, payload)]
    human = run("inbox", "--state-dir", str(two)).stdout
    assert message_id[:12] in human and "summarize the logs" in human
    assert "messages  2 in the inbox, 0 waiting in the outbox" in run("status", "--state-dir", str(two)).stdout
    acked = run("inbox", "--ack", message_id[:8], "--state-dir", str(two))
    assert acked.returncode == 0 and f"acknowledged {message_id}" in acked.stdout
    left = [json.loads(line)["id"] for line in run("inbox", "--json", "--state-dir", str(two)).stdout.splitlines()]
    assert left == [listed[1]["id"]]
    shown = run("outbox", "--json", "--state-dir", str(one))
    assert shown.returncode == 0, shown.stderr
    outbox = json.loads(shown.stdout)
    assert [item["state"] for item in outbox] == ["delivered", "delivered"]


def test_inbox_follow_prints_messages_as_they_arrive(pair) -> None:
    (one, _, _), (two, two_address, _) = pair[0]
    follower = subprocess.Popen(
        [*PEERPATH, "inbox", "--follow", "--json", "--state-dir", str(two)], stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1)
        run("send", two_address, "--stdin", "--state-dir", str(one))  # empty stdin: an empty text
        assert run("send", two_address, "first", "--state-dir", str(one)).returncode == 0
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        second = json.loads(follower.stdout.readline())
        assert [first["data"], second["data"]] == ["", "first"]
    finally:
        follower.terminate()
        follower.wait(10)


def test_send_errors_are_one_clear_line(pair, tmp_path) -> None:
    (one, _, _), (_, two_address, _) = pair[0]
    stranger = run("address", "--state-dir", str(tmp_path / "stranger")).stdout.strip()
    cases = [
        (["send", "nobody", "hi"], 1, "neither an address nor the name of a trusted peer"),
        (["send", stranger, "hi"], 1, "is not trusted; run: peerpath trust add"),
        (["send", two_address], 2, "give the message once"),
        (["send", two_address, "hi", "--json", "{}"], 2, "give the message once"),
        (["send", two_address, "--json", "{not json"], 2, "not JSON"),
        (["send", "pp1" + "q" * 37, "hi"], 2, "pp1"),
        (["inbox", "--ack", "zz"], 1, "a message id is hex"),
        (["inbox", "--ack", "abcdef12"], 1, "no message abcdef12"),
    ]
    procs = run_each([[*args, "--state-dir", str(one)] for args, _, _ in cases])
    for (args, code, words), proc in zip(cases, procs, strict=True):
        assert (proc.returncode, words in proc.stderr, "Traceback" in proc.stderr) == (code, True, False), (
            args,
            proc.stderr,
        )
    big = subprocess.run(
        [*PEERPATH, "send", two_address, "--stdin", "--state-dir", str(one)],
        input="x" * 1_100_000,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert big.returncode == 1 and "exceeds the limit" in big.stderr
    assert json.loads(run("outbox", "--json", "--state-dir", str(one)).stdout) == []
