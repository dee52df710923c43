"""``AdminClient``: kill, resume and fleet reads, for operators and the CLI."""

from __future__ import annotations

import dataclasses
import functools
import getpass
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from tether._channel import (
    ENV_TOKEN,
    ServiceStub,
    bearer,
    client_tls,
    open_channel,
    resolve_targets,
    tls_from_env,
    trace_from_env,
    traced,
)
from tether._errors import from_rpc_error
from tether._failover import Coordinators, FailoverStub
from tether._halt import Halt, Selector
from tether._policy_calls import ProtectionCalls
from tether.v1 import admin_pb2, types_pb2

# The listing calls import the types they return (tether._types) when first called: a
# `tether kill` needs only a Halt, and creating every record class would cost it about 5 ms
# (bench/run.py --only cli).
if TYPE_CHECKING:
    from datetime import datetime
    from pathlib import Path

    from tether._types import (
        AgentEvent,
        AgentInstance,
        AgentToken,
        AuditEntry,
        EffectRecord,
        EffectStatus,
        Principal,
        State,
    )

T = TypeVar("T")

_ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
AUDIT_LIMIT = 100  # audit entries asked for when the caller names no limit (the CLI too)


def default_actor() -> str:
    """``user@host``: who the audit says ordered a kill when no actor is given."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# Admin channels notice a dead coordinator under an open watch, and retry a restarted one soon.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


class AdminClient(ProtectionCalls):
    """Talks to the coordinators' AdminService. Every coordinator answers the same.

    Given several addresses, it fails over: see ``tether._failover``. A Kill retried on
    another coordinator is safe: a halt's id is its selector, and a Kill of a selector
    already halted changes nothing (it answers ``already_halted``).

    Args:
        target: ``HOST:PORT``, or a comma-separated list to fail over; defaults to
            ``TETHER_ADDR``, then ``127.0.0.1:7700``.
        timeout: Seconds per call, on each coordinator tried.
        connect_timeout: Seconds each coordinator gets to connect before the next is tried.
        actor: Recorded in the audit as a note beside who acted (the audit's actor is the
            identity the coordinator authenticated); defaults to ``user@host``.
        token: Admin bearer token, for coordinators run with ``--admin-tokens``;
            defaults to ``TETHER_TOKEN``.
        tls_ca: PEM CA bundle that verifies the coordinator; given, the client speaks
            TLS. Defaults to ``TETHER_TLS_CA``; without one, plaintext.
        tls_cert: PEM client certificate (its URI SAN names the operator), with
            ``tls_key``. Defaults to ``TETHER_TLS_CERT``.
        tls_key: Private key of ``tls_cert``. Defaults to ``TETHER_TLS_KEY``.
        environ: Where the defaults above are read; usually ``os.environ``.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
        actor: str | None = None,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        targets = resolve_targets(target, environ)
        self._timeout = timeout
        self._actor = actor or default_actor()
        self._metadata = bearer(token or environ.get(ENV_TOKEN))
        self._trace = trace_from_env(environ)  # TRACEPARENT, when no span is active here
        files = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
        if not any(files.values()):
            files.update(tls_from_env(environ))
        tls = client_tls(**files)
        self._coordinators = Coordinators(
            targets,
            lambda addr: open_channel(addr, tls, CHANNEL_OPTIONS),
            lambda channel: ServiceStub(channel, _ADMIN_SERVICE),
            connect_timeout,
        )
        self._stub = FailoverStub(self._coordinators)  # its calls try every coordinator

    @property
    def target(self) -> str:
        """The coordinator tried first: the one that answered last."""
        return self._coordinators.current

    @property
    def targets(self) -> tuple[str, ...]:
        """Every coordinator this client may ask, in the order given."""
        return self._coordinators.targets

    def close(self) -> None:
        self._coordinators.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any) -> T:
        try:
            metadata = traced(self._metadata, self._trace)
            return method(request, timeout=self._timeout, metadata=metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def kill(
        self,
        sel: Selector,
        reason: str,
        *,
        force: bool = False,
        soft: bool = False,
        grace: float | None = None,
        drain: bool = False,
    ) -> tuple[Halt, bool]:
        """Halt ``sel``. Returns the halt in force and whether it was already there.

        Args:
            force: Halt a name that never registered.
            soft: Let gated work in flight finish within ``grace`` seconds (default 30),
                then escalate to hard. New effects stop at once either way.
            drain: Let work queued through ``WorkQueue`` run to completion; by default it
                is discarded and recorded in the ledger as not started.
        """
        req = admin_pb2.KillRequest(
            selector=sel.to_pb(),
            reason=reason,
            actor=self._actor,
            force=force,
            mode=types_pb2.KILL_MODE_SOFT if soft else types_pb2.KILL_MODE_HARD,
            queue=types_pb2.QUEUE_POLICY_DRAIN if drain else types_pb2.QUEUE_POLICY_DISCARD,
        )
        if grace is not None:
            req.grace.FromMilliseconds(int(grace * 1000))
        resp = self._call(self._stub.Kill, req)
        return Halt.from_pb(resp.halt), resp.already_halted

    def resume(
        self, sel: Selector, reason: str = "", *, require_labels: Mapping[str, str] | None = None
    ) -> Halt | None:
        """Lift the halt on ``sel``; returns it, or None when nothing was halted.

        Args:
            require_labels: Lift it only for instances carrying all of these labels, such
                as ``{"version": "1.4.3"}``; the rest stay halted (the returned halt
                carries them as its ``release_gate``).
        """
        req = admin_pb2.ResumeRequest(
            selector=sel.to_pb(), reason=reason, actor=self._actor,
            require_labels=dict(require_labels or {}),
        )  # fmt: skip
        resp = self._call(self._stub.Resume, req)
        return Halt.from_pb(resp.resumed) if resp.was_halted else None

    def agents(
        self, *, tenant: str = "", agent: str = "", run_id: str = "", state: State | None = None
    ) -> list[AgentInstance]:
        from tether._types import STATE_TO_PB, AgentInstance

        req = admin_pb2.ListAgentsRequest(
            tenant=tenant,
            agent=agent,
            run_id=run_id,
            state=STATE_TO_PB[state] if state else types_pb2.INSTANCE_STATE_UNSPECIFIED,
        )
        return [AgentInstance.from_pb(a) for a in self._call(self._stub.ListAgents, req).agents]

    def agent(self, tenant: str, agent: str, run_id: str, instance_id: str = "") -> AgentInstance:
        from tether._types import AgentInstance

        req = admin_pb2.GetAgentRequest(
            tenant=tenant, agent=agent, run_id=run_id, instance_id=instance_id
        )
        return AgentInstance.from_pb(self._call(self._stub.GetAgent, req))

    def halts(self, *, tenant: str = "") -> list[Halt]:
        req = admin_pb2.ListHaltsRequest(tenant=tenant)
        return [Halt.from_pb(h) for h in self._call(self._stub.ListHalts, req).halts]

    def audit(
        self, *, tenant: str = "", since: datetime | None = None, limit: int = AUDIT_LIMIT
    ) -> list[AuditEntry]:
        from tether._types import AuditEntry

        req = admin_pb2.ListAuditRequest(tenant=tenant, limit=limit)
        if since is not None:
            req.since.FromDatetime(since)
        return [AuditEntry.from_pb(e) for e in self._call(self._stub.ListAudit, req).entries]

    def effects(
        self,
        tenant: str,
        *,
        agent: str = "",
        run_id: str = "",
        since: datetime | None = None,
        status: EffectStatus | None = None,
        until: datetime | None = None,
        trace_id: str = "",
        capability: str = "",
    ) -> list[EffectRecord]:
        """The ledger: one row per gated effect, oldest first.

        ``run_id`` without ``agent`` looks for the run across the tenant; ``since`` and
        ``until`` bound when effects were intended (``until`` excluded).
        """
        from tether._types import EFFECT_STATUS_TO_PB, EffectRecord

        req = admin_pb2.ListEffectsRequest(
            tenant=tenant, agent=agent, run_id=run_id, trace_id=trace_id, capability=capability
        )
        if status is not None:
            req.status = EFFECT_STATUS_TO_PB[status]
        if since is not None:
            req.since.FromDatetime(since)
        if until is not None:
            req.until.FromDatetime(until)
        resp = self._call(self._stub.ListEffects, req)
        return [EffectRecord.from_pb(e) for e in resp.effects]

    def record_compensation(
        self, effect: EffectRecord, error: str = "", *, claim: bool = False
    ) -> tuple[EffectRecord, bool]:
        """Record that ``effect`` was compensated, or, with ``error``, that compensating it
        failed; with ``claim``, take it before calling a handler (``FailedPrecondition``
        while another run holds it). Returns the effect as the ledger now has it, and
        whether it had been compensated already (then nothing was recorded)."""
        from tether._types import EffectRecord

        status = types_pb2.COMPENSATION_STATUS_FAILED if error else (
            types_pb2.COMPENSATION_STATUS_CLAIMED if claim
            else types_pb2.COMPENSATION_STATUS_COMPENSATED
        )  # fmt: skip
        req = admin_pb2.RecordCompensationRequest(
            tenant=effect.tenant, agent=effect.agent, run_id=effect.run_id,
            effect_id=effect.effect_id, error=error, status=status,
        )  # fmt: skip
        resp = self._call(self._stub.RecordCompensation, req)
        return EffectRecord.from_pb(resp.effect), resp.already_compensated

    def permit_key(self) -> tuple[str, str]:
        """(public key PEM, key id) that verifies effect permits."""
        resp = self._call(self._stub.GetPermitKey, admin_pb2.GetPermitKeyRequest())
        return resp.public_key_pem, resp.key_id

    def verify_audit(self) -> tuple[bool, int, str, str]:
        """Walk the audit hash chain: (intact, entries checked, first bad id, problem)."""
        resp = self._call(self._stub.VerifyAudit, admin_pb2.VerifyAuditRequest())
        return resp.intact, resp.entries, resp.first_bad_id, resp.problem

    def whoami(self) -> Principal:
        """Who the coordinator takes this client to be, and what its role allows."""
        from tether._types import Principal

        return Principal.from_pb(self._call(self._stub.WhoAmI, admin_pb2.WhoAmIRequest()))

    def issue_agent_token(
        self, tenant: str, *, agent: str = "", ttl: float | None = None
    ) -> AgentToken:
        """A signed token that registers as ``tenant`` (and ``agent``, if given); admins only.

        Args:
            ttl: Seconds the token lives; the coordinator's default is 24 hours, at most 30 days.
        """
        from tether._types import AgentToken

        req = admin_pb2.IssueAgentTokenRequest(tenant=tenant, agent=agent)
        if ttl is not None:
            req.ttl.FromMilliseconds(int(ttl * 1000))
        return AgentToken.from_pb(self._call(self._stub.IssueAgentToken, req))

    def status(self) -> admin_pb2.CoordinatorStatus:
        """What the coordinator sees (its etcd cluster, halt view, permit key, TLS, clock,
        canary), as ``tether doctor`` compares them; the wire message, as doctor reports it."""
        status: admin_pb2.CoordinatorStatus = self._call(
            self._stub.GetStatus, admin_pb2.GetStatusRequest()
        )
        return status

    def watch(
        self,
        *,
        tenant: str = "",
        agent: str = "",
        run_id: str = "",
        snapshot: bool = True,
        progress: bool = False,
    ) -> Iterator[AgentEvent]:
        """State changes as they happen, after the current state unless ``snapshot`` is off.

        When its coordinator goes away the watch moves to the next one, and reports only
        what changed meanwhile: a reconnection starts with a snapshot, and the instances
        whose state is already known are left out of it. ``progress`` adds each run's
        checkpoint to the events, and an event (state unchanged) whenever a stored
        checkpoint changes.
        """
        from tether._types import AgentEvent

        req = admin_pb2.WatchAgentsRequest(
            tenant=tenant, agent=agent, run_id=run_id, progress=progress
        )
        seen = _Seen(snapshot)
        try:
            for connection, message in self._coordinators.stream(
                functools.partial(self._watch_on, req)
            ):
                event = seen.news(connection, AgentEvent.from_pb(message))
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc_error(err) from err

    def _watch_on(
        self, req: admin_pb2.WatchAgentsRequest, stub: ServiceStub
    ) -> Iterator[admin_pb2.AgentEvent]:
        stream = stub.WatchAgents(req, metadata=traced(self._metadata, self._trace))
        try:
            yield from stream
        finally:
            stream.cancel()


class _Seen:
    """The state a watch last reported per instance, so a reconnection reports only news."""

    def __init__(self, snapshot: bool) -> None:
        self._snapshot = snapshot
        self._states: dict[tuple[str, str, str, str], State] = {}

    def news(self, connection: int, event: AgentEvent) -> AgentEvent | None:
        a = event.instance
        key = (a.tenant, a.agent, a.run_id, a.instance_id)
        before = self._states.get(key)
        self._states[key] = a.state
        if not event.snapshot:
            return event
        if connection == 1:
            return event if self._snapshot else None
        if before == a.state:
            return None  # a reconnection's snapshot, and nothing changed meanwhile
        return dataclasses.replace(event, previous=before, snapshot=False)
