"""The dashboard's side of the Admin API: its own credentials and JSON-ready answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from tether._admin import AdminClient, default_actor
from tether._cli._output import plain
from tether._dashboard._config import DashboardConfig
from tether._dashboard._requests import EffectsQuery, KillOrder
from tether._errors import InvalidArgument, NotFound, PermissionDenied, TetherError, Unavailable
from tether._types import AuditEntry, Halt

ACTING_ROLES = frozenset({"operator", "admin"})
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


_BY_CLASS = {
    InvalidArgument: "INVALID_ARGUMENT",
    NotFound: "NOT_FOUND",
    PermissionDenied: "PERMISSION_DENIED",
    Unavailable: "UNAVAILABLE",
}


def status_of(err: TetherError) -> str:
    """The gRPC status name behind an SDK error, such as ``FAILED_PRECONDITION``."""
    cause = err.__cause__
    if isinstance(cause, grpc.Call):
        return str(cause.code().name)
    return _BY_CLASS.get(type(err), "UNKNOWN")


def http_status(err: TetherError) -> int:
    """The HTTP status the page gets for a coordinator's refusal: 502 when none fits."""
    return HTTP_STATUS.get(status_of(err), 502)


def connector(config: DashboardConfig) -> Callable[[str], AdminClient]:
    """Opens an ``AdminClient`` to one coordinator with the dashboard's own credentials."""
    actor = f"{default_actor()} via dashboard"

    def connect(target: str) -> AdminClient:
        return AdminClient(
            target, token=config.token, actor=actor, tls_ca=config.tls_ca,
            tls_cert=config.tls_cert, tls_key=config.tls_key,
        )  # fmt: skip

    return connect


def whoami(client: AdminClient) -> dict[str, Any]:
    """Who the coordinator takes the dashboard to be, and whether that may kill and resume.

    A coordinator that predates ``WhoAmI`` answers UNIMPLEMENTED: open, anonymous.
    """
    try:
        me = client.whoami()
    except TetherError as err:
        if status_of(err) != "UNIMPLEMENTED":
            raise
        return {"id": "anonymous", "kind": "anonymous", "role": "", "tenants": [],
                "can_act": True}  # fmt: skip
    return {
        "id": me.id,
        "kind": me.kind,
        "role": me.role,
        "tenants": list(me.tenants),
        "can_act": me.role in ACTING_ROLES,
    }


def halt_json(halt: Halt) -> dict[str, Any]:
    """A halt; ``actor`` is the principal, ``actor_note`` what the caller said of itself."""
    return {**plain(halt), "what": halt.selector.describe()}


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {**plain(entry), "what": entry.selector.describe()}


def kill(client: AdminClient, order: KillOrder) -> dict[str, Any]:
    halt, already = client.kill(
        order.selector, order.reason, force=order.force, soft=order.soft, grace=order.grace
    )
    return {"halt": halt_json(halt), "already_halted": already}


def resume(client: AdminClient, tenant: str, halt_id: str, reason: str) -> dict[str, Any]:
    """Lift the halt with this id, by its own selector, as the coordinator lists it."""
    found = [h for h in client.halts(tenant=tenant) if h.id == halt_id]
    if not found:
        raise NotFound(f"no halt {halt_id} is in force: it may have been lifted already")
    lifted = client.resume(found[0].selector, reason)
    return {"resumed": halt_json(lifted) if lifted else None, "was_halted": lifted is not None}


def verify(client: AdminClient) -> dict[str, Any]:
    """The hash chain's verdict; ``intact`` is None when this token may not walk it."""
    try:
        intact, checked, first_bad, problem = client.verify_audit()
    except (PermissionDenied, NotFound) as err:
        return {"intact": None, "entries": 0, "first_bad_id": "", "problem": str(err)}
    return {"intact": intact, "entries": checked, "first_bad_id": first_bad, "problem": problem}


def audit(client: AdminClient, tenant: str, limit: int) -> dict[str, Any]:
    entries = client.audit(tenant=tenant, limit=limit)
    entries.sort(key=lambda e: e.revision, reverse=True)
    return {"verify": verify(client), "entries": [audit_json(e) for e in entries]}


def effects(client: AdminClient, query: EffectsQuery) -> list[dict[str, Any]]:
    rows = client.effects(
        query.tenant, agent=query.agent, run_id=query.run_id, since=query.since,
        until=query.until, status=query.status,
    )  # fmt: skip
    return [plain(r) for r in rows]  # each with its undo data, trace and compensation
