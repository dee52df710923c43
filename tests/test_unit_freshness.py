"""The freshness proof and the etcd outage log: pure decisions, given times and revisions."""

from __future__ import annotations

import logging

from tether_server._coordinator import Outage
from tether_server._freshness import Freshness


def test_a_view_is_fresh_as_of_its_load_until_the_deadline() -> None:
    fresh = Freshness(2.0, proven_at=10.0)
    assert fresh.fresh(12.0)
    assert not fresh.fresh(12.01)
    assert fresh.expires_in(11.5) == 0.5


def test_a_delivery_at_the_read_revision_proves_the_read_moment() -> None:
    fresh = Freshness(2.0, proven_at=0.0)
    fresh.asked(1.0, revision=40)
    fresh.reached(40)
    assert fresh.proven_at == 1.0
    assert fresh.fresh(3.0)


def test_a_delivery_behind_the_read_proves_nothing() -> None:
    """The watch is still catching up (or stuck): what it misses may be a kill."""
    fresh = Freshness(2.0, proven_at=0.0)
    fresh.asked(1.0, revision=40)
    fresh.reached(39)
    assert fresh.proven_at == 0.0
    assert not fresh.fresh(2.5)


def test_a_delivery_before_the_read_proves_nothing() -> None:
    """The proof must come after the read: an earlier progress note says nothing of it."""
    fresh = Freshness(2.0, proven_at=0.0)
    fresh.reached(50)
    fresh.asked(1.0, revision=50)
    assert fresh.proven_at == 0.0
    fresh.reached(50)
    assert fresh.proven_at == 1.0


def test_the_newest_proven_read_wins() -> None:
    fresh = Freshness(2.0, proven_at=0.0)
    fresh.asked(1.0, revision=10)
    fresh.asked(1.5, revision=12)
    fresh.asked(2.0, revision=15)
    fresh.reached(12)
    assert fresh.proven_at == 1.5
    fresh.reached(20)
    assert fresh.proven_at == 2.0


def test_a_silent_watch_goes_stale_however_often_etcd_is_read() -> None:
    fresh = Freshness(2.0, proven_at=0.0)
    for tick in range(1, 100):
        fresh.asked(tick * 0.5, revision=7)
    assert not fresh.fresh(2.01)


def test_proof_never_goes_backwards() -> None:
    fresh = Freshness(2.0, proven_at=5.0)
    fresh.asked(3.0, revision=1)  # a read older than the load
    fresh.reached(1)
    assert fresh.proven_at == 5.0


def test_start_up_says_it_waits_once() -> None:
    outage = Outage(every=30)
    assert outage.failed("refused", 0.0) == (logging.WARNING, "waiting for etcd: refused")
    assert [outage.failed("refused", t) for t in (0.2, 0.6, 1.4, 60.0)] == [None] * 4
    assert outage.attached(61.0) is None  # the first attach is no return


def test_a_loss_is_said_once_then_summarised() -> None:
    outage = Outage(every=30)
    outage.attached(0.0)
    lost = outage.failed("socket closed", 10.0)
    assert lost == (logging.ERROR, "coordinator lost etcd, failing closed: socket closed")
    assert [outage.failed("refused", 10.0 + t) for t in (0.1, 0.3, 0.7, 1.5, 3.5)] == [None] * 5
    summary = outage.failed("refused", 41.0)
    assert summary is not None and summary[0] == logging.ERROR
    assert summary[1] == "etcd still lost after 31s (6 failed attempts to re-attach); last: refused"
    assert outage.failed("refused", 45.0) is None


def test_the_return_is_said_once() -> None:
    outage = Outage()
    outage.attached(0.0)
    outage.failed("gone", 5.0)
    assert outage.attached(7.5) == (logging.WARNING, "etcd is back: re-attached after 2.5s")
    assert outage.attached(8.0) is None
    assert outage.failed("gone again", 9.0) == (
        logging.ERROR,
        "coordinator lost etcd, failing closed: gone again",
    )
