"""How the CLI prints: one-line errors, JSON, tables, and the rows of each listing.

``json`` is imported by the functions that write it: ``tether kill`` prints one line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from tether._types import AgentEvent, AgentInstance, AuditEntry, EffectRecord, Halt

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
R = TypeVar("R")


def fail(code: int, err: object) -> int:
    """Print ``err`` as one line on stderr; return the exit ``code``."""
    text = " ".join(str(err).split())
    print(f"tether: {text}", file=sys.stderr)
    return code


def plain(value: Any) -> Any:
    """Dataclasses, enums and datetimes as JSON-ready values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def print_json(value: Any) -> None:
    import json

    print(json.dumps(plain(value), indent=2, sort_keys=True))


def print_listing(
    output: str,
    found: Sequence[R],
    headers: list[str],
    row: Callable[[R], list[str]],
    *,
    no_headers: bool = False,
) -> None:
    """``found`` as JSON, or as a table of one ``row`` each (``-o wide`` is a table too)."""
    if output == "json":
        print_json(found)
    else:
        print_table(headers, [row(r) for r in found], no_headers=no_headers)


def print_table(headers: list[str], rows: list[list[str]], *, no_headers: bool = False) -> None:
    """Aligned columns. ``no_headers``: rows only, and nothing at all when there are none,
    so that scripts can count lines."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for row in rows if no_headers else [headers, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not rows and not no_headers:
        print("(none)")


_UNITS = ((86400, "d"), (3600, "h"), (60, "m"))


def ago(when: datetime | None, now: datetime | None = None) -> str:
    """How long ago, in the largest whole unit: ``4s ago``, ``3m ago``, ``2h ago``, ``5d ago``
    (as kubectl's AGE). Every table column of times uses it; ``-o json`` keeps timestamps."""
    if when is None:
        return "-"
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    if seconds < 0:
        return "in the future"  # a clock ahead of this machine's: say so rather than "0s"
    for size, unit in _UNITS:
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


AGENT_HEADERS = ["TENANT", "AGENT", "RUN", "INSTANCE", "STATE", "LAST HEARTBEAT", "CHECKPOINT"]
WIDE_AGENT_HEADERS = [*AGENT_HEADERS, "COORDINATOR", "LABELS", "CAPABILITIES"]


def wide_agent_row(a: AgentInstance) -> list[str]:
    """``-o wide``: also where it is served, its labels and capabilities."""
    labels = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
    return [*agent_row(a), a.coordinator or "-", labels or "-", ",".join(a.capabilities) or "-"]


def agent_row(a: AgentInstance) -> list[str]:
    import json

    checkpoint = json.dumps(a.checkpoint, separators=(",", ":")) if a.checkpoint else "-"
    if len(checkpoint) > 40:
        checkpoint = checkpoint[:37] + "..."
    return [
        a.tenant,
        a.agent,
        a.run_id,
        a.instance_id,
        a.state.value,
        ago(a.last_heartbeat),
        checkpoint,
    ]


def actor(who: str, note: str) -> str:
    """The authenticated actor, with what the caller said of itself beside it, if anything."""
    return f"{who} (says {note})" if note and note != who else who


HALT_HEADERS = ["HALT", "SCOPE", "ACTOR", "SINCE", "REASON"]


def halt_row(h: Halt) -> list[str]:
    reason = h.reason
    if h.release_gate:
        wanted = ",".join(f"{k}={v}" for k, v in sorted(h.release_gate.items()))
        reason += f" [resumed only for {wanted}]"
    return [h.id, h.selector.describe(), actor(h.actor, h.actor_note), ago(h.created_at), reason]


AUDIT_HEADERS = ["AT", "ACTION", "SCOPE", "ACTOR", "CHANGED", "REASON"]


def audit_row(e: AuditEntry) -> list[str]:
    at = ago(e.at)
    who = actor(e.actor, e.actor_note)
    reason = e.reason
    if e.require_labels:  # a resume that waits for a release: the condition is the point
        reason += " [only for " + ",".join(f"{k}={v}" for k, v in e.require_labels.items()) + "]"
    return [at, e.action, e.selector.describe(), who, "yes" if e.changed else "no", reason]


EFFECT_HEADERS = [
    "INTENDED", "RUN", "CAPABILITY", "KEY", "STATUS", "REFUSED BY", "COMPENSATION", "UNDO",
]  # fmt: skip


def effect_row(e: EffectRecord) -> list[str]:
    import json

    undo = json.dumps(e.undo, separators=(",", ":"), sort_keys=True) if e.undo is not None else "-"
    return [
        ago(e.intended_at),
        e.run_id, e.capability, e.key or "-", e.status.value, e.refused_by or "-",
        e.compensation or "-", undo if len(undo) <= 60 else undo[:57] + "...",
    ]  # fmt: skip


def print_event(event: AgentEvent, output: str) -> None:
    if output == "json":
        import json

        print(json.dumps(plain(event), separators=(",", ":")), flush=True)
        return
    a = event.instance
    before = event.previous.value if event.previous else "-"
    when = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    who = f"agent://{a.tenant}/{a.agent} run={a.run_id} instance={a.instance_id}"
    print(f"{when} {who} {before} -> {a.state.value}", flush=True)
