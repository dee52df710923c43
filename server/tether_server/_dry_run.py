"""``tether policy test``: what a policy would trip over recent traffic, changing nothing.

The traffic is what the coordinators publish for the evaluator (``_tally``): per run, the
effects counted since its coordinator began counting it (a run idle for
``FORGET_AFTER`` is dropped, and a coordinator's restart starts from zero), and each
instance's spend since the run began. There is no history of windows to replay, so a
breaker's rates are judged over those counts as one span, and a volume spike, which
needs a baseline of earlier windows, cannot be judged: it is said so, never guessed.
Rules see the context they would see live, with ``effects`` and ``rates`` over that span.
"""

from __future__ import annotations

import json

from tether.v1 import admin_pb2

from tether_server._breakers import (
    NO_LABELS,
    Figures,
    Series,
    Totals,
    covers,
    subject_of,
    trip_reason,
)
from tether_server._etcd import Store
from tether_server._policy import Policy, groups_of, parse
from tether_server._rules import Decisions, read_context, rule_reason, rule_selector, selector_of
from tether_server._selectors import halt_id
from tether_server._store import COUNTS, RunKey, counts_source
from tether_server._tally import FORGET_AFTER, FleetTotals

TRAFFIC = (
    "each run's effects since its coordinator began counting it (runs idle over "
    f"{FORGET_AFTER / 60:g} min are forgotten) and its spend since it began; breaker rates "
    "and rule windows over that span; volume spikes need a live baseline and are not judged"
)
_OVER = "the published counts"


async def dry_run(store: Store, text: str, tenant: str = "") -> admin_pb2.TestPolicyResponse:
    """What ``text`` would trip now, on ``tenant``'s runs (every tenant's when empty).

    Raises:
        InvalidArgument: the document is malformed or a rule does not compile.
    """
    policy = parse(text)  # refuses first, as apply does
    fleet = FleetTotals()
    kvs = (await store.range(COUNTS)).kvs
    for kv in kvs:
        fleet.merge(counts_source(kv.key), json.loads(kv.value))
    runs = {r for r in fleet.known_runs() if tenant in ("", r.tenant)}
    groups = groups_of(policy.rules)
    await read_context(store, fleet, policy, groups, runs)
    out = admin_pb2.TestPolicyResponse(runs=len(runs), coordinators=len(kvs), traffic=TRAFFIC)
    out.trips.extend(_breakers(policy, fleet, runs))
    decided = Decisions().due(groups, 0, fleet, _whole, 1.0, changed=runs)
    for rule, subject, context in decided:
        out.trips.add(
            kind="rule", name=rule.name, selector=halt_id(rule_selector(rule, subject)),
            action=rule.action.value, reason=rule_reason(rule, context["run"]),
            dry_run=rule.dry_run,
        )  # fmt: skip
    return out


def _breakers(policy: Policy, fleet: FleetTotals, runs: set[RunKey]) -> list[admin_pb2.WouldTrip]:
    found = []
    for spec in policy.breakers:
        labels = fleet.labels
        subjects = {
            subject_of(spec.scope, r) for r in runs if covers(spec, r, labels.get(r, NO_LABELS))
        }
        for subject in sorted(subjects):
            fig = Figures(spec.window, fleet.totals(subject))  # no baseline: no volume verdict
            reason = trip_reason(spec, fig, over=_OVER)
            if reason:
                sel = selector_of(spec.scope, subject, writes=True)
                found.append(
                    admin_pb2.WouldTrip(
                        kind="breaker", name=spec.name, selector=halt_id(sel),
                        action="degrade", reason=reason,
                    )
                )  # fmt: skip
    return found


def _whole(window: float, subject: tuple[str, ...], totals: Totals, now: float) -> Series:
    """A rule's window as the whole published span: from nothing to the totals now."""
    series = Series(window)
    series.add(now - window, Totals())
    series.add(now, totals)
    return series
