"""`peerpath expose --exec NAME -- COMMAND`: a program per stream, joined to it, that lives exactly
as long as its stream; two nodes on loopback (the `sides` of test_tunnels), real processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peerpath import errors
from peerpath.identity import Identity
from peerpath.session.streams import StreamWriter
from peerpath.tunnels import exec as tunnel_exec
from peerpath.tunnels.registry import MAX_ARGS, Exposure, Registry
from peerpath.tunnels.services import ServiceError, service_port

from .conftest import eventually
from .test_tunnels import Side, sides  # noqa: F401  (the fixture is shared)

PY = sys.executable
#: Says its pid, then echoes its input upper-cased, line by line, until its input ends.
SHOUT = (
    "import os, sys\n"
    "print(os.getpid(), flush=True)\n"
    "for line in sys.stdin:\n"
    "    print(line.upper(), end='', flush=True)\n"
)
#: Says its pid, then sleeps (ignoring SIGTERM if told to), never reading its input.
SLEEPER = (
    "import os, signal, sys, time\n"
    "if 'stubborn' in sys.argv: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print(os.getpid(), flush=True)\n"
    "time.sleep(600)\n"
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def expose(service: Side, name: str, *command: str) -> int:
    """Expose ``command`` as ``name`` on the service side; its overlay port."""
    port = service_port(name)
    service.registry.expose(Exposure(name, port, None, command=tuple(command), cwd=str(service.state)))
    assert await service.apply() == {}
    return port


async def open_to(client: Side, service: Side, name: str) -> tuple[asyncio.StreamReader, StreamWriter]:
    return await client.tunnels.open(str(service.node.address), name)


async def first_line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 20)


async def test_each_stream_runs_its_own_process_joined_to_its_input_and_output(sides) -> None:  # noqa: F811
    client, service = sides
    await expose(service, "shout", PY, "-c", SHOUT)
    (r1, w1), (r2, w2) = [await open_to(client, service, "shout") for _ in range(2)]
    pids = {int(await first_line(r1)), int(await first_line(r2))}
    assert len(pids) == 2 and service.tunnels.programs.running("shout") == 2
    w1.write(b"first stream\n")
    w2.write(b"second stream\n")
    assert await first_line(r1) == b"FIRST STREAM\n" and await first_line(r2) == b"SECOND STREAM\n"
    # The opener's EOF ends the program's input only; what it writes after still arrives, then EOF.
    w1.write(b"last words\n")
    w1.write_eof()
    assert await asyncio.wait_for(r1.read(), 20) == b"LAST WORDS\n"
    w2.write_eof()
    assert await asyncio.wait_for(r2.read(), 20) == b""
    await eventually(lambda: not any(alive(pid) for pid in pids))
    await eventually(lambda: service.tunnels.programs.running("shout") == 0)
    assert service.tunnels.counters["processes_started"] == 2


async def test_the_process_runs_in_the_directory_expose_was_given_and_knows_its_peer(sides) -> None:  # noqa: F811
    client, service = sides
    script = "import os, sys\nprint(os.getcwd(), os.environ['PEERPATH_PEER'], os.environ['PEERPATH_SERVICE'])\n"
    (service.state / "who.py").write_text(script)
    await expose(service, "who", PY, "who.py")  # a path relative to the exposure's directory
    reader, _ = await open_to(client, service, "who")
    answer = (await asyncio.wait_for(reader.read(), 20)).decode().split()
    assert answer == [str(service.state), str(client.node.address), "who"]


async def test_a_process_that_exits_ends_the_stream(sides) -> None:  # noqa: F811
    client, service = sides
    await expose(service, "once", PY, "-c", "print('done')")
    reader, _ = await open_to(client, service, "once")  # the opener never ends its side
    assert await asyncio.wait_for(reader.read(), 20) == b"done\n"
    await eventually(lambda: service.tunnels.programs.running("once") == 0)


async def test_a_reset_stream_terminates_its_process(sides) -> None:  # noqa: F811
    client, service = sides
    await expose(service, "sleeper", PY, "-c", SLEEPER)
    reader, writer = await open_to(client, service, "sleeper")
    pid = int(await first_line(reader))
    assert alive(pid)
    writer.abort()
    await eventually(lambda: not alive(pid), timeout=10)
    await eventually(lambda: service.tunnels.programs.running("sleeper") == 0)


async def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(sides) -> None:  # noqa: F811
    client, service = sides
    service.tunnels.programs.kill_after = 0.5
    await expose(service, "stubborn", PY, "-c", SLEEPER, "stubborn")
    reader, writer = await open_to(client, service, "stubborn")
    pid = int(await first_line(reader))
    writer.abort()
    await asyncio.sleep(0.2)
    assert alive(pid)  # SIGTERM is ignored...
    await eventually(lambda: not alive(pid), timeout=10)  # ...SIGKILL is not


async def test_when_both_directions_have_ended_the_process_is_stopped(sides) -> None:  # noqa: F811
    client, service = sides
    # Closes its output and goes on sleeping: once the opener's EOF comes, nothing more can pass.
    script = "import os, sys, time\nprint(os.getpid(), flush=True)\nos.close(1)\ntime.sleep(600)\n"
    await expose(service, "mute", PY, "-c", script)
    reader, writer = await open_to(client, service, "mute")
    pid = int(await first_line(reader))
    assert await asyncio.wait_for(reader.read(), 20) == b""
    assert alive(pid)
    writer.write_eof()
    await eventually(lambda: not alive(pid), timeout=10)


async def test_closing_the_node_tunnels_terminates_every_process(sides) -> None:  # noqa: F811
    client, service = sides
    await expose(service, "sleeper", PY, "-c", SLEEPER)
    pids = []
    for _ in range(3):
        reader, _ = await open_to(client, service, "sleeper")
        pids.append(int(await first_line(reader)))
    assert all(alive(pid) for pid in pids)
    await service.tunnels.close()
    assert not any(alive(pid) for pid in pids)  # close() returns once they are gone
    assert service.tunnels.programs.running("sleeper") == 0


async def test_streams_beyond_the_limit_are_reset_with_a_reason(sides, caplog) -> None:  # noqa: F811
    client, service = sides
    service.tunnels.programs.limit = 2
    await expose(service, "sleeper", PY, "-c", SLEEPER)
    kept = []
    for _ in range(2):
        reader, writer = await open_to(client, service, "sleeper")
        kept.append((int(await first_line(reader)), writer))
    extra, _ = await open_to(client, service, "sleeper")
    with pytest.raises(errors.StreamResetError, match="could not reach its target"):
        await asyncio.wait_for(extra.read(), 20)
    assert service.tunnels.counters["processes_refused"] == 1
    assert "2 processes run already (the limit)" in caplog.text
    kept[0][1].abort()
    await eventually(lambda: service.tunnels.programs.running("sleeper") == 1)
    reader, _ = await open_to(client, service, "sleeper")  # room again
    assert int(await first_line(reader)) not in {pid for pid, _ in kept}


async def test_a_program_that_cannot_start_resets_the_stream(sides, caplog) -> None:  # noqa: F811
    client, service = sides
    await expose(service, "gone", str(service.state / "no-such-program"))
    reader, _ = await open_to(client, service, "gone")
    with pytest.raises(errors.StreamResetError, match="could not reach its target"):
        await asyncio.wait_for(reader.read(), 20)
    assert service.tunnels.counters["processes_failed"] == 1
    assert "cannot run" in caplog.text and "no-such-program" in caplog.text


async def test_standard_error_goes_to_the_log_bounded(sides, caplog) -> None:  # noqa: F811
    client, service = sides
    caplog.set_level(logging.INFO, logger="peerpath.tunnels.exec")
    script = (
        "import sys\nsys.stderr.write('warming up\\n')\nsys.stderr.write('x' * 300_000 + '\\n' + 'y\\n' * 50_000)\n"
    )
    await expose(service, "noisy", PY, "-c", script)
    reader, _ = await open_to(client, service, "noisy")
    assert await asyncio.wait_for(reader.read(), 20) == b""  # the process never blocked on its stderr
    await eventually(lambda: "more bytes of standard error not logged" in caplog.text)
    lines = [r.getMessage() for r in caplog.records if r.name == "peerpath.tunnels.exec"]
    assert any(line.endswith(": warming up") for line in lines)
    assert all(len(line) < tunnel_exec.STDERR_LINE + 200 for line in lines)
    assert sum(len(line) for line in lines) < tunnel_exec.STDERR_LOGGED + 200 * len(lines)


async def test_the_status_shows_the_command_and_its_running_processes(sides) -> None:  # noqa: F811
    client, service = sides
    port = await expose(service, "sleeper", PY, "-c", "import time; time.sleep(600)")
    await open_to(client, service, "sleeper")
    await eventually(lambda: service.tunnels.programs.running("sleeper") == 1)
    [shown] = service.tunnels.describe()["exposed"]
    assert shown["port"] == port and shown["exec"] == [PY, "-c", "import time; time.sleep(600)"]
    assert shown["target"].startswith(f"exec: {PY} -c") and shown["processes"] == 1


# -- the exposure as saved, and as the CLI takes it ---------------------------------------------------


def test_an_exposure_leads_to_a_target_or_runs_a_command_never_both_or_neither() -> None:
    assert Exposure("calc", 7000, None, command=("python", "calc.py"), cwd="/srv").check().leads_to == (
        "exec: python calc.py"
    )
    cases = [
        (Exposure("both", 7000, "127.0.0.1:80", command=("cat",)), "not both or neither"),
        (Exposure("neither", 7000, None), "not both or neither"),
        (Exposure("empty", 7000, None, command=()), "no command to run"),
        (Exposure("blank", 7000, None, command=("",)), "no command to run"),
        (Exposure("long", 7000, None, command=("x",) * (MAX_ARGS + 1)), f"at most {MAX_ARGS} arguments"),
        (Exposure("nul", 7000, None, command=("cat", "a\x00b")), "NUL"),
        (Exposure("rel", 7000, None, command=("cat",), cwd="srv"), "not an absolute path"),
        (Exposure("dir", 7000, "127.0.0.1:80", cwd="/srv"), "goes with a command only"),
    ]
    for exposure, message in cases:
        with pytest.raises(ServiceError, match=message):
            exposure.check()


def test_an_exec_exposure_survives_a_reload_of_the_registry(tmp_path: Path) -> None:
    registry = Registry.load(tmp_path)
    peer = str(Identity.generate().address)
    registry.expose(Exposure("calc", 7000, None, (peer,), ("python", "calc.py", "--fast"), "/srv/calc"))
    registry.expose(Exposure("web", 80, "127.0.0.1:8000"))
    registry.save()
    saved = json.loads((tmp_path / "tunnels.json").read_text())["expose"]
    assert saved[0] == {"name": "calc", "port": 7000, "target": None, "exec": ["python", "calc.py", "--fast"],
                        "cwd": "/srv/calc", "allow": [peer]}  # fmt: skip
    assert "exec" not in saved[1]  # entries with a target are written as before
    assert Registry.load(tmp_path).exposures == registry.exposures
    for bad in ({"exec": "python calc.py"}, {"exec": [1, 2]}, {"exec": []}, {"exec": ["cat"], "target": "127.0.0.1:1"}):
        item = {"name": "calc", "port": 7000, "target": None} | bad
        (tmp_path / "tunnels.json").write_text(json.dumps({"expose": [item]}))
        with pytest.raises(ServiceError, match="malformed"):
            Registry.load(tmp_path)


def peerpath(state: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "peerpath", *args, "--state-dir", str(state)] if "--" not in args else
        [PY, "-m", "peerpath", *args[: args.index("--")], "--state-dir", str(state), *args[args.index("--"):]],
        capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
    )  # fmt: skip


def test_expose_exec_saves_the_command_lists_it_and_removes_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "server.py").write_text("print('hi')\n")
    added = peerpath(state, "expose", "--exec", "calc", "--", PY, "server.py", "--verbose", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith(f"running {PY} server.py --verbose for each stream as calc (overlay port ")
    [item] = json.loads(peerpath(state, "expose", "--list", "--json").stdout)
    assert item == {"name": "calc", "port": service_port("calc"), "target": None,
                    "exec": [PY, "server.py", "--verbose"], "cwd": str(tmp_path), "allow": "trusted"}  # fmt: skip
    listed = peerpath(state, "expose", "--list").stdout
    assert f"-> exec: {PY} server.py --verbose  (every trusted peer)" in listed
    assert peerpath(state, "expose", "--remove", "calc").returncode == 0
    assert json.loads(peerpath(state, "expose", "--list", "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["expose", "--exec", "calc"], "no command to run: give it after --"),
        (["expose", "--exec", "calc", "--"], "no command to run: give it after --"),
        (["expose", "--exec", "calc", "--", "127.0.0.1:8000", "cat"], "give either a TARGET or --exec"),
        (["expose", "--exec", "calc", "--name", "other", "--", "cat"], "names the service already"),
        (["expose", "--exec", "calc", "--", "no-such-program-here"], "no program 'no-such-program-here' on PATH"),
        (["expose", "--exec", "calc", "--", "./missing.sh"], "no program './missing.sh' in"),
        (["expose", "--exec", "Bad_Name", "--", "cat"], "bad service name"),
        (["expose", "127.0.0.1:8000", "127.0.0.1:8001"], "give one TARGET"),
    ],
)
def test_bad_exec_exposures_get_a_clear_message_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = peerpath(tmp_path, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("peerpath: ") and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "tunnels.json").exists()
