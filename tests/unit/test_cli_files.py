"""`peerpath send-file | files` as a user runs them, against two running daemons."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from .test_cli_messages import pair  # noqa: F401
from .test_cli_node import private_local_rendezvous, run  # noqa: F401

pytestmark = pytest.mark.usefixtures("private_local_rendezvous")


def test_send_files_and_find_them_on_the_other_side(pair, tmp_path: Path) -> None:  # noqa: F811
    (one, one_address, _), (two, _, _) = pair[0]
    first, second = tmp_path / "report.txt", tmp_path / "blob.bin"
    first.write_text("quarterly numbers\n")
    second.write_bytes(os.urandom(2_000_000))
    sent = run("send-file", "planner", str(first), str(second), "--json", "--state-dir", str(one))
    assert sent.returncode == 0, sent.stderr
    transfers = json.loads(sent.stdout)
    assert [(t["name"], t["state"], t["bytes"]) for t in transfers] == [
        ("report.txt", "done", 18),
        ("blob.bin", "done", 2_000_000),
    ]
    received = json.loads(run("files", "--direction", "in", "--json", "--state-dir", str(two)).stdout)
    by_name = {t["name"]: t for t in received}
    saved = Path(by_name["blob.bin"]["path"])
    assert saved.parent == two / "files" / one_address
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == hashlib.sha256(second.read_bytes()).hexdigest()
    inbox = [json.loads(line) for line in run("inbox", "--json", "--state-dir", str(two)).stdout.splitlines()]
    assert sorted(m["data"]["file"] for m in inbox if m["via"] == "file") == ["blob.bin", "report.txt"]
    human = run("send-file", "planner", str(first), "--state-dir", str(one))
    assert human.returncode == 0 and "report.txt" in human.stdout and "delivered" in human.stdout
    newest = json.loads(run("files", "--json", "--state-dir", str(two)).stdout)[0]
    assert Path(newest["path"]).name == "report (2).txt"  # beside the first one, not over it
    assert "report.txt" in run("files", "--state-dir", str(two)).stdout


def test_send_file_errors_are_one_clear_line(pair, tmp_path: Path) -> None:  # noqa: F811
    (one, _, _), (_, two_address, _) = pair[0]
    missing = run("send-file", two_address, str(tmp_path / "nope"), "--state-dir", str(one))
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    bad = run("files", "--direction", "sideways", "--state-dir", str(one))
    assert bad.returncode == 2 and "--direction is in or out" in bad.stderr
