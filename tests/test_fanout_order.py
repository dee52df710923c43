"""The halt fan-out's ordering guarantees, in one process, without timing.

A real ``Fanout`` over real ``Presence``, ``HaltTable`` and checkpoint writers (on the
tests' real etcd) pushes to sessions whose writer keeps what it is given, instead of a
gRPC stream: which orders reach which session, in which order, and in which turn of the
event loop. Halts arrive as etcd watch events, built as etcd sends them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from aetcd import rpc
from tether.v1 import agent_pb2, types_pb2
from tether_server._checkpoints import CheckpointWriter, RunFlush
from tether_server._etcd import Store
from tether_server._fanout import CHUNK, Fanout
from tether_server._gate import Gate
from tether_server._halts import HaltTable
from tether_server._ledger import LedgerWriter
from tether_server._orders import Push
from tether_server._outbox import Outbox
from tether_server._presence import Presence
from tether_server._registry import Session
from tether_server._store import InstanceKey, halt_key, to_json
from tether_server._tally import Tally
from tether_server._telemetry import Metrics

from tests.conftest import Etcd

SESSIONS = 3 * CHUNK + 17  # several chunks, the last one partial
TENANT = "acme"


class Loop:
    """Counts the turns the fan-out gives the loop: a ticker that runs once per turn."""

    def __init__(self) -> None:
        self.turn = 0
        self.pushed = asyncio.Event()  # the first order is out
        self.quiet = asyncio.Event()  # the fan-out's: set while no halt is being pushed
        self.quiet.set()

    async def tick(self) -> None:
        while True:
            self.turn += 1
            await asyncio.sleep(0)


class Kept(Outbox):
    """A session's writer that keeps each pushed order with the loop turn it came in."""

    def __init__(self, loop: Loop, shared: Any = None) -> None:
        super().__init__(None, lambda seconds: None)
        self.loop = loop
        self.orders: list[tuple[int, agent_pb2.HeartbeatResponse]] = []
        self._shared = self if shared is None else shared

    @property
    def shared(self) -> Any:
        return self._shared

    def post(self, item: Any) -> None:
        assert isinstance(item, Push)
        self.loop.pushed.set()
        self.quiet_when_pushed = self.loop.quiet.is_set()
        self.orders.append((self.loop.turn, agent_pb2.HeartbeatResponse.FromString(item.payload)))


class World:
    """A fan-out over ``SESSIONS`` sessions of one tenant, and the etcd revisions it sees."""

    def __init__(self, store: Store, writers: int = 0) -> None:
        self.loop = Loop()
        self.halts = HaltTable()
        checkpoints = CheckpointWriter(store, 60)
        ledger = LedgerWriter(store, "c-test", 60)
        self.quiet = self.loop.quiet
        flush = RunFlush(checkpoints, ledger, self.quiet)
        gate = Gate(ledger, store, Tally("c-test"))
        self.presence = Presence(
            store=store, halts=self.halts, checkpoints=checkpoints, flush=flush, gate=gate,
            metrics=Metrics(), coordinator_id="c-test",
        )  # fmt: skip
        self.fanout = Fanout(
            presence=self.presence, halts=self.halts, checkpoints=checkpoints, flush=flush,
            metrics=Metrics(), lease_ttl=60, quiet=self.quiet,
        )  # fmt: skip
        self._revision = itertools.count(100)
        shared = [object() for _ in range(writers)]
        for n in range(SESSIONS):
            key = InstanceKey(TENANT, "bot", f"run-{n}", "i-0")
            outbox = Kept(self.loop, shared[n % writers] if writers else None)
            record = types_pb2.AgentInstance(tenant=TENANT, agent="bot", run_id=key.run_id)
            self.presence.admit(Session(key, f"s-{n}", record, outbox))

    def sessions(self) -> tuple[Session, ...]:
        return self.presence.snapshot()

    def kill(self) -> None:
        """A tenant kill committed: the watch applies it and queues its fan-out."""
        halt = types_pb2.Halt(id="kill-acme", selector=types_pb2.Selector(tenant=TENANT))
        rev = next(self._revision)
        kv = rpc.KeyValue(key=halt_key(halt.id), value=to_json(halt), mod_revision=rev)
        kv.create_revision = rev
        self._apply(rpc.Event(type=rpc.Event.PUT, kv=kv))

    def resume(self) -> None:
        """The kill deleted (a resume committed)."""
        prev = rpc.KeyValue(key=halt_key("kill-acme"), value=b"{}")
        kv = rpc.KeyValue(key=halt_key("kill-acme"), mod_revision=next(self._revision))
        self._apply(rpc.Event(type=rpc.Event.DELETE, kv=kv, prev_kv=prev))

    def _apply(self, event: Any) -> None:
        self.fanout.on_halt(self.halts.apply(event), 0.0)

    async def run(self, meanwhile: Callable[[], Awaitable[None]]) -> None:
        """Run the fan-out and the ticker while ``meanwhile`` does its part."""
        tasks = [asyncio.create_task(self.fanout.run()), asyncio.create_task(self.loop.tick())]
        try:
            await meanwhile()
            for _ in range(20 * SESSIONS):  # until the queue is pushed out
                await asyncio.sleep(0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _orders(session: Session) -> list[tuple[int, agent_pb2.HeartbeatResponse]]:
    assert isinstance(session.outbox, Kept)
    return session.outbox.orders


def _last(session: Session) -> int:
    """The order the instance was last told, RUN when it was never told anything."""
    told = _orders(session)
    return told[-1][1].order if told else agent_pb2.ORDER_RUN


def _in_world(etcd: Etcd, test: Callable[[World], Awaitable[None]], writers: int = 0) -> None:
    async def main() -> None:
        store = Store([etcd.endpoint])
        try:
            await test(World(store, writers))
        finally:
            await store.close()

    asyncio.run(main())


def test_a_kill_is_pushed_to_every_session_in_chunks(etcd: Etcd) -> None:
    async def test(world: World) -> None:
        async def kill() -> None:
            world.kill()

        await world.run(kill)
        told = [_orders(s) for s in world.sessions()]
        assert all(len(t) == 1 and t[0][1].order == agent_pb2.ORDER_STOP for t in told)
        turns = sorted({t[0][0] for t in told})
        assert len(turns) == -(-SESSIONS // CHUNK)  # the loop was served between chunks
        assert all(s.revision == world.halts.revision for s in world.sessions())

    _in_world(etcd, test)


def test_kill_then_resume_at_once_leaves_every_session_running(etcd: Etcd) -> None:
    async def test(world: World) -> None:
        async def both() -> None:
            world.kill()
            world.resume()

        await world.run(both)
        assert all(_last(s) == agent_pb2.ORDER_RUN for s in world.sessions())
        assert all(not s.halts and s.revision == world.halts.revision for s in world.sessions())

    _in_world(etcd, test)


def test_a_resume_during_the_kills_chunks_is_not_lost(etcd: Etcd) -> None:
    async def test(world: World) -> None:
        async def resume_mid_kill() -> None:
            world.kill()
            await world.loop.pushed.wait()  # the kill's first chunk is out, the rest is not
            assert not all(_orders(s) for s in world.sessions())
            world.resume()

        await world.run(resume_mid_kill)
        told = [_orders(s) for s in world.sessions()]
        assert any(t and t[0][1].order == agent_pb2.ORDER_STOP for t in told)
        assert all(_last(s) == agent_pb2.ORDER_RUN for s in world.sessions())
        for t in told:  # each session's orders in etcd's order: revisions only rise
            revisions = [order.revision for _, order in t]
            assert revisions == sorted(set(revisions))

    _in_world(etcd, test)


def test_sessions_sharing_a_writer_are_pushed_in_one_turn(etcd: Etcd) -> None:
    writers = 7  # about 110 sessions each: a group outgrows nothing, but spans chunks

    async def test(world: World) -> None:
        async def kill() -> None:
            world.kill()

        await world.run(kill)
        turns: dict[Any, set[int]] = {}
        for s in world.sessions():
            assert len(_orders(s)) == 1
            turns.setdefault(s.outbox.shared, set()).add(_orders(s)[0][0])
        assert len(turns) == writers
        assert all(len(t) == 1 for t in turns.values())  # one writer, one turn
        assert len(set().union(*turns.values())) > 1  # and still more than one chunk

    _in_world(etcd, test, writers)


def test_intake_waits_while_a_kill_is_pushed_and_goes_on_after(etcd: Etcd) -> None:
    # What agents send back after a kill (acknowledgements, ledger records) and the
    # kill-time flush wait on ``quiet``: it must be clear through every chunk of a push,
    # or their intake would hold up the streams not yet told, and set again after.
    async def test(world: World) -> None:
        async def kill() -> None:
            world.kill()

        await world.run(kill)
        kept = [s.outbox for s in world.sessions()]
        assert all(isinstance(k, Kept) and k.quiet_when_pushed is False for k in kept)
        assert world.quiet.is_set()

    _in_world(etcd, test)
