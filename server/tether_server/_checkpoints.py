"""Checkpoint writes, coalesced per run: the newest value wins, many runs share one txn.

Heartbeats never write etcd directly. A changed checkpoint marks its run dirty; a flush
every ``interval`` writes every dirty run in as few transactions as etcd allows. Kills and
clean exits flush at once, because that checkpoint is the one a resume uses: a session's
end flushes its own run, and a kill flushes everything a moment later, as one batch
(:class:`RunFlush`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from tether_server._etcd import EtcdUnavailable, Store, every
from tether_server._ledger import LedgerWriter
from tether_server._store import RunKey, put_op

log = logging.getLogger("tether_server")
KILL_FLUSH_DELAY = 0.05  # seconds: long enough to gather a fleet's final checkpoints


def digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


class Coalescer:
    """Which checkpoints need writing: the newest value per run, unless etcd holds it already.

    Pure bookkeeping, no I/O: the writer takes a batch, writes it, and reports back.
    """

    def __init__(self) -> None:
        self.dirty: dict[bytes, bytes] = {}
        # A digest, not the value: enough to skip rewriting an unchanged checkpoint.
        self._stored: dict[bytes, bytes] = {}

    def seed(self, key: bytes, stored: bytes | None) -> None:
        """Remember what etcd holds for ``key``, as read at registration."""
        if stored is not None:
            self._stored[key] = digest(stored)

    def offer(self, key: bytes, value: bytes) -> None:
        """Mark ``key`` dirty with ``value`` unless etcd already holds exactly that."""
        if self._stored.get(key) == digest(value):
            self.dirty.pop(key, None)
        else:
            self.dirty[key] = value

    def forget(self, key: bytes) -> None:
        """Drop the digest once no session serves the run; unwritten values still go out."""
        self._stored.pop(key, None)

    def take(self, keys: list[bytes] | None = None) -> dict[bytes, bytes]:
        """Remove and return the dirty values of ``keys`` (default: every dirty run)."""
        if keys is None:
            batch, self.dirty = self.dirty, {}
            return batch
        return {k: self.dirty.pop(k) for k in keys if k in self.dirty}

    def written(self, batch: dict[bytes, bytes]) -> None:
        """``batch`` is in etcd now."""
        for key, value in batch.items():
            self._stored[key] = digest(value)

    def failed(self, batch: dict[bytes, bytes]) -> None:
        """``batch`` did not reach etcd: dirty again, unless a newer value arrived meanwhile."""
        for key, value in batch.items():
            self.dirty.setdefault(key, value)


class CheckpointWriter:
    """Holds the newest unwritten checkpoint of each run and writes them in batches."""

    def __init__(self, store: Store, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._pending = Coalescer()
        # One flush at a time: two in flight could commit out of order and leave an older
        # checkpoint stored last, and a resume would then repeat work.
        self._lock = asyncio.Lock()

    def seed(self, key: bytes, stored: bytes | None) -> None:
        """Remember what etcd holds for ``key``, as read at registration."""
        self._pending.seed(key, stored)

    def offer(self, key: bytes, value: bytes) -> None:
        """Mark ``key`` dirty with ``value`` unless etcd already holds exactly that."""
        self._pending.offer(key, value)

    def forget(self, key: bytes) -> None:
        """Drop the digest once no session serves the run; unwritten values still go out."""
        self._pending.forget(key)

    async def flush(self, keys: list[bytes] | None = None) -> None:
        """Write the dirty checkpoints of ``keys`` (default: every run) now.

        Raises:
            EtcdUnavailable: nothing is lost; the values stay dirty for the next flush.
        """
        async with self._lock:
            batch = self._pending.take(keys)
            if not batch:
                return
            try:
                await self._store.put_many([put_op(k, v) for k, v in batch.items()])
            except EtcdUnavailable:
                self._pending.failed(batch)
                raise
            self._pending.written(batch)

    async def run(self) -> None:
        await every(self._interval, self.flush, "checkpoint flush")


class RunFlush:
    """Writes checkpoints, then ledger records, at once instead of at the next interval.

    Two uses: every session's end, stopped or not (goodbye, a stream gone stale), writes
    its own run now (:meth:`run_now`); a stop, pushed or noticed on a stream, writes
    everything a moment later as one batch (:meth:`soon`). Checkpoints go first: the ledger
    says what landed, and a resume reads both.
    """

    def __init__(self, checkpoints: CheckpointWriter, ledger: LedgerWriter) -> None:
        self._checkpoints = checkpoints
        self._ledger = ledger
        self._flushing: asyncio.Task[None] | None = None

    async def run_now(self, checkpoint_key: bytes, run: RunKey) -> None:
        """Write one run's checkpoint and ledger records now (a session's end).

        Raises:
            EtcdUnavailable: what was not written stays queued.
        """
        await self._checkpoints.flush([checkpoint_key])
        await self._ledger.flush([run])

    def soon(self) -> None:
        """After a kill, write checkpoints and ledger records at once, but as one batch.

        A kill reaches thousands of sessions in a few milliseconds; one flush per session
        would queue thousands of transactions. One flush a moment later carries them all.
        """
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._all())

    async def _all(self) -> None:
        await asyncio.sleep(KILL_FLUSH_DELAY)
        try:
            await self._checkpoints.flush()
            await self._ledger.flush()
        except EtcdUnavailable as err:
            log.warning("kill-time checkpoint flush deferred: %s", err)
