"""The tunnels a node keeps, saved in its state directory (``tunnels.json``, mode 0600), so
a restarted node serves and forwards the same set: services it exposes to peers (each leading
to a TCP endpoint or Unix socket, or running a program per stream), and local ports it
forwards to peers' services."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peerpath.identity import Address
from peerpath.services import ports
from peerpath.tunnels.services import Destination, ServiceError, check_name, service_port
from peerpath.wire.endpoint import format_endpoint, parse_endpoint

FILE = "tunnels.json"
#: What a node keeps at most (a file anyone could edit is input like any other).
MAX_ENTRIES = 256
#: A program an exposure runs: at most this many arguments (the program included), each this long.
MAX_ARGS = 256
MAX_ARG_LENGTH = 4096


def read_json(path: Path) -> Any:
    """A state file's JSON (None if there is none); ServiceError if it cannot be read."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServiceError(f"cannot read {path}: {exc}") from None


def write_json(path: Path, data: Any) -> None:
    """Write a state file atomically, readable by the owner only (creating its state
    directory, 0700, if this is the first thing written there)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=2)
        out.write("\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Exposure:
    """A service this node exposes: streams to overlay ``port`` go to ``target`` (a TCP
    endpoint or a Unix socket), or each start ``command`` (run in ``cwd``) with its standard
    input and output joined to the stream."""

    name: str
    port: int
    target: str | None
    #: Peers allowed (their addresses); None: every trusted peer.
    allow: tuple[str, ...] | None = None
    #: The program run per stream, and its arguments (instead of a ``target``).
    command: tuple[str, ...] | None = None
    #: Where ``command`` runs (an absolute path; None: where the node runs).
    cwd: str | None = None

    def check(self) -> Exposure:
        """This exposure if every field is usable (ServiceError otherwise)."""
        check_name(self.name)
        if not 1 <= self.port <= 0xFFFF:
            raise ServiceError(f"port {self.port} out of range 1-65535")
        if ports.is_built_in(self.port):
            raise ServiceError(f"overlay port {self.port} belongs to peerpath's own {ports.name_of(self.port)} service")
        if (self.target is None) == (self.command is None):
            raise ServiceError(f"service {self.name!r}: give a target or a command to run, not both or neither")
        if self.target is not None:
            Destination.parse(self.target)
            if self.cwd is not None:
                raise ServiceError(f"service {self.name!r}: a working directory goes with a command only")
        if self.command is not None:
            check_command(self.command)
            if self.cwd is not None and not os.path.isabs(self.cwd):
                raise ServiceError(f"service {self.name!r}: working directory {self.cwd!r} is not an absolute path")
        for text in self.allow or ():
            try:
                Address.parse(text)
            except ValueError as exc:
                raise ServiceError(f"--allow {text!r}: {exc}") from None
        return self

    def allows(self, peer: Address) -> bool:
        """Whether ``peer`` may open a stream to this service (it must be trusted anyway)."""
        return self.allow is None or str(peer) in self.allow

    @property
    def leads_to(self) -> str:
        """Where streams go, for people: the target, or ``exec: COMMAND ARGS...``."""
        if self.command is not None:
            return "exec: " + shlex.join(self.command)
        return str(self.target)

    def describe(self) -> dict[str, Any]:
        """The exposure as JSON-ready values (as tunnels.json and ``expose --list --json`` show it)."""
        shown: dict[str, Any] = {"name": self.name, "port": self.port, "target": self.target}
        if self.command is not None:
            shown |= {"exec": list(self.command), "cwd": self.cwd}
        return shown | {"allow": list(self.allow) if self.allow else None}

    @classmethod
    def from_json(cls, item: Any) -> Exposure:
        """An exposure as :meth:`describe` gives it (ServiceError if a field is unusable)."""
        allow, command, target = item.get("allow"), item.get("exec"), item.get("target")
        if command is not None and not (isinstance(command, list) and all(isinstance(a, str) for a in command)):
            raise ServiceError(f"service {item.get('name')!r}: exec is a list of strings")
        cwd = item.get("cwd")
        return cls(
            str(item["name"]),
            int(item["port"]),
            None if target is None else str(target),
            tuple(str(a) for a in allow) if allow else None,
            None if command is None else tuple(command),
            None if cwd is None else str(cwd),
        ).check()


def check_command(command: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``command`` (a program and its arguments) if it can be run as given (ServiceError otherwise)."""
    if not command or not command[0]:
        raise ServiceError("no command to run: give it after --, e.g. peerpath expose --exec NAME -- COMMAND [ARGS]")
    if len(command) > MAX_ARGS:
        raise ServiceError(f"a command takes at most {MAX_ARGS} arguments")
    for arg in command:
        if len(arg) > MAX_ARG_LENGTH:
            raise ServiceError(f"an argument of the command is longer than {MAX_ARG_LENGTH} characters")
        if "\x00" in arg:
            raise ServiceError("an argument of the command contains a NUL character")
    return tuple(command)


@dataclass(frozen=True)
class Forward:
    """A local TCP port whose connections become streams to a peer's service."""

    bind: str
    peer: str
    service: str

    def check(self) -> Forward:
        """This forward if every field is usable (ServiceError otherwise)."""
        try:
            parse_endpoint(self.bind)
            Address.parse(self.peer)
        except ValueError as exc:
            raise ServiceError(str(exc)) from None
        service_port(self.service)
        return self

    @property
    def endpoint(self) -> tuple[str, int]:
        """Where the forward listens."""
        return parse_endpoint(self.bind)


def parse_bind(text: str) -> str:
    """``[BIND:]LOCALPORT`` as ``host:port`` (the default host is 127.0.0.1: a forward is for
    this machine unless asked otherwise)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 0xFFFF:
        raise ServiceError(f"bad local port {text!r}: expected [BIND:]PORT with PORT in 1-65535")
    return format_endpoint((host.strip("[]") or "127.0.0.1", int(port)))


@dataclass
class Registry:
    """Exposures and forwards, read from and written to the state directory."""

    path: Path
    exposures: dict[str, Exposure] = field(default_factory=dict)
    forwards: dict[str, Forward] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path) -> Registry:
        """The registry of ``state_dir`` (empty if there is none yet)."""
        registry = cls(state_dir / FILE)
        raw = read_json(registry.path)
        if raw is None:
            return registry
        try:
            for item in raw.get("expose", [])[:MAX_ENTRIES]:
                exposure = Exposure.from_json(item)
                registry.exposures[exposure.name] = exposure
            for item in raw.get("forward", [])[:MAX_ENTRIES]:
                forward = Forward(str(item["bind"]), str(item["peer"]), str(item["service"])).check()
                registry.forwards[forward.bind] = forward
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ServiceError(f"{registry.path} is malformed: {exc}") from None
        return registry

    def save(self) -> None:
        """Write atomically, readable by the owner only."""
        data: dict[str, Any] = {
            "expose": [e.describe() for e in self.exposures.values()],
            "forward": [asdict(f) for f in self.forwards.values()],
        }
        write_json(self.path, data)

    def expose(self, exposure: Exposure) -> None:
        """Add (or replace, by name) an exposure; refuse a port another service uses."""
        exposure.check()
        for other in self.exposures.values():
            if other.port == exposure.port and other.name != exposure.name:
                raise ServiceError(
                    f"overlay port {exposure.port} is {other.name!r}'s already; give this one another --port"
                )
        if exposure.name not in self.exposures and len(self.exposures) >= MAX_ENTRIES:
            raise ServiceError(f"at most {MAX_ENTRIES} services")
        self.exposures[exposure.name] = exposure

    def unexpose(self, name: str) -> Exposure:
        """Remove an exposure by name."""
        try:
            return self.exposures.pop(name)
        except KeyError:
            raise ServiceError(f"no exposed service named {name!r}") from None

    def forward(self, forward: Forward) -> None:
        """Add (or replace, by local endpoint) a forward."""
        forward.check()
        if forward.bind not in self.forwards and len(self.forwards) >= MAX_ENTRIES:
            raise ServiceError(f"at most {MAX_ENTRIES} forwards")
        self.forwards[forward.bind] = forward

    def unforward(self, bind: str) -> Forward:
        """Remove a forward by its local endpoint."""
        try:
            return self.forwards.pop(bind)
        except KeyError:
            raise ServiceError(f"no forward on {bind}") from None
