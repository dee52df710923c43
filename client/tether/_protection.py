"""Automatic protection on the admin client: the policy document, its history, the breakers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from tether._halt import _time
from tether.v1 import admin_pb2

T = TypeVar("T")


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


class ProtectionCalls:
    """The policy and breaker calls of ``AdminClient``."""

    _stub: Any

    def _call(self, method: Callable[..., T], request: Any) -> T:
        raise NotImplementedError

    def apply_policy(self, yaml_text: str, *, note: str = "") -> PolicyVersion:
        """Store the policy document as the next version (admins only).

        Raises:
            tether.InvalidArgument: malformed, or a rule's CEL does not compile; the policy
                in force stays.
        """
        req = admin_pb2.ApplyPolicyRequest(yaml=yaml_text, actor=note)
        return PolicyVersion.from_pb(self._call(self._stub.ApplyPolicy, req))

    def policy(self, version: int = 0) -> PolicyVersion:
        """The policy in force (version 0 when none was applied), or an earlier version."""
        req = admin_pb2.GetPolicyRequest(version=version)
        return PolicyVersion.from_pb(self._call(self._stub.GetPolicy, req))

    def policy_history(self) -> list[PolicyVersion]:
        """Every policy applied, oldest first."""
        resp = self._call(self._stub.ListPolicyHistory, admin_pb2.ListPolicyHistoryRequest())
        return [PolicyVersion.from_pb(v) for v in resp.versions]

    def breakers(self, tenant: str = "") -> tuple[list[BreakerStatus], list[str]]:
        """Every breaker state per subject, and the names of the breakers configured."""
        resp = self._call(self._stub.ListBreakers, admin_pb2.ListBreakersRequest(tenant=tenant))
        return [BreakerStatus.from_pb(b) for b in resp.breakers], list(resp.configured)

    def test_policy(self, yaml_text: str, *, tenant: str = "") -> PolicyTest:
        """A dry run: what the document would trip over recent traffic. Nothing is stored,
        halted or notified.

        Raises:
            tether.InvalidArgument: malformed, or a rule's CEL does not compile.
        """
        req = admin_pb2.TestPolicyRequest(yaml=yaml_text, tenant=tenant)
        resp = self._call(self._stub.TestPolicy, req)
        trips = [WouldTrip.from_pb(t) for t in resp.trips]
        return PolicyTest(trips, resp.runs, resp.coordinators, resp.traffic)
