"""The coordinator's hold on etcd: its own lease, the halt watch, and fail-closed on loss.

The halt view must be proven current at least every ``TTL * PROOF_PERIOD`` and never be
older than ``TTL * DEADLINE`` (``_freshness``); past that, agents are failed closed, and
they hear it before their own TTL runs out. The lease and the watch move between etcd
members on their own (``_leases``, ``_watch``), so a member's death costs nothing as long
as a new proof arrives in time: the time left for a leaderless cluster to elect a leader
is ``DEADLINE - PROOF_PERIOD``, half the TTL (5 s for the default TTL of 10 s; etcd's
default election takes 1 to 2 s).
"""

from __future__ import annotations

import asyncio
import logging
import time

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from tether_server._acks import AckBook
from tether_server._audit import AuditLog
from tether_server._checkpoints import CheckpointWriter
from tether_server._config import ServerConfig
from tether_server._etcd import EtcdUnavailable, Store, every, spawn
from tether_server._evaluator import Evaluator
from tether_server._freshness import Freshness
from tether_server._gate import Gate, load_signer
from tether_server._halts import HaltTable
from tether_server._leases import EtcdLost, LeaseKeeper
from tether_server._ledger import LedgerWriter
from tether_server._prune import RosterPruner
from tether_server._sessions import Sessions
from tether_server._store import HALTS, coordinator_key, put_op
from tether_server._tally import Tally
from tether_server._telemetry import Metrics
from tether_server._watch import ResumingWatch, WatchBroken, prove_fresh

log = logging.getLogger("tether_server")

SERVICES = ("", "tether.v1.AgentService", "tether.v1.AdminService")
_LOSS = (EtcdLost, WatchBroken, EtcdUnavailable)
DEADLINE = 2 / 3  # of the TTL: how old the proven halt view may get
PROOF_PERIOD = 1 / 6  # of the TTL: how often a proof is sought
_SUMMARY_EVERY = 30.0  # seconds between lines while etcd stays lost


class Outage:
    """What the coordinator says about reaching etcd: a line per change, not per attempt.

    Before the first attach, one line says it is waiting. A loss gets one line, then a
    summary every ``every`` seconds while it lasts, and the return one line.
    """

    def __init__(self, every: float = _SUMMARY_EVERY) -> None:
        self.every = every
        self.attached_once = False
        self.since: float | None = None  # when etcd was lost, or first not reached
        self.attempts = 0
        self._said_at = 0.0

    def failed(self, reason: str, now: float) -> tuple[int, str] | None:
        """etcd was lost, or an attempt to attach failed: the line to log, if any."""
        if self.since is None:
            self.since, self.attempts, self._said_at = now, 0, now
            if not self.attached_once:
                return logging.WARNING, f"waiting for etcd: {reason}"
            return logging.ERROR, f"coordinator lost etcd, failing closed: {reason}"
        self.attempts += 1
        if not self.attached_once or now - self._said_at < self.every:
            return None
        self._said_at = now
        return logging.ERROR, (
            f"etcd still lost after {now - self.since:.0f}s "
            f"({self.attempts} failed attempts to re-attach); last: {reason}"
        )

    def attached(self, now: float) -> tuple[int, str] | None:
        """Attached to etcd: the line to log, if it had been lost."""
        back = self.since is not None and self.attached_once
        line = f"etcd is back: re-attached after {now - (self.since or now):.1f}s"
        self.attached_once, self.since = True, None
        return (logging.WARNING, line) if back else None


class Coordinator:
    """Keeps the halt cache and the leases live, and fails closed the moment it cannot."""

    def __init__(self, config: ServerConfig, store: Store, health: HealthServicer) -> None:
        self.config = config
        self.store = store
        self.health = health
        self.halts = HaltTable()
        self.checkpoints = CheckpointWriter(store, config.checkpoint_flush_interval)
        self._ledger = LedgerWriter(store, config.coordinator_id, config.checkpoint_flush_interval)
        # Automatic protection: counts of what this coordinator sees, and its campaign to
        # be the one evaluator that decides breakers and rules for the fleet.
        self.tally = Tally(config.coordinator_id)
        self.gate = Gate(self._ledger, store, self.tally)
        self.acks = AckBook(AuditLog(store), self.halts)
        self.sessions = Sessions(
            config,
            store=store,
            halts=self.halts,
            checkpoints=self.checkpoints,
            ledger=self._ledger,
            gate=self.gate,
            tally=self.tally,
            acks=self.acks,
            metrics=Metrics(),
        )
        # Converting buffered records to JSON waits out a kill's pushes.
        self._ledger.quiet = self.checkpoints.quiet = self.sessions.quiet
        self.evaluator = Evaluator(store, config.coordinator_id, self.halts)
        self.attached = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lease = 0
        self._outage = Outage()
        self._pruner = RosterPruner(store, config.roster_retention)

    async def run(self) -> None:
        """Attach to etcd and stay attached; on any loss, fail closed and try again."""
        backoff = 0.1
        while True:
            try:
                keeper, fresh = await self._attach()
                backoff = 0.1
                await self._hold(keeper, fresh)
            except _LOSS as err:
                self._lose(str(err))
            except Exception as err:
                # Any other failure of a loop that keeps the halt view true (a bad halt
                # record, a bug) leaves this coordinator unable to know: fail closed too.
                log.exception("coordinator loop failed")
                self._lose(f"{type(err).__name__}: {err}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _attach(self) -> tuple[LeaseKeeper, Freshness]:
        """Take a lease, load the halts, and serve sessions on it; returns its keeper, which
        sessions hold until etcd is lost, and the proof that the halts are current."""
        ttl = self.config.lease_ttl
        # Every presence key this coordinator writes hangs on this lease: it lapses within
        # the instance TTL of the coordinator's death, and the instances go STALE with it.
        self._lease, _ = await self.store.grant(ttl)
        await self.store.txn(
            (),
            [
                put_op(
                    coordinator_key(self.config.coordinator_id),
                    self.config.listen.encode(),
                    self._lease,
                )
            ],
        )
        self.gate.attach(await load_signer(self.store, self.config.permit_key), self._lease)
        loaded_at = time.monotonic()
        resp = await self.store.range(HALTS)
        self.halts.load(resp.kvs, resp.header.revision)
        fresh = Freshness(ttl * DEADLINE, loaded_at)
        keeper = LeaseKeeper(self.store, self._lease, ttl)
        self.sessions.attach(keeper)
        for service in SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.attached.set()
        log.info(
            "coordinator %s attached to etcd at revision %d",
            self.config.coordinator_id,
            self.halts.revision,
        )
        if said := self._outage.attached(time.monotonic()):
            log.log(*said)
        return keeper, fresh

    async def _hold(self, keeper: LeaseKeeper, fresh: Freshness) -> None:
        watch = ResumingWatch(self.store, HALTS, self.halts.revision, fresh.reached)
        period = self.config.lease_ttl * PROOF_PERIOD

        async def read(timeout: float) -> int:
            return await self.store.revision(HALTS, timeout)

        tasks = [
            asyncio.create_task(keeper.run(), name="lease-keeper"),
            asyncio.create_task(self._watch_halts(watch), name="halt-watch"),
            asyncio.create_task(self.sessions.push_halts(), name="halt-fanout"),
            asyncio.create_task(prove_fresh(watch, read, fresh, period), name="freshness"),
            asyncio.create_task(self.checkpoints.run(), name="checkpoints"),
            asyncio.create_task(self._ledger.run(), name="ledger"),
            asyncio.create_task(self.acks.run(), name="acks"),
            asyncio.create_task(self.sessions.watch_silence(), name="silence"),
            asyncio.create_task(self.tally.publish(self.store, self._lease), name="tally"),
            asyncio.create_task(self.evaluator.run(self._lease), name="evaluator"),
        ]
        if self._pruner.retention > 0:  # off the hot path: a pass every retention / 10
            prune = every(self._pruner.interval, self._pruner.step, "roster pruning")
            tasks.append(asyncio.create_task(prune, name="roster-pruning"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise EtcdLost("a coordinator loop ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_halts(self, watch: ResumingWatch) -> None:
        async for resp in watch.events():
            since = time.monotonic()
            for event in resp.events:
                self.sessions.on_halt(self.halts.apply(event), since)

    def _lose(self, reason: str) -> None:
        if said := self._outage.failed(reason, time.monotonic()):
            log.log(*said)
        self.attached.clear()
        self.sessions.lose(reason)
        for service in SERVICES:
            spawn(self._tasks, self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING))

    async def detach(self) -> None:
        """Shutdown: let sessions go, flush checkpoints, drop the coordinator's own lease."""
        await self.sessions.drain()
        try:
            await self._ledger.flush()
            await self.acks.flush()
        except EtcdUnavailable as err:
            log.warning("final ledger and acknowledgement flush failed: %s", err)
        if self._lease:
            try:
                await self.store.revoke(self._lease)
            except EtcdUnavailable as err:
                log.warning("could not revoke the coordinator lease: %s", err)
