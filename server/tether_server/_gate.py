"""The coordinator's side of the effect gate: ledger intake and strict permit decisions."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from tether.v1 import agent_pb2, types_pb2

from tether_server._halts import HaltTable
from tether_server._ledger import LedgerWriter, landed
from tether_server._selectors import is_stop
from tether_server._signer import PermitSigner
from tether_server._store import (
    HALTS,
    PERMIT_KEY,
    EtcdUnavailable,
    InstanceKey,
    RunKey,
    Store,
    absent,
    put_op,
    range_op,
)

log = logging.getLogger("tether_server")


async def load_signer(store: Store, pem_file: Path | None) -> PermitSigner:
    """The permit key: from ``--permit-key``, else the one all coordinators share in etcd."""
    if pem_file is not None:
        return PermitSigner.from_pem(await asyncio.to_thread(pem_file.read_bytes))
    fresh = os.urandom(32)  # an Ed25519 private key is 32 random bytes
    resp = await store.txn(
        [absent(PERMIT_KEY)], [put_op(PERMIT_KEY, fresh.hex().encode())], [range_op(PERMIT_KEY)]
    )
    raw = (
        fresh
        if resp.succeeded
        else bytes.fromhex(resp.responses[0].response_range.kvs[0].value.decode())
    )
    return PermitSigner.from_raw(raw)


class FreshHalts:
    """Linearizable reads of the halts, shared by the permit requests that wait together.

    A request waits for a read that *started after it arrived*, so a kill committed before
    the request is always seen, whatever the watch has delivered so far. Requests that
    arrive during a read share the next one: one etcd read serves a burst.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: list[asyncio.Future[HaltTable]] = []
        self._reading = False
        self._task: asyncio.Task[None] | None = None

    async def read(self) -> HaltTable:
        waiter: asyncio.Future[HaltTable] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        if not self._reading:
            self._reading = True
            self._task = asyncio.get_running_loop().create_task(self._serve())
        return await waiter

    async def _serve(self) -> None:
        try:
            while self._waiting:
                waiting, self._waiting = self._waiting, []
                try:
                    resp = await self._store.range(HALTS)
                except Exception as err:
                    for waiter in waiting:
                        if not waiter.done():
                            waiter.set_exception(err)
                    continue
                table = HaltTable()
                table.load(resp.kvs, resp.header.revision)
                for waiter in waiting:
                    if not waiter.done():
                        waiter.set_result(table)
        finally:
            self._reading = False


class Gate:
    """Takes effect records into the ledger and decides strict permits."""

    def __init__(self, ledger: LedgerWriter, store: Store) -> None:
        self._ledger = ledger
        self._signer: PermitSigner | None = None
        self._fresh = FreshHalts(store)
        self._landed: dict[RunKey, set[str]] = {}

    @property
    def signer(self) -> PermitSigner | None:
        """The key that signs permits; None until the coordinator first reaches etcd."""
        return self._signer

    def attach(self, signer: PermitSigner) -> None:
        """Sign permits with ``signer`` from now on."""
        self._signer = signer

    def seed(self, run: RunKey, records: Iterable[types_pb2.Effect]) -> list[str]:
        """Load a run's landed keys at registration; returns them for the session grant."""
        keys = self._landed.setdefault(run, set())
        keys |= landed(records)
        return sorted(keys)

    def forget(self, run: RunKey) -> None:
        self._landed.pop(run, None)

    def record(self, key: InstanceKey, batch: agent_pb2.EffectBatch) -> None:
        run = key.run
        for effect in batch.effects:
            effect.tenant, effect.agent, effect.run_id, effect.instance_id = key.parts
            if effect.status == types_pb2.EFFECT_STATUS_LANDED and effect.key:
                self._landed.setdefault(run, set()).add(effect.key)
        self._ledger.add(run, batch.effects)

    async def decide(
        self, key: InstanceKey, labels: Mapping[str, str], req: agent_pb2.PermitRequest
    ) -> agent_pb2.PermitDecision:
        """Refuse if a halt in etcd, read after the request arrived, stops it."""
        decision = agent_pb2.PermitDecision(request_id=req.request_id)
        try:
            halts = await self._fresh.read()
        except EtcdUnavailable as err:
            decision.refused_by.reason = f"cannot read the halts ({err}); refusing"
            return decision  # fail closed
        decision.revision = halts.revision
        for halt in halts.matching(key, labels):
            frozen = halt.selector.capability == req.capability
            draining = req.drain and halt.queue == types_pb2.QUEUE_POLICY_DRAIN
            if frozen or (is_stop(halt) and not draining):
                decision.refused_by.CopyFrom(halt)
                return decision
        if req.key and req.key in self._landed.get(key.run, ()):
            decision.duplicate = True
            return decision
        if self._signer is None:
            decision.refused_by.reason = "the coordinator has no permit key yet"
            return decision
        decision.permit, _ = self._signer.sign(
            tenant=key.tenant, agent=key.agent, run_id=key.run_id, instance_id=key.instance_id,
            capability=req.capability, key=req.key, revision=halts.revision,
        )  # fmt: skip
        decision.granted = True
        return decision
