"""The coordinator's hold on etcd: its own lease, the halt watch, and fail-closed on loss."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from tether_server._acks import AckBook
from tether_server._audit import AuditLog
from tether_server._checkpoints import CheckpointWriter
from tether_server._config import ServerConfig
from tether_server._gate import Gate, load_signer
from tether_server._halts import HaltTable
from tether_server._leases import EtcdLost, LeaseKeeper
from tether_server._ledger import LedgerWriter
from tether_server._sessions import Sessions
from tether_server._store import HALTS, EtcdUnavailable, Store, coordinator_key, put_op
from tether_server._telemetry import Metrics
from tether_server._watch import WatchBroken, watch_prefix

log = logging.getLogger("tether_server")

SERVICES = ("", "tether.v1.AgentService", "tether.v1.AdminService")
_LOSS = (EtcdLost, WatchBroken, EtcdUnavailable)


class Coordinator:
    """Keeps the halt cache and the leases live, and fails closed the moment it cannot."""

    def __init__(self, config: ServerConfig, store: Store, health: HealthServicer) -> None:
        self.config = config
        self.store = store
        self.health = health
        self.halts = HaltTable()
        self.checkpoints = CheckpointWriter(store, config.checkpoint_flush_interval)
        self._ledger = LedgerWriter(store, config.coordinator_id, config.checkpoint_flush_interval)
        self.gate = Gate(self._ledger, store)
        self.acks = AckBook(AuditLog(store), self.halts)
        self.sessions = Sessions(
            config,
            store=store,
            halts=self.halts,
            checkpoints=self.checkpoints,
            ledger=self._ledger,
            gate=self.gate,
            acks=self.acks,
            metrics=Metrics(),
        )
        self.attached = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lease = 0

    async def run(self) -> None:
        """Attach to etcd and stay attached; on any loss, fail closed and try again."""
        backoff = 0.1
        while True:
            try:
                keeper = await self._attach()
                backoff = 0.1
                await self._hold(keeper)
            except _LOSS as err:
                self._lose(str(err))
            except Exception as err:
                # Any other failure of a loop that keeps the halt view true (a bad halt
                # record, a bug) leaves this coordinator unable to know: fail closed too.
                log.exception("coordinator loop failed")
                self._lose(f"{type(err).__name__}: {err}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _attach(self) -> LeaseKeeper:
        """Take a lease, load the halts, and serve sessions on it; returns its keeper, which
        sessions hold until etcd is lost."""
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
        resp = await self.store.range(HALTS)
        self.halts.load(resp.kvs, resp.header.revision)
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
        return keeper

    async def _hold(self, keeper: LeaseKeeper) -> None:
        tasks = [
            asyncio.create_task(keeper.run(), name="lease-keeper"),
            asyncio.create_task(self._watch_halts(), name="halt-watch"),
            asyncio.create_task(self.checkpoints.run(), name="checkpoints"),
            asyncio.create_task(self._ledger.run(), name="ledger"),
            asyncio.create_task(self.acks.run(), name="acks"),
            asyncio.create_task(self.sessions.watch_silence(), name="silence"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise EtcdLost("a coordinator loop ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_halts(self) -> None:
        async for resp in watch_prefix(self.store, HALTS, self.halts.revision + 1):
            since = time.monotonic()
            for event in resp.events:
                self.sessions.on_halt(self.halts.apply(event), since)

    def _lose(self, reason: str) -> None:
        log.error("coordinator lost etcd, failing closed: %s", reason)
        self.attached.clear()
        self.sessions.lose(reason)
        for service in SERVICES:
            self._spawn_health(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _spawn_health(self, service: str, status: Any) -> None:
        task = asyncio.get_running_loop().create_task(self.health.set(service, status))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
