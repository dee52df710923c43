"""A halt and the selector it applies to: all that ``tether kill`` sends and gets back.

Apart from the SDK's other types (``tether._types``, which re-exports these), so that a
one-shot ``tether kill`` creates only the classes it uses: each frozen dataclass costs its
import a fraction of a millisecond (``bench/run.py --only cli``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from tether.v1 import types_pb2


class Scope(enum.StrEnum):
    """The breadth of a halt."""

    GLOBAL = "global"
    TENANT = "tenant"
    AGENT = "agent"
    RUN = "run"


_SCOPE_TO_PB = {
    Scope.GLOBAL: types_pb2.SCOPE_GLOBAL,
    Scope.TENANT: types_pb2.SCOPE_TENANT,
    Scope.AGENT: types_pb2.SCOPE_AGENT,
    Scope.RUN: types_pb2.SCOPE_RUN,
}
_SCOPE_FROM_PB = {v: k for k, v in _SCOPE_TO_PB.items()}


@dataclass(frozen=True, slots=True)
class Selector:
    """Which instances a halt applies to."""

    scope: Scope
    tenant: str = ""
    agent: str = ""
    run_id: str = ""
    capability: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    writes: bool = False  # degraded mode: every write capability is frozen

    def to_pb(self) -> types_pb2.Selector:
        return types_pb2.Selector(
            scope=_SCOPE_TO_PB[self.scope],
            tenant=self.tenant,
            agent=self.agent,
            run_id=self.run_id,
            capability=self.capability,
            labels=dict(self.labels),
            writes=self.writes,
        )

    def names(self, tenant: str, agent: str, run_id: str) -> bool:
        """True when every identity field this selector sets equals the given one.

        Labels and capability are not compared; callers that know them check them.
        """
        return (
            self.tenant in ("", tenant)
            and self.agent in ("", agent)
            and self.run_id in ("", run_id)
        )

    def describe(self) -> str:
        """A short human form, such as ``agent://acme/email`` or ``run campaign-42``."""
        text = self._base()
        if self.labels:
            text += " [" + ",".join(f"{k}={v}" for k, v in sorted(self.labels.items())) + "]"
        if self.writes:
            return f"writes in {text}"
        return f"{self.capability} in {text}" if self.capability else text

    def _base(self) -> str:
        if self.scope is Scope.GLOBAL:
            return "global"
        if self.scope is Scope.TENANT:
            return f"tenant {self.tenant}"
        if self.scope is Scope.AGENT:
            return f"agent://{self.tenant}/{self.agent}"
        return f"run {self.run_id}" + (f" (tenant {self.tenant})" if self.tenant else "")


def selector_from_pb(msg: types_pb2.Selector) -> Selector:
    scope = _SCOPE_FROM_PB.get(msg.scope, Scope.GLOBAL)
    return Selector(
        scope, msg.tenant, msg.agent, msg.run_id, msg.capability, dict(msg.labels), msg.writes
    )


def _time(ts: timestamp_pb2.Timestamp) -> datetime | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Halt:
    """A kill order, in force until resumed.

    ``actor`` is who ordered it as the coordinator authenticated it (a SPIFFE ID,
    ``operator:NAME``, or ``anonymous@PEER``); ``actor_note`` is what the caller said of
    itself (``AdminClient(actor=...)``), kept beside it.
    """

    id: str
    selector: Selector
    reason: str
    actor: str
    created_at: datetime | None
    revision: int
    actor_note: str = ""
    release_gate: dict[str, str] = field(default_factory=dict)
    """Labels that exempt an instance: a resume waits for this release (``--require-label``)."""

    @classmethod
    def from_pb(cls, msg: types_pb2.Halt) -> Halt:
        return cls(
            msg.id,
            selector_from_pb(msg.selector),
            msg.reason,
            msg.actor,
            _time(msg.created_at),
            msg.revision,
            msg.actor_note,
            dict(msg.release_gate),
        )
