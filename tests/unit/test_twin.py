"""The lab's twin: complete nodes and a rendezvous server on fakenet, behind every NAT kind
the lab builds, on a virtual clock. The same pair matrix, failover, rebinding, lossy-path
and port-prediction cases as tests/lab/test_direct_lab.py, in seconds and without root."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from peerpath.session.connection import SessionConfig
from peerpath.testing import vtime
from peerpath.testing.matrix import expected_direct
from peerpath.testing.twin import Twin, request_ok, soak, wait_direct


def kinds(path: str) -> str:
    """ "direct udp 1.2.3.4:5" -> "direct udp"; "relay ..." -> "relay"."""
    return " ".join(path.split()[:2]) if path.startswith("direct") else "relay"


@pytest.mark.parametrize(("latency", "loss"), [(0.005, 0.0), (0.05, 0.02)], ids=["clean", "50ms-2%-loss"])
def test_the_pair_matrix_matches_the_lab(tmp_path: Path, latency: float, loss: float) -> None:
    async def main() -> dict[frozenset[str], tuple[str, str, bool]]:
        async with Twin(tmp_path, latency=latency) as twin:
            hosts = twin.every_router_kind()
            nodes = {name: await twin.node(name, host) for name, host in sorted(hosts.items())}
            twin.lossy(twin.public_ips(), loss)

            async def pair(a: str, b: str) -> tuple[str, str, bool]:
                conn = await nodes[a].connect(nodes[b].address, timeout=20)
                first = conn.path.describe() if conn.path else "none"
                ok = await request_ok(conn)
                # Virtual time is free: give each pair 30 s to settle (the lab gives 10 s of
                # real time; when a symmetric NAT's birthday rounds queue up behind the
                # node's limit, a pair may need the next round, 5 s of backoff later).
                final = await wait_direct(conn, 30.0)
                return first, final, ok and await request_ok(conn)

            async def exercise(a: str, peers: list[str]) -> dict[frozenset[str], tuple[str, str, bool]]:
                return {frozenset((a, b)): await pair(a, b) for b in peers}  # one peer after another

            names = sorted(nodes)
            # As in the lab: every node exercises the peers after it in turn, all at once.
            done = await asyncio.gather(*(exercise(a, names[i + 1 :]) for i, a in enumerate(names)))
            return {p: o for results in done for p, o in results.items()}

    began = time.perf_counter()
    results = vtime.run(main())
    took = time.perf_counter() - began
    matrix, wrong = [], []
    for pair, (first, final, ok) in sorted(results.items(), key=lambda item: sorted(item[0])):
        a, b = sorted(pair)
        matrix.append(f"{a:>20} - {b:<20} {final}")
        expected = expected_direct(a, b) or "relay"
        if not ok or not first.startswith("relay") or kinds(final) != expected:
            wrong.append((a, b, first, final, ok))
    print("\n".join(matrix), f"\n{len(results)} pairs in {took:.1f} s real")
    assert len(results) == 36
    assert not wrong, wrong


def _one_way(tmp_path: Path, kind: str, run, *, config: SessionConfig | None = None, initiator: str = "one"):
    """A host behind a ``kind`` router ("one") and a public one ("two"), a session that
    ``initiator`` started warmed up direct; ``run(twin, router, conn, two)`` does the rest."""

    async def main():
        async with Twin(tmp_path) as twin:
            router = twin.router("home", kind)
            one = await twin.node("one", twin.host(router, udp_blocked=kind == "udp-blocked"), config=config)
            two = await twin.node("two", twin.host(), config=config)
            conn = await (one.connect(two.address) if initiator == "one" else two.connect(one.address))
            assert await request_ok(conn)
            await wait_direct(conn, 10.0)
            return await run(twin, router, conn, two)

    return vtime.run(main())


@pytest.mark.parametrize(("kind", "path"), [("full-cone", "direct udp"), ("udp-blocked", "direct tcp")])
def test_a_cut_falls_back_to_the_relay_and_recovers(tmp_path: Path, kind: str, path: str) -> None:
    async def run(twin: Twin, router, conn, two) -> list[str]:
        assert kinds(conn.path.describe()) == path
        public = twin.nodes["two"].local_endpoint[0]

        async def faults() -> None:
            await asyncio.sleep(2.0)
            twin.net.cut(router.public_ip, public)  # the direct path dies mid-transfer
            await asyncio.sleep(6.0)
            twin.net.heal(router.public_ip, public)  # and comes back
            await asyncio.sleep(5.0)
            router.forget()  # every NAT mapping forgotten

        chaos = asyncio.ensure_future(faults())
        result = await soak(conn, 22.0)
        await chaos
        assert result.error is None and result.ok == result.sent > 20, result
        return [kinds(p) for p in result.paths]

    taken = _one_way(tmp_path, kind, run)
    assert taken[0] == path and "relay" in taken, taken
    assert taken[taken.index("relay") :].count(path) >= 1, taken  # back to direct
    assert taken[-1] == path, taken  # and again after the mappings were forgotten


def test_a_lossy_direct_path_is_set_aside_for_the_relay_without_flapping(tmp_path: Path) -> None:
    async def run(twin: Twin, router, conn, two):
        public = two.local_endpoint[0]

        async def faults() -> None:
            await asyncio.sleep(2.0)
            twin.net.set_loss(router.public_ip, public, 0.7)
            await asyncio.sleep(20.0)
            twin.net.set_loss(router.public_ip, public, 0.0)

        chaos = asyncio.ensure_future(faults())
        result = await soak(conn, 40.0)
        await chaos
        return result

    result = _one_way(tmp_path, "full-cone", run, config=SessionConfig(path_hold_down=6.0))
    assert result.error is None and result.ok == result.sent, result
    assert any("lost" in reason for reason in result.aside), result
    taken = [kinds(p).split()[0] for p in result.paths]
    assert taken[0] == "direct" and taken[-1] == "direct" and "relay" in taken, result.paths
    assert len(result.paths) <= 8, result.paths  # a handful of moves, not a flap a second


@pytest.mark.parametrize("initiator", ["two", "one"], ids=["public-host-started", "host-behind-nat-started"])
def test_a_nat_rebinding_moves_the_direct_path_to_the_new_port(tmp_path: Path, initiator: str) -> None:
    """The home router forgets its mappings and maps from another port range: the public
    host's direct path to the old port dies, and the session goes direct again to the new
    port with nothing lost, whichever side started it (the lab covers the public host
    starting; when the host behind the NAT did, its checks from the new port are checked in
    turn, since it sees nothing wrong and starts no round)."""

    async def run(twin: Twin, router, conn, two):
        back = await two.connect(twin.nodes["one"].address, timeout=20)  # the public host's view
        before = await wait_direct(back, 10.0)

        async def rebind() -> None:
            await asyncio.sleep(3.0)
            router.forget(port_range=(20000, 20999))

        chaos = asyncio.ensure_future(rebind())
        result = await soak(back, 20.0)
        await chaos
        return router.public_ip, before, result

    public, before, result = _one_way(tmp_path, "port-restricted", run, initiator=initiator)
    assert before.startswith(f"direct udp {public}:") and not 20000 <= int(before.rpartition(":")[2]) < 21000
    assert result.error is None and result.ok == result.sent, result
    assert result.paths[0] == before, result.paths
    final = result.paths[-1]
    assert final.startswith(f"direct udp {public}:") and 20000 <= int(final.rpartition(":")[2]) < 21000, result


@pytest.mark.parametrize("initiator", ["easy", "hard"])
def test_port_prediction_takes_a_sequential_symmetric_nat_direct(tmp_path: Path, initiator: str) -> None:
    async def main():
        async with Twin(tmp_path) as twin:
            hard = await twin.node("hard", twin.host(twin.router("seq", "symmetric-sequential")))
            easy = await twin.node("easy", twin.host(twin.router("easy", "port-restricted")))
            a, b = (easy, hard) if initiator == "easy" else (hard, easy)
            conn = await a.connect(b.address, timeout=20)
            assert await request_ok(conn)
            return await wait_direct(conn, 10.0), dict(easy.direct.counters)

    final, counters = vtime.run(main())
    assert final.startswith("direct udp"), final
    assert counters["predicted_rounds"] >= 1 and counters["predicted_paths"] >= 1, counters


@pytest.mark.parametrize(("kind", "why"), [("symmetric", "random ports"), ("symmetric-sequential", "in sequence")])
def test_two_symmetric_nats_stay_on_the_relay_and_say_why(tmp_path: Path, kind: str, why: str) -> None:
    async def main():
        async with Twin(tmp_path) as twin:
            one = await twin.node("one", twin.host(twin.router("r1", kind)))
            two = await twin.node("two", twin.host(twin.router("r2", kind)))
            conn = await one.connect(two.address, timeout=20)
            assert await request_ok(conn)
            final = await wait_direct(conn, 5.0)
            return final, conn.relay_reason

    final, reason = vtime.run(main())
    assert final.startswith("relay"), final
    assert "both NATs map per destination" in str(reason) and why in str(reason), reason
