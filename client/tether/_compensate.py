"""``tether.compensate``: reverse what landed, off the ledger's list, one effect at a time.

The handler is called once per landed effect that carries undo data, newest first, with
the effect (``EffectRecord``; its ``undo`` holds what ``fx.undo`` attached). Without
``apply`` nothing is called: the report lists what would be. With it, each outcome is
recorded in the ledger (compensated, or failed with the error) and audited with the
caller's principal, so a second run never compensates an effect twice; failed ones are
tried again. Each effect is claimed before its handler is called, so two runs at the same
moment never both reverse it: the second skips it as busy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tether._admin import AdminClient
from tether._errors import FailedPrecondition, InvalidArgument
from tether._types import EffectRecord, EffectStatus

Handler = Callable[[EffectRecord], Any]
"""Reverses one effect, given its ledger row; raises if it could not."""


def load_handler(spec: str) -> Handler:
    """The function ``module:function`` names, imported.

    Raises:
        InvalidArgument: the spec is malformed, or names nothing callable.
    """
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise InvalidArgument(f"handler {spec!r}: expected module:function, e.g. my_undo:refund")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InvalidArgument(f"handler {spec!r}: cannot import {module_name}: {err}") from None
    handler = getattr(module, name, None)
    if not callable(handler):
        raise InvalidArgument(f"handler {spec!r}: {module_name} has no function {name}")
    return handler  # type: ignore[no-any-return]


@dataclass(slots=True)
class CompensationReport:
    """What a compensation run did, or, without ``apply``, would do."""

    applied: bool
    todo: list[EffectRecord] = field(default_factory=list)
    """Landed effects with undo data, not yet compensated, newest first."""
    compensated: list[EffectRecord] = field(default_factory=list)
    failed: list[tuple[EffectRecord, str]] = field(default_factory=list)
    skipped: list[EffectRecord] = field(default_factory=list)
    """Landed effects without undo data: nothing says how to reverse them."""
    already: list[EffectRecord] = field(default_factory=list)
    """Compensated by an earlier run (or by another run meanwhile)."""
    busy: list[EffectRecord] = field(default_factory=list)
    """Claimed by another run at the same time: left to it."""

    def counts(self) -> str:
        done = f"{len(self.compensated)} compensated, {len(self.failed)} failed"
        if not self.applied:
            done = f"{len(self.todo)} to compensate (dry run; --apply to run the handler)"
        busy = f", {len(self.busy)} busy (another run is at them)" if self.busy else ""
        return (
            f"{done}, {len(self.skipped)} skipped (no undo data), {len(self.already)} already"
            + busy
        )


def _plan(rows: list[EffectRecord], report: CompensationReport) -> None:
    landed = [e for e in rows if e.status == EffectStatus.LANDED]
    landed.sort(key=lambda e: (e.intended_at is not None, e.intended_at), reverse=True)
    for effect in landed:
        if effect.compensation == "compensated":
            report.already.append(effect)
        elif effect.undo is None:
            report.skipped.append(effect)
        else:
            report.todo.append(effect)


def _run_one(
    client: AdminClient, handler: Handler, effect: EffectRecord, report: CompensationReport
) -> str:
    try:
        _, already = client.record_compensation(effect, claim=True)
    except FailedPrecondition as busy:  # another run is at it, or finished it meanwhile
        report.busy.append(effect)
        return f"skipped: {busy}"
    if already:
        report.already.append(effect)
        return "already compensated"
    try:
        handler(effect)
    except Exception as err:  # a handler's failure is recorded, and the rest go on
        error = f"{type(err).__name__}: {err}"
        client.record_compensation(effect, error)
        report.failed.append((effect, error))
        return f"failed: {error}"
    _, already = client.record_compensation(effect)
    (report.already if already else report.compensated).append(effect)
    return "already compensated" if already else "compensated"


def compensate(
    client: AdminClient,
    tenant: str,
    *,
    handler: Handler | str,
    agent: str = "",
    run_id: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
    trace_id: str = "",
    capability: str = "",
    apply: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CompensationReport:
    """Compensate the landed effects of a tenant, agent or run, newest first.

    Args:
        client: An ``AdminClient``; recording needs role operator in the tenant.
        handler: Called once per effect to reverse, or ``"module:function"``.
        since, until, trace_id, capability: Narrow the effects, as ``AdminClient.effects``.
        apply: Run the handler and record the outcomes; without it, only list.
        progress: Called with one line per effect handled.
    """
    run = load_handler(handler) if isinstance(handler, str) else handler
    rows = client.effects(
        tenant, agent=agent, run_id=run_id, since=since, until=until, trace_id=trace_id,
        capability=capability, status=EffectStatus.LANDED,
    )  # fmt: skip
    report = CompensationReport(applied=apply)
    _plan(rows, report)
    if not apply:
        return report
    for n, effect in enumerate(report.todo, start=1):
        outcome = _run_one(client, run, effect, report)
        if progress is not None:
            progress(f"[{n}/{len(report.todo)}] {effect.capability} {effect.key!r}: {outcome}")
    return report
