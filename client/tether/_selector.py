"""``selector``: one kill or resume scope from CLI-style choices."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from tether._errors import InvalidArgument
from tether._halt import Scope, Selector
from tether._uri import parse_agent_uri


def selector(
    *,
    all: bool = False,
    tenant: str | None = None,
    agent: str | None = None,
    run_id: str | None = None,
    capability: str | None = None,
    labels: Mapping[str, str] | None = None,
    writes: bool = False,
) -> Selector:
    """Build a selector from exactly one of the CLI-style choices.

    ``agent`` is a URI, ``agent://TENANT/AGENT``. ``run_id`` may be combined with
    ``tenant`` to narrow a run kill to one tenant. ``capability`` narrows any scope to
    one tool (a freeze); ``labels`` narrow it to instances carrying all of them.
    ``writes`` makes it a degraded mode: every write capability frozen, reads go on.
    """
    sel = _selector(
        all=all, tenant=tenant, agent=agent, run_id=run_id, capability=capability, labels=labels
    )
    if writes and sel.capability:
        raise InvalidArgument("writes freezes every write capability; drop the capability")
    return dataclasses.replace(sel, writes=True) if writes else sel


def _selector(
    *,
    all: bool,
    tenant: str | None,
    agent: str | None,
    run_id: str | None,
    capability: str | None,
    labels: Mapping[str, str] | None,
) -> Selector:
    cap, wanted = capability or "", dict(labels or {})
    if agent is not None:
        if all or tenant is not None or run_id is not None:
            raise InvalidArgument("an agent URI already names the tenant; give it alone")
        ref = parse_agent_uri(agent)
        return Selector(Scope.AGENT, ref.tenant, ref.agent, "", cap, wanted)
    if run_id is not None:
        return Selector(Scope.RUN, tenant or "", "", run_id, cap, wanted)
    if tenant is not None:
        return Selector(Scope.TENANT, tenant, "", "", cap, wanted)
    if all:
        return Selector(Scope.GLOBAL, "", "", "", cap, wanted)
    raise InvalidArgument("name a scope: global, tenant, agent or run")
