"""The agent node: a :class:`~peerpath.node.node.Node` with the agent services running on it
(messages and the inbox, files, tasks, pub/sub), and names accepted wherever an address is.

This is what ``peerpath.Node`` is, and what ``peerpath up`` runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from peerpath.identity import Address, Identity
from peerpath.node.control import ControlExtension
from peerpath.node.node import Node
from peerpath.node.trust import TrustStore
from peerpath.services.events import EventsControl, watch
from peerpath.services.files import Files, FilesControl
from peerpath.services.mailstore import Message
from peerpath.services.messages import Messages, MessagesControl
from peerpath.services.names import Names, NamesControl, ProfileService
from peerpath.services.pubsub import RULES_FILE, PubSub, PubSubControl
from peerpath.services.revocation import Revocation
from peerpath.services.tasks import DEFAULT_CONCURRENCY, TaskHandler, Tasks, TasksControl
from peerpath.session.connection import Connection
from peerpath.wire.endpoint import Endpoint


class AgentNode(Node):
    """A node with the agent services: ``node.messages`` and ``node.inbox()``; peers by name.

    Its services keep their state next to the trust store (the state directory).
    """

    def __init__(self, identity: Identity, trust: TrustStore, **kwargs: Any) -> None:
        super().__init__(identity, trust, **kwargs)
        state_dir = trust.path.parent
        #: Names users type for peers: pinned names, petnames, then the rendezvous's names.
        self.names = Names(trust, lambda: self.rendezvous)
        #: This node's name and tags at the rendezvous server (profile.json).
        self.profile = ProfileService(self, state_dir / "profile.json", self.names)
        self.attach(self.profile)
        #: Messages: ``await node.messages.send(peer, data)``.
        self.messages = Messages(self, state_dir / "messages.db", self.names)
        self.attach(self.messages)
        #: Tasks: ``await node.tasks.submit(peer, name, input)``; ``@node.task(name)`` to run them.
        self.tasks = Tasks(self, state_dir / "tasks.db", self.names)
        self.attach(self.tasks)
        #: Pub/sub: ``await node.pubsub.publish("PEER/topic", data)``, ``node.pubsub.subscribe("PEER/jobs.>")``.
        self.pubsub = PubSub(self, state_dir / RULES_FILE, self.names)
        self.attach(self.pubsub)
        #: Files: ``await node.files.send(peer, path)``; received ones are listed in the inbox.
        self.files = Files(self, state_dir, self.messages.note_file, self.names)
        self.attach(self.files)
        #: Sessions of peers no longer trusted are closed (``peerpath trust remove`` takes effect).
        self.revocation = Revocation(self)
        self.attach(self.revocation)

    def inbox(self, *, follow: bool = True) -> AsyncIterator[Message]:
        """Unacknowledged messages, oldest first, then (``follow``) each new one as it arrives.
        Acknowledge one with ``node.messages.ack(message)`` once it is handled."""
        return self.messages.inbox(follow=follow)

    def task(self, name: str, *, concurrency: int = DEFAULT_CONCURRENCY) -> Callable[[TaskHandler], TaskHandler]:
        """Register the decorated coroutine as this node's handler of tasks named ``name``:
        ``await handler(input, context)`` returns the result; ``context.progress(0.5)``
        reports progress. At most ``concurrency`` run at once."""
        return self.tasks.handler(name, concurrency=concurrency)

    def watch_events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event from now on: sessions up and down, path changes, trust requests,
        messages, files and tasks (``{"event": "session-up", "peer": ..., ...}``)."""
        return watch(self.events)

    async def resolve(self, peer: Address | str) -> Address:
        """The address ``peer`` stands for: an address, or the name of a trusted peer."""
        return await self.names.resolve(peer)

    async def connect(
        self, address: Address | str, via: Endpoint | None = None, *, timeout: float | None = None
    ) -> Connection:
        """A session with a peer given by address or by name (see :meth:`Node.connect`)."""
        return await super().connect(await self.resolve(address), via, timeout=timeout)

    def control_extensions(self) -> dict[str, ControlExtension]:
        """The services' parts of the daemon's control API, by the name their status goes under."""
        return {
            "messages": MessagesControl(self.messages),
            "tasks": TasksControl(self.tasks),
            "pubsub": PubSubControl(self.pubsub),
            "files": FilesControl(self.files),
            "events": EventsControl(self.events),
            "names": NamesControl(self.profile),
        }
