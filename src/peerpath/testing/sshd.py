"""An OpenSSH server for tests: key-only authentication with keys made for the test, on an
address and port of the test's choosing, run in the foreground (``sshd -D``)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Where Debian's openssh-server puts the daemon.
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def available() -> str | None:
    """None if sshd can run here (root, OpenSSH installed), else why not."""
    import os  # noqa: PLC0415

    if os.geteuid() != 0:
        return "needs root (sshd's privilege separation)"
    if not Path(SSHD).exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "needs OpenSSH (openssh-server, openssh-client)"
    return None


@dataclass(frozen=True)
class Sshd:
    """A prepared sshd: run :attr:`command`; log in with :attr:`client_key`."""

    port: int
    config: Path
    client_key: Path

    @property
    def command(self) -> list[str]:
        """sshd in the foreground, logging to stderr."""
        return [SSHD, "-D", "-e", "-f", str(self.config)]

    def client_options(self, proxy_command: str, known_hosts: Path) -> list[str]:
        """ssh/scp options: this key only, no prompts, the server's key accepted on first use."""
        return [
            "-o", f"ProxyCommand={proxy_command}",
            "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
            "-i", str(self.client_key),
        ]  # fmt: skip


def prepare(directory: Path, port: int, listen: str = "127.0.0.1") -> Sshd:
    """Host and client keys, an authorized key and a config in ``directory`` (created)."""
    directory.mkdir(mode=0o700, parents=True)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)], check=True)
    (directory / "authorized_keys").write_text((directory / "client.pub").read_text())
    config = directory / "sshd_config"
    settings = [
        f"Port {port}",
        f"ListenAddress {listen}",
        f"HostKey {directory / 'host'}",
        f"PidFile {directory / 'sshd.pid'}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",
        "Subsystem sftp internal-sftp",  # scp speaks SFTP
    ]
    config.write_text("\n".join(settings) + "\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # the privilege separation directory
    return Sshd(port, config, directory / "client")
