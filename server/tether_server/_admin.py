"""AdminService: kill, resume, and the operator's view of the fleet.

A thin servicer, in the manner of grpc's ``grpc_health/v1/_async.py``: each RPC checks its
request, asks one collaborator, and returns. Halts are written by ``HaltStore``, the fleet is
read by ``FleetReader``, effects by ``LedgerReader`` and the audit by ``AuditLog``; all of them
read etcd, so every coordinator answers the same. Errors become gRPC statuses in one place,
``_rpc``, through the one status table in ``_errors``. Who the caller is and whether it may
ask was decided before the call reached here (``_auth``); each RPC receives the principal.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from tether.v1 import admin_pb2, admin_pb2_grpc, types_pb2

from tether_server._audit import AuditLog
from tether_server._auth import Guard, caller
from tether_server._canary import CANARY_TENANT
from tether_server._compensations import Compensations
from tether_server._dry_run import dry_run
from tether_server._errors import (
    ANSWERABLE,
    FailedPrecondition,
    InvalidArgument,
    check_name,
    status_of,
)
from tether_server._etcd import Store
from tether_server._evaluator import list_breakers
from tether_server._fleet import FleetReader, LastBeat
from tether_server._halt_store import HaltStore, halt_from
from tether_server._halts import COMMITTING
from tether_server._identity import Kind, Principal, spiffe_id
from tether_server._ledger import EffectFilter, LedgerReader
from tether_server._notify import Notifier
from tether_server._policy_store import PolicyStore
from tether_server._selectors import validate, validate_gate
from tether_server._signer import PermitSigner
from tether_server._status import StatusSource

R = TypeVar("R")

PermitKey = Callable[[], PermitSigner | None]
"""The coordinator's permit signer, or None before it has loaded the key."""

DEFAULT_AUDIT_LIMIT = 100  # entries ListAudit returns when the request names no limit
DEFAULT_TOKEN_TTL = 24 * 3600  # seconds an agent token lives when the request names no ttl
MAX_TOKEN_TTL = 30 * 24 * 3600

_KINDS = {
    Kind.ANONYMOUS: admin_pb2.PRINCIPAL_KIND_ANONYMOUS,
    Kind.AGENT: admin_pb2.PRINCIPAL_KIND_AGENT,
    Kind.TENANT: admin_pb2.PRINCIPAL_KIND_TENANT,
    Kind.OPERATOR: admin_pb2.PRINCIPAL_KIND_OPERATOR,
}


def _check_names(request: Any) -> None:
    """Names a request filters by are names: "a/b" must not read tenant a's agent b.

    The canary's reserved tenant breaks the name rule on purpose (no agent can take it),
    and may still be asked for by name.
    """
    for field in ("tenant", "agent", "run_id", "instance_id"):
        value = getattr(request, field, "")
        if value and not (field == "tenant" and value == CANARY_TENANT):
            check_name(field, value)


def _rpc(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Hand the call its caller's principal, and turn our errors into gRPC statuses with
    an actionable message. (The call's span comes from the interceptor, ``_auth``.)"""

    @functools.wraps(method)
    async def wrapper(self: Admin, request: Any, context: Any) -> R:
        try:
            _check_names(request)
            return await method(self, request, caller())
        except ANSWERABLE as err:
            await context.abort(status_of(err), str(err))
            raise  # unreachable: abort raises

    return wrapper


def _token_ttl(request: admin_pb2.IssueAgentTokenRequest) -> float:
    if not request.HasField("ttl"):
        return DEFAULT_TOKEN_TTL
    ttl = request.ttl.ToTimedelta().total_seconds()
    if not 0 < ttl <= MAX_TOKEN_TTL:
        raise InvalidArgument(f"ttl must be more than 0 and at most 30 days, got {ttl:g}s")
    return ttl


def _since_ns(request: Any) -> int:
    """The request's ``since`` in ns since the epoch; 0 when it sets none."""
    return int(request.since.ToNanoseconds()) if request.HasField("since") else 0


def _effect_filter(request: admin_pb2.ListEffectsRequest) -> EffectFilter:
    until = int(request.until.ToNanoseconds()) if request.HasField("until") else 0
    if until and until <= _since_ns(request):
        raise InvalidArgument("ListEffects: until must be later than since")
    if request.capability:
        check_name("capability", request.capability)
    return EffectFilter(
        since_ns=_since_ns(request),
        until_ns=until,
        status=request.status,
        trace_id=request.trace_id,
        capability=request.capability,
    )


class Admin(admin_pb2_grpc.AdminServiceServicer):
    """Checks each admin request, then hands it to the one collaborator that serves it.

    Args:
        halts: Writes and lists halts (Kill, Resume, ListHalts).
        fleet: Reads the fleet (ListAgents, GetAgent, WatchAgents).
        ledger: Reads the effect ledger (ListEffects).
        audit: Lists and verifies the audit (ListAudit, VerifyAudit).
        permit_key: The coordinators' signer, None until loaded (GetPermitKey,
            IssueAgentToken).
        guard: Who callers are and what they may do (WhoAmI, IssueAgentToken's subject).
        status: Answers GetStatus (what this coordinator sees, for ``tether doctor``).
        policy: The policy in etcd (ApplyPolicy, GetPolicy, ListPolicyHistory, ListBreakers,
            TestPolicy).
        compensations: Records compensations (RecordCompensation).
    """

    def __init__(
        self,
        *,
        halts: HaltStore,
        fleet: FleetReader,
        ledger: LedgerReader,
        audit: AuditLog,
        permit_key: PermitKey,
        guard: Guard,
        status: StatusSource,
        policy: PolicyStore,
        compensations: Compensations,
    ) -> None:
        self._compensations = compensations
        self._status = status
        self._policy = policy
        self._notifier = Notifier(policy.policy)
        self._halts = halts
        self._fleet = fleet
        self._ledger = ledger
        self._audit = audit
        self._permit_key = permit_key
        self._guard = guard

    @classmethod
    def create(
        cls,
        store: Store,
        *,
        last_beat: LastBeat,
        permit_key: PermitKey,
        guard: Guard,
        status: StatusSource,
    ) -> Admin:
        """The servicer over ``store``, with its collaborators built on it."""
        audit, ledger = AuditLog(store), LedgerReader(store)
        return cls(
            halts=HaltStore(store, audit),
            fleet=FleetReader(store, last_beat),
            ledger=ledger,
            audit=audit,
            permit_key=permit_key,
            guard=guard,
            status=status,
            policy=PolicyStore(store, audit),
            compensations=Compensations(store, ledger, audit),
        )

    # -- kill and resume --------------------------------------------------------------------

    @_rpc
    async def Kill(self, request: admin_pb2.KillRequest, who: Principal) -> admin_pb2.KillResponse:
        sel = validate(request.selector)
        if not request.reason.strip():
            raise InvalidArgument("reason is required: say why, it goes into the audit")
        halt = halt_from(request, sel, who.id)
        with COMMITTING.kill():  # the stream intake makes way until it is committed
            out = await self._halts.kill(halt, force=request.force)
        if not out.already_halted:
            self._notifier.emit(_event_of(sel), who.id, request.reason, sel)
        return out

    @_rpc
    async def Resume(
        self, request: admin_pb2.ResumeRequest, who: Principal
    ) -> admin_pb2.ResumeResponse:
        sel = validate(request.selector)
        if request.require_labels:
            gate = validate_gate(request.require_labels)
            out = await self._halts.gate(sel, gate, who.id, request.reason, note=request.actor)
        else:
            out = await self._halts.resume(sel, who.id, request.reason, note=request.actor)
        if out.was_halted:
            self._notifier.emit("resume", who.id, request.reason, sel)
        return out

    @_rpc
    async def ListHalts(
        self, request: admin_pb2.ListHaltsRequest, who: Principal
    ) -> admin_pb2.ListHaltsResponse:
        return await self._halts.halts(request.tenant)

    # -- reading the fleet ------------------------------------------------------------------

    @_rpc
    async def ListAgents(
        self, request: admin_pb2.ListAgentsRequest, who: Principal
    ) -> admin_pb2.ListAgentsResponse:
        return await self._fleet.agents(request)

    @_rpc
    async def GetAgent(
        self, request: admin_pb2.GetAgentRequest, who: Principal
    ) -> types_pb2.AgentInstance:
        if not (request.tenant and request.agent and request.run_id):
            raise InvalidArgument("GetAgent needs tenant, agent and run_id")
        return await self._fleet.agent(request)

    async def WatchAgents(
        self, request: admin_pb2.WatchAgentsRequest, context: Any
    ) -> AsyncIterator[admin_pb2.AgentEvent]:
        try:
            _check_names(request)
            async for event in self._fleet.watch(request):
                yield event
        except ANSWERABLE as err:
            await context.abort(status_of(err), str(err))

    # -- effects, audit and the permit key --------------------------------------------------

    @_rpc
    async def ListEffects(
        self, request: admin_pb2.ListEffectsRequest, who: Principal
    ) -> admin_pb2.ListEffectsResponse:
        if not request.tenant:
            raise InvalidArgument("ListEffects needs tenant (and optionally agent and run_id)")
        where = _effect_filter(request)
        effects = await self._ledger.read(request.tenant, request.agent, request.run_id, where)
        return admin_pb2.ListEffectsResponse(effects=effects)

    @_rpc
    async def RecordCompensation(
        self, request: admin_pb2.RecordCompensationRequest, who: Principal
    ) -> admin_pb2.RecordCompensationResponse:
        return await self._compensations.record(request, who.id)

    @_rpc
    async def ListAudit(
        self, request: admin_pb2.ListAuditRequest, who: Principal
    ) -> admin_pb2.ListAuditResponse:
        limit = request.limit or DEFAULT_AUDIT_LIMIT
        entries = await self._audit.recent(request.tenant, _since_ns(request), limit)
        return admin_pb2.ListAuditResponse(entries=entries)

    @_rpc
    async def VerifyAudit(
        self, request: admin_pb2.VerifyAuditRequest, who: Principal
    ) -> admin_pb2.VerifyAuditResponse:
        return await self._audit.verify()

    @_rpc
    async def GetPermitKey(
        self, request: admin_pb2.GetPermitKeyRequest, who: Principal
    ) -> admin_pb2.PermitKey:
        signer = self._permit_key()
        if signer is None:
            raise FailedPrecondition("the coordinator has not loaded its permit key yet")
        return admin_pb2.PermitKey(public_key_pem=signer.public_pem(), key_id=signer.key_id)

    # -- identity ---------------------------------------------------------------------------

    @_rpc
    async def WhoAmI(self, request: admin_pb2.WhoAmIRequest, who: Principal) -> admin_pb2.Principal:
        out = admin_pb2.Principal(
            id=who.id, kind=_KINDS[who.kind], tenant=who.tenant, agent=who.agent,
            operator=who.operator,
        )  # fmt: skip
        grant = self._guard.authorizer.grant_of(who)
        if grant is not None:
            out.role = grant.role.label
            out.tenants.extend(sorted(grant.tenants))
        return out

    @_rpc
    async def IssueAgentToken(
        self, request: admin_pb2.IssueAgentTokenRequest, who: Principal
    ) -> admin_pb2.AgentToken:
        if not request.tenant:
            raise InvalidArgument("IssueAgentToken needs tenant (and optionally agent)")
        tenant = check_name("tenant", request.tenant)
        agent = check_name("agent", request.agent) if request.agent else ""
        signer = self._permit_key()
        if signer is None:
            raise FailedPrecondition("the coordinator has not loaded its signing key yet")
        domain = self._guard.trust_domain
        subject = spiffe_id(domain, tenant, agent)
        token, claims = signer.sign_agent_token(subject, tenant, agent, domain, _token_ttl(request))
        out = admin_pb2.AgentToken(token=token, subject=subject)
        out.expires_at.FromMilliseconds(claims.expires_ms)
        return out

    @_rpc
    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, who: Principal
    ) -> admin_pb2.CoordinatorStatus:
        return await self._status()

    # -- automatic protection ---------------------------------------------------------------

    @_rpc
    async def ApplyPolicy(
        self, request: admin_pb2.ApplyPolicyRequest, who: Principal
    ) -> admin_pb2.PolicyVersion:
        version = await self._policy.apply(request.yaml, who.id, request.actor)
        reason = f"policy version {version.version} applied"
        self._notifier.emit("policy", who.id, reason, types_pb2.Selector())
        return version

    @_rpc
    async def GetPolicy(
        self, request: admin_pb2.GetPolicyRequest, who: Principal
    ) -> admin_pb2.PolicyVersion:
        return await self._policy.get(request.version)

    @_rpc
    async def ListPolicyHistory(
        self, request: admin_pb2.ListPolicyHistoryRequest, who: Principal
    ) -> admin_pb2.ListPolicyHistoryResponse:
        return admin_pb2.ListPolicyHistoryResponse(versions=await self._policy.history())

    @_rpc
    async def ListBreakers(
        self, request: admin_pb2.ListBreakersRequest, who: Principal
    ) -> admin_pb2.ListBreakersResponse:
        policy, _ = await self._policy.policy()
        out = await list_breakers(self._policy.store, request.tenant)
        out.configured.extend(b.name for b in policy.breakers)
        return out

    @_rpc
    async def TestPolicy(
        self, request: admin_pb2.TestPolicyRequest, who: Principal
    ) -> admin_pb2.TestPolicyResponse:
        if request.tenant:
            check_name("tenant", request.tenant)
        return await dry_run(self._policy.store, request.yaml, request.tenant)


def _event_of(sel: types_pb2.Selector) -> str:
    """The webhook event a manual halt makes."""
    if sel.writes:
        return "degrade"
    return "freeze" if sel.capability else "kill"
