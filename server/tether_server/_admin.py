"""AdminService: kill, resume, and the operator's view of the fleet."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from tether._errors import FailedPrecondition, InvalidArgument, NotFound
from tether.v1 import admin_pb2, admin_pb2_grpc, types_pb2

from tether_server._audit import AuditLog, new_entry
from tether_server._auth import AdminTokens, PermissionDenied, Unauthenticated
from tether_server._fleet import Fleet
from tether_server._gate import Gate
from tether_server._halts import halt_from_kv
from tether_server._presence import now_timestamp
from tether_server._selectors import halt_id, scope_name, validate
from tether_server._sessions import Sessions
from tether_server._store import (
    FLEET,
    HALTS,
    EtcdUnavailable,
    InstanceKey,
    Store,
    absent,
    checkpoint_prefix,
    delete_op,
    halt_key,
    present,
    put_op,
    range_op,
    roster_prefix,
    run_owner_key,
    to_json,
    unchanged_since,
)
from tether_server._telemetry import tracer
from tether_server._watch import WatchBroken, watch_prefix

R = TypeVar("R")

_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
    EtcdUnavailable: grpc.StatusCode.UNAVAILABLE,
    WatchBroken: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def _tenant_of(request: Any) -> str:
    """The tenant a request addresses; '' when it addresses every tenant."""
    if hasattr(request, "selector"):
        return str(request.selector.tenant)
    return str(getattr(request, "tenant", ""))


def _rpc(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Trace the call and turn our errors into gRPC statuses with an actionable message."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Any) -> R:
        with tracer.start_as_current_span(f"tether.v1.AdminService/{method.__name__}"):
            try:
                self.authorize(request, context)
                return await method(self, request, context)
            except tuple(_STATUS) as err:
                await context.abort(_STATUS[type(err)], str(err))
                raise  # unreachable: abort raises

    return wrapper


MAX_GRACE_SECONDS = 3600
DEFAULT_GRACE_SECONDS = 30


def _halt_from(request: admin_pb2.KillRequest, sel: types_pb2.Selector, actor: str) -> Any:
    """The halt a Kill asks for, with its mode, grace and queue policy checked."""
    if request.mode not in (
        types_pb2.KILL_MODE_UNSPECIFIED,
        types_pb2.KILL_MODE_HARD,
        types_pb2.KILL_MODE_SOFT,
    ):
        raise InvalidArgument(f"mode {request.mode} is unknown: use HARD or SOFT")
    soft = request.mode == types_pb2.KILL_MODE_SOFT
    has_grace = request.HasField("grace")
    grace = request.grace.ToTimedelta().total_seconds() if has_grace else DEFAULT_GRACE_SECONDS
    if has_grace and not soft:
        raise InvalidArgument(
            "grace goes with mode SOFT; a hard kill cancels in-flight work at once"
        )
    if not 0 <= grace <= MAX_GRACE_SECONDS:
        raise InvalidArgument(f"grace must be between 0 and {MAX_GRACE_SECONDS} seconds")
    if request.queue not in (0, types_pb2.QUEUE_POLICY_DISCARD, types_pb2.QUEUE_POLICY_DRAIN):
        raise InvalidArgument(f"queue {request.queue} is unknown: use DISCARD or DRAIN")
    halt = types_pb2.Halt(
        id=halt_id(sel),
        selector=sel,
        reason=request.reason,
        actor=actor,
        created_at=now_timestamp(),
        mode=types_pb2.KILL_MODE_SOFT if soft else types_pb2.KILL_MODE_HARD,
        queue=request.queue or types_pb2.QUEUE_POLICY_DISCARD,
    )
    if soft and has_grace:
        halt.grace.CopyFrom(request.grace)  # exactly as asked: 0.5 s stays 0.5 s
    elif soft:
        halt.grace.FromSeconds(DEFAULT_GRACE_SECONDS)
    return halt


def _actor(request: Any, context: Any) -> str:
    if request.actor:
        return str(request.actor)
    return f"anonymous@{context.peer()}"


class Admin(admin_pb2_grpc.AdminServiceServicer):
    """Reads go to etcd, so every coordinator answers the same; writes are transactions."""

    def __init__(
        self, store: Store, sessions: Sessions, gate: Gate, tokens: AdminTokens | None = None
    ) -> None:
        self._tokens = tokens
        self._store = store
        self._sessions = sessions
        self._gate = gate
        self._audit = AuditLog(store)

    def authorize(self, request: Any, context: Any) -> None:
        if self._tokens is not None:
            self._tokens.check(context.invocation_metadata(), _tenant_of(request))

    # -- kill and resume --------------------------------------------------------------------

    @_rpc
    async def Kill(self, request: admin_pb2.KillRequest, context: Any) -> admin_pb2.KillResponse:
        sel = validate(request.selector)
        if not request.reason.strip():
            raise InvalidArgument("reason is required: say why, it goes into the audit")
        halt = _halt_from(request, sel, _actor(request, context))
        if not request.force:
            await self._check_known(sel)
        key = halt_key(halt.id)
        action = admin_pb2.AUDIT_ACTION_FREEZE if sel.capability else admin_pb2.AUDIT_ACTION_KILL
        entry = new_entry(action, sel, halt.actor, halt.reason, halt.mode)
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
        entry = new_entry(admin_pb2.AUDIT_ACTION_ESCALATE, existing.selector, asked.actor, reason)
        entry.halt_id = existing.id
        stored = types_pb2.Halt()
        stored.CopyFrom(existing)
        stored.revision = 0
        await self._audit.record(
            entry, [unchanged_since(key, revision)], [put_op(key, to_json(stored))]
        )
        return admin_pb2.KillResponse(halt=existing, already_halted=True)

    async def _check_known(self, sel: types_pb2.Selector) -> None:
        """Refuse to halt a name nothing ever registered under: a typo is not a stop."""
        if sel.scope == types_pb2.SCOPE_RUN:
            resp = await self._store.range(run_owner_key(sel.run_id), prefix=False)
            owner = resp.kvs[0].value.decode() if resp.kvs else ""
            tenant, _, agent = owner.partition("/")
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

    @_rpc
    async def Resume(
        self, request: admin_pb2.ResumeRequest, context: Any
    ) -> admin_pb2.ResumeResponse:
        sel = validate(request.selector)
        key = halt_key(halt_id(sel))
        actor = _actor(request, context)
        entry = new_entry(admin_pb2.AUDIT_ACTION_RESUME, sel, actor, request.reason)
        entry.halt_id = halt_id(sel)
        changed, resp = await self._audit.record(
            entry, [present(key)], [delete_op(key, prev_kv=True)]
        )
        out = admin_pb2.ResumeResponse(was_halted=changed, revision=resp.header.revision)
        if changed:
            out.resumed.CopyFrom(halt_from_kv(resp.responses[0].response_delete_range.prev_kvs[0]))
        return out

    # -- reading the fleet ------------------------------------------------------------------

    async def _fleet(self, tenant: str = "") -> Fleet:
        checkpoints = checkpoint_prefix(tenant)
        resp = await self._store.txn(
            (), [range_op(FLEET, prefix=True), range_op(checkpoints, prefix=True)]
        )
        fleet = Fleet()
        kvs = [*resp.responses[0].response_range.kvs, *resp.responses[1].response_range.kvs]
        fleet.load(kvs, resp.header.revision)
        return fleet

    def _overlay(self, instance: types_pb2.AgentInstance) -> types_pb2.AgentInstance:
        """Instances on this coordinator get their exact last heartbeat."""
        key = InstanceKey(instance.tenant, instance.agent, instance.run_id, instance.instance_id)
        session = self._sessions.registry.by_key.get(key)
        if session is not None:
            age = time.monotonic() - session.last_beat
            instance.last_heartbeat.FromNanoseconds(time.time_ns() - int(max(age, 0) * 1e9))
        return instance

    @_rpc
    async def ListAgents(
        self, request: admin_pb2.ListAgentsRequest, context: Any
    ) -> admin_pb2.ListAgentsResponse:
        fleet = await self._fleet(request.tenant)
        out = admin_pb2.ListAgentsResponse(revision=fleet.revision)
        for key in fleet.ordered():
            if _wanted(request, key) and (not request.state or request.state == fleet.state(key)):
                out.agents.append(self._overlay(fleet.instance(key)))
        return out

    @_rpc
    async def GetAgent(
        self, request: admin_pb2.GetAgentRequest, context: Any
    ) -> types_pb2.AgentInstance:
        if not (request.tenant and request.agent and request.run_id):
            raise InvalidArgument("GetAgent needs tenant, agent and run_id")
        fleet = await self._fleet(request.tenant)
        found = [k for k in fleet.ordered() if _wanted(request, k)]
        if request.instance_id:
            found = [k for k in found if k.instance_id == request.instance_id]
        run = f"agent://{request.tenant}/{request.agent} run {request.run_id}"
        if not found:
            raise NotFound(
                f"no instance of {run}"
                + (f" with id {request.instance_id}" if request.instance_id else "")
            )
        if len(found) > 1:
            ids = ", ".join(k.instance_id for k in found)
            raise FailedPrecondition(f"{run} has {len(found)} instances ({ids}); name instance_id")
        return self._overlay(fleet.instance(found[0]))

    @_rpc
    async def ListHalts(
        self, request: admin_pb2.ListHaltsRequest, context: Any
    ) -> admin_pb2.ListHaltsResponse:
        resp = await self._store.range(HALTS)
        halts = [halt_from_kv(kv) for kv in resp.kvs]
        if request.tenant:
            halts = [h for h in halts if h.selector.tenant in ("", request.tenant)]
        halts.sort(key=lambda h: h.revision)
        return admin_pb2.ListHaltsResponse(halts=halts, revision=resp.header.revision)

    @_rpc
    async def ListAudit(
        self, request: admin_pb2.ListAuditRequest, context: Any
    ) -> admin_pb2.ListAuditResponse:
        since = request.since.ToNanoseconds() if request.HasField("since") else 0
        entries = [
            e
            for e in await self._audit.entries()
            if e.at.ToNanoseconds() >= since
            and (not request.tenant or e.selector.tenant in ("", request.tenant))
        ]
        return admin_pb2.ListAuditResponse(entries=entries[-(request.limit or 100) :])

    @_rpc
    async def ListEffects(
        self, request: admin_pb2.ListEffectsRequest, context: Any
    ) -> admin_pb2.ListEffectsResponse:
        if not request.tenant:
            raise InvalidArgument("ListEffects needs tenant (and optionally agent and run_id)")
        if request.run_id and not request.agent:
            raise InvalidArgument("ListEffects with run_id needs agent as well")
        since = request.since.ToNanoseconds() if request.HasField("since") else 0
        effects = [
            e
            for e in await self._gate.ledger.read(request.tenant, request.agent, request.run_id)
            if e.intended_at.ToNanoseconds() >= since
            and (not request.status or e.status == request.status)
        ]
        return admin_pb2.ListEffectsResponse(effects=effects)

    @_rpc
    async def GetPermitKey(
        self, request: admin_pb2.GetPermitKeyRequest, context: Any
    ) -> admin_pb2.PermitKey:
        signer = self._gate.signer
        if signer is None:
            raise FailedPrecondition("the coordinator has not loaded its permit key yet")
        return admin_pb2.PermitKey(public_key_pem=signer.public_pem(), key_id=signer.key_id)

    @_rpc
    async def VerifyAudit(
        self, request: admin_pb2.VerifyAuditRequest, context: Any
    ) -> admin_pb2.VerifyAuditResponse:
        return await self._audit.verify()

    async def WatchAgents(
        self, request: admin_pb2.WatchAgentsRequest, context: Any
    ) -> AsyncIterator[admin_pb2.AgentEvent]:
        with tracer.start_as_current_span("tether.v1.AdminService/WatchAgents"):
            try:
                self.authorize(request, context)
                async for event in self._watch(request):
                    yield event
            except tuple(_STATUS) as err:
                await context.abort(_STATUS[type(err)], str(err))

    async def _watch(
        self, request: admin_pb2.WatchAgentsRequest
    ) -> AsyncIterator[admin_pb2.AgentEvent]:
        fleet = await self._fleet(request.tenant)
        seen: dict[InstanceKey, int] = {}
        for key in fleet.ordered():
            if _wanted(request, key):
                seen[key] = fleet.state(key)
                if not request.skip_snapshot:
                    yield self._event(fleet, key, 0, snapshot=True)
        async for resp in watch_prefix(self._store, FLEET, fleet.revision + 1):
            touched: set[InstanceKey] = set()
            for event in resp.events:
                keys = fleet.apply(event)
                touched |= set(fleet.ordered()) if keys is None else keys
            fleet.revision = resp.header.revision
            for key in sorted(k for k in touched if _wanted(request, k)):
                state, before = fleet.state(key), seen.get(key, 0)
                if state != before:
                    seen[key] = state
                    yield self._event(fleet, key, before)

    def _event(self, fleet: Fleet, key: InstanceKey, before: int, *, snapshot: bool = False) -> Any:
        instance = self._overlay(fleet.instance(key, with_checkpoint=False))
        return admin_pb2.AgentEvent(
            agent=instance,
            previous=types_pb2.InstanceState.ValueType(before),
            snapshot=snapshot,
            revision=fleet.revision,
        )


def _wanted(request: Any, key: InstanceKey) -> bool:
    return (
        (not request.tenant or request.tenant == key.tenant)
        and (not request.agent or request.agent == key.agent)
        and (not request.run_id or request.run_id == key.run_id)
    )
