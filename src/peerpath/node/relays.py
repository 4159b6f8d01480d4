"""The relays a node talks to: the rendezvous server itself, its home relay (of those the
server offers, the one it reaches fastest), and its peers' home relays, each a
:class:`RendezvousClient` connected and registered on first use."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from peerpath import errors
from peerpath.clock import Clock, monotonic
from peerpath.identity import Address, Identity
from peerpath.net import Net, open_stream
from peerpath.rendezvous.client import REST_AFTER, LetterHandler, RendezvousClient, UdpSender
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.tasks import spawn
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint

log = logging.getLogger(__name__)

#: What the node does with a datagram a relay delivers: (the relay's client, source, datagram).
RelayedHandler = Callable[[RendezvousClient, bytes, bytes], None]


class Relays:
    """The node's relay clients: ``main`` (the rendezvous server) and the others."""

    def __init__(
        self,
        identity: Identity,
        udp_send: UdpSender,
        on_relayed: RelayedHandler,
        *,
        net: Net,
        clock: Clock = monotonic,
    ) -> None:
        self._identity = identity
        self._net = net
        self._clock = clock
        self._udp_send = udp_send
        self._on_relayed = on_relayed
        #: The client of the rendezvous server (None: the node runs without one).
        self.main: RendezvousClient | None = None
        #: Relays other than the rendezvous server: our home relay and our peers' home relays.
        self.others: dict[Address, RendezvousClient] = {}
        #: The relay peers reach us through (a URL the server offered).
        self.home: str | None = None
        self._home_task: asyncio.Task[None] | None = None
        self._rest_after: float | None = REST_AFTER

    def rest_after(self, seconds: float | None) -> None:
        """Idle this long, every relay client (now and later) rests on UDP (None: never)."""
        self._rest_after = seconds
        for client in self.every():
            client.rest_after = seconds

    async def start(
        self, url: RendezvousUrl, on_letter: LetterHandler, on_registered: Callable[[rv.Registered], None]
    ) -> RendezvousClient:
        """Connect to the rendezvous server (in the background) and keep registered there."""
        self.main = self._client(url, on_letter=on_letter, on_registered=on_registered)
        await self.main.start()
        return self.main

    def _client(
        self,
        url: RendezvousUrl,
        on_letter: LetterHandler | None = None,
        on_registered: Callable[[rv.Registered], None] | None = None,
    ) -> RendezvousClient:
        client = RendezvousClient(
            self._identity,
            url,
            on_relay=lambda source, data: None,
            on_letter=on_letter,
            udp_send=self._udp_send,
            on_registered=on_registered,
            net=self._net,
            clock=self._clock,
            rest_after=self._rest_after,
        )
        client.on_relay = functools.partial(self._on_relayed, client)  # it needs the client itself
        return client

    def every(self) -> list[RendezvousClient]:
        """Every relay client: the rendezvous server's first."""
        return [*([self.main] if self.main is not None else []), *self.others.values()]

    def from_udp(self, remote: Endpoint) -> RendezvousClient | None:
        """The client whose server's UDP relay endpoint is ``remote`` (only it speaks that protocol to us)."""
        for client in self.every():
            if client.udp_endpoint == remote:
                return client
        return None

    async def client(self, url_text: str, timeout: float = 10.0) -> RendezvousClient:
        """The client for relay ``url_text``: the rendezvous server itself, or another relay
        (connected and registered on first use)."""
        url = RendezvousUrl.parse(url_text)
        if self.main is not None and url.address == self.main.url.address:
            return self.main
        client = self.others.get(url.address)
        if client is None:
            client = self._client(url)
            self.others[url.address] = client
            await client.start()
        await client.wait_registered(timeout)
        return client

    def choose_home(self, offered: list[str]) -> None:
        """Choose (again) a home relay among ``offered``, in the background."""
        if self._home_task is not None:
            self._home_task.cancel()
        self._home_task = spawn(self._choose_home(offered), "choosing a home relay")

    async def _choose_home(self, offered: list[str]) -> None:
        main = self.main
        if main is None or not offered:
            return
        rtts = await asyncio.gather(*(connect_rtt(self._net, text, clock=self._clock) for text in offered))
        reachable = [(rtt, text) for rtt, text in zip(rtts, offered, strict=True) if rtt is not None]
        if not reachable:
            return
        _, chosen = min(reachable)
        try:
            await self.client(chosen)
            main.set_home_relay(chosen)
        except (errors.PeerpathError, OSError, ValueError) as exc:
            log.info("home relay %s unusable: %s", chosen, exc)
            return
        if chosen != self.home:
            log.info("home relay: %s", chosen)
        self.home = chosen

    async def close(self) -> None:
        """Stop choosing and disconnect from every relay."""
        if self._home_task is not None:
            self._home_task.cancel()
        for client in [*self.others.values(), *([self.main] if self.main is not None else [])]:
            await client.close()


async def connect_rtt(net: Net, url_text: str, timeout: float = 2.0, *, clock: Clock = monotonic) -> float | None:
    """The best of two TCP connects to a relay: how far away it is (None: unreachable)."""
    try:
        url = RendezvousUrl.parse(url_text)
    except ValueError:
        return None
    best: float | None = None
    for _ in range(2):
        start = clock()
        try:
            _, writer = await asyncio.wait_for(open_stream(net, (url.host, url.port)), timeout)
        except (OSError, TimeoutError):
            continue
        elapsed = clock() - start
        writer.close()
        best = elapsed if best is None else min(best, elapsed)
    return best
