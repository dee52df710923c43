"""Automatic protection on the admin client: the policy document, its history, the breakers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from tether._types import _time
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
