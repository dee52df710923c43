"""Audit verification as a pure function: a chain of entries in, a verdict naming the place out."""

from __future__ import annotations

from tether.v1 import admin_pb2, types_pb2
from tether_server._audit import chained, entry_hash, new_entry, verify_chain

_REMOVED = "an entry was removed or inserted"
_EDITED = "the entry was edited"
_CUT = "entries were cut off the end"


def _chain(n: int) -> list[admin_pb2.AuditEntry]:
    """``n`` entries chained as AuditLog.record chains them, alternating kill and resume."""
    sel = types_pb2.Selector(scope=types_pb2.SCOPE_TENANT, tenant="acme")
    entries, prev = [], ""
    for i in range(n):
        action = admin_pb2.AUDIT_ACTION_KILL if i % 2 == 0 else admin_pb2.AUDIT_ACTION_RESUME
        entry = new_entry(action, sel, "pytest", f"reason {i}")
        entry.id = f"{i:020d}-000000"  # ids are time-based: make them distinct and ordered
        entries.append(chained(entry, prev, changed=True))
        prev = entries[-1].hash
    return entries


def test_an_intact_chain_verifies_and_names_its_head() -> None:
    entries = _chain(5)
    out = verify_chain(entries, entries[-1].hash)
    assert (out.intact, out.entries, out.head_hash) == (True, 5, entries[-1].hash)
    assert (out.first_bad_id, out.problem) == ("", "")


def test_an_empty_chain_is_intact() -> None:
    out = verify_chain([], "")
    assert (out.intact, out.entries, out.head_hash) == (True, 0, "")


def test_an_edited_entry_is_named() -> None:
    entries = _chain(5)
    entries[2].reason = "nothing to see here"
    out = verify_chain(entries, entries[-1].hash)
    assert not out.intact
    assert out.first_bad_id == entries[2].id
    assert _EDITED in out.problem


def test_an_edit_that_recomputes_its_own_hash_breaks_the_next_link() -> None:
    entries = _chain(5)
    entries[2].actor = "mallory"
    entries[2].hash = entry_hash(entries[2])
    out = verify_chain(entries, entries[-1].hash)
    assert (out.intact, out.first_bad_id) == (False, entries[3].id)
    assert _REMOVED in out.problem


def test_a_removed_entry_is_named_by_the_one_after_it() -> None:
    entries = _chain(5)
    after = entries[3]
    del entries[2]
    out = verify_chain(entries, entries[-1].hash)
    assert (out.intact, out.first_bad_id) == (False, after.id)
    assert _REMOVED in out.problem


def test_a_removed_first_entry_is_caught() -> None:
    entries = _chain(3)
    out = verify_chain(entries[1:], entries[-1].hash)
    assert (out.intact, out.first_bad_id) == (False, entries[1].id)


def test_reordered_entries_are_named_where_the_order_breaks() -> None:
    entries = _chain(5)
    entries[1], entries[3] = entries[3], entries[1]
    out = verify_chain(entries, entries[-1].hash)
    assert (out.intact, out.first_bad_id) == (False, entries[1].id)
    assert _REMOVED in out.problem


def test_entries_cut_off_the_end_are_caught_by_the_head() -> None:
    entries = _chain(5)
    out = verify_chain(entries[:-1], entries[-1].hash)
    assert (out.intact, out.first_bad_id) == (False, "")
    assert _CUT in out.problem


def test_an_inserted_entry_is_named() -> None:
    entries = _chain(4)
    forged = _chain(1)[0]
    forged.id = "00000000000000000002-ffffff"
    entries.insert(2, forged)
    out = verify_chain(entries, entries[-1].hash)
    assert (out.intact, out.first_bad_id) == (False, forged.id)
    assert _REMOVED in out.problem


def test_the_stored_revision_does_not_count_towards_the_hash() -> None:
    entries = _chain(3)
    for revision, entry in enumerate(entries, start=7):
        entry.revision = revision  # AuditLog.entries sets it from etcd on the way out
    assert verify_chain(entries, entries[-1].hash).intact
