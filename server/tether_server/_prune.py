"""Forget ended instances: roster records of instances gone longer than the retention.

An instance whose presence key is gone (it EXITED, was KILLED and left, or went STALE)
keeps its roster record so that operators see how it ended. ``tether serve
--roster-retention`` bounds how long: every coordinator, off the hot path, pages through
the roster, picks the ended records older than the retention (``expired``, pure), and
deletes them in batches. Each delete holds only if the record is unchanged since it was
read and the instance has no presence, so an instance that registered again meanwhile is
never forgotten. Two coordinators pruning at once delete the same keys: harmless.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from tether.v1 import types_pb2

from tether_server._etcd import EtcdUnavailable, Store
from tether_server._store import (
    LIVE,
    ROSTER,
    absent,
    delete_op,
    from_json,
    instance_of,
    live_key,
    prefix_end,
    unchanged_since,
)

log = logging.getLogger("tether_server")

PAGE = 500  # roster records read per range
BATCH = 50  # deletes per transaction (with two compares each, under etcd's 128 ops)


def ended_ns(record: types_pb2.AgentInstance) -> int:
    """When the instance ended, as well as the record knows: its end, else its last beat
    (a STALE one never said goodbye), else its registration."""
    for stamp in (record.ended_at, record.last_heartbeat, record.registered_at):
        if stamp.seconds or stamp.nanos:
            return int(stamp.ToNanoseconds())
    return 0


Expired = tuple[bytes, int, bytes]  # roster key, its mod_revision, the presence key


def expired(kvs: Iterable[Any], live: set[bytes], cutoff_ns: int) -> list[Expired]:
    """``(key, mod_revision, presence key)`` of the roster records whose instance has no
    presence and ended before ``cutoff_ns`` (nanoseconds since the epoch)."""
    found = []
    for kv in kvs:
        key = instance_of(kv.key)
        if key is None or (presence := live_key(key)) in live:
            continue
        if ended_ns(from_json(kv.value, types_pb2.AgentInstance())) < cutoff_ns:
            found.append((bytes(kv.key), int(kv.mod_revision), presence))
    return found


class RosterPruner:
    """Deletes expired roster records every ``interval`` seconds.

    Args:
        store: The etcd client.
        retention: Seconds an ended instance stays listed; 0 keeps them for ever.
    """

    def __init__(self, store: Store, retention: float) -> None:
        self._store = store
        self.retention = retention
        self.interval = min(max(retention / 10, 1.0), 300.0)

    async def prune(self, now_ns: int | None = None) -> int:
        """One pass over the roster; returns how many records it deleted."""
        if self.retention <= 0:
            return 0
        cutoff = (now_ns or time.time_ns()) - int(self.retention * 1e9)
        live = await self._live()
        deleted, start, end = 0, ROSTER, prefix_end(ROSTER)
        while True:
            page = await self._store.range_between(start, end, limit=PAGE)
            doomed = expired(page.kvs, live, cutoff)
            for at in range(0, len(doomed), BATCH):
                deleted += await self._delete(doomed[at : at + BATCH])
            if not page.more or not page.kvs:
                return deleted
            start = bytes(page.kvs[-1].key) + b"\0"

    async def _live(self) -> set[bytes]:
        resp = await self._store.range(LIVE)
        return {bytes(kv.key) for kv in resp.kvs}

    async def _delete(self, batch: list[Expired]) -> int:
        """All of ``batch`` in one transaction; one by one if any changed meanwhile."""
        if await self._try(batch):
            return len(batch)
        if len(batch) == 1:
            return 0
        return sum([await self._delete([one]) for one in batch])

    async def _try(self, batch: list[Expired]) -> bool:
        compares = [unchanged_since(key, rev) for key, rev, _ in batch]
        compares += [absent(presence) for _, _, presence in batch]
        resp = await self._store.txn(compares, [delete_op(key) for key, _, _ in batch])
        return bool(resp.succeeded)

    async def step(self) -> None:
        """One pass, for ``every``: a failure is logged and the next pass tries again; it
        never ends the coordinator's loops, because forgetting is not on the kill path."""
        try:
            if count := await self.prune():
                log.info("pruned %d ended roster records older than %gs", count, self.retention)
        except EtcdUnavailable:
            raise
        except Exception:
            log.exception("roster pruning failed; trying again in %gs", self.interval)
