"""`peerpath task ...` as a user runs it: a worker daemon serving a command, a submitter daemon."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .test_cli_messages import pair  # noqa: F401
from .test_cli_node import PEERPATH, private_local_rendezvous, run, run_each  # noqa: F401

pytestmark = pytest.mark.usefixtures("private_local_rendezvous")

SCRIPT = (
    "import json, sys, time\n"
    "data = json.load(sys.stdin)\n"
    "print('progress 50% counting', file=sys.stderr, flush=True)\n"
    "time.sleep(data.get('sleep', 0))\n"
    "print(json.dumps({'words': len(data['text'].split())}))\n"
)


def test_submit_wait_status_list_and_cancel(pair) -> None:  # noqa: F811
    (one, _, _), (two, two_address, _) = pair[0]
    server = subprocess.Popen(
        [*PEERPATH, "task", "serve", "count", "--state-dir", str(two), "--", sys.executable, "-c", SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while "count" not in json.loads(run("status", "--json", "--state-dir", str(two)).stdout)["tasks"]["serves"]:
            assert time.monotonic() < deadline, "task serve did not register"
            time.sleep(0.2)
        done = run(
            "task", "submit", "planner", "count", "--input", '{"text": "a b c"}', "--wait", "--state-dir", str(one)
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"words": 3}
        task_id = done.stderr.splitlines()[0].removeprefix("task ")
        status = json.loads(run("task", "status", task_id[:8], "--json", "--state-dir", str(one)).stdout)
        assert (status["state"], status["result"], status["peer"]) == ("done", {"words": 3}, two_address)
        assert run("task", "result", task_id, "--state-dir", str(one)).stdout.strip() == '{"words": 3}'
        listed = json.loads(run("task", "list", "--role", "working", "--json", "--state-dir", str(two)).stdout)
        assert [(t["id"], t["state"]) for t in listed] == [(task_id, "done")]
        slow = run(
            "task", "submit", two_address, "count", "--input", '{"text": "x", "sleep": 30}', "--state-dir", str(one)
        )
        slow_id = slow.stdout.strip()
        deadline = time.monotonic() + 20
        while (
            json.loads(run("task", "status", slow_id, "--json", "--state-dir", str(one)).stdout)["state"] != "running"
        ):
            assert time.monotonic() < deadline, "the slow task never ran"
            time.sleep(0.2)
        pending = run("task", "result", slow_id, "--state-dir", str(one))
        assert pending.returncode == 3 and "is running" in pending.stderr
        cancelled = run("task", "cancel", slow_id, "--state-dir", str(one))
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
        failed = run("task", "result", slow_id, "--state-dir", str(one))
        assert failed.returncode == 1 and "cancelled" in failed.stderr
    finally:
        server.terminate()
        out, err = server.communicate(timeout=10)
    assert "serving task 'count'" in err
    assert f"{task_id[:12]}  done" in out


def test_task_errors_are_one_clear_line(pair) -> None:  # noqa: F811
    (one, _, _), (_, two_address, _) = pair[0]
    cases = [
        (["task", "submit", two_address, "count", "--input", "{nope"], 2, "not JSON"),
        (["task", "submit", two_address, "Bad Name"], 1, "bad task name"),
        (["task", "status", "abc"], 1, "at least 6 digits"),
        (["task", "status", "abcdef"], 1, "no task abcdef"),
        (["task", "list", "--role", "boss"], 2, "--role is submitted or working"),
    ]
    procs = run_each([[*args, "--state-dir", str(one)] for args, _, _ in cases])
    for (args, code, words), proc in zip(cases, procs, strict=True):
        assert (proc.returncode, words in proc.stderr, "Traceback" in proc.stderr) == (code, True, False), (
            args,
            proc.stderr,
        )
    refused = run("task", "submit", two_address, "count", "--wait", "--state-dir", str(one))
    assert refused.returncode == 1 and "runs no task named 'count'" in refused.stderr
