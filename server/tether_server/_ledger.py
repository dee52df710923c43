"""The side-effect ledger: every gated effect with its key, status and the kill that refused it.

It lives in etcd under ``/tether/ledger/<tenant>/<agent>/<run>/`` so that it survives
coordinator restarts and is readable from any coordinator, like the rest of Tether's
state. Agents ship records on their stream; the coordinator buffers them per run and
writes one value per run per flush (batched into as few transactions as etcd allows),
never one write per effect. Records are appended, never rewritten: readers fold them by
``effect_id``, and a final status (landed, failed, refused, duplicate) beats ``intended``.

Compensations (``tether compensate``) are records of their own, one key per effect beside
the run's chunks (``_compensations``); folding lays them over the effect's row, and a
compensation that succeeded beats one that failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tether.v1 import agent_pb2, types_pb2

from tether_server._etcd import Store, every
from tether_server._store import RunKey, from_json, ledger_chunk_key, ledger_prefix, put_op, to_json

_MAX_CHUNK = 128 * 1024  # bytes per value: several fit one transaction under etcd's limit
_CONVERT_CHUNK = 128  # runs converted to JSON between two yields of the loop


async def pause(quiet: asyncio.Event | None) -> None:
    """Let the loop serve others, and wait until no kill is being pushed (``quiet``)."""
    await asyncio.sleep(0)
    if quiet is not None:
        await quiet.wait()


def compensate(row: types_pb2.Effect, record: types_pb2.Effect) -> None:
    """Lay a compensation record over an effect's row; compensated is final."""
    if row.compensation == types_pb2.COMPENSATION_STATUS_COMPENSATED:
        return
    row.compensation = record.compensation
    row.compensation_error = record.compensation_error
    row.compensated_at.CopyFrom(record.compensated_at)
    row.compensated_by = record.compensated_by


def strip_compensation(record: types_pb2.Effect) -> None:
    """Only the coordinator records compensations: an agent's record may not claim one."""
    record.ClearField("compensation")
    record.ClearField("compensation_error")
    record.ClearField("compensated_at")
    record.ClearField("compensated_by")


def fold(records: Iterable[types_pb2.Effect]) -> list[types_pb2.Effect]:
    """One row per effect: its final status, in the order effects were intended."""
    rows: dict[str, types_pb2.Effect] = {}
    compensations = []
    for record in records:
        if record.compensation:
            compensations.append(record)
            continue
        row = rows.get(record.effect_id)
        if row is None:
            rows[record.effect_id] = row = types_pb2.Effect()
            row.CopyFrom(record)
        elif record.status != types_pb2.EFFECT_STATUS_INTENDED:
            intended = row.intended_at
            row.CopyFrom(record)
            if intended.seconds and not record.intended_at.seconds:
                row.intended_at.CopyFrom(intended)
    for record in compensations:
        if record.effect_id in rows:
            compensate(rows[record.effect_id], record)
    return sorted(rows.values(), key=lambda e: (e.intended_at.ToNanoseconds(), e.effect_id))


def decode(kvs: Iterable[Any]) -> list[types_pb2.Effect]:
    records: list[types_pb2.Effect] = []
    for kv in sorted(kvs, key=lambda kv: kv.key):
        records.extend(from_json(kv.value, agent_pb2.EffectBatch()).effects)
    return records


def landed(records: Iterable[types_pb2.Effect]) -> set[str]:
    return {e.key for e in fold(records) if e.key and e.status == types_pb2.EFFECT_STATUS_LANDED}


class LedgerWriter:
    """Buffers records per run and writes them in batches; ``LedgerReader`` reads them back."""

    def __init__(self, store: Store, coordinator_id: str, interval: float) -> None:
        self._store = store
        self._coordinator = coordinator_id
        self._interval = interval
        self._pending: dict[RunKey, list[types_pb2.Effect]] = defaultdict(list)
        self._seq = 0
        # Runs whose records a flush under way has taken, and the event it sets when done:
        # a session's final flush of its run waits for it rather than find nothing to write.
        self._held: dict[RunKey, asyncio.Event] = {}
        # Set while no kill is being pushed (``Fanout.quiet``); conversions wait for it.
        self.quiet: asyncio.Event | None = None

    def add(self, run: RunKey, effects: Iterable[types_pb2.Effect]) -> None:
        self._pending[run].extend(effects)

    async def flush(self, runs: Iterable[RunKey] | None = None) -> None:
        """Write what is buffered (for ``runs``, or all); on failure it stays buffered.

        Converting thousands of runs' records to JSON takes the loop a while: it yields
        every ``_CONVERT_CHUNK`` runs, and waits out a kill's pushes, so that neither a Kill
        nor a push waits behind it. A run's records are taken and named in one step, so
        chunk keys keep their order.
        """
        if runs is not None:  # a flush under way holds some of them: they are written
            runs = list(runs)  # when it ends (or back in the buffer if it failed)
            held = {self._held[r] for r in runs if r in self._held}
            await asyncio.gather(*(written.wait() for written in held))
        keys = list(self._pending) if runs is None else [r for r in runs if r in self._pending]
        batch: dict[RunKey, list[types_pb2.Effect]] = {}
        ops: list[Any] = []
        written = asyncio.Event()
        try:
            for done, run in enumerate(keys, 1):
                effects = self._pending.pop(run, None)  # None: a flush meanwhile took them
                if effects:
                    batch[run] = effects
                    self._held[run] = written
                    ops.extend(self._ops(run, effects))
                if done % _CONVERT_CHUNK == 0:
                    await pause(self.quiet)
            if ops:
                await self._store.put_many(ops)
        except BaseException:  # etcd refused, or cancelled: what was taken stays buffered
            for run, effects in batch.items():
                self._pending[run][:0] = effects
            raise
        finally:
            for run in batch:
                if self._held.get(run) is written:
                    del self._held[run]
            written.set()

    def _ops(self, run: RunKey, effects: list[types_pb2.Effect]) -> list[Any]:
        ops, chunk = [], agent_pb2.EffectBatch()
        for effect in effects:
            chunk.effects.append(effect)
            if chunk.ByteSize() > _MAX_CHUNK:
                ops.append(self._op(run, chunk))
                chunk = agent_pb2.EffectBatch()
        if chunk.effects:
            ops.append(self._op(run, chunk))
        return ops

    def _op(self, run: RunKey, chunk: agent_pb2.EffectBatch) -> Any:
        self._seq += 1
        name = f"{time.time_ns():020d}-{self._coordinator}-{self._seq}"
        return put_op(ledger_chunk_key(run, name), to_json(chunk))

    async def run(self) -> None:
        await every(self._interval, self.flush, "ledger flush")


@dataclass(frozen=True, slots=True)
class EffectFilter:
    """What ``ListEffects`` narrows by; every field set must match. A pure predicate."""

    since_ns: int = 0
    """Intended at or after (ns since the epoch); 0: no lower bound."""
    until_ns: int = 0
    """Intended before; 0: no upper bound."""
    status: int = 0
    trace_id: str = ""
    capability: str = ""
    run_id: str = ""
    """A run of any agent of the tenant (when the read names no agent)."""

    def __call__(self, e: types_pb2.Effect) -> bool:
        at = e.intended_at.ToNanoseconds()
        return (
            at >= self.since_ns
            and (not self.until_ns or at < self.until_ns)
            and (not self.status or e.status == self.status)
            and (not self.trace_id or e.trace_id == self.trace_id)
            and (not self.capability or e.capability == self.capability)
            and (not self.run_id or e.run_id == self.run_id)
        )


class LedgerReader:
    """Reads the ledger from etcd, so that every coordinator answers the same."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def read(
        self, tenant: str, agent: str = "", run_id: str = "", where: EffectFilter | None = None
    ) -> list[types_pb2.Effect]:
        """Every effect under the tenant, agent or run that ``where`` keeps, one row each.

        A run with no agent is looked for across the tenant.
        """
        keep = where or EffectFilter()
        if run_id and not agent:
            keep = dataclasses.replace(keep, run_id=run_id)
            run_id = ""
        resp = await self._store.range(ledger_prefix(tenant, agent, run_id))
        return [e for e in fold(decode(resp.kvs)) if keep(e)]
