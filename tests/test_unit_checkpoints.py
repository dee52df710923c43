"""Checkpoint coalescing, without etcd: which values a flush would write."""

from __future__ import annotations

from tether_server._checkpoints import Coalescer
from tether_server._store import RunKey, checkpoint_key

RUN_A = checkpoint_key(RunKey("acme", "bot", "run-a"))
RUN_B = checkpoint_key(RunKey("acme", "bot", "run-b"))


def test_the_newest_value_of_a_run_wins() -> None:
    pending = Coalescer()
    pending.offer(RUN_A, b'{"step":1}')
    pending.offer(RUN_A, b'{"step":2}')
    pending.offer(RUN_B, b'{"step":7}')

    assert pending.take() == {RUN_A: b'{"step":2}', RUN_B: b'{"step":7}'}
    assert pending.take() == {}


def test_a_value_etcd_already_holds_is_not_rewritten() -> None:
    pending = Coalescer()
    pending.seed(RUN_A, b'{"step":1}')

    pending.offer(RUN_A, b'{"step":1}')

    assert pending.take() == {}


def test_returning_to_the_stored_value_cancels_the_pending_write() -> None:
    pending = Coalescer()
    pending.seed(RUN_A, b'{"step":1}')
    pending.offer(RUN_A, b'{"step":2}')

    pending.offer(RUN_A, b'{"step":1}')

    assert pending.take() == {}


def test_a_written_value_is_not_written_again() -> None:
    pending = Coalescer()
    pending.offer(RUN_A, b'{"step":3}')
    pending.written(pending.take())

    pending.offer(RUN_A, b'{"step":3}')
    assert pending.take() == {}
    pending.offer(RUN_A, b'{"step":4}')
    assert pending.take() == {RUN_A: b'{"step":4}'}


def test_a_flush_of_some_runs_leaves_the_others_pending() -> None:
    pending = Coalescer()
    pending.offer(RUN_A, b"1")
    pending.offer(RUN_B, b"2")

    assert pending.take([RUN_A, checkpoint_key(RunKey("acme", "bot", "idle"))]) == {RUN_A: b"1"}
    assert pending.take() == {RUN_B: b"2"}


def test_a_failed_write_stays_pending_unless_a_newer_value_arrived() -> None:
    pending = Coalescer()
    pending.offer(RUN_A, b"old-a")
    pending.offer(RUN_B, b"old-b")
    batch = pending.take()
    pending.offer(RUN_A, b"new-a")  # arrived while the write was in flight

    pending.failed(batch)

    assert pending.take() == {RUN_A: b"new-a", RUN_B: b"old-b"}


def test_a_forgotten_run_writes_its_value_again() -> None:
    pending = Coalescer()
    pending.seed(RUN_A, b"same")

    pending.forget(RUN_A)
    pending.offer(RUN_A, b"same")

    assert pending.take() == {RUN_A: b"same"}
