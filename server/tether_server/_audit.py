"""The audit: append-only and tamper-evident, as a hash chain serialised through one head key.

Every kill and resume commits in the same etcd transaction as its audit entry and the new
chain head, guarded by a compare on the head's value; a concurrent append makes the
transaction fail and it is retried on the new head, which the failed transaction returns.
The head this process last saw is tried first, so an append is one round trip unless
another appended since. Editing, inserting or deleting an entry afterwards breaks the
chain, and ``verify`` says where.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import weakref
from collections.abc import Sequence
from typing import Any

from tether.v1 import admin_pb2, types_pb2

from tether_server._etcd import EtcdUnavailable, Store
from tether_server._store import (
    AUDIT,
    AUDIT_HEAD,
    absent,
    audit_key,
    from_json,
    holds,
    put_op,
    range_op,
    to_json,
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


def _head_hash(head: bytes) -> str:
    """The hash a head value names; '' before the first entry (no head)."""
    return str(json.loads(head)["hash"]) if head else ""


def _head_value(kvs: Sequence[Any]) -> bytes:
    """The head key's value; b'' before the first entry."""
    return bytes(kvs[0].value) if kvs else b""


def _is_head(value: bytes) -> Any:
    """A compare that holds while the head is still ``value``. Every head names a distinct
    entry (its id and hash), so an equal value is the same head, even after etcd was
    restored to an older revision: the value, not its revision, is compared."""
    return holds(AUDIT_HEAD, value) if value else absent(AUDIT_HEAD)


def _chain_ops(record: admin_pb2.AuditEntry) -> tuple[bytes, list[Any]]:
    """The new head's value, and the ops that put ``record`` (already chained) and make it
    the head."""
    head = json.dumps({"id": record.id, "hash": record.hash}).encode()
    return head, [put_op(audit_key(record.id), to_json(record)), put_op(AUDIT_HEAD, head)]


_HEADS: weakref.WeakKeyDictionary[Store, bytes] = weakref.WeakKeyDictionary()
"""The head value each store's appends last saw, shared by every AuditLog on that store (the
Kill handler's, the acknowledgements', the evaluator's): a guess, checked by the compare."""


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
        head = await self._last_head()
        for _ in range(_RETRIES):
            prev = _head_hash(head)
            record = chained(entry, prev, changed=True)
            done, now = await self._append(record, [_is_head(head), *compare], success)
            if done is not None:
                return True, done
            if now == head:  # the head held, so ``compare`` did not: audit the attempt
                record = chained(entry, prev, changed=False)
                done, now = await self._append(record, [_is_head(head)], failure)
                if done is not None:
                    return False, done
            head = now  # another append won the head; chain onto the new one
        raise EtcdUnavailable(f"could not append to the audit after {_RETRIES} tries (contention)")

    async def _last_head(self) -> bytes:
        """The head this process last saw, or else the one etcd holds now."""
        head = _HEADS.get(self._store)
        if head is None:
            head = _head_value((await self._store.range(AUDIT_HEAD, prefix=False)).kvs)
            _HEADS[self._store] = head
        return head

    async def _append(
        self, record: admin_pb2.AuditEntry, compare: Sequence[Any], ops: Sequence[Any]
    ) -> tuple[Any, bytes]:
        """Commit ``ops`` with ``record`` as the new head if ``compare`` holds.

        Returns the response if it committed, else None; and the head as it is now.
        """
        head, chain = _chain_ops(record)
        resp = await self._store.txn(compare, [*ops, *chain], [range_op(AUDIT_HEAD)])
        if resp.succeeded:
            emit_audit(record)  # a log record, for a SIEM
        else:
            head = _head_value(resp.responses[0].response_range.kvs)
        _HEADS[self._store] = head
        return (resp if resp.succeeded else None), head

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
        return verify_chain(entries, _head_hash(_head_value(head.kvs)))
