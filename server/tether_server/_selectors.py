"""Halt selectors: validating them, naming them, and matching them to instances."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from types import MappingProxyType

from tether.v1 import types_pb2

from tether_server._errors import InvalidArgument, check_name
from tether_server._store import InstanceKey

_SCOPE_NAMES: dict[int, str] = {
    types_pb2.SCOPE_GLOBAL: "global",
    types_pb2.SCOPE_TENANT: "tenant",
    types_pb2.SCOPE_AGENT: "agent",
    types_pb2.SCOPE_RUN: "run",
}
# Which identity fields each scope requires (R), allows (A), or forbids (absent).
_FIELDS = {
    types_pb2.SCOPE_GLOBAL: {},
    types_pb2.SCOPE_TENANT: {"tenant": "R"},
    types_pb2.SCOPE_AGENT: {"tenant": "R", "agent": "R"},
    types_pb2.SCOPE_RUN: {"tenant": "A", "agent": "A", "run_id": "R"},
}


def validate(sel: types_pb2.Selector) -> types_pb2.Selector:
    """Return ``sel`` if it names one well-formed scope.

    Raises:
        InvalidArgument: with what to fix. A selector is never widened: an empty or
            unknown scope is rejected, not read as global.
    """
    if sel.scope not in _SCOPE_NAMES:
        raise InvalidArgument(
            f"selector.scope {sel.scope} is unknown: use one of global, tenant, agent, run"
            if sel.scope
            else "selector.scope is required: one of global, tenant, agent, run"
        )
    if sel.capability:
        check_name("selector.capability", sel.capability)
    if sel.writes and sel.capability:
        raise InvalidArgument("selector.writes freezes every write; drop selector.capability")
    check_labels(sel.labels)
    scope, rules = _SCOPE_NAMES[sel.scope], _FIELDS[sel.scope]
    for name in ("tenant", "agent", "run_id"):
        value = getattr(sel, name)
        rule = rules.get(name)
        if rule == "R" and not value:
            raise InvalidArgument(f"a {scope} halt needs selector.{name}")
        if rule is None and value:
            raise InvalidArgument(
                f"a {scope} halt takes no selector.{name}; drop it or narrow the scope"
            )
        if value:
            check_name(name, value)
    if sel.agent and not sel.tenant:
        raise InvalidArgument("selector.agent needs selector.tenant as well")
    return sel


def check_labels(labels: Mapping[str, str], prefix: str = "") -> None:
    """Refuse a label whose key or value is not a name (``prefix`` begins the message)."""
    for label, value in labels.items():
        check_name(f"{prefix}label key", label)
        check_name(f"{prefix}label {label}", value)


def halt_id(sel: types_pb2.Selector) -> str:
    """A stable name for a selector: the same selector always maps to the same halt.

    ``global``, ``tenant/acme``, ``agent/acme/email``, ``run/*/*/campaign-42``, then
    ``#send_email`` for a capability freeze and ``+feature=beta`` per label (``#`` is
    not a name character, so a label can never read as a capability).
    """
    scope = _SCOPE_NAMES[sel.scope]
    if sel.scope == types_pb2.SCOPE_RUN:
        parts = [scope, sel.tenant or "*", sel.agent or "*", sel.run_id]
    else:
        parts = [scope, *(f for f in (sel.tenant, sel.agent) if f)]
    name = "/".join(parts)
    if sel.capability:
        name += f"#{sel.capability}"
    if sel.writes:
        name += "#*writes"  # ``*`` is no name character: never a capability's freeze
    for label in sorted(sel.labels):
        name += f"+{label}={sel.labels[label]}"
    return name


EMPTY: Mapping[str, str] = MappingProxyType({})  # shared: never to be written


def matches(sel: types_pb2.Selector, key: InstanceKey, labels: Mapping[str, str] = EMPTY) -> bool:
    """True when every identity field and label the selector names equals the instance's."""
    return (
        (not sel.tenant or sel.tenant == key.tenant)
        and (not sel.agent or sel.agent == key.agent)
        and (not sel.run_id or sel.run_id == key.run_id)
        and (not sel.labels or all(labels.get(k) == v for k, v in sel.labels.items()))
    )


def validate_gate(labels: Mapping[str, str]) -> dict[str, str]:
    """A release gate (``ResumeRequest.require_labels``) whose keys and values are names."""
    check_labels(labels, prefix="required ")
    return dict(labels)


def exempt(gate: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when a release gate lets the instance go: it carries every label of the gate."""
    return bool(gate) and all(labels.get(k) == v for k, v in gate.items())


def halts_instance(
    halt: types_pb2.Halt, key: InstanceKey, labels: Mapping[str, str] = EMPTY
) -> bool:
    """The one decision whether ``halt`` applies to an instance: its selector matches, and
    no release gate exempts it (a resume that waited for the instance's release)."""
    return matches(halt.selector, key, labels) and not exempt(halt.release_gate, labels)


def is_stop(halt: types_pb2.Halt) -> bool:
    """A halt stops the whole instance unless it only freezes one capability, or writes."""
    return not halt.selector.capability and not halt.selector.writes


def freezes(halt: types_pb2.Halt, capability: str, reads: Collection[str]) -> bool:
    """True when ``halt`` freezes ``capability`` of an instance that registered ``reads``."""
    if halt.selector.writes:
        return capability not in reads
    return halt.selector.capability == capability


def scope_name(scope: int) -> str:
    return _SCOPE_NAMES.get(scope, "unknown")
