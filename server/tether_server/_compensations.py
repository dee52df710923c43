"""Recording compensations: ``tether compensate`` reversed an effect, or tried and failed.

Each compensation is a record of its own in the run's ledger, written in one transaction
with its audit entry (actor: the principal). A compensated effect has one key, created
only if absent, so that no effect is ever recorded as compensated twice; a failure has
another, overwritten by each failed try, until one succeeds. Before calling its handler a
run claims the effect (a third key, taken only if absent or older than ``CLAIM_SECONDS``),
so that two runs at once never both reverse it; the outcome ends the claim.
"""

from __future__ import annotations

import time

from tether.v1 import admin_pb2, agent_pb2, types_pb2

from tether_server._audit import AuditLog, new_entry
from tether_server._errors import FailedPrecondition, InvalidArgument, NotFound, check_name
from tether_server._etcd import Store
from tether_server._ledger import LedgerReader, compensate
from tether_server._store import (
    RunKey,
    absent,
    delete_op,
    from_json,
    ledger_chunk_key,
    put_op,
    to_json,
    unchanged_since,
)

_STATUSES = (
    types_pb2.COMPENSATION_STATUS_COMPENSATED,
    types_pb2.COMPENSATION_STATUS_FAILED,
    types_pb2.COMPENSATION_STATUS_CLAIMED,
)
MAX_ERROR_CHARS = 500
CLAIM_SECONDS = 300  # a claim this old was left by a run that died: another may take it


def _keys(run: RunKey, effect_id: str) -> tuple[bytes, bytes, bytes]:
    """The run's compensated, failed and claimed keys of one effect ("~" sorts after every
    chunk, and "~claimed" first, so a failure or success lays over a claim)."""
    return (
        ledger_chunk_key(run, f"~compensated-{effect_id}"),
        ledger_chunk_key(run, f"~failed-{effect_id}"),
        ledger_chunk_key(run, f"~claimed-{effect_id}"),
    )


def _checked(request: admin_pb2.RecordCompensationRequest) -> RunKey:
    if not (request.tenant and request.agent and request.run_id and request.effect_id):
        raise InvalidArgument("RecordCompensation needs tenant, agent, run_id and effect_id")
    check_name("effect_id", request.effect_id)
    if request.status not in _STATUSES:
        raise InvalidArgument("RecordCompensation status must be CLAIMED, COMPENSATED or FAILED")
    return RunKey(request.tenant, request.agent, request.run_id)


def _record(request: admin_pb2.RecordCompensationRequest, actor: str) -> types_pb2.Effect:
    record = types_pb2.Effect(
        effect_id=request.effect_id,
        tenant=request.tenant,
        agent=request.agent,
        run_id=request.run_id,
        compensation=request.status,
        compensation_error=request.error[:MAX_ERROR_CHARS],
        compensated_by=actor,
    )
    record.compensated_at.GetCurrentTime()
    return record


def _reason(effect: types_pb2.Effect, request: admin_pb2.RecordCompensationRequest) -> str:
    what = f"{effect.capability} {effect.key!r} (effect {effect.effect_id})"
    if request.status == types_pb2.COMPENSATION_STATUS_COMPENSATED:
        return f"compensated {what}"
    return f"compensation of {what} failed: {request.error[:MAX_ERROR_CHARS]}"


class Compensations:
    """Records compensations in the ledger, each with its audit entry."""

    def __init__(self, store: Store, ledger: LedgerReader, audit: AuditLog) -> None:
        self._store = store
        self._ledger = ledger
        self._audit = audit

    async def _effect(self, run: RunKey, effect_id: str) -> types_pb2.Effect:
        for effect in await self._ledger.read(*run):
            if effect.effect_id == effect_id:
                return effect
        raise NotFound(f"no effect {effect_id} in the ledger of run {run.run_id}")

    async def record(
        self, request: admin_pb2.RecordCompensationRequest, actor: str
    ) -> admin_pb2.RecordCompensationResponse:
        """Record the outcome of one compensation, unless the effect was compensated already.

        Raises:
            InvalidArgument: a field missing or malformed.
            NotFound: the run's ledger holds no such effect.
            FailedPrecondition: the effect did not land, so there is nothing to reverse.
        """
        run = _checked(request)
        effect = await self._effect(run, request.effect_id)
        if effect.status != types_pb2.EFFECT_STATUS_LANDED:
            name = types_pb2.EffectStatus.Name(effect.status).removeprefix("EFFECT_STATUS_")
            raise FailedPrecondition(f"effect {effect.effect_id} is {name.lower()}, not landed")
        if effect.compensation == types_pb2.COMPENSATION_STATUS_COMPENSATED:
            return admin_pb2.RecordCompensationResponse(effect=effect, already_compensated=True)
        record = _record(request, actor)
        done, failed, claim = _keys(run, request.effect_id)
        if request.status == types_pb2.COMPENSATION_STATUS_CLAIMED:
            return await self._claim(effect, record, done, claim)
        key = done if request.status == types_pb2.COMPENSATION_STATUS_COMPENSATED else failed
        sel = types_pb2.Selector(
            scope=types_pb2.SCOPE_RUN, tenant=run.tenant, agent=run.agent, run_id=run.run_id
        )
        entry = new_entry(admin_pb2.AUDIT_ACTION_COMPENSATE, sel, actor, _reason(effect, request))
        value = to_json(agent_pb2.EffectBatch(effects=[record]))
        ops = [put_op(key, value), delete_op(claim)]
        changed, _ = await self._audit.record(entry, [absent(done)], ops)
        if not changed:  # another run compensated it meanwhile
            return admin_pb2.RecordCompensationResponse(
                effect=await self._effect(run, request.effect_id), already_compensated=True
            )
        compensate(effect, record)
        return admin_pb2.RecordCompensationResponse(effect=effect)

    async def _claim(
        self, effect: types_pb2.Effect, record: types_pb2.Effect, done: bytes, claim: bytes
    ) -> admin_pb2.RecordCompensationResponse:
        """Take the effect for one run's handler, unless another run holds a fresh claim."""
        held = (await self._store.range(claim, prefix=False)).kvs
        if held:
            mine = from_json(held[0].value, agent_pb2.EffectBatch()).effects[0]
            age = time.time() - mine.compensated_at.ToNanoseconds() / 1e9
            if age < CLAIM_SECONDS:
                raise FailedPrecondition(
                    f"effect {effect.effect_id} is being compensated by {mine.compensated_by} "
                    f"(claimed {age:.0f}s ago); a claim lapses after {CLAIM_SECONDS}s"
                )
        free = unchanged_since(claim, held[0].mod_revision) if held else absent(claim)
        value = to_json(agent_pb2.EffectBatch(effects=[record]))
        resp = await self._store.txn([absent(done), free], [put_op(claim, value)], [])
        if not resp.succeeded:
            raise FailedPrecondition(
                f"effect {effect.effect_id} was compensated or claimed meanwhile; list it again"
            )
        compensate(effect, record)
        return admin_pb2.RecordCompensationResponse(effect=effect)
