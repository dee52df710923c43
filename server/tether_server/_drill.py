"""``tether drill``: pull the lever on a fleet at one scope and prove the stop, the
bystanders, the queue and the journal, as seed 000's quarterly drill asks.

By default the drill brings its own fleet: an etcd, two coordinators, and workers spread
over both. Each worker drains a finite queue of items; before each item it checks its
tether for the ``send`` capability, then records the item in its journal (the effect) and
checkpoints. The drill flips the halt, watches who stops and how fast, waits a settle
period, resumes, restarts the stopped runs from their checkpoints, and checks that every
run's journal holds every item exactly once.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

from tether import AdminClient, InvalidArgument, Selector, selector

from tether_server._drill_breaker import drill_breaker
from tether_server._drill_fleet import CAPABILITY, DrillFleet, Worker, own_fleet
from tether_server._drill_report import Flip, report

SCOPES = ("capability", "run", "agent", "tenant", "global")


def plan(
    scope: str, tag: str, targets: list[str], items: int, tick: float
) -> tuple[Selector, list[Worker]]:
    """The workers, and the selector for ``scope``: two agents, a bystander tenant."""
    tenant, other = f"drill-{tag}", f"drill-{tag}-bystander"
    layout = [
        (tenant, "alpha"),
        (tenant, "alpha"),
        (tenant, "beta"),
        (tenant, "beta"),
        (other, "alpha"),
    ]
    workers = [
        Worker(t, a, f"{tenant}.r{n}", _spread(targets, n), items, tick)
        for n, (t, a) in enumerate(layout)
    ]
    sel = {
        "capability": selector(agent=f"agent://{tenant}/alpha", capability=CAPABILITY),
        "run": selector(run_id=workers[0].run_id),
        "agent": selector(agent=f"agent://{tenant}/alpha"),
        "tenant": selector(tenant=tenant),
        "global": selector(all=True),
    }[scope]
    return sel, workers


def _spread(targets: list[str], n: int) -> str:
    """Every coordinator, the ``n``-th first: workers spread over them and fail over."""
    first = n % len(targets)
    return ",".join([*targets[first:], *targets[:first]])


def targeted(sel: Selector, w: Worker) -> bool:
    return sel.names(w.tenant, w.agent, w.run_id)


def drill(
    scope: str, fleet: DrillFleet, *, settle: float, items: int, tick: float
) -> dict[str, Any]:
    """Run one drill at ``scope``; return the report."""
    sel, workers = plan(scope, uuid.uuid4().hex[:6], fleet.targets, items, tick)
    with AdminClient(",".join(fleet.targets), actor="tether-drill") as admin:
        with _running(workers):
            _wait(lambda: all(w.done >= items // 4 for w in workers), 30)
            sent = time.monotonic()
            admin.kill(sel, f"drill at {scope} scope", force=True)
            flipped = time.monotonic()
            hit = [w for w in workers if targeted(sel, w)]
            _wait(lambda: all(w.stopped_at is not None or w.error for w in hit), 10)
            at_flip = {w.run_id: w.done for w in workers}
            time.sleep(settle)
            after_settle = {w.run_id: w.done for w in workers}
        flip = Flip(sent, flipped, time.monotonic(), at_flip, after_settle)
        stops = {w.run_id: w.stopped_at for w in workers}
        admin.resume(sel, "drill over")
        with _running(workers):  # every run finishes its queue, from its checkpoint
            _wait(lambda: all(w.done >= items or w.error for w in workers), 60 + items * tick * 4)
    return report(scope, sel, workers, hit, flip, stops, items, settle)


@contextlib.contextmanager
def _running(workers: list[Worker]) -> Iterator[None]:
    for w in workers:
        w.quit.clear()
        w.start()
    try:
        yield
    finally:
        for w in workers:
            w.quit.set()
        for w in workers:
            w.join(15)


def _wait(probe: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.005)
    return False


def run_drills(
    scope: str, addr: str | None, *, settle: float, items: int, tick: float
) -> list[dict[str, Any]]:
    """Drill at ``scope``, or at every scope in turn for ``"all"``; return the reports.

    Args:
        scope: one of ``SCOPES``, or ``"all"``.
        addr: coordinators ``HOST:PORT[,...]`` to drill; none: a fleet of the drill's own.
        settle: seconds to watch the stopped runs after the flip.
        items: queue length of each worker.
        tick: seconds of work per item.

    Raises:
        tether.TetherError: the fleet did not come up, or a call to it failed.
    """
    scopes = list(SCOPES) if scope == "all" else [scope]
    if scope == "breaker" and addr:
        raise InvalidArgument(
            "the breaker drill applies a policy of its own; run it without --addr"
        )
    fleet = DrillFleet([a for a in addr.split(",") if a]) if addr else own_fleet(2.0)
    try:
        if scope == "breaker":
            return [drill_breaker(fleet.targets)]
        return [drill(s, fleet, settle=settle, items=items, tick=tick) for s in scopes]
    finally:
        fleet.close()
