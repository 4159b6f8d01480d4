"""A running node's tunnels: its exposed services served on their overlay ports (joined to
their targets, or running a program per stream: :mod:`~peerpath.tunnels.exec`), its forwards
listening on local ports, and streams opened on request (``peerpath connect``).

Built on the node's public API only: ``Node.serve`` (with a per-service ``allow``),
``Node.connect`` and ``Connection.open_stream``, and the node's network for listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from peerpath import errors
from peerpath.identity import Address
from peerpath.net import TcpListener, open_stream, serve_streams
from peerpath.node.node import Node
from peerpath.session.splice import abort, splice
from peerpath.session.streams import ResetReason, StreamWriter
from peerpath.tunnels.exec import Programs
from peerpath.tunnels.gateway import Gateway, GatewayConfig
from peerpath.tunnels.registry import Exposure, Forward, Registry
from peerpath.tunnels.services import Destination, ServiceError, service_port

log = logging.getLogger(__name__)

#: Seconds a forward waits for a session and a stream to the peer's service.
OPEN_TIMEOUT = 20.0
#: Seconds an exposed service waits to connect to its target.
TARGET_TIMEOUT = 10.0
#: Seconds between the gateway's looks at the trust store (a newly trusted peer gets its address).
GATEWAY_REFRESH = 5.0


class Tunnels:
    """The tunnels of one node, kept in step with its registry (``tunnels.json``)."""

    def __init__(self, node: Node, state_dir: Path) -> None:
        self.node = node
        self.state_dir = state_dir
        self.registry = Registry(state_dir / "tunnels.json")
        self._served: dict[str, Exposure] = {}
        self._listeners: dict[str, tuple[Forward, TcpListener]] = {}
        #: Why a forward is not listening (its port is taken, say), by its local endpoint.
        self.errors: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters = {"streams_served": 0, "streams_forwarded": 0, "target_unreachable": 0, "open_failed": 0}
        #: The processes of the services that run a program per stream (their counters are ours).
        self.programs = Programs(self.counters)
        #: Every trusted peer at a loopback address of its own (when on).
        self.gateway = Gateway(node.net, self._gateway_connect)
        self.gateway_config = GatewayConfig(state_dir / "gateway.json")
        self._refresher: asyncio.Task[None] | None = None

    async def reload(self) -> dict[str, str]:
        """Read the registry again and make the running tunnels match it; what failed, by
        the forward's local endpoint or the service's name."""
        self.registry = Registry.load(self.state_dir)
        for name in [n for n in self._served if n not in self.registry.exposures]:
            self.node.unserve(self._served.pop(name).port)
        for name, exposure in self.registry.exposures.items():
            old = self._served.get(name)
            if old is not None and old.port != exposure.port:
                self.node.unserve(old.port)
            self.node.serve(exposure.port, self._handler(exposure), allow=exposure.allows)
            self._served[name] = exposure
        for bind in [b for b, (f, _) in self._listeners.items() if self.registry.forwards.get(b) != f]:
            _, listener = self._listeners.pop(bind)
            listener.close()
        self.errors = {}
        for bind, forward in self.registry.forwards.items():
            if bind in self._listeners:
                continue
            try:
                host, port = forward.endpoint
                listener = await serve_streams(self.node.net, self._forwarding(forward), host, port)
            except OSError as exc:
                self.errors[bind] = f"cannot listen on {bind}: {exc.strerror or exc}"
                log.warning("forward %s -> %s:%s: %s", bind, forward.peer, forward.service, self.errors[bind])
                continue
            self._listeners[bind] = (forward, listener)
            log.info("forwarding %s to %s:%s", bind, forward.peer, forward.service)
        self.gateway_config = GatewayConfig.load(self.state_dir)
        await self._refresh_gateway()
        if self.gateway_config.enabled and self._refresher is None:
            self._refresher = asyncio.ensure_future(self._keep_gateway())
        return dict(self.errors) | self.gateway.errors

    async def _refresh_gateway(self) -> None:
        """Listen for the peers trusted now (a peer trusted since gets its address)."""
        known = dict(self.gateway_config.addresses)
        trusted = [entry.address for entry in self.node.trust.entries()]
        await self.gateway.update(self.gateway_config, trusted)
        if self.gateway_config.addresses != known:
            self.gateway_config.save()

    async def _keep_gateway(self) -> None:
        while self.gateway_config.enabled:
            await asyncio.sleep(GATEWAY_REFRESH)
            try:
                await self._refresh_gateway()
            except (OSError, ServiceError) as exc:
                log.warning("gateway: %s", exc)
        self._refresher = None

    async def _gateway_connect(
        self, peer: Address, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._join(peer, port, f"gateway {peer} port {port}", reader, writer)

    async def close(self) -> None:
        """Stop serving and forwarding (open tunnels end)."""
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        self.gateway.close()
        for exposure in self._served.values():
            self.node.unserve(exposure.port)
        self._served.clear()
        for _, listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.programs.close()

    def describe(self) -> dict[str, Any]:
        """For status displays: what is exposed and forwarded, and what failed."""
        return {
            "exposed": [self._describe(e) for e in self._served.values()],
            "forwards": [
                {"bind": f.bind, "peer": f.peer, "service": f.service, "listening": b in self._listeners}
                for b, f in self.registry.forwards.items()
            ],
            "errors": dict(self.errors),
            "gateway": {
                "enabled": self.gateway_config.enabled,
                "ports": list(self.gateway_config.ports),
                "addresses": dict(self.gateway_config.addresses),
                "listening": len(self.gateway.listening()),
                "errors": dict(self.gateway.errors),
            },
            "counters": dict(self.counters),
        }

    def _describe(self, exposure: Exposure) -> dict[str, Any]:
        shown = {"name": exposure.name, "port": exposure.port, "target": exposure.leads_to}
        if exposure.command is not None:
            shown |= {"exec": list(exposure.command), "processes": self.programs.running(exposure.name)}
        return shown | {"allow": list(exposure.allow) if exposure.allow else "trusted"}

    # -- exposed services ------------------------------------------------------------------------

    def _handler(self, exposure: Exposure) -> Any:
        if exposure.command is not None:
            return self.programs.handler(exposure)
        destination = Destination.parse(str(exposure.target))

        async def serve(reader: asyncio.StreamReader, writer: StreamWriter) -> None:
            self.counters["streams_served"] += 1
            try:
                target_reader, target_writer = await asyncio.wait_for(self._reach(destination), TARGET_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                self.counters["target_unreachable"] += 1
                log.info("service %s: %s unreachable: %s", exposure.name, exposure.target, exc or "timed out")
                writer.abort(ResetReason.UNREACHABLE)  # the opener's connection is reset, with the reason
                return
            await splice(reader, writer, target_reader, target_writer)

        return serve

    async def _reach(self, destination: Destination) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if destination.endpoint is None:
            return await asyncio.open_unix_connection(destination.text)
        return await open_stream(self.node.net, destination.endpoint)

    # -- forwards and streams to peers ---------------------------------------------------------------

    async def open(self, peer: str, service: str) -> tuple[asyncio.StreamReader, StreamWriter]:
        """A stream to ``peer``'s ``service`` (a session is made if there is none)."""
        return await self._open_stream(Address.parse(peer), service_port(service))

    async def _open_stream(self, peer: Address, port: int) -> tuple[asyncio.StreamReader, StreamWriter]:
        conn = await self.node.connect(peer, timeout=OPEN_TIMEOUT)
        return await conn.open_stream(port, timeout=OPEN_TIMEOUT)

    async def _join(
        self, peer: Address, port: int, what: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A local TCP connection (a forward's, the gateway's) joined to a stream to ``peer``'s
        ``port``; if none can be opened, the local client sees a reset at once, not a hang."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                stream_reader, stream_writer = await self._open_stream(peer, port)
            except (errors.PeerpathError, OSError) as exc:
                self.counters["open_failed"] += 1
                log.info("%s: %s", what, exc)
                abort(writer)
                return
            self.counters["streams_forwarded"] += 1
            await splice(reader, writer, stream_reader, stream_writer)
        finally:
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    def _forwarding(self, forward: Forward) -> Any:
        peer, port = Address.parse(forward.peer), service_port(forward.service)
        what = f"forward {forward.bind} -> {forward.peer}:{forward.service}"

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._join(peer, port, what, reader, writer)

        return accepted
