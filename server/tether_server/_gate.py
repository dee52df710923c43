"""The coordinator's side of the effect gate: ledger intake and strict permit decisions.

One permit per idempotency key of a run, even across instances and coordinators: the
truth is in etcd. A permit for a keyed effect claims ``effect_key(run, key)`` in the same
decision, create-only and on the coordinator's lease; a second request finds the claim and
is refused as ``in_flight`` (or ``duplicate`` once it landed). The claim ends with the
effect's record: LANDED makes it permanent, any other end deletes it, and so does the last
session of the run leaving this coordinator, or the coordinator's lease lapsing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from tether.v1 import agent_pb2, types_pb2

from tether_server._errors import InvalidArgument, check_name
from tether_server._etcd import EtcdUnavailable, Store, spawn
from tether_server._halts import HaltTable
from tether_server._ledger import LedgerWriter, landed, strip_compensation
from tether_server._selectors import freezes, is_stop
from tether_server._signer import PermitSigner
from tether_server._store import (
    HALTS,
    PERMIT_KEY,
    InstanceKey,
    RunKey,
    absent,
    delete_op,
    effect_key,
    holds,
    put_op,
    range_op,
)
from tether_server._tally import Tally

log = logging.getLogger("tether_server")

MAX_KEY_BYTES = 1024  # an idempotency key, as UTF-8; it becomes part of an etcd key
MAX_EFFECT_BYTES = 32 * 1024  # one ledger record; etcd takes 1.5 MiB a request
MAX_UNDO_BYTES = 16 * 1024  # its undo data, as the SDK's tether.MAX_UNDO_BYTES
LANDED = b"landed"


def check_effect(capability: str, key: str, size: int = 0) -> None:
    """Refuse an effect record or permit request the ledger and etcd could not hold.

    Raises:
        InvalidArgument: with what to fix.
    """
    check_name("capability", capability)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidArgument(f"effect key is longer than {MAX_KEY_BYTES} bytes; hash it")
    if size > MAX_EFFECT_BYTES:
        raise InvalidArgument(f"an effect record is {size} bytes; at most {MAX_EFFECT_BYTES}")


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


class Claims:
    """The etcd claims on idempotency keys that this coordinator's permits hold."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.lease = 0
        self._held: dict[RunKey, dict[str, str]] = {}  # run -> key -> holding instance id
        self._tasks: set[asyncio.Task[None]] = set()

    async def take(self, key: InstanceKey, effect: str) -> bytes:
        """Claim ``effect`` of ``key``'s run; b"" when claimed, else the claim's value."""
        claim = effect_key(key.run, effect)
        resp = await self._store.txn(
            [absent(claim)],
            [put_op(claim, key.instance_id.encode(), self.lease)],
            [range_op(claim)],
        )
        if not resp.succeeded:
            return bytes(resp.responses[0].response_range.kvs[0].value)
        self._held.setdefault(key.run, {})[effect] = key.instance_id
        return b""

    def settle(self, key: InstanceKey, effect: str, landed: bool) -> None:
        """The holder's effect ended: keep the claim for good if it landed, else free it."""
        held = self._held.get(key.run, {})
        if held.get(effect) != key.instance_id:
            return  # not a claim this instance holds here
        del held[effect]
        claim = effect_key(key.run, effect)
        op = put_op(claim, LANDED) if landed else delete_op(claim)
        self._spawn(self._store.txn([holds(claim, key.instance_id.encode())], [op]))

    def release(self, run: RunKey) -> None:
        """No session of ``run`` is served here any more: free what its effects still hold."""
        for effect, holder in self._held.pop(run, {}).items():
            claim = effect_key(run, effect)
            self._spawn(self._store.txn([holds(claim, holder.encode())], [delete_op(claim)]))

    def _spawn(self, txn: Any) -> None:
        async def run() -> None:
            try:
                await txn
            except EtcdUnavailable as err:  # the claim lapses with this coordinator's lease
                log.warning("could not settle an effect key claim: %s", err)

        spawn(self._tasks, run())


class Gate:
    """Takes effect records into the ledger and decides strict permits."""

    def __init__(self, ledger: LedgerWriter, store: Store, tally: Tally) -> None:
        self._ledger = ledger
        self._signer: PermitSigner | None = None
        self._fresh = FreshHalts(store)
        self._claims = Claims(store)
        self._landed: dict[RunKey, set[str]] = {}
        self._tally = tally  # automatic protection counts what ended

    @property
    def signer(self) -> PermitSigner | None:
        """The key that signs permits; None until the coordinator first reaches etcd."""
        return self._signer

    def attach(self, signer: PermitSigner, lease: int = 0) -> None:
        """Sign permits with ``signer``, and hang key claims on ``lease``, from now on."""
        self._signer = signer
        self._claims.lease = lease

    def seed(self, run: RunKey, records: Iterable[types_pb2.Effect]) -> list[str]:
        """Load a run's landed keys at registration; returns them for the session grant."""
        found = landed(records)
        if not found:  # a set is held only for a run with landed keys: most have none
            return sorted(self._landed.get(run, ()))
        keys = self._landed.setdefault(run, set())
        keys |= found
        return sorted(keys)

    def forget(self, run: RunKey) -> None:
        self._landed.pop(run, None)
        self._claims.release(run)

    def record(
        self, key: InstanceKey, batch: agent_pb2.EffectBatch, reads: Collection[str] = ()
    ) -> None:
        """Take an instance's effect records into the ledger.

        Raises:
            InvalidArgument: a record the ledger could not hold; none of the batch is taken.
        """
        for effect in batch.effects:
            check_effect(effect.capability, effect.key, effect.ByteSize())
            if effect.undo.ByteSize() > MAX_UNDO_BYTES:
                raise InvalidArgument(f"an effect's undo data is over {MAX_UNDO_BYTES} bytes")
        run = key.run
        for effect in batch.effects:
            effect.tenant, effect.agent, effect.run_id, effect.instance_id = key.parts
            strip_compensation(effect)
            if effect.key and effect.status in _ENDED:
                landed = effect.status == types_pb2.EFFECT_STATUS_LANDED
                if landed:
                    self._landed.setdefault(run, set()).add(effect.key)
                self._claims.settle(key, effect.key, landed)
        self._ledger.add(run, batch.effects)
        self._tally.effects(key, batch.effects, reads)

    async def decide(
        self,
        key: InstanceKey,
        labels: Mapping[str, str],
        req: agent_pb2.PermitRequest,
        reads: Collection[str] = (),
    ) -> agent_pb2.PermitDecision:
        """Refuse if a halt in etcd, read after the request arrived, stops it, or if the
        request's key already landed or is in flight for this run, or if the request
        names no valid capability or too long a key."""
        decision = agent_pb2.PermitDecision(request_id=req.request_id)
        try:
            check_effect(req.capability, req.key)
        except InvalidArgument as err:  # refused, with why: the tether itself is fine
            decision.refused_by.reason = str(err)
            return decision
        try:
            halts = await self._fresh.read()
        except EtcdUnavailable as err:
            decision.refused_by.reason = f"cannot read the halts ({err}); refusing"
            return decision  # fail closed
        decision.revision = halts.revision
        for halt in halts.matching(key, labels):
            frozen = freezes(halt, req.capability, reads)
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
        if req.key and not await self._claimed(key, req.key, decision):
            return decision
        decision.permit, _ = self._signer.sign(
            tenant=key.tenant, agent=key.agent, run_id=key.run_id, instance_id=key.instance_id,
            capability=req.capability, key=req.key, revision=halts.revision,
        )  # fmt: skip
        decision.granted = True
        return decision

    async def _claimed(
        self, key: InstanceKey, effect: str, decision: agent_pb2.PermitDecision
    ) -> bool:
        """Claim the key in etcd; False, with the decision saying why, when it is not free."""
        try:
            taken = await self._claims.take(key, effect)
        except EtcdUnavailable as err:
            decision.refused_by.reason = f"cannot claim the effect key ({err}); refusing"
            return False
        if taken == LANDED:
            self._landed.setdefault(key.run, set()).add(effect)
            decision.duplicate = True
        elif taken:
            decision.in_flight = True
        return not taken


_ENDED = (
    types_pb2.EFFECT_STATUS_LANDED,
    types_pb2.EFFECT_STATUS_FAILED,
    types_pb2.EFFECT_STATUS_REFUSED,
    types_pb2.EFFECT_STATUS_CANCELLED,
    types_pb2.EFFECT_STATUS_DUPLICATE,
)
