"""The audit: append-only and tamper-evident, as a hash chain serialised through one head key.

Every kill and resume commits in the same etcd transaction as its audit entry and the new
chain head, guarded by a compare on the head's revision; a concurrent append makes the
transaction fail and it is retried on the new head. Editing, inserting or deleting an
entry afterwards breaks the chain, and ``verify`` says where.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from tether.v1 import admin_pb2, types_pb2

from tether_server._etcd import EtcdUnavailable, Store
from tether_server._store import (
    AUDIT,
    AUDIT_HEAD,
    audit_key,
    from_json,
    put_op,
    range_op,
    to_json,
    unchanged_since,
)
from tether_server._telemetry import emit_audit

_RETRIES = 64


def entry_hash(entry: admin_pb2.AuditEntry) -> str:
    """sha256 over the entry's canonical JSON, with ``prev_hash`` set and ``hash`` empty."""
    body = admin_pb2.AuditEntry()
    body.CopyFrom(entry)
    body.hash = ""
    body.revision = 0
    return hashlib.sha256(to_json(body)).hexdigest()


def new_entry(
    action: int,
    sel: types_pb2.Selector,
    actor: str,
    reason: str,
    mode: int = 0,
    *,
    note: str = "",
) -> admin_pb2.AuditEntry:
    """An audit entry, not yet chained: ``actor`` is who acted (the authenticated principal,
    or the coordinator itself), ``note`` what the caller said of itself."""
    entry = admin_pb2.AuditEntry(
        id=f"{time.time_ns():020d}-{os.urandom(3).hex()}",
        selector=sel,
        actor=actor,
        reason=reason,
        actor_note=note,
    )
    entry.action = action  # type: ignore[assignment]
    entry.mode = mode  # type: ignore[assignment]
    entry.at.GetCurrentTime()
    return entry


def chained(entry: admin_pb2.AuditEntry, prev: str, *, changed: bool) -> admin_pb2.AuditEntry:
    """A copy of ``entry`` as it goes onto the chain after the entry whose hash is ``prev``."""
    record = admin_pb2.AuditEntry()
    record.CopyFrom(entry)
    record.changed = changed
    record.prev_hash = prev
    record.hash = entry_hash(record)
    return record


def verify_chain(
    entries: Sequence[admin_pb2.AuditEntry], head_hash: str
) -> admin_pb2.VerifyAuditResponse:
    """Whether ``entries``, in commit order, form an unbroken chain ending at ``head_hash``.

    Returns:
        ``intact`` and the entry count; if broken, ``first_bad_id`` (the first entry that
        does not fit, empty when the end was cut off) and ``problem``, saying what was done.
    """
    out = admin_pb2.VerifyAuditResponse(intact=True, entries=len(entries))
    prev = ""
    for entry in entries:
        problem = ""
        if entry.prev_hash != prev:
            problem = (
                "its prev_hash does not match the entry before it: an entry was removed or inserted"
            )
        elif entry_hash(entry) != entry.hash:
            problem = "its content does not match its hash: the entry was edited"
        if problem:
            out.intact, out.first_bad_id, out.problem = False, entry.id, problem
            return out
        prev = entry.hash
    if head_hash != prev:
        out.intact = False
        out.problem = "the chain head does not match the last entry: entries were cut off the end"
    out.head_hash = prev
    return out


def _head_hash(kvs: Sequence[Any]) -> str:
    """The hash the head key names; '' before the first entry."""
    return str(json.loads(kvs[0].value)["hash"]) if kvs else ""


def _chain_ops(record: admin_pb2.AuditEntry) -> list[Any]:
    """Put ``record`` (already chained) and make it the head."""
    head = json.dumps({"id": record.id, "hash": record.hash}).encode()
    return [put_op(audit_key(record.id), to_json(record)), put_op(AUDIT_HEAD, head)]


class AuditLog:
    """Appends entries onto the chain, lists them in chain order, and verifies the chain."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(
        self,
        entry: admin_pb2.AuditEntry,
        compare: Sequence[Any] = (),
        success: Sequence[Any] = (),
        failure: Sequence[Any] = (),
    ) -> tuple[bool, Any]:
        """Commit ``success`` if ``compare`` holds, else ``failure``; audit either way.

        Returns whether ``compare`` held, and the transaction response, whose first
        responses are those of ``success`` or ``failure``.
        """
        for _ in range(_RETRIES):
            head = await self._store.range(AUDIT_HEAD, prefix=False)
            prev = _head_hash(head.kvs)
            revision = head.kvs[0].mod_revision if head.kvs else 0
            record = chained(entry, prev, changed=True)
            resp = await self._store.txn(
                [unchanged_since(AUDIT_HEAD, revision), *compare],
                [*success, *_chain_ops(record)],
                [range_op(AUDIT_HEAD)],
            )
            if resp.succeeded:
                emit_audit(record)  # a log record, for a SIEM
                return True, resp
            kvs = resp.responses[0].response_range.kvs
            if (kvs[0].mod_revision if kvs else 0) != revision:
                continue  # another append won the head; chain onto the new one
            record = chained(entry, prev, changed=False)
            resp = await self._store.txn(
                [unchanged_since(AUDIT_HEAD, revision)], [*failure, *_chain_ops(record)]
            )
            if resp.succeeded:
                emit_audit(record)
                return False, resp
        raise EtcdUnavailable(f"could not append to the audit after {_RETRIES} tries (contention)")

    async def entries(self) -> list[admin_pb2.AuditEntry]:
        """Every entry, in the order it was committed (etcd revision order)."""
        resp = await self._store.range(AUDIT)
        out = []
        for kv in sorted(resp.kvs, key=lambda kv: kv.create_revision):  # edits keep it
            entry = from_json(kv.value, admin_pb2.AuditEntry())
            entry.revision = kv.create_revision
            out.append(entry)
        return out

    async def recent(self, tenant: str, since_ns: int, limit: int) -> list[admin_pb2.AuditEntry]:
        """The last ``limit`` entries at or after ``since_ns`` that address ``tenant``.

        An entry addresses a tenant when its selector names it or names no tenant at all;
        ``tenant`` '' takes every entry.
        """
        entries = [
            e
            for e in await self.entries()
            if e.at.ToNanoseconds() >= since_ns
            and (not tenant or e.selector.tenant in ("", tenant))
        ]
        return entries[-limit:]

    async def verify(self) -> admin_pb2.VerifyAuditResponse:
        """Check the stored chain against itself and against the head: see ``verify_chain``."""
        entries = await self.entries()
        head = await self._store.range(AUDIT_HEAD, prefix=False)
        return verify_chain(entries, _head_hash(head.kvs))
