"""The policy in etcd: applied as a new version with its audit entry, read, and listed.

A version is stored twice: as the policy in force, and under its number in the history.
Both, and the audit entry naming the principal, commit in one transaction guarded by the
revision of the policy in force: two admins applying at once get consecutive versions.
"""

from __future__ import annotations

from tether.v1 import admin_pb2, types_pb2

from tether_server._audit import AuditLog, new_entry
from tether_server._errors import FailedPrecondition, NotFound
from tether_server._etcd import Store
from tether_server._policy import EMPTY, Policy, parse
from tether_server._store import (
    POLICY,
    POLICY_HISTORY,
    from_json,
    policy_version_key,
    put_op,
    to_json,
    unchanged_since,
)

_RETRIES = 8


def summary(policy: Policy) -> str:
    return (
        f"{len(policy.breakers)} breakers, {len(policy.rules)} rules, {len(policy.notify)} webhooks"
    )


class PolicyStore:
    """Applies and reads the policy document."""

    def __init__(self, store: Store, audit: AuditLog) -> None:
        self.store = store
        self._audit = audit
        # The last policy parsed, with its version, by the etcd revision of its key: each
        # is parsed once (the JSON too: the evaluator asks every round).
        self._parsed: tuple[int, Policy, int] = (0, EMPTY, 0)
        self.applied_at = 0.0  # when the policy last read was applied (wall time, seconds)

    async def current(self) -> tuple[admin_pb2.PolicyVersion, int]:
        """The policy in force (version 0 when none was applied), and its etcd revision."""
        resp = await self.store.range(POLICY, prefix=False)
        if not resp.kvs:
            return admin_pb2.PolicyVersion(), 0
        kv = resp.kvs[0]
        return from_json(kv.value, admin_pb2.PolicyVersion()), kv.mod_revision

    async def policy(self) -> tuple[Policy, int]:
        """The policy in force, parsed, and its version."""
        resp = await self.store.range(POLICY, prefix=False)
        revision = resp.kvs[0].mod_revision if resp.kvs else 0
        if revision != self._parsed[0]:
            version = admin_pb2.PolicyVersion()
            if revision:
                from_json(resp.kvs[0].value, version)
            self._parsed = (revision, parse(version.yaml) if revision else EMPTY, version.version)
            self.applied_at = version.applied_at.ToNanoseconds() / 1e9
        return self._parsed[1], self._parsed[2]

    async def apply(self, text: str, actor: str, note: str = "") -> admin_pb2.PolicyVersion:
        """Store ``text`` as the next version, audited as applied by ``actor``.

        Raises:
            InvalidArgument: the document is malformed or a rule does not compile; the
                policy in force stays.
        """
        policy = parse(text)  # refuses before anything is written
        for _ in range(_RETRIES):
            current, revision = await self.current()
            version = admin_pb2.PolicyVersion(
                version=current.version + 1, yaml=text, actor=actor, actor_note=note
            )
            version.applied_at.GetCurrentTime()
            reason = f"policy version {version.version} applied: {summary(policy)}"
            entry = new_entry(
                admin_pb2.AUDIT_ACTION_POLICY,
                types_pb2.Selector(scope=types_pb2.SCOPE_GLOBAL),
                actor,
                reason,
                note=note,
            )
            body = to_json(version)
            changed, _ = await self._audit.record(
                entry,
                [unchanged_since(POLICY, revision)],
                [put_op(POLICY, body), put_op(policy_version_key(version.version), body)],
            )
            if changed:
                return version
        raise FailedPrecondition("the policy kept changing while this one was applied; retry")

    async def get(self, version: int = 0) -> admin_pb2.PolicyVersion:
        if version == 0:
            return (await self.current())[0]
        resp = await self.store.range(policy_version_key(version), prefix=False)
        if not resp.kvs:
            raise NotFound(f"no policy version {version}; see tether policy history")
        return from_json(resp.kvs[0].value, admin_pb2.PolicyVersion())

    async def history(self) -> list[admin_pb2.PolicyVersion]:
        resp = await self.store.range(POLICY_HISTORY)
        return [from_json(kv.value, admin_pb2.PolicyVersion()) for kv in resp.kvs]
