"""Kill acknowledgements, and soft kills whose grace ran out, written to the audit in batches.

A global kill can be acknowledged by thousands of instances within milliseconds; one audit
entry each would contend on the chain head. Acknowledgements are gathered per halt and
written together, so the audit says who stopped, how, and how much was in flight.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from tether.v1 import admin_pb2, agent_pb2, types_pb2

from tether_server._audit import AuditLog, new_entry
from tether_server._etcd import EtcdUnavailable, every
from tether_server._halts import HaltTable
from tether_server._store import InstanceKey

_MAX_NAMES = 100


@dataclass
class _Acks:
    halt: types_pb2.Halt = field(default_factory=types_pb2.Halt)
    instances: list[str] = field(default_factory=list)
    in_flight: int = 0
    discarded: int = 0


class AckBook:
    """Gathers acknowledgements per (halt, escalated) and appends them to the audit."""

    def __init__(self, audit: AuditLog, halts: HaltTable, interval: float = 0.5) -> None:
        self._audit = audit
        self._halts = halts
        self._interval = interval
        self._pending: dict[tuple[str, bool], _Acks] = defaultdict(_Acks)

    def add(self, key: InstanceKey, ack: agent_pb2.KillAck) -> None:
        acks = self._pending[(ack.halt_id, ack.escalated)]
        if not acks.halt.id and (halt := self._halts.halts.get(ack.halt_id)) is not None:
            acks.halt.CopyFrom(halt)  # now, while it is in force: a resume may follow
        acks.instances.append("/".join(key.parts))
        acks.in_flight += len(ack.in_flight)
        acks.discarded += ack.discarded

    async def flush(self) -> None:
        pending, self._pending = self._pending, defaultdict(_Acks)
        items = list(pending.items())
        for done, ((halt_id, escalated), acks) in enumerate(items):
            try:
                await self._audit.record(self._entry(halt_id, escalated, acks))
            except EtcdUnavailable:
                for key, left in items[done:]:  # this one and every one after it
                    merged = self._pending[key]
                    merged.halt = merged.halt if merged.halt.id else left.halt
                    merged.instances[:0] = left.instances
                    merged.in_flight += left.in_flight
                    merged.discarded += left.discarded
                raise

    def _entry(self, halt_id: str, escalated: bool, acks: _Acks) -> admin_pb2.AuditEntry:
        halt = acks.halt
        n = len(acks.instances)
        if escalated:
            grace = halt.grace.ToTimedelta().total_seconds()
            action = admin_pb2.AUDIT_ACTION_ESCALATE
            reason = (
                f"grace of {grace:g}s timed out: {n} instance(s) escalated to a hard kill "
                f"and cancelled {acks.in_flight} effect(s) in flight"
            )
        else:
            action = admin_pb2.AUDIT_ACTION_ACK
            reason = f"{n} instance(s) stopped; {acks.in_flight} effect(s) were in flight"
        if acks.discarded:
            reason += f"; {acks.discarded} queued item(s) discarded"
        entry = new_entry(action, halt.selector, "tether", reason, halt.mode)
        entry.halt_id = halt_id
        entry.instances.extend(acks.instances[:_MAX_NAMES])
        return entry

    async def run(self) -> None:
        await every(self._interval, self.flush, "audit of acknowledgements")
