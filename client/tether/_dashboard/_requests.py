"""What the page may ask for, checked before anything reaches a coordinator.

Pure functions: each takes the decoded body or query and returns a typed order, or raises
``BadRequest`` with a message that says what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tether._cli._recovery import time_or_age
from tether._errors import InvalidArgument
from tether._selector import selector
from tether._types import EffectStatus, Selector
from tether._uri import check_name

SCOPES = ("global", "tenant", "agent", "run")
MAX_GRACE = 3600.0  # the coordinator's own ceiling for a soft kill's grace


class BadRequest(Exception):
    """The page sent something the dashboard will not forward; ``str()`` says why."""

    status, code = 400, "BAD_REQUEST"


class Forbidden(BadRequest):
    """The dashboard's own credentials may not do this; the coordinator is not asked."""

    status, code = 403, "FORBIDDEN"


@dataclass(frozen=True, slots=True)
class KillOrder:
    selector: Selector
    reason: str
    soft: bool
    grace: float | None
    force: bool


@dataclass(frozen=True, slots=True)
class EffectsQuery:
    tenant: str
    agent: str
    run_id: str
    since: datetime | None
    until: datetime | None
    status: EffectStatus | None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    return body


def _text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name) or ""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return value.strip()


def _grace(body: Mapping[str, Any], soft: bool) -> float | None:
    raw = body.get("grace")
    if raw in (None, ""):
        return None
    if not soft:
        raise BadRequest("grace goes with mode soft")
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise BadRequest("grace must be a number of seconds")
    try:
        grace = float(raw)
    except ValueError:
        raise BadRequest(f"grace {raw!r} is not a number of seconds") from None
    if not math.isfinite(grace) or not 0 <= grace <= MAX_GRACE:
        raise BadRequest(f"grace {raw!r}: give seconds between 0 and {MAX_GRACE:g}")
    return grace


def _selector(body: Mapping[str, Any]) -> Selector:
    scope = _text(body, "scope")
    if scope not in SCOPES:
        raise BadRequest(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    tenant, agent, run_id = _text(body, "tenant"), _text(body, "agent"), _text(body, "run_id")
    needs = {"tenant": ("tenant",), "agent": ("tenant", "agent"), "run": ("run_id",)}
    for name in needs.get(scope, ()):
        if not _text(body, name):
            raise BadRequest(f"a {scope} kill needs {name}")
    capability = _text(body, "capability") or None
    try:
        if tenant:
            check_name("tenant", tenant)
        if scope == "agent":
            return selector(agent=f"agent://{tenant}/{agent}", capability=capability)
        if scope == "run":
            return selector(run_id=check_name("run", run_id), tenant=tenant or None,
                            capability=capability)  # fmt: skip
        if scope == "tenant":
            return selector(tenant=tenant, capability=capability)
        return selector(all=True, capability=capability)
    except InvalidArgument as err:
        raise BadRequest(str(err)) from None


def kill_order(body: Any) -> KillOrder:
    """A kill as the form sent it: scope and names, capability, mode, grace, reason."""
    body = _object(body)
    reason = _text(body, "reason")
    if not reason:
        raise BadRequest("a reason is required: it goes into the audit")
    mode = _text(body, "mode") or "hard"
    if mode not in ("hard", "soft"):
        raise BadRequest(f"mode must be hard or soft, not {mode!r}")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise BadRequest("force must be true or false")
    soft = mode == "soft"
    return KillOrder(_selector(body), reason, soft, _grace(body, soft), force)


def resume_order(body: Any) -> tuple[str, str]:
    """(halt id, reason) of a resume button's request."""
    body = _object(body)
    halt_id = _text(body, "halt_id")
    if not halt_id:
        raise BadRequest("name the halt to lift: halt_id")
    return halt_id, _text(body, "reason")


def parse_when(raw: str, name: str, now: datetime) -> datetime | None:
    """An ISO time, or an age such as ``30m``, ``2h``, ``1d`` back from ``now``."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        return time_or_age(raw, now)
    except ValueError:
        raise BadRequest(
            f"{name} {raw!r}: give an ISO time or an age such as 30m, 2h, 1d"
        ) from None


def effects_query(params: Mapping[str, str], now: datetime) -> EffectsQuery:
    """The compensation list's filter: tenant (required), agent, run and a time window."""
    tenant, agent, run_id = (params.get(k, "").strip() for k in ("tenant", "agent", "run_id"))
    if not tenant:
        raise BadRequest("the effects ledger needs a tenant")
    if run_id and not agent:
        raise BadRequest("a run filter needs the agent as well")
    since = parse_when(params.get("since", ""), "since", now)
    until = parse_when(params.get("until", ""), "until", now)
    if since and until and until < since:
        raise BadRequest("the window ends before it starts: until is earlier than since")
    status = params.get("status", "").strip().lower()
    if status and status not in {s.value for s in EffectStatus}:
        raise BadRequest(f"status must be one of {', '.join(s.value for s in EffectStatus)}")
    return EffectsQuery(
        tenant, agent, run_id, since, until, EffectStatus(status) if status else None
    )


def audit_limit(params: Mapping[str, str], default: int) -> int:
    raw = params.get("limit", "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise BadRequest(f"limit {raw!r}: give a whole number from 1 to 10000")
    return int(raw)
