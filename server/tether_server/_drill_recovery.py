"""What the drill proves of recovery, read back from the ledger after the resume.

Every worker gates its journal entry as one effect (``send``, keyed by the item, with the
item as undo data). After the resume, the ledger's "intended vs landed" diff must be
clean: no effect left merely intended, and the landed keys exactly the journal's items.
And a compensation dry run over the window from the flip to the resume must list exactly
the effects that landed in it on the targeted runs (as the journals say), which the kill
should make zero: a WARN when they differ, as the late effects themselves are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tether import AdminClient, EffectStatus, compensate

from tether_server._drill_fleet import Worker
from tether_server._drill_report import Check


@dataclass(frozen=True)
class Window:
    """The flip and the resume, on the wall clock the ledger's times are on."""

    flipped: datetime
    resumed: datetime
    late: int
    """Journal entries of the targeted runs between the flip and the resume."""


def _ledger_check(admin: AdminClient, workers: list[Worker]) -> Check:
    unclean = []
    for w in workers:
        rows = admin.effects(w.tenant, agent=w.agent, run_id=w.run_id)
        landed = sorted(r.key for r in rows if r.status == EffectStatus.LANDED)
        intended = [r.key for r in rows if r.status == EffectStatus.INTENDED]
        journal = sorted(f"item-{item}" for item, _ in w.journal)
        if intended or landed != journal:
            unclean.append(w.run_id)
    return Check(
        "FAIL" if unclean else "PASS",
        "ledger after resume: every effect ended, landed exactly the journal"
        + (f"; differs: {unclean}" if unclean else ""),
    )


def _dry_run_check(admin: AdminClient, hit: list[Worker], window: Window) -> Check:
    listed = 0
    for w in hit:
        plan = compensate(
            admin, w.tenant, agent=w.agent, run_id=w.run_id, since=window.flipped,
            until=window.resumed, handler=lambda _: None,
        )  # fmt: skip
        listed += len(plan.todo)
    return Check(
        "PASS" if listed == window.late else "WARN",
        f"compensation dry run from the flip to the resume lists {listed} effect(s); "
        f"the journals say {window.late} landed then",
    )


def recovery_checks(
    admin: AdminClient, workers: list[Worker], hit: list[Worker], window: Window
) -> list[Check]:
    """The ledger is clean after the resume, and what landed after the flip is listed."""
    return [_ledger_check(admin, workers), _dry_run_check(admin, hit, window)]
