"""Who an instance is, and what the coordinator last told it: the verdict in force."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tether._errors import CapabilityFrozen, Degraded, Killed, TetherLost
from tether._types import Halt
from tether.v1 import agent_pb2, types_pb2


class _Scope(Protocol):
    @property
    def capability(self) -> str: ...

    @property
    def writes(self) -> bool: ...


class _Halted(Protocol):
    @property
    def selector(self) -> _Scope: ...


H = TypeVar("H", bound=_Halted)


def refusal(halt: Halt, capability: str) -> CapabilityFrozen:
    """What using ``capability`` raises under ``halt``, a degraded-mode or capability halt."""
    kind = Degraded if halt.selector.writes else CapabilityFrozen
    scope = halt.selector.scope.value
    return kind(capability, halt.reason, scope=scope, actor=halt.actor, halt_id=halt.id)


def stops(halts: Iterable[H]) -> list[H]:
    """The halts that stop the whole instance: those that freeze no single capability.

    Works on the wire's halts and on their ``tether.Halt`` conversions alike.
    """
    return [h for h in halts if not h.selector.capability and not h.selector.writes]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this instance is, as sent in the first message of every stream."""

    tenant: str
    agent: str
    run_id: str
    instance_id: str
    capabilities: tuple[str, ...]
    labels: Mapping[str, str]
    reads: frozenset[str] = frozenset()  # the capabilities that only read

    def register(self) -> agent_pb2.HeartbeatRequest:
        """The stream's first message: register this instance."""
        reg = agent_pb2.Register(
            tenant=self.tenant,
            agent=self.agent,
            run_id=self.run_id,
            instance_id=self.instance_id,
            capabilities=self.capabilities,
            labels=dict(self.labels),
            read_capabilities=sorted(self.reads),
        )
        return agent_pb2.HeartbeatRequest(register=reg)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the coordinator last said; a new value replaces it whole with every reply.

    Attributes:
        stop: The ``tether.Killed`` (or ``tether.TetherLost``) that stops this instance,
            or None when the coordinator said RUN.
        confirmed_at: ``time.monotonic()`` of the confirmation: when the beat that this
            reply answered was sent.
        revision: The coordinator's etcd revision of the halt state.
        frozen: Each frozen capability with its ``tether.CapabilityFrozen``.
        drain: True when every stopping halt lets queued work drain.
        degraded: The degraded-mode halt in force (every write frozen), if any.
    """

    stop: Killed | None
    confirmed_at: float
    revision: int = 0
    frozen: Mapping[str, CapabilityFrozen] = field(default_factory=dict)
    drain: bool = False
    degraded: Halt | None = None

    def blocks(self, capability: str, reads: frozenset[str]) -> CapabilityFrozen | None:
        """The error using ``capability`` raises now, or None when it may go."""
        frozen = self.frozen.get(capability)
        if frozen is not None:
            return frozen
        if self.degraded is None or capability in reads:
            return None
        return refusal(self.degraded, capability)


def verdict_of(
    resp: agent_pb2.HeartbeatResponse, halts: Sequence[Halt], confirmed_at: float
) -> Verdict:
    """The verdict a reply makes, given the reply's halts already converted."""
    frozen = {
        h.selector.capability: refusal(h, h.selector.capability)
        for h in reversed(halts)  # the broadest freeze of a capability wins
        if h.selector.capability
    }
    degraded = next((h for h in halts if h.selector.writes), None)
    stop: Killed | None = None
    policies = [h.queue for h in stops(resp.halts)]
    drain = bool(policies) and all(q == types_pb2.QUEUE_POLICY_DRAIN for q in policies)
    if resp.order != agent_pb2.ORDER_RUN:
        stopping = stops(halts)
        if resp.fail_closed_reason or not stopping:
            stop = TetherLost(resp.fail_closed_reason or "coordinator ordered a stop")
        else:
            h = stopping[0]
            reason = h.reason
            if h.release_gate:  # a resume waits for another release: say which
                wanted = ",".join(f"{k}={v}" for k, v in sorted(h.release_gate.items()))
                reason += f" (resumed only for {wanted})"
            stop = Killed(reason, scope=h.selector.scope.value, actor=h.actor, halt_id=h.id)
    drain = drain and not resp.fail_closed_reason
    return Verdict(stop, confirmed_at, resp.revision, frozen, drain, degraded)
