"""What a drill proves: one row per worker, the checks over them, and the human report."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tether import Selector

from tether_server._drill_fleet import Worker


@dataclass
class Check:
    """One line of the report."""

    status: str  # PASS, WARN or FAIL
    text: str


@dataclass(frozen=True)
class Flip:
    """When the lever was pulled, and each run's progress at the flip and after the settle."""

    sent: float  # before Kill was called
    returned: float  # Kill returned: the halt is committed
    resumed: float  # the settle period ended
    at_flip: dict[str, int]
    after_settle: dict[str, int]


def report(  # noqa: PLR0917 - one call site, every argument a distinct fact
    scope: str, sel: Selector, workers: list[Worker], hit: list[Worker], flip: Flip,
    stops: dict[str, float | None], items: int, settle: float, recovery: list[Check] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The report of one drill: a row per worker, the checks, and the verdict."""
    rows = [_row(w, w in hit, stops[w.run_id], flip, items) for w in workers]
    checks = _stop_checks(rows) + _journal_checks(rows, settle) + list(recovery or [])
    return {
        "scope": scope, "selector": sel.describe(), "settle_seconds": settle, "workers": rows,
        "checks": [c.__dict__ for c in checks],
        "verdict": verdict(checks),
    }  # fmt: skip


def verdict(checks: list[Check]) -> str:
    """FAIL if any check failed, else PASS (a warning does not fail a drill)."""
    return "FAIL" if any(c.status == "FAIL" for c in checks) else "PASS"


def _row(
    w: Worker, is_hit: bool, stopped_at: float | None, flip: Flip, items: int
) -> dict[str, Any]:
    # From the moment Kill was sent: a stop can land before the operator's call returns.
    stop_ms = (stopped_at - flip.sent) * 1e3 if is_hit and stopped_at else None

    def between(start: float) -> int:
        return sum(1 for _, t in w.journal if start < t < flip.resumed)

    counts = Counter(item for item, _ in w.journal)
    first = w.target.partition(",")[0]  # the coordinator it was given first
    return {
        "tenant": w.tenant, "agent": w.agent, "run_id": w.run_id, "coordinator": first,
        "targeted": is_hit, "stopped": stopped_at is not None, "time_to_stop_ms": stop_ms,
        "effects_after_flip": between(flip.returned) if is_hit else None,
        "effects_after_kill_sent": between(flip.sent) if is_hit else None,
        "queue_at_flip": items - flip.at_flip[w.run_id],
        "queue_after_settle": items - flip.after_settle[w.run_id],
        "duplicated": sorted(i for i, n in counts.items() if n > 1),
        "lost": sorted(set(range(items)) - set(counts)),
        "error": w.error,
    }  # fmt: skip


def _stop_checks(rows: list[dict[str, Any]]) -> list[Check]:
    """Did the targeted workers stop, how fast, and did the bystanders carry on."""
    hit = [r for r in rows if r["targeted"]]
    spared = [r for r in rows if not r["targeted"]]
    times = [r["time_to_stop_ms"] for r in hit if r["time_to_stop_ms"] is not None]
    out = [
        check(
            all(r["stopped"] for r in hit),
            f"every targeted worker stopped ({len(times)}/{len(hit)})",
        )
    ]
    if times:
        out.append(
            Check(
                "PASS",
                f"time to stop from Kill sent: median {statistics.median(times):.1f} ms, "
                f"max {max(times):.1f} ms",
            )
        )
    out.append(
        check(
            not any(r["stopped"] for r in spared),
            f"bystanders kept working ({len(spared)} untouched)",
        )
    )
    return out


def _journal_checks(rows: list[dict[str, Any]], settle: float) -> list[Check]:
    """Did the stopped queues hold still, did effects land late, is every journal whole."""
    hit = [r for r in rows if r["targeted"]]
    moved = [r["run_id"] for r in hit if r["queue_after_settle"] != r["queue_at_flip"]]
    out = [
        check(
            not moved,
            f"queues of stopped runs unchanged over {settle:g}s settle"
            + (f"; moved: {moved}" if moved else ""),
        )
    ]
    late = sum(r["effects_after_flip"] or 0 for r in hit)
    out.append(
        Check(
            "PASS" if late == 0 else "WARN",
            f"effects after the flip: {late} (local check, measured)",
        )
    )
    broken = [r["run_id"] for r in rows if r["duplicated"] or r["lost"]]
    out.append(
        check(
            not broken,
            "journal consistent after resume: none lost, none duplicated"
            + (f"; broken: {broken}" if broken else ""),
        )
    )
    errors = [f"{r['run_id']}: {r['error']}" for r in rows if r["error"]]
    if errors:
        out.append(Check("FAIL", "worker errors: " + "; ".join(errors)))
    return out


def check(ok: bool, text: str) -> Check:
    """PASS if ``ok``, else FAIL."""
    return Check("PASS" if ok else "FAIL", text)


def render(report: dict[str, Any]) -> str:
    """The human report, in the style of ``clawproof --check``."""
    title = f"DRILL {report['scope']}: {report['selector']}"
    lines = [title, "-" * len(title)]
    lines += [f"[{c['status']}] {c['text']}" for c in report["checks"]]
    tally = Counter(c["status"] for c in report["checks"])
    lines.append(
        f"Result: {tally['PASS']} passed, {tally['WARN']} warnings, {tally['FAIL']} failed"
    )
    lines.append(f"Status: {report['verdict']}")
    return "\n".join(lines)
