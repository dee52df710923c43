"""What a kill stops: work in flight (soft and hard), queued work (drain or discard),
timers and retries. Real coordinator, real etcd; timings are recorded, not asserted tight."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import tether

from tests.conftest import Coordinator, eventually


@pytest.fixture
def admin(coord: Coordinator) -> Iterator[tether.AdminClient]:
    with tether.AdminClient(coord.addr, actor="pytest") as client:
        yield client


def _audit(admin: tether.AdminClient, tenant: str, action: str) -> tether.AuditEntry:
    def found() -> list[tether.AuditEntry]:
        return [e for e in admin.audit(tenant=tenant) if e.action == action]

    return eventually(found)[0]


def _statuses(admin: tether.AdminClient, tenant: str, n: int) -> dict[str, str]:
    def rows() -> dict[str, str]:
        got = {r.key: r.status.value for r in admin.effects(tenant)}
        if len(got) < n or "intended" in got.values():
            raise AssertionError(got)
        return got

    return eventually(rows)


def _long_effect(
    coord: Coordinator, uri: str, kill: Callable[[], object]
) -> tuple[float, str, float]:
    """An asyncio agent is inside a 10 s gated effect when ``kill`` runs.

    Returns when the in-flight effect ended after the kill, how, and the check latency."""

    async def scenario() -> tuple[float, str, float]:
        async with tether.AsyncAgent(uri, run_id="r", target=coord.addr) as agent:
            entered = asyncio.Event()

            async def work() -> str:
                async with agent.effect("long_call", key="k-long"):
                    entered.set()
                    await asyncio.sleep(10)
                return "finished"

            task = asyncio.create_task(work())
            await entered.wait()
            start = time.monotonic()
            await asyncio.to_thread(kill)
            while not agent.killed:  # noqa: ASYNC110 - polling the SDK's local verdict
                await asyncio.sleep(0.005)
            stopped_new = time.monotonic() - start
            try:
                outcome = await task
            except asyncio.CancelledError:
                outcome = "cancelled"
            return time.monotonic() - start, outcome, stopped_new

    return asyncio.run(scenario())


def test_hard_kill_cancels_work_in_flight_at_once(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/a"
    elapsed, outcome, _ = _long_effect(
        coord, uri, lambda: admin.kill(tether.selector(agent=uri), "hard stop", force=True)
    )
    assert outcome == "cancelled"
    assert elapsed < 5  # not the 10 s the effect wanted
    assert _statuses(admin, tenant, 1) == {"k-long": "cancelled"}
    ack = _audit(admin, tenant, "ack")
    assert ack.reason == "1 instance(s) stopped; 1 effect(s) were in flight"


def test_soft_kill_escalates_to_hard_when_the_grace_runs_out(
    coord: Coordinator,
    admin: tether.AdminClient,
    tenant: str,
    record_property: Callable[[str, object], None],
) -> None:
    uri = f"agent://{tenant}/a"
    grace = 1.0
    elapsed, outcome, stopped_new = _long_effect(
        coord,
        uri,
        lambda: admin.kill(
            tether.selector(agent=uri), "soft stop", soft=True, grace=grace, force=True
        ),
    )
    record_property("soft_to_hard_seconds", round(elapsed, 3))
    print(
        f"soft kill: new effects stopped after {stopped_new * 1e3:.1f} ms, in-flight cancelled after {elapsed:.2f} s (grace {grace} s)"
    )
    assert outcome == "cancelled"
    assert elapsed >= grace * 0.9  # it was allowed to run on during the grace
    assert elapsed < 10  # and did not get its full 10 s
    assert _statuses(admin, tenant, 1) == {"k-long": "cancelled"}
    escalation = _audit(admin, tenant, "escalate")
    assert escalation.reason.startswith("grace of 1s timed out: 1 instance(s) escalated")
    assert escalation.actor == "tether"


def test_soft_kill_lets_short_work_finish_and_refuses_new_work(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/a"

    async def scenario() -> None:
        async with tether.AsyncAgent(uri, run_id="r", target=coord.addr) as agent:
            entered = asyncio.Event()

            async def work() -> None:
                async with agent.effect("short_call", key="k-short"):
                    entered.set()
                    await asyncio.sleep(0.5)

            task = asyncio.create_task(work())
            await entered.wait()
            await asyncio.to_thread(
                admin.kill, tether.selector(agent=uri), "soft", soft=True, grace=5, force=True
            )
            while not agent.killed:  # noqa: ASYNC110 - polling the SDK's local verdict
                await asyncio.sleep(0.005)
            with pytest.raises(tether.Killed):
                async with agent.effect("short_call", key="k-new"):
                    pytest.fail("a soft kill still stops new effects at once")
            await task  # finishes within the grace

    asyncio.run(scenario())
    assert _statuses(admin, tenant, 2) == {"k-short": "landed", "k-new": "refused"}
    ack = _audit(admin, tenant, "ack")
    assert ack.reason == "1 instance(s) stopped; 0 effect(s) were in flight"


@pytest.mark.parametrize("drain", [False, True], ids=["discard", "drain"])
def test_queued_work_is_drained_or_discarded_as_the_kill_says(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, drain: bool
) -> None:
    uri = f"agent://{tenant}/q"
    sent: list[int] = []
    with tether.Agent(uri, run_id="r", target=coord.addr) as agent:

        def handler(n: int) -> None:
            sent.append(n)
            if n == 4:
                admin.kill(tether.selector(agent=uri), "queue drill", drain=drain, force=True)
                eventually(lambda: agent.killed)
            time.sleep(0.01)

        queue = agent.queue("send_email", handler)
        for n in range(20):
            queue.put(n, key=f"q-{n}")
        if drain:
            assert queue.run() == 20
            with pytest.raises(tether.Killed):
                queue.put(99, key="q-99")  # nothing new while halted
        else:
            with pytest.raises(tether.Killed):
                queue.run()
            assert queue.discarded == [f"q-{n}" for n in range(5, 20)]
    expected = {f"q-{n}": "landed" for n in range(5)}
    expected |= {f"q-{n}": "landed" if drain else "not_started" for n in range(5, 20)}
    assert _statuses(admin, tenant, 20) == expected
    assert sent == (list(range(20)) if drain else list(range(5)))


def test_a_cancelled_timer_never_fires_and_a_retry_stops_at_the_kill(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/t"
    fired = threading.Event()
    attempts: list[float] = []
    with tether.Agent(uri, run_id="r", target=coord.addr) as agent:
        early = agent.call_later(0.05, lambda: None)
        timer = agent.call_later(1.0, fired.set)
        eventually(lambda: early.fired)

        def flaky() -> None:
            attempts.append(time.monotonic())
            raise ConnectionError("downstream flaky")

        outcome: list[BaseException] = []
        retrier = threading.Thread(
            target=lambda: outcome.append(
                _raises(lambda: agent.retry(flaky, attempts=10, delay=0.3))
            )
        )
        retrier.start()
        eventually(lambda: len(attempts) >= 2)
        admin.kill(tether.selector(agent=uri), "stop everything", force=True)
        killed_at = time.monotonic()
        retrier.join(5)
        assert isinstance(outcome[0], tether.Killed)
        assert all(t < killed_at for t in attempts)  # no retry after the stop
        time.sleep(1.2)
        assert not fired.is_set()
        assert not timer.fired
        with pytest.raises(tether.Killed):
            agent.call_later(0.1, fired.set)  # nothing new is scheduled while halted


def _raises(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as err:
        return err
    raise AssertionError("expected an exception")
