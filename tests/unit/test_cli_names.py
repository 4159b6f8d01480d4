"""`peerpath name | tag | listing | find`, `trust add NAME` and `ping NAME` as a user runs them,
against two running daemons on a local rendezvous server."""

from __future__ import annotations

import json

import pytest

from .test_cli_node import daemons, private_local_rendezvous, run, run_each  # noqa: F401

pytestmark = pytest.mark.usefixtures("private_local_rendezvous")


@pytest.fixture
def strangers(tmp_path):
    """Two daemons that do not trust each other yet; fresh ones for every test (the tests
    claim names and set tags at the rendezvous)."""
    yield from daemons(tmp_path, befriend=False)


def ok(*args: str) -> str:
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_name_is_claimed_trusted_pinned_and_pinged(strangers) -> None:
    (one, one_address, _), (two, two_address, _) = strangers[0]
    at_one, at_two = ["--state-dir", str(one)], ["--state-dir", str(two)]
    claimed = ok("name", "set", "Planner", *at_two)
    assert claimed.strip() == f"planner is the name of {two_address} at the rendezvous server"
    taken = run("name", "set", "planner", *at_one)
    assert (taken.returncode, taken.stderr) == (1, "peerpath: cannot claim 'planner': name taken\n")
    untrusted = run("ping", "planner", "--count", "1", *at_one)
    assert untrusted.returncode == 1 and "Traceback" not in untrusted.stderr
    assert f"peerpath trust add {two_address} --note planner" in untrusted.stderr
    ok("trust", "add", one_address, *at_two)
    trusted = ok("trust", "add", "planner", *at_one)
    assert f"planner is {two_address} at the rendezvous server" in trusted
    assert f"trusted {two_address}" in trusted and f"planner is pinned to {two_address}" in trusted
    [entry] = json.loads(ok("trust", "list", "--json", *at_one))
    assert (entry["address"], entry["note"], entry["names"]) == (two_address, "planner", ["planner"])
    pinged = json.loads(ok("ping", "planner", "--count", "1", "--json", *at_one))
    assert (pinged["address"], pinged["received"]) == (two_address, 1)
    looked_up = json.loads(ok("name", "lookup", "planner", "--json", *at_one))
    assert (looked_up["address"], looked_up["trusted"], looked_up["pinned"]) == (two_address, True, True)
    assert ok("name", "release", *at_two).strip() == "released planner"
    gone = run("name", "lookup", "planner", *at_one)
    assert (gone.returncode, gone.stderr) == (1, "peerpath: no agent claims 'planner' at the rendezvous server\n")


def test_find_lists_public_agents_by_tag(strangers) -> None:
    (one, _, _), (two, two_address, _) = strangers[0]
    at_one, at_two = ["--state-dir", str(one)], ["--state-dir", str(two)]
    ok("name", "set", "gpu-box", *at_two)
    added = ok("tag", "add", "gpu", "Region=EU", "--public", *at_two)
    assert added.splitlines()[0] == "tags: gpu region=eu"
    ok("tag", "add", "gpu", *at_one)  # private: the default
    found = json.loads(ok("find", "--tag", "gpu", "--json", *at_one))
    assert found == [{"address": two_address, "name": "gpu-box", "tags": ["gpu", "region=eu"], "online": True}]
    table = ok("find", "--tag", "gpu", "--tag", "region=eu", *at_two)
    assert two_address in table and "gpu-box" in table and "online" in table
    none = run("find", "--tag", "gpu", "--tag", "region=us", *at_one)
    assert none.returncode == 0 and "no public agent has all of gpu region=us" in none.stderr
    assert json.loads(ok("tag", "list", "--json", *at_two)) == {"tags": ["gpu", "region=eu"], "public": True}
    ok("listing", "private", *at_two)
    assert json.loads(ok("find", "--tag", "gpu", "--json", *at_one)) == []
    assert ok("tag", "remove", "gpu", *at_two).strip() == "tags: region=eu"


def test_bad_names_and_tags_are_usage_errors_in_one_line(tmp_path) -> None:
    state = ["--state-dir", str(tmp_path)]
    cases = [
        (["name", "set", "pp1qlv26tgca"], 2, "looks like an address"),
        (["name", "set", "my agent"], 2, "lower-case letters, digits and '-'"),
        (["name", "lookup", "9lives"], 2, "does not start with a letter"),
        (["tag", "add", "region=e u"], 2, "a tag's value"),
        (["tag", "add", *(f"t{i}" for i in range(9))], 2, "at most 8 tags"),
        (["find", "--tag", "=gpu"], 2, "KEY cannot be empty"),
        (["listing", "maybe"], 2, "say public or private"),
        (["trust", "add", "not a name"], 2, "lower-case letters, digits and '-'"),
        (["name", "set", "planner"], 1, "no node is running"),
    ]
    procs = run_each([[*args, *state] for args, _, _ in cases])
    for (args, code, words), proc in zip(cases, procs, strict=True):
        assert (proc.returncode, words in proc.stderr, len(proc.stderr.splitlines())) == (code, True, 1), (
            args,
            proc.stderr,
        )
