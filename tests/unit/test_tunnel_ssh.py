"""OpenSSH through the overlay, unmodified: `ssh -o ProxyCommand='peerpath connect %h:ssh'`
runs a command (stdin to EOF, the answer back), and scp copies 32 MiB both ways intact.

sshd runs on loopback with key-only authentication and keys the test makes; it needs root
(its privilege separation) and Debian's openssh-server, which the test command installs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerpath.node import control
from peerpath.testing.sshd import Sshd
from peerpath.testing.sshd import available as sshd_available
from peerpath.testing.sshd import prepare as prepare_sshd
from peerpath.tunnels.registry import Exposure

from .test_tunnels import free_port, sides  # noqa: F401  (the fixture is shared)

pytestmark = pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[Sshd]:
    """sshd on a loopback port, accepting only a key made here."""
    server = prepare_sshd(tmp_path / "ssh", free_port())
    proc = await asyncio.create_subprocess_exec(*server.command, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        await proc.wait()


async def run(*args: str, stdin: bytes = b"", timeout: float = 60) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode or 0, out, err


async def test_ssh_and_scp_through_a_proxy_command(sides, sshd, tmp_path: Path) -> None:  # noqa: F811
    client, service = sides
    service.registry.expose(Exposure("ssh", 22, f"127.0.0.1:{sshd.port}"))
    await service.apply()
    daemon = control.ControlServer(client.node, control.socket_path(client.state), client.tunnels)
    await daemon.start()
    proxy = f"{sys.executable} -m peerpath connect %h:ssh --state-dir {client.state}"
    options = sshd.client_options(proxy, tmp_path / "known_hosts")
    peer = str(service.node.address)
    try:
        # A command that reads its standard input to the end: the half-close must pass through.
        data = os.urandom(1 << 20)
        code, out, err = await run("ssh", *options, f"root@{peer}", "sha256sum", stdin=data)
        assert code == 0, err
        assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
        # scp, 32 MiB each way.
        original = tmp_path / "original.bin"
        original.write_bytes(os.urandom(32 << 20))
        remote = tmp_path / "on-the-peer.bin"
        back = tmp_path / "back.bin"
        code, _, err = await run("scp", *options, str(original), f"root@{peer}:{remote}", timeout=120)
        assert code == 0, err
        code, _, err = await run("scp", *options, f"root@{peer}:{remote}", str(back), timeout=120)
        assert code == 0, err
        digest = hashlib.sha256(original.read_bytes()).hexdigest()
        assert hashlib.sha256(remote.read_bytes()).hexdigest() == digest
        assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
        if shutil.which("rsync"):  # rsync over the same ssh: a directory, then only what changed
            tree = tmp_path / "tree"
            (tree / "sub").mkdir(parents=True)
            (tree / "a.txt").write_text("alpha\n")
            (tree / "sub" / "b.bin").write_bytes(os.urandom(1 << 20))
            remote_shell = "ssh " + " ".join(shlex.quote(option) for option in options)
            mirror = tmp_path / "mirror"
            code, _, err = await run("rsync", "-a", "-e", remote_shell, f"{tree}/", f"root@{peer}:{mirror}/")
            assert code == 0, err
            assert (mirror / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()
            (tree / "a.txt").write_text("alpha, changed\n")
            code, out, err = await run("rsync", "-ai", "-e", remote_shell, f"{tree}/", f"root@{peer}:{mirror}/")
            assert code == 0, err
            assert b"a.txt" in out and b"b.bin" not in out  # only the changed file went
            assert (mirror / "a.txt").read_text() == "alpha, changed\n"
    finally:
        await daemon.close()
