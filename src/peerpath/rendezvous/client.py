"""An agent's long-lived connection to its rendezvous server: registration, lookups, names
and tags, and the relay transport. Reconnects with jittered exponential backoff when the server goes
away; sessions riding on other paths are not affected by an outage.

An agent idle for REST_AFTER seconds rests on UDP where the server allows it: it closes its
connection and stays registered by its UDP hellos alone (peers still find it, and relayed
datagrams still reach it over UDP). It connects again at once when it needs the server (a
request), when the server wakes it (a letter waits), or when UDP stops answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import random
from collections.abc import Callable
from typing import Any, TypeVar

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from peerpath import errors
from peerpath.certs import tls_client_context, tls_peer_address
from peerpath.clock import Clock, monotonic
from peerpath.identity import Address, Identity
from peerpath.net import KernelNet, Net, open_stream
from peerpath.rendezvous.directory import (
    Claimed,
    ClaimError,
    Listed,
    check_claim,
    check_name,
    check_tags,
    make_claim,
)
from peerpath.rendezvous.links import WS_MAX_MESSAGE, WS_PATH, Link, StreamLink, WebSocketLink
from peerpath.rendezvous.url import RendezvousUrl
from peerpath.wire import rendezvous as rv
from peerpath.wire.endpoint import Endpoint, parse_endpoint

log = logging.getLogger(__name__)

#: Keepalive toward the server (it drops agents silent for three of its ping intervals).
KEEPALIVE = 10.0
#: Relay frames beyond this many queued bytes are dropped instead of buffered.
SEND_HIGH_WATER = 1 << 20
#: UDP relay hellos: how often, and how long without an acknowledgement before falling back to TCP.
UDP_HELLO_INTERVAL = 10.0
UDP_ACK_TIMEOUT = 25.0
#: Idle this long (nothing on the connection but keepalives, no request waiting), an agent asks
#: to rest on UDP.
REST_AFTER = 60.0

UdpSender = Callable[[bytes, Endpoint], None]
#: Connecting: the whole attempt, and how long TLS over TCP goes alone before WebSocket joins.
CONNECT_TIMEOUT = 10.0
WSS_HEAD_START = 0.5
_CONNECTION_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionClosed)

RelayHandler = Callable[[bytes, bytes], None]
LetterHandler = Callable[[rv.Letter], None]
RegisteredListener = Callable[[rv.Registered], None]
_Answer = TypeVar("_Answer", bound=rv.Message)


class RendezvousError(errors.RemoteError):
    """The server refused us or broke the protocol."""


class RendezvousClient:
    """Keeps this agent registered with one server. :meth:`start`, then :meth:`close`."""

    def __init__(
        self,
        identity: Identity,
        url: RendezvousUrl,
        *,
        on_relay: RelayHandler,
        on_letter: LetterHandler | None = None,
        udp_send: UdpSender | None = None,
        on_registered: Callable[[rv.Registered], None] | None = None,
        backoff: tuple[float, float] = (0.25, 30.0),
        rng: random.Random | None = None,
        net: Net | None = None,
        clock: Clock = monotonic,
        rest_after: float | None = REST_AFTER,
    ) -> None:
        self.identity = identity
        self.net = net or KernelNet()
        self.clock = clock
        self.url = url
        self.on_relay = on_relay
        self.on_letter = on_letter
        self._udp_send = udp_send
        self.on_registered = on_registered
        #: The relays the server offered at the last registration (its own URL first).
        self.relays: list[str] = []
        #: The server's STUN endpoints ("ip:port"), for netcheck.
        self.stun: list[str] = []
        self.udp_ready = False
        self._udp_endpoint: Endpoint | None = None
        self._token = b""
        self._udp_key = b""
        self._udp_acked = 0.0
        self._udp_task: asyncio.Task[None] | None = None
        # A server on this machine is cheap to retry and may be taken over by another node
        # within a second: never back off long from it.
        self._backoff = (backoff[0], min(backoff[1], 1.0)) if _is_loopback(url.host) else backoff
        self._rng = rng or random.Random()
        self.registered = asyncio.Event()
        self.observed: str | None = None
        self.last_error: str | None = None
        self.registrations = 0
        self.counters = {
            "relay_sent": 0,
            "relay_sent_udp": 0,
            "relay_received": 0,
            "relay_received_udp": 0,
            "relay_dropped": 0,
            "udp_dropped": 0,
        }
        self._link: Link | None = None
        self.transport_name: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._lookups: dict[int, asyncio.Future[rv.LookupResult]] = {}
        self._posts: dict[int, asyncio.Future[rv.PostResult]] = {}
        #: Directory requests (names, tags, searches) waiting for their answer, by id.
        self._answers: dict[int, asyncio.Future[rv.Message]] = {}
        self._registered_listeners: list[RegisteredListener] = []
        self._ids = itertools.count(1)
        self._closed = False
        #: Idle this long, ask to rest on UDP (None: never).
        self.rest_after = rest_after
        #: Resting on UDP: registered, with no connection (see the module's text).
        self.resting = False
        self._rest_allowed = False
        #: Our Rest waiting for its answer: its id, and how much had happened when we asked.
        self._rest_asked: tuple[int, int] | None = None
        #: When something last happened on the connection, and how many things have (:meth:`_touch`).
        self._active = clock()
        self._activity = 0
        self._woken = asyncio.Event()

    async def start(self) -> None:
        """Start connecting in the background (returns at once)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_registered(self, timeout: float) -> None:
        """Wait until registered; raise a NetworkError that says why not."""
        try:
            await asyncio.wait_for(self.registered.wait(), timeout)
        except TimeoutError:
            reason = f": {self.last_error}" if self.last_error else ""
            raise errors.NetworkError(f"not registered with {self.url.endpoint} within {timeout:g} s{reason}") from None

    async def close(self) -> None:
        """Disconnect and stop reconnecting (resting, say goodbye: offline at once)."""
        self._closed = True
        if self.resting and self._udp_send is not None and self._udp_endpoint is not None:
            goodbye = rv.encode_udp_goodbye(self._token, self._udp_key)
            with contextlib.suppress(Exception):  # the node's socket may be closing too
                for _ in range(2):  # (one may be lost)
                    self._udp_send(goodbye, self._udp_endpoint)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._drop_connection("client closed")

    def status(self) -> dict[str, Any]:
        """Where we are registered and the relay counters."""
        return {
            "url": str(self.url),
            "registered": self.registered.is_set(),
            "observed": self.observed,
            "last_error": self.last_error,
            "registrations": self.registrations,
            "connection": "resting on udp" if self.resting else self.transport_name,
            "resting": self.resting,
            "relay_transport": "udp" if self.udp_ready else self.transport_name,
            **self.counters,
        }

    # -- requests ---------------------------------------------------------------------

    async def lookup(self, address: Address, timeout: float = 5.0) -> rv.LookupResult:
        """Ask the server whether ``address`` is online and how to reach it."""
        await self._ready(timeout)
        request_id = next(self._ids)
        future: asyncio.Future[rv.LookupResult] = asyncio.get_running_loop().create_future()
        self._lookups[request_id] = future
        try:
            self._send(rv.encode_control(rv.Lookup(request_id, str(address))))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise errors.NetworkError(f"lookup of {address} got no answer within {timeout:g} s") from None
        finally:
            self._lookups.pop(request_id, None)

    async def post(self, letter: rv.Letter, timeout: float = 10.0) -> None:
        """Hand a signed letter to the server, which keeps it until its recipient is online."""
        await self._ready(timeout)
        request_id = next(self._ids)
        future: asyncio.Future[rv.PostResult] = asyncio.get_running_loop().create_future()
        self._posts[request_id] = future
        try:
            self._send(rv.encode_control(rv.Post(request_id, letter)))
            result = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise errors.NetworkError(f"the server did not confirm the letter within {timeout:g} s") from None
        finally:
            self._posts.pop(request_id, None)
        if not result.ok:
            raise RendezvousError(f"the server refused the letter: {result.error}")

    async def _ready(self, timeout: float) -> None:
        """Registered with a connection for a request: a resting agent connects again."""
        self.wake("a request")
        await self.wait_registered(timeout)

    def wake(self, why: str) -> None:
        """Stop resting on UDP (if resting) and connect to the server again at once."""
        if not self.resting:
            return
        log.info("rendezvous %s: connecting again (%s)", self.url.endpoint, why)
        self.resting = False
        self.registered.clear()  # until the new registration
        self._woken.set()

    def add_registered_listener(self, listener: RegisteredListener) -> Callable[[], None]:
        """Call ``listener`` after every registration from now on (each reconnection is one), after
        ``on_registered``; returns what removes it. A listener that raises is logged and skipped."""
        self._registered_listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._registered_listeners.remove(listener)

        return remove

    async def _ask(
        self, make: Callable[[int], rv.Message], expected: type[_Answer], what: str, timeout: float
    ) -> _Answer:
        """Send the directory request ``make(id)`` and return its answer; a refusal raises
        :class:`RendezvousError` as "WHAT: the server's reason"."""
        await self._ready(timeout)
        request_id = next(self._ids)
        future: asyncio.Future[rv.Message] = asyncio.get_running_loop().create_future()
        self._answers[request_id] = future
        try:
            self._send(rv.encode_control(make(request_id)))
            answer = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise errors.NetworkError(f"{what}: {self.url.endpoint} did not answer within {timeout:g} s") from None
        finally:
            self._answers.pop(request_id, None)
        if isinstance(answer, rv.Outcome) and not answer.ok:
            raise RendezvousError(f"{what}: {answer.error}")
        if not isinstance(answer, expected):
            raise RendezvousError(f"{what}: the server answered with {type(answer).__name__}")
        return answer

    async def claim_name(self, name: str, timeout: float = 10.0) -> rv.NameClaim:
        """Claim ``name`` at the server (first come, first served; it replaces this agent's
        previous name), or renew it; the signed claim. Refused: :class:`RendezvousError`."""
        name = check_name(name)
        claim = make_claim(self.identity, name, self.url.address)
        await self._ask(lambda i: rv.ClaimName(i, claim), rv.Outcome, f"cannot claim {name!r}", timeout)
        return claim

    async def release_name(self, timeout: float = 10.0) -> None:
        """Give up this agent's name at the server (nothing happens if it has none)."""
        await self._ask(rv.ReleaseName, rv.Outcome, "cannot release the name", timeout)

    async def resolve_name(self, name: str, timeout: float = 5.0) -> Claimed | None:
        """Who claims ``name`` at the server (None: nobody). The claim is checked here, and the
        address derived from its key: the server cannot make a name stand for anyone else."""
        name = check_name(name)
        answer = await self._ask(
            lambda i: rv.ResolveName(i, name), rv.NameResolved, f"cannot resolve {name!r}", timeout
        )
        if answer.claim is None:
            return None
        if answer.claim.name != name:
            raise RendezvousError(f"asked for {name!r}, the server answered with the claim of {answer.claim.name!r}")
        try:
            return check_claim(answer.claim, self.url.address)
        except ClaimError as exc:
            raise RendezvousError(f"the server's answer for {name!r} does not hold up: {exc}") from None

    async def set_profile(self, tags: list[str], public: bool, timeout: float = 10.0) -> None:
        """Tell the server this agent's tags, and whether searches may list it."""
        checked = check_tags(tags)
        await self._ask(lambda i: rv.SetProfile(i, checked, public), rv.Outcome, "cannot set the tags", timeout)

    async def find(self, tags: list[str], timeout: float = 10.0) -> tuple[list[Listed], bool]:
        """The public agents with every one of ``tags``, and whether the server left some out.
        Each address is derived from the agent's key, and a name shown only if its claim holds up."""
        wanted = check_tags(tags)
        answer = await self._ask(lambda i: rv.Find(i, wanted), rv.Found, "cannot search", timeout)
        listed = []
        for listing in answer.agents:
            try:
                address = Address.from_public_key(listing.public_key)
            except ValueError:
                log.info("ignoring a search result with a malformed key")
                continue
            if not set(wanted) <= set(listing.tags):
                log.info("ignoring %s in the search results: it lacks a tag searched for", address)
                continue
            name = ""
            if listing.claim is not None:
                try:
                    claimed = check_claim(listing.claim, self.url.address)
                except ClaimError as exc:
                    log.info("ignoring the name of %s: %s", address, exc)
                else:
                    name = claimed.name if claimed.address == address else ""
            listed.append(Listed(address, name, list(listing.tags), listing.online))
        return listed, answer.more

    def set_home_relay(self, url: str) -> None:
        """Tell the server which of its relays peers should use to reach us."""
        self._send(rv.encode_control(rv.HomeRelay(url)))

    @property
    def udp_endpoint(self) -> Endpoint | None:
        """The server's UDP relay endpoint we use (frames from elsewhere are not its)."""
        return self._udp_endpoint

    def send_relay(self, destination: bytes, datagram: bytes) -> bool:
        """Hand a session datagram to the relay for ``destination``; False if it was dropped.

        Over UDP when the server acknowledged our UDP hello (both directions work), else over
        the TLS connection.
        """
        if self.udp_ready and self._udp_send is not None and self._udp_endpoint is not None:
            self._udp_send(rv.encode_udp_relay(self._token, self._udp_key, destination, datagram), self._udp_endpoint)
            self.counters["relay_sent"] += 1
            self.counters["relay_sent_udp"] += 1
            return True
        link = self._link
        if link is None or not self.registered.is_set() or link.is_closing():
            self.counters["relay_dropped"] += 1
            return False
        if link.buffered() > SEND_HIGH_WATER:
            self.counters["relay_dropped"] += 1
            return False
        link.write(rv.encode_relay(destination, datagram))
        self.counters["relay_sent"] += 1
        self._touch()
        return True

    def udp_received(self, data: bytes, addr: Endpoint) -> None:
        """A UDP relay frame arrived on the node's socket: only the server we registered with,
        under this registration's key, speaks this protocol to us."""
        if addr != self._udp_endpoint or not rv.udp_authentic(self._udp_key, data):
            self.counters["udp_dropped"] += 1
            return
        try:
            frame = rv.parse_udp_relay(data)
        except rv.FrameError:
            self.counters["udp_dropped"] += 1
            return
        if frame.kind == rv.UDP_FROM_SERVER:
            self.counters["relay_received"] += 1
            self.counters["relay_received_udp"] += 1
            self._deliver(frame.address, frame.payload)
        elif frame.kind == rv.UDP_CHALLENGE and frame.token == self._token and self._udp_send is not None:
            self._udp_send(rv.encode_udp_response(self._token, self._udp_key, frame.payload), addr)
        elif frame.kind == rv.UDP_WAKE and frame.token == self._token:
            if self.resting:
                self.wake("the server woke us")
            elif self._rest_asked is not None:
                self._touch()  # it said yes to our rest and then had a letter: we stay
        elif frame.kind == rv.UDP_HELLO_ACK and frame.token == self._token:
            self._udp_acked = self.clock()
            if not self.udp_ready:
                self.udp_ready = True
                with contextlib.suppress(errors.NetworkError):
                    self._send(rv.encode_control(rv.UdpReady(True)))
                log.info("relay traffic to %s goes over UDP", self.url.endpoint)

    def _deliver(self, source: bytes, datagram: bytes) -> None:
        """Hand a relayed datagram to the node; a failure there costs that datagram, not the link."""
        try:
            self.on_relay(source, datagram)
        except Exception:
            log.exception("a relayed datagram from the server could not be handled")

    async def _udp_hellos(self) -> None:
        if self._udp_send is None or self._udp_endpoint is None:
            return
        delays = [0.0, 0.3, 1.0, 3.0]
        for sequence in itertools.count(1):  # numbered: a copy replayed later proves nothing
            await asyncio.sleep(delays.pop(0) if delays else UDP_HELLO_INTERVAL)
            self._udp_send(rv.encode_udp_hello(self._token, self._udp_key, sequence), self._udp_endpoint)
            if self.udp_ready and self.clock() - self._udp_acked > UDP_ACK_TIMEOUT:
                self.udp_ready = False
                log.info("UDP relay to %s stopped answering; back to TCP", self.url.endpoint)
                if self.resting:
                    self.wake("UDP stopped answering")  # the server is about to drop us
                    continue
                with contextlib.suppress(errors.NetworkError):
                    self._send(rv.encode_control(rv.UdpReady(False)))

    def _send(self, frame: bytes, active: bool = True) -> None:
        """Write a frame to the connection; ``active``: it is the agent's own doing (a
        keepalive is not), which keeps the agent from resting a while longer."""
        if self._link is None or self._link.is_closing():
            raise errors.NetworkError(f"not connected to {self.url.endpoint}")
        self._link.write(frame)
        if active:
            self._touch()

    # -- the connection -----------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, serve, and reconnect with backoff, for as long as the client is open: nothing
        the server sends or does ends this loop (a bug is logged and counts as an outage)."""
        low, high = self._backoff
        delay = low
        while not self._closed:
            try:
                await self._connect_and_serve()
                delay = low  # it was up: the next outage starts from the shortest backoff
            except (*_CONNECTION_ERRORS, rv.FrameError, errors.PeerpathError) as exc:
                if not self.resting:
                    self.last_error = str(exc) or type(exc).__name__
                    log.info("rendezvous %s: %s", self.url.endpoint, self.last_error)
            except Exception as exc:
                self.last_error = f"internal error: {type(exc).__name__}: {exc}"
                log.exception("rendezvous %s: the connection failed", self.url.endpoint)
                self.resting = False
            finally:
                if self.resting:
                    self._close_link()  # registered still: the UDP hellos go on
                else:
                    self._drop_connection("disconnected")
            if self._closed:
                return
            if self.resting:
                await self._woken.wait()
                delay = low
                continue
            # Full jitter (AWS architecture blog's "exponential backoff and jitter").
            await asyncio.sleep(self._rng.uniform(low, delay))
            delay = min(high, delay * 2)

    async def _open_link(self) -> Link:
        """TLS over TCP to the server's port; if that has not worked within a moment (or
        fails), WebSocket over TLS to its ``wss`` port too; the first to connect wins."""
        attempts = [self._open_tls()]
        if self.url.wss_port:
            attempts.append(self._open_wss(delay=WSS_HEAD_START))
        tasks = [asyncio.ensure_future(a) for a in attempts]
        failures: list[str] = []
        winner: Link | None = None
        try:
            for next_done in asyncio.as_completed(tasks, timeout=CONNECT_TIMEOUT):
                try:
                    winner = await next_done
                    break
                except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                    failures.append(str(exc) or type(exc).__name__)
        except TimeoutError:
            failures.append(f"no connection within {CONNECT_TIMEOUT:g} s")
        finally:
            for task in tasks:
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if outcome is not winner and isinstance(outcome, StreamLink | WebSocketLink):
                    outcome.close()  # the slower attempt connected too: not needed
        if winner is None:
            raise OSError("; ".join(failures))
        self.transport_name = "wss" if isinstance(winner, WebSocketLink) else "tls"
        return winner

    async def _open_tls(self) -> Link:
        reader, writer = await open_stream(self.net, (self.url.host, self.url.port), tls=tls_client_context())
        return StreamLink(reader, writer)

    async def _open_wss(self, delay: float) -> Link:
        await asyncio.sleep(delay)
        host = f"[{self.url.host}]" if ":" in self.url.host else self.url.host
        ws = await ws_connect(
            f"wss://{host}:{self.url.wss_port}{WS_PATH}",
            ssl=tls_client_context(),
            server_hostname="peerpath",
            max_size=WS_MAX_MESSAGE,
            compression=None,
            open_timeout=CONNECT_TIMEOUT,
        )
        return WebSocketLink(ws)

    async def _connect_and_serve(self) -> None:
        link = await self._open_link()
        self._link = link
        proven = tls_peer_address(link.ssl_object())
        if proven != self.url.address:
            raise RendezvousError(
                f"the server at {self.url.endpoint} is {proven or 'not a peerpath server'}, not {self.url.address}"
            )
        decoder = rv.FrameDecoder()
        keepalive = asyncio.get_running_loop().create_task(self._keepalive())
        try:
            while data := await asyncio.wait_for(link.read(), KEEPALIVE * 4):
                for message, datagram in decoder.feed(data):
                    if datagram is None:
                        self._on_control(message)  # type: ignore[arg-type]
                    else:
                        self.counters["relay_received"] += 1
                        self._touch()
                        self._deliver(message, datagram)  # type: ignore[arg-type]
                if self.resting:
                    return
            if not self.resting:
                self.last_error = "the server closed the connection"
        finally:
            keepalive.cancel()

    def _on_control(self, message: rv.Message) -> None:
        if not isinstance(message, rv.Ping | rv.Pong | rv.Outcome):
            self._touch()
        if isinstance(message, rv.Challenge):
            if message.server != str(self.url.address):
                raise RendezvousError(f"server names itself {message.server}, expected {self.url.address}")
            payload = rv.register_payload(message.nonce, self.identity.address.digest, self.url.address.digest)
            register = rv.Register(self.identity.public_key, self.identity.sign(payload))
            self._send(rv.encode_control(register))
        elif isinstance(message, rv.Registered):
            self.observed = message.observed
            self._token = message.token
            self._udp_key = message.udp_key
            self._udp_endpoint = _pick_udp_endpoint(message.udp_relay, self.url.host)
            self.udp_ready = False  # this registration's UDP is not acknowledged yet
            self._rest_allowed = message.rest
            self._rest_asked = None
            self._woken.clear()
            if self._udp_task is not None:
                self._udp_task.cancel()
            self._udp_task = asyncio.get_running_loop().create_task(self._udp_hellos())
            self.registrations += 1
            self.last_error = None
            self.relays = list(message.relays)
            self.stun = list(message.stun)
            self.registered.set()
            if self.on_registered is not None:
                self.on_registered(message)
            for listener in list(self._registered_listeners):
                try:
                    listener(message)
                except Exception:
                    log.exception("a listener of registrations failed")
            log.info(
                "registered with %s as %s (seen from %s)", self.url.endpoint, self.identity.address, message.observed
            )
        elif isinstance(message, rv.Refused):
            raise RendezvousError(f"refused by {self.url.endpoint}: {message.reason}")
        elif isinstance(message, rv.LookupResult):
            future = self._lookups.get(message.id)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, rv.PostResult):
            posted = self._posts.get(message.id)
            if posted is not None and not posted.done():
                posted.set_result(message)
        elif isinstance(message, rv.Outcome) and self._rest_asked is not None and message.id == self._rest_asked[0]:
            self._rest_answered(message, self._rest_asked[1])
        elif isinstance(message, rv.NameResolved | rv.Found | rv.Outcome):
            answered = self._answers.get(message.id)
            if answered is not None and not answered.done():
                answered.set_result(message)
        elif isinstance(message, rv.Deliver):
            if self.on_letter is not None:
                # A letter not handled is not acknowledged: the server keeps it and delivers it
                # again at the next registration.
                try:
                    self.on_letter(message.letter)
                except errors.PeerpathError as exc:
                    log.info("letter %d left in the server's mailbox: %s", message.letter_id, exc)
                    return
                except Exception:
                    log.exception("handling a letter failed; it stays in the server's mailbox")
                    return
            self._send(rv.encode_control(rv.Received(message.letter_id)))
        elif isinstance(message, rv.Ping):
            self._send(rv.encode_control(rv.Pong(message.id)), active=False)
        elif isinstance(message, rv.Pong | rv.Unreachable):
            pass
        else:
            raise RendezvousError(f"unexpected {type(message).__name__} from the server")

    async def _keepalive(self) -> None:
        """Every KEEPALIVE seconds a ping, or, idle long enough, the question whether we may rest."""
        while True:
            await asyncio.sleep(KEEPALIVE)
            ident = next(self._ids)
            message: rv.Ping | rv.Rest = rv.Ping(ident)
            if self._may_rest():
                message = rv.Rest(ident)
                self._rest_asked = (ident, self._activity)
            with contextlib.suppress(errors.NetworkError):
                self._send(rv.encode_control(message), active=False)

    def _waiting(self) -> bool:
        """Whether a request waits for the server's answer."""
        return bool(self._lookups or self._posts or self._answers)

    def _may_rest(self) -> bool:
        """Idle for ``rest_after`` on a connection whose server lets agents rest, with UDP
        acknowledged lately (a resting agent lives by its UDP hellos) and nothing waiting."""
        now = self.clock()
        return (
            self.rest_after is not None
            and self._rest_allowed
            and self._rest_asked is None
            and self.udp_ready
            and now - self._udp_acked < UDP_HELLO_INTERVAL * 2
            and now - self._active >= self.rest_after
            and not self._waiting()
        )

    def _touch(self) -> None:
        """Something happened on the connection (sent or received), or a wake came: the idle
        spell starts again, and a rest asked for before it is called off."""
        self._active = self.clock()
        self._activity += 1

    def _rest_answered(self, outcome: rv.Outcome, activity: int) -> None:
        """The server's answer to our :class:`~peerpath.wire.rendezvous.Rest`: rest (close the
        connection) if it said yes and nothing happened since we asked; else say we stay, so
        that both ends agree that we are connected."""
        self._rest_asked = None
        if not outcome.ok:
            log.info("rendezvous %s: staying connected: %s", self.url.endpoint, outcome.error)
            self._touch()  # ask again only after another idle spell
            return
        if self._activity != activity or self._waiting() or not self.udp_ready:
            with contextlib.suppress(errors.NetworkError):
                self._send(rv.encode_control(rv.Stay(outcome.id)), active=False)
            return
        log.info("rendezvous %s: idle; resting on UDP", self.url.endpoint)
        self.resting = True
        self._woken.clear()
        self._close_link()

    def _close_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def _drop_connection(self, reason: str) -> None:
        self.resting = False
        self.registered.clear()
        self.udp_ready = False
        if self._udp_task is not None:
            self._udp_task.cancel()
            self._udp_task = None
        if self._link is not None:
            self._link.close()
            self._link = None
        pending: list[asyncio.Future[Any]] = [*self._lookups.values(), *self._posts.values(), *self._answers.values()]
        for future in pending:
            if not future.done():
                future.set_exception(errors.NetworkError(f"rendezvous connection lost: {reason}"))


def _pick_udp_endpoint(endpoints: list[str], preferred_host: str) -> Endpoint | None:
    """The server's UDP relay endpoint on the host we reached it at, else its first one."""
    parsed = []
    for text in endpoints:
        with contextlib.suppress(ValueError):
            parsed.append(parse_endpoint(text))
    for endpoint in parsed:
        if endpoint[0] == preferred_host:
            return endpoint
    return parsed[0] if parsed else None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
