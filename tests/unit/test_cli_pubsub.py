"""`peerpath publish | subscribe | topic` as a user runs them, against two running daemons."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from .test_cli_messages import pair  # noqa: F401
from .test_cli_node import PEERPATH, private_local_rendezvous, run, run_each  # noqa: F401

pytestmark = pytest.mark.usefixtures("private_local_rendezvous")


def test_subscribe_to_a_peers_topics_and_publish_to_them(pair) -> None:  # noqa: F811
    (one, one_address, _), (two, two_address, _) = pair[0]
    subscriber = subprocess.Popen(
        [*PEERPATH, "subscribe", "planner/jobs.>", "--json", "-n", "2", "--state-dir", str(one)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while json.loads(run("status", "--json", "--state-dir", str(two)).stdout)["pubsub"]["subscribers"] < 1:
            assert time.monotonic() < deadline, "the subscription never reached the host"
            time.sleep(0.2)
        local = run("publish", "jobs.build", "--json", '{"commit": "abc"}', "--state-dir", str(two))
        assert local.returncode == 0 and "published to 1 subscriber(s)" in local.stderr
        remote = run("publish", f"{two_address}/jobs.test", "go", "--state-dir", str(one))
        assert remote.returncode == 0, remote.stderr
        out, err = subscriber.communicate(timeout=20)
    finally:
        subscriber.kill()
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["topic"], e["data"], e["publisher"]) for e in events] == [
        ("jobs.build", {"commit": "abc"}, two_address),
        ("jobs.test", "go", one_address),
    ]
    assert "subscribed to planner/jobs.>" in err


def test_topic_rules_refuse_with_a_clear_line(pair) -> None:  # noqa: F811
    (one, one_address, _), (two, two_address, _) = pair[0]
    allowed = run("topic", "allow", "admin.>", "--publish", "host", "--subscribe", one_address, "--state-dir", str(two))
    assert allowed.returncode == 0 and "published by this node alone" in allowed.stdout
    rules = json.loads(run("topic", "rules", "--json", "--state-dir", str(two)).stdout)
    assert rules == [{"pattern": "admin.>", "publishers": [], "subscribers": [one_address]}]
    refused = run("publish", f"{two_address}/admin.reboot", "now", "--state-dir", str(one))
    assert refused.returncode == 1 and "may not publish to 'admin.reboot'" in refused.stderr
    cases = [
        (["publish", "Bad Topic", "x"], 1, "bad topic"),
        (["publish", "jobs"], 2, "give the event once"),
        (["subscribe", f"{two_address}/a.>.b"], 1, "'>' (last)"),
    ]
    procs = run_each([[*args, "--state-dir", str(one)] for args, _, _ in cases])
    for (_, code, words), proc in zip(cases, procs, strict=True):
        assert (proc.returncode, words in proc.stderr, "Traceback" in proc.stderr) == (code, True, False), proc.stderr
