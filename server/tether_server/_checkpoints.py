"""Checkpoint writes, coalesced per run: the newest value wins, many runs share one txn.

Heartbeats never write etcd directly. A changed checkpoint marks its run dirty; a flush
every ``interval`` writes every dirty run in as few transactions as etcd allows. Kills and
clean exits flush their run at once, because that checkpoint is the one a resume uses.
"""

from __future__ import annotations

import asyncio
import hashlib

from tether_server._store import EtcdUnavailable, Store, every, put_op


def digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


class CheckpointWriter:
    """Holds the newest unwritten checkpoint of each run and writes them in batches."""

    def __init__(self, store: Store, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._dirty: dict[bytes, bytes] = {}
        # A digest, not the value: enough to skip rewriting an unchanged checkpoint.
        self._stored: dict[bytes, bytes] = {}
        # One flush at a time: two in flight could commit out of order and leave an older
        # checkpoint stored last, and a resume would then repeat work.
        self._lock = asyncio.Lock()

    def seed(self, key: bytes, stored: bytes | None) -> None:
        """Remember what etcd holds for ``key``, as read at registration."""
        if stored is not None:
            self._stored[key] = digest(stored)

    def offer(self, key: bytes, value: bytes) -> None:
        """Mark ``key`` dirty with ``value`` unless etcd already holds exactly that."""
        if self._stored.get(key) == digest(value):
            self._dirty.pop(key, None)
        else:
            self._dirty[key] = value

    def forget(self, key: bytes) -> None:
        """Drop the digest once no session serves the run; unwritten values still go out."""
        self._stored.pop(key, None)

    async def flush(self, keys: list[bytes] | None = None) -> None:
        """Write the dirty checkpoints of ``keys`` (default: every run) now.

        Raises:
            EtcdUnavailable: nothing is lost; the values stay dirty for the next flush.
        """
        async with self._lock:
            await self._flush(keys)

    async def _flush(self, keys: list[bytes] | None) -> None:
        if keys is None:
            batch, self._dirty = self._dirty, {}
        else:
            batch = {k: self._dirty.pop(k) for k in keys if k in self._dirty}
        if not batch:
            return
        try:
            await self._store.put_many([put_op(k, v) for k, v in batch.items()])
        except EtcdUnavailable:
            for key, value in batch.items():
                self._dirty.setdefault(key, value)  # a newer value may have arrived meanwhile
            raise
        for key, value in batch.items():
            self._stored[key] = digest(value)

    async def run(self) -> None:
        await every(self._interval, self.flush, "checkpoint flush")
