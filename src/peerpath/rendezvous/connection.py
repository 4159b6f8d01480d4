"""One connection to the rendezvous server, from its first byte to its end: the server's
challenge, the agent's signed registration, then its frames (control messages handled by the
server, relay frames routed by the data plane without being decoded).

It is fed bytes by whatever reads its link (the TLS protocol of :mod:`.tls`, or the WebSocket
reader of the server) and keeps no task and no timer of its own: a registered agent costs its
link, this object and its :class:`~peerpath.rendezvous.presence.Agent`, nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from peerpath.identity import Address, verify
from peerpath.rendezvous.limits import CutOff, client_network
from peerpath.rendezvous.links import WritableLink
from peerpath.rendezvous.presence import Agent
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import format_endpoint

if TYPE_CHECKING:
    from peerpath.rendezvous.server import RendezvousServer

#: The server's logger: a connection's records are the server's.
log = logging.getLogger("peerpath.rendezvous.server")

_HEADER = 4
_CONTROL = rv.FrameType.CONTROL


class FrameStream:
    """A connection's byte stream cut into whole frames, read in place: a frame that a read
    leaves incomplete is kept and completed from the next read (no more of it is copied), and
    whatever a frame does wrong ends the connection with a reason, never the reader.

    Subclasses say what the frames do (:meth:`_frames`) and whom the stream belongs to."""

    __slots__ = ("_partial", "link")

    def __init__(self, link: WritableLink) -> None:
        self.link = link
        #: The start of a frame whose end has not arrived yet (grown in place: a frame sent a
        #: byte at a time costs no more than one sent whole).
        self._partial: bytearray | None = None

    def received(self, data: bytes | bytearray | memoryview) -> bool:
        """Bytes from the link (valid only during the call); False once the connection is over
        (a bad frame, a refusal, an agent cut off), the link told why where there is a reason."""
        counters = self._counters()
        try:
            self._heard()
            if self._partial is not None:
                data, done = self._complete(self._partial, data)
                if not done:
                    return True
            offset = self._frames(data, 0)
            if offset < len(data):
                self._partial = bytearray(data[offset:])
            return self._going_on()
        except rv.FrameError as exc:
            counters["malformed"] += 1
            log.info("dropping %s: %s", self._who(), exc)
            self._tell(rv.Refused(f"protocol error: {exc}"[:500]))
        except CutOff as exc:
            counters["agents_cut_off"] += 1
            log.warning("cutting off %s: %s", self._who(), exc)
            self._tell(rv.Refused(str(exc)))
        except Exception:
            # A bug, not the peer's fault: log it with whom, drop this connection, serve the rest.
            counters["handler_errors"] += 1
            log.exception("connection from %s failed", self._who())
        finally:
            self._flush()
        self._failed()
        return False

    # -- what a subclass says -------------------------------------------------------------------

    def _frames(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Handle the whole frames from ``offset`` on; the offset of the first incomplete one."""
        raise NotImplementedError

    def _counters(self) -> dict[str, int]:
        raise NotImplementedError

    def _heard(self) -> None:
        """Something arrived (before it is read)."""

    def _going_on(self) -> bool:
        """Whether the connection goes on after what was just read."""
        return True

    def _failed(self) -> None:
        """The connection ends for something its peer sent (or a bug): not a rest."""

    def _flush(self) -> None:
        """What was read is handled: write what it made."""

    def _who(self) -> str:
        return endpoint_text(self.link.peername())

    # -- frames -------------------------------------------------------------------------------

    def _complete(self, partial: bytearray, data: bytes | bytearray | memoryview) -> tuple[memoryview, bool]:
        """Append to the partial frame what completes it (no more: the rest is read in place), and
        handle it if it is whole; the rest of ``data``, and whether the frame was completed."""
        view = memoryview(data)
        taken = 0
        while True:
            if len(partial) < _HEADER:
                need = _HEADER - len(partial)
            else:
                rv.frame_at(partial, 0)  # a header no frame has raises FrameError here
                need = _HEADER + (int.from_bytes(partial[1:4], "big")) - len(partial)
            if need == 0:
                break
            if taken == len(view):
                self._partial = partial
                return view[taken:], False
            piece = view[taken : taken + need]
            partial += piece
            taken += len(piece)
        self._partial = None
        self._frames(partial, 0)
        return view[taken:], True

    def _tell(self, message: rv.Message) -> None:
        with contextlib.suppress(Exception):  # the link may be gone; the connection ends anyway
            self.link.write(rv.encode_control(message))


class AgentConnection(FrameStream):
    """One agent's connection: :meth:`open`, then :meth:`received` for each read, then :meth:`end`
    (however it ends; the agent it made goes offline with it)."""

    __slots__ = ("_counted", "_nonce", "agent", "network", "observed", "server")

    def __init__(self, server: RendezvousServer, link: WritableLink) -> None:
        super().__init__(link)
        self.server = server
        self.observed = endpoint_text(link.peername())
        #: What the per-address limits count this connection by (its IP, or the /64 of an IPv6 one).
        self.network = client_network(self.observed.rpartition(":")[0])
        self.agent: Agent | None = None
        self._nonce: bytes | None = None
        self._counted = False

    def open(self) -> bool:
        """Count the connection and challenge the agent; False (the link told why) if it is one
        too many."""
        server = self.server
        server.counters["connections"] += 1
        self._counted = True
        if not server._connection_opened(self.network):
            server.counters["connections_refused"] += 1
            server._refuse(self.link, "too many connections; try again later")
            return False
        self._nonce = os.urandom(32)
        self.link.write(rv.encode_control(rv.Challenge(self._nonce, str(server.address))))
        return True

    def end(self) -> None:
        """The connection is over: it is no longer counted, its agent goes offline, its link closes."""
        if self._counted:
            self._counted = False
            self.server._connection_closed(self.network)
        agent, self.agent = self.agent, None
        if agent is not None and agent.resting and self.server.agents.get(agent.address.digest) is agent:
            self.server._rested(agent)
        elif agent is not None:
            self.server._forget(agent)
        self._nonce = self._partial = None
        self.link.close()

    @property
    def registered(self) -> bool:
        """Whether the agent has registered (and is online)."""
        return self.agent is not None

    def _counters(self) -> dict[str, int]:
        return self.server.counters

    def _heard(self) -> None:
        if self.agent is not None:
            self.agent.last_seen = self.server.clock()

    def _going_on(self) -> bool:
        return self._nonce is not None or self.agent is not None

    def _failed(self) -> None:
        if self.agent is not None:
            self.agent.resting = False  # cut off, or broke the protocol: it goes offline

    def _flush(self) -> None:
        self.server.plane.flush()

    def _frames(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Handle the whole frames from ``offset`` on; the offset of the first incomplete one."""
        server = self.server
        view = memoryview(data)
        while (found := rv.frame_at(view, offset)) is not None:
            kind, end = found
            agent = self.agent
            if agent is None:
                if self._nonce is None:
                    return len(view)  # refused: the rest is not read
                self._register(self._nonce, view[offset + _HEADER : end] if kind == _CONTROL else None)
                offset = end
            elif kind == _CONTROL:
                message = rv.decode_control(view[offset + _HEADER : end])
                offset = end
                server._on_control(agent, message)
            else:
                offset = server.plane.relay_frames(agent, view, offset, server.clock())
        return offset

    def _register(self, nonce: bytes, body: memoryview | None) -> None:
        """The first frame: a registration signed over the challenge, or the connection is refused."""
        server, link = self.server, self.link
        self._nonce = None  # one registration per connection, whatever happens to it
        message = rv.decode_control(body) if body is not None else None
        if not isinstance(message, rv.Register):
            server._refuse(link, "the first message must be a registration")
            return
        try:
            claimed = Address.from_public_key(message.public_key)
        except ValueError:
            server._refuse(link, "registration carries a malformed key")
            return
        payload = rv.register_payload(nonce, claimed.digest, server.address.digest)
        if not verify(message.public_key, message.signature, payload):
            server._refuse(link, "registration signature does not verify")
            return
        self.agent = server._admit(link, message, self.observed)

    def _who(self) -> str:
        return f"{self.agent.address} at {self.observed}" if self.agent is not None else self.observed


def endpoint_text(peer: Any) -> str:
    """A link's peer address as ``host:port`` text (or "unknown")."""
    return format_endpoint((peer[0], peer[1])) if peer else "unknown"
