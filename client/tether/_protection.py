"""Automatic protection on the admin client: the policy document, its history, the breakers.

The calls that return these are ``AdminClient``'s, in ``tether._policy_calls``: a client
that only kills never creates these classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tether._halt import _time
from tether.v1 import admin_pb2


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """One applied policy: its number, the document, and who applied it when."""

    version: int
    yaml: str
    actor: str
    applied_at: datetime | None
    actor_note: str = ""

    @classmethod
    def from_pb(cls, msg: admin_pb2.PolicyVersion) -> PolicyVersion:
        return cls(msg.version, msg.yaml, msg.actor, _time(msg.applied_at), msg.actor_note)


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """A breaker's state for one subject (``tenant``, ``tenant/agent`` or a run)."""

    name: str
    subject: str
    state: str  # closed | open | half_open
    reason: str
    since: datetime | None

    @classmethod
    def from_pb(cls, msg: admin_pb2.BreakerStatus) -> BreakerStatus:
        return cls(msg.name, msg.subject, msg.state, msg.reason, _time(msg.since))


@dataclass(frozen=True, slots=True)
class WouldTrip:
    """A breaker or rule that would have acted on one subject (``tether policy test``)."""

    kind: str  # breaker | rule
    name: str
    selector: str  # the halt it would write, as ``tether halts`` names it
    action: str  # degrade | kill | freeze | notify
    reason: str  # the figures that trip it
    dry_run: bool = False  # a dry_run rule: applied, it would only audit and notify

    @classmethod
    def from_pb(cls, msg: admin_pb2.WouldTrip) -> WouldTrip:
        return cls(msg.kind, msg.name, msg.selector, msg.action, msg.reason, msg.dry_run)


@dataclass(frozen=True, slots=True)
class PolicyTest:
    """What a policy would trip over recent traffic, and what that traffic was."""

    trips: list[WouldTrip]
    runs: int  # the runs judged
    coordinators: int  # whose published counts were read
    traffic: str  # what the figures cover, in words
