"""Pub/sub between agent nodes on loopback: patterns, fan-out, rules, slow subscribers,
resumed subscriptions and malformed frames."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerpath import errors
from peerpath.identity import Identity
from peerpath.services import ports, pubsub
from peerpath.services.frames import encode
from peerpath.services.pubsub import Publish, Rule, Rules, TopicError, check_topic, codec, matches

from .conftest import Agents, eventually


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("sensors.kitchen.temp", "sensors.kitchen.temp", True),
        ("sensors.*.temp", "sensors.kitchen.temp", True),
        ("sensors.*.temp", "sensors.kitchen.humidity", False),
        ("sensors.*", "sensors.kitchen.temp", False),
        ("jobs.>", "jobs.a", True),
        ("jobs.>", "jobs.a.b.c", True),
        ("jobs.>", "jobs", False),
        (">", "anything.at.all", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_patterns_match_as_nats_patterns_do(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


def test_bad_topics_and_patterns_are_refused() -> None:
    for bad in ["", "Sensors", "a..b", "a.*", "a.>.b", "a b", "x" * 201, ".".join("a" * 17)]:
        with pytest.raises(TopicError):
            check_topic(bad)
    assert check_topic("a.*.>", pattern=True) == "a.*.>"
    with pytest.raises(TopicError, match="'>' \\(last\\)"):
        check_topic("a.>.b", pattern=True)


def test_rules_first_match_and_overlapping_subscriptions(tmp_path: Path) -> None:
    rules = Rules(tmp_path / "pubsub.json")
    alice, bob = Identity.generate().address, Identity.generate().address
    rules.set(Rule("secrets.>", frozenset({alice}), frozenset({alice})))
    rules.set(Rule("news.>", frozenset(), None))
    assert rules.may_publish(alice, "secrets.x") and not rules.may_publish(bob, "secrets.x")
    assert not rules.may_publish(alice, "news.today") and rules.may_subscribe(bob, "news.>")
    assert rules.may_publish(bob, "other.topic")
    # A pattern that could match a secret topic is a subscription to it.
    assert not rules.may_subscribe(bob, ">") and not rules.may_subscribe(bob, "*.x")
    assert rules.may_subscribe(alice, ">")
    assert Rules(tmp_path / "pubsub.json").rules == rules.rules  # saved
    assert (tmp_path / "pubsub.json").stat().st_mode & 0o777 == 0o600


async def _take(iterator: AsyncIterator[pubsub.Event], count: int, timeout: float = 10.0) -> list[pubsub.Event]:
    got = []
    async with asyncio.timeout(timeout):
        async for event in iterator:
            got.append(event)
            if len(got) == count:
                break
    return got


async def test_subscribers_get_what_their_patterns_match(agents: Agents) -> None:
    host, other = await agents.pair()
    temps = other.pubsub.subscribe(f"{host.address}/sensors.*.temp")
    everything = other.pubsub.subscribe("alice/>")
    first = asyncio.ensure_future(_take(temps, 2))
    second = asyncio.ensure_future(_take(everything, 3))
    await eventually(lambda: host.pubsub.describe()["subscribers"] == 2)
    assert host.pubsub.publish_local("sensors.kitchen.temp", 21.5) == 2
    assert host.pubsub.publish_local("sensors.kitchen.humidity", {"pct": 40}) == 1
    assert await other.pubsub.publish("alice/sensors.garage.temp", 9) == 2  # a peer publishes at the host
    got = await first
    assert [(e.topic, e.data, e.publisher) for e in got] == [
        ("sensors.kitchen.temp", 21.5, host.address),
        ("sensors.garage.temp", 9, other.address),
    ]
    assert [e.topic for e in await second] == [
        "sensors.kitchen.temp",
        "sensors.kitchen.humidity",
        "sensors.garage.temp",
    ]
    await temps.aclose()
    await everything.aclose()
    await eventually(lambda: host.pubsub.describe()["subscribers"] == 0)


async def test_rules_refuse_publishers_and_subscribers(agents: Agents, tmp_path: Path) -> None:
    host, other = await agents.pair()
    host.pubsub.rules.set(Rule("admin.>", frozenset(), frozenset()))
    with pytest.raises(errors.PeerRefusedError, match=r"may not publish to 'admin\.reboot'"):
        await other.pubsub.publish(f"{host.address}/admin.reboot", True)
    with pytest.raises(errors.PeerRefusedError, match="may not subscribe to '>'"):
        await _take(other.pubsub.subscribe(f"{host.address}/>"), 1)
    assert host.pubsub.counters["refused"] == 2


async def test_a_slow_subscriber_drops_events_and_does_not_slow_the_others(
    agents: Agents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pubsub, "QUEUE", 8)
    host, other = await agents.pair()
    slow = host.pubsub.subscribe("ticks")  # read once, then not at all
    fast = other.pubsub.subscribe(f"{host.address}/ticks")
    slow_first = asyncio.ensure_future(_take(slow, 1))
    fast_all = asyncio.ensure_future(_take(fast, 100, timeout=30))
    await eventually(lambda: host.pubsub.describe()["subscribers"] == 2)
    for i in range(100):
        host.pubsub.publish_local("ticks", i)
        await asyncio.sleep(0.002)
    assert [e.data for e in await fast_all] == list(range(100))
    assert [e.data for e in await slow_first] == [0]
    later = await _take(slow, 8)
    assert [e.data for e in later] == list(range(1, 9))  # what fitted its queue
    assert later[-1].dropped == 100 - 9 == host.pubsub.counters["dropped"]
    await slow.aclose()
    await fast.aclose()


async def test_a_subscription_resumes_after_the_host_restarts(agents: Agents) -> None:
    host, other = await agents.pair()
    subscription = other.pubsub.subscribe("alice/jobs.>")
    got = asyncio.ensure_future(_take(subscription, 2, timeout=60))
    await eventually(lambda: host.pubsub.describe()["subscribers"] == 1)
    host.pubsub.publish_local("jobs.one", 1)
    await agents.stop("alice")
    host = await agents.start("alice")
    await eventually(lambda: host.pubsub.describe()["subscribers"] == 1, timeout=30)
    host.pubsub.publish_local("jobs.two", 2)
    assert [e.data for e in await got] == [1, 2]
    await subscription.aclose()


async def test_malformed_frames_close_the_stream_and_the_host_keeps_serving(agents: Agents) -> None:
    host, other = await agents.pair()
    conn = await other.connect(host.address)
    for garbage in [b"\x00\x00\x00\x02\x91\xc0", encode(Publish("ok", b"\xc0")) + b"\x00\x00\x00\x01\xc1"]:
        reader, writer = await conn.open_stream(ports.PUBSUB)
        writer.write(garbage)
        writer.write_eof()
        with pytest.raises((errors.StreamResetError, ConnectionError)):
            while await reader.read(65536):
                pass
            raise ConnectionError("closed")
    reader, writer = await conn.open_stream(ports.PUBSUB)
    writer.write(encode(Publish("Bad Topic", b"\xc0")))
    answer = await codec.read(reader, 10)
    assert isinstance(answer, pubsub.Refused) and "bad topic" in answer.reason
    assert await other.pubsub.publish("alice/fine", "still here") == 0


async def test_an_event_that_does_not_decode_is_refused_and_subscribers_go_on(agents: Agents) -> None:
    host, other = await agents.pair()
    subscription = other.pubsub.subscribe(f"{host.address}/news")
    got = asyncio.ensure_future(_take(subscription, 1))
    await eventually(lambda: host.pubsub.describe()["subscribers"] == 1)
    conn = await other.connect(host.address)
    reader, writer = await conn.open_stream(ports.PUBSUB)
    writer.write(encode(Publish("news", b"\xd4\x01x")))  # a msgpack extension type
    answer = await codec.read(reader, 10)
    assert isinstance(answer, pubsub.Refused) and "does not decode" in answer.reason
    writer.write_eof()
    host.pubsub.publish_local("news", "fine")
    assert [e.data for e in await got] == ["fine"]
    await subscription.aclose()
