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
from collections.abc import Callable
from typing import Any

from tether_server._errors import InvalidArgument
from tether_server._etcd import EtcdUnavailable, Store, every
from tether_server._ledger import LedgerWriter, pause
from tether_server._store import RunKey, put_op, to_json

log = logging.getLogger("tether_server")
KILL_FLUSH_DELAY = 0.05  # seconds: long enough to gather a fleet's final checkpoints
CONVERT_CHUNK = 128  # checkpoints converted to JSON before the loop serves others

Invalid = Callable[[str], None]
"""Told why a checkpoint offered as a message could not be stored (it ends its stream)."""


def checked(checkpoint: Any, limit: int) -> Any:
    """``checkpoint`` (a ``Struct``) if it fits in ``limit`` bytes, as the SDK measures.

    Raises:
        InvalidArgument: it is too large; the last accepted checkpoint is kept.
    """
    size = checkpoint.ByteSize()
    if size > limit:
        raise InvalidArgument(
            f"checkpoint is {size} bytes; the limit is {limit} bytes. "
            "Store large state elsewhere and checkpoint a reference to it; "
            "the last accepted checkpoint is kept"
        )
    return checkpoint


def json_of(checkpoint: Any) -> bytes:
    """``checkpoint`` as stored.

    Raises:
        InvalidArgument: it is not JSON (a NaN, say); it was not stored.
    """
    try:
        return to_json(checkpoint)
    except ValueError as err:
        raise InvalidArgument(f"checkpoint is not valid JSON ({err}); it was not stored") from None


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
        # Checkpoints that came with a kill's acknowledgement, still as messages: the JSON
        # is made at the next flush, not on the loop that is still pushing the kill.
        self._raw: dict[bytes, tuple[Any, Invalid]] = {}
        # One flush at a time: two in flight could commit out of order and leave an older
        # checkpoint stored last, and a resume would then repeat work.
        self._lock = asyncio.Lock()
        # Set while no kill is being pushed (``Fanout.quiet``); conversions wait for it.
        self.quiet: asyncio.Event | None = None

    def seed(self, key: bytes, stored: bytes | None) -> None:
        """Remember what etcd holds for ``key``, as read at registration."""
        self._pending.seed(key, stored)

    def offer(self, key: bytes, value: bytes) -> None:
        """Mark ``key`` dirty with ``value`` unless etcd already holds exactly that."""
        self._raw.pop(key, None)  # older than this value
        self._pending.offer(key, value)

    def offer_later(self, key: bytes, checkpoint: Any, invalid: Invalid) -> None:
        """Offer ``checkpoint`` (a checked ``Struct``) as JSON at the next flush.

        ``invalid`` is told why, if it turns out not to be JSON; nothing is stored then.
        """
        self._raw[key] = (checkpoint, invalid)

    async def _convert(self, keys: list[bytes] | None) -> None:
        """Offer the waiting messages of ``keys`` (default: all) as JSON, yielding between
        chunks; a value offered meanwhile is newer and wins."""
        wanted = list(self._raw) if keys is None else [k for k in keys if k in self._raw]
        for done, key in enumerate(wanted, 1):
            item = self._raw.pop(key, None)
            if item is not None:
                try:
                    self._pending.offer(key, json_of(item[0]))
                except InvalidArgument as err:
                    item[1](str(err))
            if done % CONVERT_CHUNK == 0:
                await pause(self.quiet)

    def forget(self, key: bytes) -> None:
        """Drop the digest once no session serves the run; unwritten values still go out."""
        self._pending.forget(key)

    async def flush(self, keys: list[bytes] | None = None) -> None:
        """Write the dirty checkpoints of ``keys`` (default: every run) now.

        Raises:
            EtcdUnavailable: nothing is lost; the values stay dirty for the next flush.
        """
        await self._convert(keys)
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

    def __init__(
        self, checkpoints: CheckpointWriter, ledger: LedgerWriter, quiet: asyncio.Event
    ) -> None:
        self._checkpoints = checkpoints
        self._ledger = ledger
        self._quiet = quiet  # set while no kill is being pushed (``Fanout.quiet``)
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
        await self._quiet.wait()  # the pushes first: converting thousands of records can wait
        try:
            await self._checkpoints.flush()
            await self._ledger.flush()
        except EtcdUnavailable as err:
            log.warning("kill-time checkpoint flush deferred: %s", err)
