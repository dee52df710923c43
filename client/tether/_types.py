"""The SDK's own types. The public API returns these, never pb2 messages.

``Scope``, ``Selector`` and ``Halt`` live in ``tether._halt``, which ``tether kill`` loads
alone; they are re-exported here with the rest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2

from tether._halt import Halt, Scope, Selector, _time, selector_from_pb
from tether.v1 import admin_pb2, types_pb2

__all__ = [
    "EFFECT_STATUS_TO_PB",
    "STATE_TO_PB",
    "AgentEvent",
    "AgentInstance",
    "AgentToken",
    "AuditEntry",
    "EffectRecord",
    "EffectStatus",
    "Halt",
    "Principal",
    "Scope",
    "Selector",
    "State",
    "selector_from_pb",
    "struct_to_dict",
]


class State(enum.StrEnum):
    """An instance's state as operators see it."""

    ACTIVE = "ACTIVE"
    KILLED = "KILLED"
    STALE = "STALE"
    EXITED = "EXITED"


_STATE_FROM_PB = {
    types_pb2.INSTANCE_STATE_ACTIVE: State.ACTIVE,
    types_pb2.INSTANCE_STATE_KILLED: State.KILLED,
    types_pb2.INSTANCE_STATE_STALE: State.STALE,
    types_pb2.INSTANCE_STATE_EXITED: State.EXITED,
}
STATE_TO_PB = {v: k for k, v in _STATE_FROM_PB.items()}


def _ints(value: Any) -> Any:
    # Struct keeps every number as a double; give back the ints that went in.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def struct_to_dict(msg: struct_pb2.Struct) -> dict[str, Any]:
    """A checkpoint as the agent reported it: JSON values, integral numbers as ints."""
    from google.protobuf import json_format  # 13 ms to import; `tether kill` never needs it

    result: dict[str, Any] = _ints(json_format.MessageToDict(msg))
    return result


@dataclass(frozen=True, slots=True)
class AgentInstance:
    """One agent process: one stream, one lease."""

    tenant: str
    agent: str
    run_id: str
    instance_id: str
    state: State
    capabilities: tuple[str, ...]
    labels: dict[str, str]
    coordinator: str
    registered_at: datetime | None
    last_heartbeat: datetime | None
    ended_at: datetime | None
    checkpoint: dict[str, Any] | None
    halts: tuple[Halt, ...] = field(default=())

    @classmethod
    def from_pb(cls, msg: types_pb2.AgentInstance) -> AgentInstance:
        return cls(
            tenant=msg.tenant,
            agent=msg.agent,
            run_id=msg.run_id,
            instance_id=msg.instance_id,
            state=_STATE_FROM_PB.get(msg.state, State.STALE),
            capabilities=tuple(msg.capabilities),
            labels=dict(msg.labels),
            coordinator=msg.coordinator,
            registered_at=_time(msg.registered_at),
            last_heartbeat=_time(msg.last_heartbeat),
            ended_at=_time(msg.ended_at),
            checkpoint=struct_to_dict(msg.checkpoint) if msg.HasField("checkpoint") else None,
            halts=tuple(Halt.from_pb(h) for h in msg.halts),
        )


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """A change of an instance's state, from ``watch_agents``."""

    instance: AgentInstance
    previous: State | None
    snapshot: bool
    revision: int

    @classmethod
    def from_pb(cls, msg: admin_pb2.AgentEvent) -> AgentEvent:
        return cls(
            AgentInstance.from_pb(msg.agent),
            _STATE_FROM_PB.get(msg.previous),
            msg.snapshot,
            msg.revision,
        )


class EffectStatus(enum.StrEnum):
    """Where a gated effect ended up."""

    INTENDED = "intended"
    LANDED = "landed"
    FAILED = "failed"
    REFUSED = "refused"
    DUPLICATE = "duplicate"
    NOT_STARTED = "not_started"
    CANCELLED = "cancelled"


_EFFECT_STATUS_FROM_PB = {
    types_pb2.EFFECT_STATUS_INTENDED: EffectStatus.INTENDED,
    types_pb2.EFFECT_STATUS_LANDED: EffectStatus.LANDED,
    types_pb2.EFFECT_STATUS_FAILED: EffectStatus.FAILED,
    types_pb2.EFFECT_STATUS_REFUSED: EffectStatus.REFUSED,
    types_pb2.EFFECT_STATUS_DUPLICATE: EffectStatus.DUPLICATE,
    types_pb2.EFFECT_STATUS_NOT_STARTED: EffectStatus.NOT_STARTED,
    types_pb2.EFFECT_STATUS_CANCELLED: EffectStatus.CANCELLED,
}
EFFECT_STATUS_TO_PB = {v: k for k, v in _EFFECT_STATUS_FROM_PB.items()}


_COMPENSATION = {
    types_pb2.COMPENSATION_STATUS_COMPENSATED: "compensated",
    types_pb2.COMPENSATION_STATUS_FAILED: "failed",
    types_pb2.COMPENSATION_STATUS_CLAIMED: "claimed",
}


@dataclass(frozen=True, slots=True)
class EffectRecord:
    """One row of the side-effect ledger."""

    effect_id: str
    key: str
    capability: str
    status: EffectStatus
    intended_at: datetime | None
    ended_at: datetime | None
    refused_by: str
    error: str
    strict: bool
    permit_revision: int
    tenant: str
    agent: str
    run_id: str
    instance_id: str
    undo: dict[str, Any] | None = None
    """What reverses the effect (``fx.undo``); None when it carries none."""
    trace_id: str = ""
    span_id: str = ""
    release: str = ""
    compensation: str = ""
    """'' (not compensated), ``compensated``, ``failed``, or ``claimed`` (a run is at it)."""
    compensation_error: str = ""
    compensated_at: datetime | None = None
    compensated_by: str = ""

    @classmethod
    def from_pb(cls, msg: types_pb2.Effect) -> EffectRecord:
        return cls(
            effect_id=msg.effect_id,
            key=msg.key,
            capability=msg.capability,
            status=_EFFECT_STATUS_FROM_PB.get(msg.status, EffectStatus.INTENDED),
            intended_at=_time(msg.intended_at),
            ended_at=_time(msg.ended_at),
            refused_by=msg.refused_by,
            error=msg.error,
            strict=msg.strict,
            permit_revision=msg.permit_revision,
            tenant=msg.tenant,
            agent=msg.agent,
            run_id=msg.run_id,
            instance_id=msg.instance_id,
            undo=struct_to_dict(msg.undo) if msg.HasField("undo") else None,
            trace_id=msg.trace_id,
            span_id=msg.span_id,
            release=msg.release,
            compensation=_COMPENSATION.get(msg.compensation, ""),
            compensation_error=msg.compensation_error,
            compensated_at=_time(msg.compensated_at),
            compensated_by=msg.compensated_by,
        )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One kill or resume, with who, why and when; ``actor`` and ``actor_note`` as in Halt."""

    id: str
    action: str
    selector: Selector
    actor: str
    reason: str
    at: datetime | None
    revision: int
    changed: bool
    halt_id: str = ""
    instances: tuple[str, ...] = ()
    actor_note: str = ""
    require_labels: dict[str, str] = field(default_factory=dict)
    """A resume's condition: only instances with these labels were resumed."""

    @classmethod
    def from_pb(cls, msg: admin_pb2.AuditEntry) -> AuditEntry:
        action = admin_pb2.AuditAction.Name(msg.action).removeprefix("AUDIT_ACTION_").lower()
        return cls(
            msg.id,
            action,
            selector_from_pb(msg.selector),
            msg.actor,
            msg.reason,
            _time(msg.at),
            msg.revision,
            msg.changed,
            msg.halt_id,
            tuple(msg.instances),
            msg.actor_note,
            dict(msg.require_labels),
        )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a coordinator takes the caller to be, and what that allows (``whoami``)."""

    id: str
    """The SPIFFE ID, ``operator:NAME`` for an admin token, or ``anonymous@PEER``."""
    kind: str
    """``anonymous``, ``agent``, ``tenant`` (an agent host of one tenant) or ``operator``."""
    tenant: str = ""
    agent: str = ""
    operator: str = ""
    role: str = ""
    """``viewer``, ``operator`` or ``admin``; '' when the caller may not use AdminService."""
    tenants: tuple[str, ...] = ()
    """The tenants the role covers; ``*`` for every tenant."""

    @classmethod
    def from_pb(cls, msg: admin_pb2.Principal) -> Principal:
        kind = admin_pb2.PrincipalKind.Name(msg.kind).removeprefix("PRINCIPAL_KIND_").lower()
        return cls(msg.id, kind, msg.tenant, msg.agent, msg.operator, msg.role, tuple(msg.tenants))


@dataclass(frozen=True, slots=True)
class AgentToken:
    """A signed agent token: give it to the agent as ``TETHER_TOKEN`` (or ``token=``)."""

    token: str
    subject: str
    """The SPIFFE ID the token stands for: ``spiffe://TD/tenant/T[/agent/A]``."""
    expires_at: datetime | None

    @classmethod
    def from_pb(cls, msg: admin_pb2.AgentToken) -> AgentToken:
        return cls(msg.token, msg.subject, _time(msg.expires_at))
