"""``tether drill``: pull the lever on a fleet at one scope and prove the stop, the
bystanders, the queue and the journal, as seed 000's quarterly drill asks.

By default the drill brings its own fleet: an etcd, two coordinators, and workers spread
over both. Each worker drains a finite queue of items; before each item it checks its
tether for the ``send`` capability, then records the item in its journal (the effect) and
checkpoints. The drill flips the halt, watches who stops and how fast, waits a settle
period, resumes, restarts the stopped runs from their checkpoints, and checks that every
run's journal holds every item exactly once, and that the ledger agrees (``_drill_recovery``).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from tether import AdminClient, EffectStatus, InvalidArgument, Selector, selector

from tether_server._drill_breaker import drill_breaker
from tether_server._drill_fleet import CAPABILITY, DrillFleet, Worker, own_fleet, wait
from tether_server._drill_recovery import Window, recovery_checks
from tether_server._drill_report import Flip, report

SCOPES = ("capability", "run", "agent", "tenant", "global")

Progress = Callable[[str], None]
"""Told each step of a drill, as one short line (the CLI prints them on stderr)."""


def _quiet(_: str) -> None:
    pass


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
    scope: str,
    fleet: DrillFleet,
    *,
    settle: float,
    items: int,
    tick: float,
    progress: Progress = _quiet,
) -> dict[str, Any]:
    """Run one drill at ``scope``; return the report. ``progress`` hears each step."""
    sel, workers = plan(scope, uuid.uuid4().hex[:6], fleet.targets, items, tick)

    def say(text: str) -> None:
        progress(f"{scope}: {text}")

    with AdminClient(",".join(fleet.targets), actor="tether-drill") as admin:
        with _running(workers):
            up = wait(lambda: all(w.done >= items // 4 for w in workers), 30)
            say(f"{len(workers)} workers up on {len(fleet.targets)} coordinator(s)" if up else
                "workers slow to start; flipping anyway")  # fmt: skip
            sent = time.monotonic()
            admin.kill(sel, f"drill at {scope} scope", force=True)
            flipped, flipped_at = time.monotonic(), datetime.now(UTC)
            hit = [w for w in workers if targeted(sel, w)]
            say(f"flipped {sel.describe()} in {(flipped - sent) * 1000:.0f} ms; "
                f"{len(hit)} of {len(workers)} workers targeted")  # fmt: skip
            wait(lambda: all(w.stopped_at is not None or w.error for w in hit), 10)
            at_flip = {w.run_id: w.done for w in workers}
            _settle(settle, say)
            after_settle = {w.run_id: w.done for w in workers}
        flip = Flip(sent, flipped, time.monotonic(), at_flip, after_settle)
        late = sum(1 for w in hit for _, t in w.journal if flipped < t < flip.resumed)
        window = Window(flipped_at, datetime.now(UTC), late)
        stops = {w.run_id: w.stopped_at for w in workers}
        admin.resume(sel, "drill over")
        say("resumed; every run finishes its queue from its checkpoint")
        with _running(workers):  # every run finishes its queue, from its checkpoint
            wait(lambda: all(w.done >= items or w.error for w in workers), 60 + items * tick * 4)
        wait(lambda: _settled(admin, workers), 10)
        recovery = recovery_checks(admin, workers, hit, window)
    found = report(scope, sel, workers, hit, flip, stops, items, settle, recovery)
    say(found["verdict"])
    return found


def _settle(seconds: float, say: Progress) -> None:
    """Sleep ``seconds``, counting down: each second up to 10 s, else every 5 s."""
    step = 1.0 if seconds <= 10 else 5.0
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        say(f"settling, {left:.0f}s left")
        time.sleep(min(step, left))


def _settled(admin: AdminClient, workers: list[Worker]) -> bool:
    """Every journal entry is in the ledger: records reach it at the flush interval."""
    tenants = {w.tenant for w in workers}
    landed = sum(len(admin.effects(t, status=EffectStatus.LANDED)) for t in tenants)
    return landed >= sum(w.done for w in workers)


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


def run_drills(
    scope: str,
    addr: str | None,
    *,
    settle: float,
    items: int,
    tick: float,
    progress: Progress = _quiet,
) -> list[dict[str, Any]]:
    """Drill at ``scope``, or at every scope in turn for ``"all"``; return the reports.

    Args:
        scope: one of ``SCOPES``, ``"breaker"`` (own fleet only), or ``"all"``.
        addr: coordinators ``HOST:PORT[,...]`` to drill; none: a fleet of the drill's own.
        settle: seconds to watch the stopped runs after the flip.
        items: queue length of each worker.
        tick: seconds of work per item.
        progress: told each step in one short line.

    Raises:
        tether.TetherError: the fleet did not come up, or a call to it failed.
    """
    scopes = list(SCOPES) if scope == "all" else [scope]
    if scope == "breaker" and addr:
        raise InvalidArgument(
            "the breaker drill applies a policy of its own; run it without --addr"
        )
    fleet = DrillFleet([a for a in addr.split(",") if a]) if addr else own_fleet(2.0)
    if not addr:
        progress("the drill's own fleet is up: etcd and two coordinators")
    try:
        if scope == "breaker":
            return [drill_breaker(fleet.targets)]
        return [
            drill(s, fleet, settle=settle, items=items, tick=tick, progress=progress)
            for s in scopes
        ]
    finally:
        fleet.close()
