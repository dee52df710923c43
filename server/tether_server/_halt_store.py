"""Writing halts: the Kill, harden and Resume transactions, each committed with its audit entry.

``_halts`` holds the halts in force as a coordinator sees them; this module changes them in
etcd. Every change goes through ``AuditLog.record``, so a halt and the audit entry that says
who put it there and why commit together or not at all.
"""

from __future__ import annotations

import time

from tether.v1 import admin_pb2, types_pb2

from tether_server._audit import AuditLog, new_entry
from tether_server._canary import hidden
from tether_server._errors import FailedPrecondition, InvalidArgument
from tether_server._etcd import Store
from tether_server._halts import halt_from_kv
from tether_server._selectors import halt_id, is_stop, scope_name
from tether_server._store import (
    HALTS,
    absent,
    delete_op,
    halt_key,
    owner_of,
    present,
    put_op,
    range_op,
    roster_prefix,
    run_owner_key,
    to_json,
    unchanged_since,
)

_KNOWN_FOR = 30.0  # seconds a name found registered counts as known without reading etcd
_KNOWN_MOST = 4096  # names remembered; past it the memo starts over
MAX_GRACE_SECONDS = 3600
DEFAULT_GRACE_SECONDS = 30
_MODES = (types_pb2.KILL_MODE_UNSPECIFIED, types_pb2.KILL_MODE_HARD, types_pb2.KILL_MODE_SOFT)
_QUEUES = (0, types_pb2.QUEUE_POLICY_DISCARD, types_pb2.QUEUE_POLICY_DRAIN)


def _grace_of(request: admin_pb2.KillRequest, soft: bool) -> float:
    """The grace a Kill asks for, in seconds, once checked against its mode."""
    if not request.HasField("grace"):
        return DEFAULT_GRACE_SECONDS
    if not soft:
        raise InvalidArgument(
            "grace goes with mode SOFT; a hard kill cancels in-flight work at once"
        )
    return request.grace.ToTimedelta().total_seconds()


def halt_from(
    request: admin_pb2.KillRequest, sel: types_pb2.Selector, actor: str
) -> types_pb2.Halt:
    """The halt a Kill asks for, ordered by ``actor`` (the principal), with its mode, grace
    and queue policy checked; the request's own ``actor`` is kept as ``actor_note``.

    Raises:
        InvalidArgument: an unknown mode or queue policy, or a grace out of range or
            given with a hard kill.
    """
    if request.mode not in _MODES:
        raise InvalidArgument(f"mode {request.mode} is unknown: use HARD or SOFT")
    soft = request.mode == types_pb2.KILL_MODE_SOFT
    if not 0 <= _grace_of(request, soft) <= MAX_GRACE_SECONDS:
        raise InvalidArgument(f"grace must be between 0 and {MAX_GRACE_SECONDS} seconds")
    if request.queue not in _QUEUES:
        raise InvalidArgument(f"queue {request.queue} is unknown: use DISCARD or DRAIN")
    halt = types_pb2.Halt(
        id=halt_id(sel),
        selector=sel,
        reason=request.reason,
        actor=actor,
        actor_note=request.actor,
        mode=types_pb2.KILL_MODE_SOFT if soft else types_pb2.KILL_MODE_HARD,
        queue=request.queue or types_pb2.QUEUE_POLICY_DISCARD,
    )
    halt.created_at.GetCurrentTime()
    if soft and request.HasField("grace"):
        halt.grace.CopyFrom(request.grace)  # exactly as asked: 0.5 s stays 0.5 s
    elif soft:
        halt.grace.FromSeconds(DEFAULT_GRACE_SECONDS)
    return halt


def _stored(halt: types_pb2.Halt) -> bytes:
    """``halt`` as its key holds it: without the revision, which etcd keeps."""
    stored = types_pb2.Halt()
    stored.CopyFrom(halt)
    stored.revision = 0
    return to_json(stored)


class HaltStore:
    """Puts, escalates and removes halts in etcd, each in one transaction with its audit entry."""

    def __init__(self, store: Store, audit: AuditLog) -> None:
        self._store = store
        self._audit = audit
        self._known: dict[tuple[int, str, str, str], float] = {}  # name -> known until

    async def kill(self, halt: types_pb2.Halt, *, force: bool = False) -> admin_pb2.KillResponse:
        """Put ``halt`` unless its selector is halted already; a hard kill hardens a soft halt.

        Raises:
            FailedPrecondition: nothing ever registered under the name, and not ``force``.
        """
        sel = halt.selector
        if not force:
            await self._check_known(sel)
        key = halt_key(halt.id)
        action = admin_pb2.AUDIT_ACTION_KILL if is_stop(halt) else admin_pb2.AUDIT_ACTION_FREEZE
        entry = new_entry(action, sel, halt.actor, halt.reason, halt.mode, note=halt.actor_note)
        entry.halt_id = halt.id
        changed, resp = await self._audit.record(
            entry, [absent(key)], [put_op(key, to_json(halt))], [range_op(key)]
        )
        if not changed:
            kv = resp.responses[0].response_range.kvs[0]
            existing = halt_from_kv(kv)
            if existing.mode == types_pb2.KILL_MODE_SOFT and halt.mode == types_pb2.KILL_MODE_HARD:
                return await self._harden(existing, kv.mod_revision, halt)
            return admin_pb2.KillResponse(halt=existing, already_halted=True)
        halt.revision = resp.header.revision
        return admin_pb2.KillResponse(halt=halt)

    async def _harden(
        self, existing: types_pb2.Halt, revision: int, asked: types_pb2.Halt
    ) -> admin_pb2.KillResponse:
        """A hard kill of a softly halted selector escalates that halt now."""
        existing.mode = types_pb2.KILL_MODE_HARD
        existing.ClearField("grace")
        key = halt_key(existing.id)
        reason = f"escalated to hard: {asked.reason}"
        entry = new_entry(
            admin_pb2.AUDIT_ACTION_ESCALATE, existing.selector, asked.actor, reason,
            note=asked.actor_note,
        )  # fmt: skip
        entry.halt_id = existing.id
        await self._audit.record(
            entry, [unchanged_since(key, revision)], [put_op(key, _stored(existing))]
        )
        return admin_pb2.KillResponse(halt=existing, already_halted=True)

    async def _check_known(self, sel: types_pb2.Selector) -> None:
        """Refuse to halt a name nothing ever registered under: a typo is not a stop.

        A name found registered is taken as known for ``_KNOWN_FOR`` seconds without
        reading etcd again: the next Kill of a fleet costs one round trip less.
        """
        name = (sel.scope, sel.tenant, sel.agent, sel.run_id)
        now = time.monotonic()
        if self._known.get(name, 0.0) > now:
            return
        await self._read_known(sel)
        if len(self._known) >= _KNOWN_MOST:
            self._known.clear()
        self._known[name] = now + _KNOWN_FOR

    async def _read_known(self, sel: types_pb2.Selector) -> None:
        if sel.scope == types_pb2.SCOPE_RUN:
            resp = await self._store.range(run_owner_key(sel.run_id), prefix=False)
            owner = resp.kvs[0].value if resp.kvs else b""
            tenant, agent = owner_of(owner)
            known = bool(owner) and sel.tenant in ("", tenant) and sel.agent in ("", agent)
            what = f"run {sel.run_id!r}"
        elif sel.scope in (types_pb2.SCOPE_TENANT, types_pb2.SCOPE_AGENT):
            parts = [sel.tenant] + ([sel.agent] if sel.agent else [])
            known = await self._store.exists(roster_prefix(sel.tenant, sel.agent))
            what = f"{scope_name(sel.scope)} {'/'.join(parts)!r}"
        else:
            return
        if not known:
            raise FailedPrecondition(
                f"no instance of {what} has ever registered; check the name, "
                "or pass force to halt it before its agents start"
            )

    async def resume(
        self, sel: types_pb2.Selector, actor: str, reason: str, *, note: str = ""
    ) -> admin_pb2.ResumeResponse:
        """Remove the halt on ``sel``, if there is one; the audit records the attempt either way.

        ``actor`` is the principal; ``note`` what the caller said of itself.
        """
        entry = new_entry(admin_pb2.AUDIT_ACTION_RESUME, sel, actor, reason, note=note)
        entry.halt_id = halt_id(sel)
        key = halt_key(entry.halt_id)
        changed, resp = await self._audit.record(
            entry, [present(key)], [delete_op(key, prev_kv=True)]
        )
        out = admin_pb2.ResumeResponse(was_halted=changed, revision=resp.header.revision)
        if changed:
            out.resumed.CopyFrom(halt_from_kv(resp.responses[0].response_delete_range.prev_kvs[0]))
        return out

    async def gate(
        self,
        sel: types_pb2.Selector,
        gate: dict[str, str],
        actor: str,
        reason: str,
        *,
        note: str = "",
    ) -> admin_pb2.ResumeResponse:
        """Resume ``sel`` only for instances carrying every label of ``gate``: the halt stays
        for the rest, with ``gate`` as its release gate. Audited as a resume with the gate."""
        entry = new_entry(admin_pb2.AUDIT_ACTION_RESUME, sel, actor, reason, note=note)
        entry.halt_id = halt_id(sel)
        key = halt_key(entry.halt_id)
        entry.require_labels.update(gate)
        resp = await self._store.range(key, prefix=False)
        if not resp.kvs:
            await self._audit.record(entry, [present(key)])
            return admin_pb2.ResumeResponse(was_halted=False, revision=resp.header.revision)
        halt = halt_from_kv(resp.kvs[0])
        halt.release_gate.clear()
        halt.release_gate.update(gate)
        changed, done = await self._audit.record(
            entry, [unchanged_since(key, resp.kvs[0].mod_revision)], [put_op(key, _stored(halt))]
        )
        if not changed:
            raise FailedPrecondition("the halt changed while gating it; run the resume again")
        return admin_pb2.ResumeResponse(
            was_halted=True, resumed=halt, revision=done.header.revision
        )

    async def halts(self, tenant: str = "") -> admin_pb2.ListHaltsResponse:
        """The halts in force, oldest first; with ``tenant``, those that reach it."""
        resp = await self._store.range(HALTS)
        halts = [h for h in map(halt_from_kv, resp.kvs) if not hidden(h.selector.tenant, tenant)]
        if tenant:
            halts = [h for h in halts if h.selector.tenant in ("", tenant)]
        halts.sort(key=lambda h: h.revision)
        return admin_pb2.ListHaltsResponse(halts=halts, revision=resp.header.revision)
