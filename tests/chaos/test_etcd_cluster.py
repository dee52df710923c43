"""A 3-member etcd cluster under one coordinator given every endpoint, and a halt watch
that goes silent. Real etcd processes, real signals, a real TCP proxy on loopback.

The cluster elects in 0.5 to 1 s (``--election-timeout=500``) instead of etcd's default
1 to 2 s: the tests' lease TTL is 3 s, not the default 10 s, and a leaderless cluster must
elect within half the TTL (``_coordinator``'s DEADLINE minus PROOF_PERIOD) for a leader's
death to stop nobody. The ratio is the default one: 10 s against 1 to 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tether
from tether_server import CoordinatorProcess, EtcdCluster, EtcdProcess
from tether_server._etcd import Store
from tether_server._freshness import Freshness
from tether_server._store import HALTS, halt_key, put_op
from tether_server._watch import ResumingWatch, WatchStalled, prove_fresh

from tests.chaos.proxy import Proxy
from tests.conftest import eventually

pytestmark = pytest.mark.chaos

TTL = 3.0
AGENTS = 20
ELECTION = ("--heartbeat-interval=50", "--election-timeout=500")


class Fleet:
    """``AGENTS`` SDK agents in this process, and a thread that notes when each stops."""

    def __init__(self, tenant: str, target: str) -> None:
        self.tenant = tenant
        self._stack = contextlib.ExitStack()
        self.agents = [
            self._stack.enter_context(
                tether.Agent(f"agent://{tenant}/a{i}", run_id=f"r{i}", target=target)
            )
            for i in range(AGENTS)
        ]
        self.stops: dict[int, tuple[float, Exception]] = {}
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._done.wait(0.01):
            for i, agent in enumerate(self.agents):
                try:
                    agent.check()
                except tether.Killed as err:
                    self.stops.setdefault(i, (time.monotonic(), err))

    def running(self) -> bool:
        return not any(agent.killed for agent in self.agents)

    def all_stopped(self, kind: type[Exception]) -> bool:
        return len(self.stops) == AGENTS and all(
            isinstance(err, kind) for _, err in self.stops.values()
        )

    def forget(self) -> None:
        """Start noting stops afresh."""
        self.stops.clear()

    def close(self) -> None:
        self._done.set()
        self._watcher.join()
        self._stack.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    etcd = EtcdCluster(tmp_path / "etcd", log_dir=tmp_path, extra=ELECTION).start()
    yield etcd
    etcd.stop()


def test_losing_members_of_a_cluster(cluster: EtcdCluster, tmp_path: Path) -> None:
    coordinator = CoordinatorProcess(
        cluster.urls,
        lease_ttl=TTL,
        log=tmp_path / "coordinator.log",
        env={**os.environ, "TETHER_LOG_LEVEL": "INFO"},
    ).start()
    fleet = Fleet("chaos", coordinator.addr)
    try:
        _leader_dies_and_nobody_stops(cluster, fleet, coordinator.addr)
        _quorum_lost_and_everyone_stops(cluster, fleet)
        _quorum_back_and_the_fleet_runs(cluster, fleet)
    finally:
        fleet.close()
        coordinator.stop()


def _leader_dies_and_nobody_stops(cluster: EtcdCluster, fleet: Fleet, addr: str) -> None:
    leader = cluster.leader()
    leader.kill()
    killed_at = time.monotonic()
    new_leader = cluster.leader()
    time.sleep(3 * TTL)  # three TTLs: the proof, the lease and the watch all moved
    assert fleet.stops == {}, f"agents stopped after the leader died: {fleet.stops}"
    print(
        f"\netcd leader {leader.name} SIGKILLed; {new_leader.name} leads; "
        f"{AGENTS} agents ran undisturbed for {time.monotonic() - killed_at:.1f}s"
    )
    with tether.AdminClient(addr) as admin:
        issued = time.monotonic()
        admin.kill(tether.selector(tenant=fleet.tenant), "chaos: after the leader died")
        eventually(lambda: fleet.all_stopped(tether.Killed))
        assert not any(isinstance(e, tether.TetherLost) for _, e in fleet.stops.values())
        latest = max(at for at, _ in fleet.stops.values())
        print(f"a kill after the leader change reached all in {latest - issued:.3f}s")
        admin.resume(tether.selector(tenant=fleet.tenant), "chaos: resume")
        eventually(fleet.running)
    fleet.forget()


def _quorum_lost_and_everyone_stops(cluster: EtcdCluster, fleet: Fleet) -> None:
    second = cluster.running()[0]
    second.kill()
    killed_at = time.monotonic()
    eventually(lambda: fleet.all_stopped(tether.TetherLost), timeout=2 * TTL)
    slowest = max(at for at, _ in fleet.stops.values()) - killed_at
    print(f"quorum lost: all {AGENTS} agents failed closed within {slowest:.2f}s (TTL {TTL:g}s)")
    assert slowest <= TTL


def _quorum_back_and_the_fleet_runs(cluster: EtcdCluster, fleet: Fleet) -> None:
    down = [m for m in cluster if m not in cluster.running()]
    restarted_at = time.monotonic()
    cluster.restart(*down)
    eventually(fleet.running, timeout=30)
    for agent in fleet.agents:
        agent.check()
    print(f"quorum back: the fleet ran again {time.monotonic() - restarted_at:.1f}s after restart")


# -- a silent halt watch --------------------------------------------------------------------


@pytest.fixture
def solo(tmp_path: Path) -> Iterator[EtcdProcess]:
    member = EtcdProcess(tmp_path / "solo", "solo").start()
    yield member
    member.stop()


def _watching(stores: tuple[Store, Store], deadline: float) -> tuple[ResumingWatch, Freshness]:
    fresh = Freshness(deadline, time.monotonic())
    return ResumingWatch(stores[0], HALTS, 0, fresh.reached), fresh


async def _silent_watch(etcd: EtcdProcess, proxy: Proxy, *, spare: bool) -> str:
    """Watch through ``proxy`` (then ``etcd`` itself if ``spare``), read directly, pause the
    proxy, and say what happened: "stalled after Xs" or "moved, event delivered"."""
    endpoints = [proxy.addr, *([etcd.endpoint] if spare else [])]
    watched, direct = Store(endpoints), Store([etcd.endpoint])
    watch, fresh = _watching((watched, direct), deadline=1.0)
    seen: list[int] = []

    async def consume() -> None:
        async for resp in watch.events():
            seen.extend(e.kv.mod_revision for e in resp.events)

    async def read(timeout: float) -> int:
        return await direct.revision(HALTS, timeout)

    tasks = [
        asyncio.create_task(consume()),
        asyncio.create_task(prove_fresh(watch, read, fresh, 0.25)),
    ]
    try:
        await asyncio.sleep(1.5)  # proven again and again while the link flows
        assert fresh.fresh(time.monotonic())
        proxy.pause()
        paused_at = time.monotonic()
        done, _ = await asyncio.wait(tasks, timeout=3, return_when=asyncio.FIRST_COMPLETED)
        if done:
            with pytest.raises(WatchStalled):
                done.pop().result()
            return f"stalled after {time.monotonic() - paused_at:.2f}s"
        put = await direct.txn((), [put_op(halt_key("probe"), b"{}")])
        await _until(lambda: put.header.revision in seen)
        return "moved, event delivered"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await watched.close()
        await direct.close()


async def _until(probe: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.05)


def test_a_silent_watch_is_caught(solo: EtcdProcess, proxy: Callable[[str], Proxy]) -> None:
    """Sockets open, nothing forwarded, reads still answered: only the proof can tell."""
    said = asyncio.run(_silent_watch(solo, proxy(solo.endpoint), spare=False))
    print(f"\nsilent watch, no other member: {said}")
    assert said.startswith("stalled after")
    assert float(said.split()[-1].rstrip("s")) <= 1.0 + 0.5


def test_a_silent_watch_moves_to_another_member(
    solo: EtcdProcess, proxy: Callable[[str], Proxy]
) -> None:
    said = asyncio.run(_silent_watch(solo, proxy(solo.endpoint), spare=True))
    print(f"\nsilent watch, another member at hand: {said}")
    assert said == "moved, event delivered"


def test_a_coordinator_blackholed_from_etcd_stops_its_agents(
    solo: EtcdProcess, proxy: Callable[[str], Proxy], tmp_path: Path
) -> None:
    """Its one etcd link hangs with the sockets open: no error ever arrives, only silence."""
    link = proxy(solo.endpoint)
    coordinator = CoordinatorProcess(
        link.url, lease_ttl=TTL, log=tmp_path / "coordinator.log"
    ).start()
    fleet = Fleet("blackholed", coordinator.addr)
    try:
        link.pause()
        paused_at = time.monotonic()
        eventually(lambda: fleet.all_stopped(tether.TetherLost), timeout=2 * TTL)
        slowest = max(at for at, _ in fleet.stops.values()) - paused_at
        print(f"\nblackholed: all {AGENTS} agents failed closed within {slowest:.2f}s")
        assert slowest <= TTL
    finally:
        coordinator.kill()  # a clean stop would wait on the blackholed etcd
        fleet.close()
