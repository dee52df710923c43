"""``AdminClient``'s calls of automatic protection: the policy document, its history, the
breakers. The types they return (``tether._protection``) are imported when one is called:
a client that only kills never creates them (``bench/run.py --only cli``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from tether.v1 import admin_pb2

if TYPE_CHECKING:
    from tether._protection import BreakerStatus, PolicyTest, PolicyVersion

T = TypeVar("T")


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
        from tether._protection import PolicyVersion

        req = admin_pb2.ApplyPolicyRequest(yaml=yaml_text, actor=note)
        return PolicyVersion.from_pb(self._call(self._stub.ApplyPolicy, req))

    def policy(self, version: int = 0) -> PolicyVersion:
        """The policy in force (version 0 when none was applied), or an earlier version."""
        from tether._protection import PolicyVersion

        req = admin_pb2.GetPolicyRequest(version=version)
        return PolicyVersion.from_pb(self._call(self._stub.GetPolicy, req))

    def policy_history(self) -> list[PolicyVersion]:
        """Every policy applied, oldest first."""
        from tether._protection import PolicyVersion

        resp = self._call(self._stub.ListPolicyHistory, admin_pb2.ListPolicyHistoryRequest())
        return [PolicyVersion.from_pb(v) for v in resp.versions]

    def breakers(self, tenant: str = "") -> tuple[list[BreakerStatus], list[str]]:
        """Every breaker state per subject, and the names of the breakers configured."""
        from tether._protection import BreakerStatus

        resp = self._call(self._stub.ListBreakers, admin_pb2.ListBreakersRequest(tenant=tenant))
        return [BreakerStatus.from_pb(b) for b in resp.breakers], list(resp.configured)

    def test_policy(self, yaml_text: str, *, tenant: str = "") -> PolicyTest:
        """A dry run: what the document would trip over recent traffic. Nothing is stored,
        halted or notified.

        Raises:
            tether.InvalidArgument: malformed, or a rule's CEL does not compile.
        """
        from tether._protection import PolicyTest, WouldTrip

        req = admin_pb2.TestPolicyRequest(yaml=yaml_text, tenant=tenant)
        resp = self._call(self._stub.TestPolicy, req)
        trips = [WouldTrip.from_pb(t) for t in resp.trips]
        return PolicyTest(trips, resp.runs, resp.coordinators, resp.traffic)
