"""What a kill stops: work in flight (soft and hard), queued work (drain or discard),
timers and retries. Real coordinator, real etcd. The asserts are on events (what ran, what
was cancelled, what the audit says); timings are only recorded, as bench/ is where they count."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
import tether

from tests.conftest import Coordinator, Siblings, audited, eventually, settled_effects


async def _runs_on_one_stream(
    stack: contextlib.AsyncExitStack, uri: str, n: int, target: str
) -> list[tether.AsyncAgent]:
    """``n`` runs of the agent ``uri`` in this process: the SDK puts them on one stream."""
    return [
        await stack.enter_async_context(tether.AsyncAgent(uri, run_id=f"r{i}", target=target))
        for i in range(n)
    ]


async def _kill_once_inside(
    admin: tether.AdminClient,
    uri: str,
    work: Callable[[int], Coroutine[Any, Any, None]],
    entered: list[asyncio.Event],
    reason: str,
) -> list[asyncio.Task[None]]:
    """Start each run's ``work``, kill the agent once every one is inside its effect, and
    give the work 10 s to end; its tasks."""
    tasks = [asyncio.create_task(work(i)) for i in range(len(entered))]
    for event in entered:
        await event.wait()
    await asyncio.to_thread(admin.kill, tether.selector(agent=uri), reason, force=True)
    await asyncio.wait(tasks, timeout=10)
    return tasks


def _statuses(admin: tether.AdminClient, tenant: str, n: int) -> dict[str, str]:
    return {r.key: r.status.value for r in settled_effects(admin, tenant, n)}


@dataclass
class LongEffect:
    """What became of a 10 s gated effect that was in flight when the kill came."""

    outcome: str  # "finished", or "cancelled" by the kill
    ran_on: bool  # the effect took another step after the agent had the kill
    seconds: float  # from the kill to the effect's end: recorded, never asserted


def _long_effect(
    coord: Coordinator, uri: str, kill: Callable[[], object], siblings: Siblings
) -> LongEffect:
    """An asyncio agent is inside a 10 s gated effect when ``kill`` runs.

    Once the effect sees its agent killed it takes one more turn of the loop, notes that it
    ran on, then goes on with its 10 s. The stream runs on this loop and applies an order
    (verdict, then cancellation) in one callback, so a kill that cancels at once, or a grace
    that ends at the next turn, leaves the effect no step after the verdict.
    """

    async def scenario() -> LongEffect:
        async with (
            siblings.around_async(coord.addr),
            tether.AsyncAgent(uri, run_id="r", target=coord.addr) as agent,
        ):
            entered = asyncio.Event()
            ran_on: list[bool] = []

            async def work() -> str:
                async with agent.effect("long_call", key="k-long"):
                    entered.set()
                    while not agent.killed:  # noqa: ASYNC110 - polling the SDK's local verdict
                        await asyncio.sleep(0.005)
                    await asyncio.sleep(0)  # one more turn of the loop, then note it ran on
                    ran_on.append(True)
                    await asyncio.sleep(10)
                return "finished"

            task = asyncio.create_task(work())
            await entered.wait()
            start = time.monotonic()
            await asyncio.to_thread(kill)
            try:
                outcome = await task
            except asyncio.CancelledError:
                outcome = "cancelled"
            return LongEffect(outcome, bool(ran_on), time.monotonic() - start)

    return asyncio.run(scenario())


def test_hard_kill_cancels_work_in_flight_at_once(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, siblings: Siblings
) -> None:
    uri = f"agent://{tenant}/a"
    effect = _long_effect(
        coord,
        uri,
        lambda: admin.kill(tether.selector(agent=uri), "hard stop", force=True),
        siblings,
    )
    assert effect.outcome == "cancelled"  # not the 10 s the effect wanted
    assert not effect.ran_on  # cancelled with the verdict, not after some grace
    assert _statuses(admin, tenant, 1) == {"k-long": "cancelled"}
    ack = audited(admin, tenant, "ack")  # acknowledged as stopped, not escalated
    assert ack.reason == "1 instance(s) stopped; 1 effect(s) were in flight"


def test_a_hard_kill_of_runs_sharing_a_stream_cancels_and_acknowledges_each(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    """One order names every run on the stream: each run's work is cancelled, and each
    run's acknowledgement, built after the cancels, still lists the work it had in flight."""
    uri, n = f"agent://{tenant}/many", 5

    async def scenario() -> list[bool]:
        async with contextlib.AsyncExitStack() as stack:
            agents = await _runs_on_one_stream(stack, uri, n, coord.addr)
            entered = [asyncio.Event() for _ in agents]

            async def work(i: int) -> None:
                async with agents[i].effect("long_call", key=f"k{i}"):
                    entered[i].set()
                    await asyncio.sleep(10)

            tasks = await _kill_once_inside(admin, uri, work, entered, "every run on the stream")
            return [task.cancelled() for task in tasks]

    assert asyncio.run(scenario()) == [True] * n
    assert _statuses(admin, tenant, n) == {f"k{i}": "cancelled" for i in range(n)}

    def acks() -> list[tether.AuditEntry]:
        found = [e for e in admin.audit(tenant=tenant) if e.action == "ack"]
        assert sum(len(e.instances) for e in found) == n, found
        return found

    for ack in eventually(acks):
        stopped = len(ack.instances)
        assert ack.reason == f"{stopped} instance(s) stopped; {stopped} effect(s) were in flight"


def test_work_a_kill_cancelled_is_recorded_once_and_nothing_starts_after_it(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    """The gate records a cancelled pass with the other cancels of the stop, after they all
    reached their code: a pass tried from the cancelled code is refused at once all the
    same, each pass is recorded exactly once, and runs that close at once lose nothing."""
    uri, n = f"agent://{tenant}/batch", 4

    async def scenario() -> list[str]:
        refused: list[str] = []
        async with contextlib.AsyncExitStack() as stack:
            agents = await _runs_on_one_stream(stack, uri, n, coord.addr)
            entered = [asyncio.Event() for _ in agents]

            async def work(i: int) -> None:
                async with agents[i].effect("long_call", key=f"k{i}"):
                    entered[i].set()
                    try:
                        await asyncio.sleep(10)
                    except asyncio.CancelledError:
                        try:  # its own record is not built yet: the gate refuses anyway
                            async with agents[i].effect("after", key=f"j{i}"):
                                pass
                        except tether.Killed:
                            refused.append(f"j{i}")
                        raise

            await _kill_once_inside(admin, uri, work, entered, "batch")
        return sorted(refused)  # every agent closed here, right after its cancel

    assert asyncio.run(scenario()) == [f"j{i}" for i in range(n)]
    rows = settled_effects(admin, tenant, 2 * n)
    assert sorted((r.key, r.status.value) for r in rows) == sorted(
        [(f"k{i}", "cancelled") for i in range(n)] + [(f"j{i}", "refused") for i in range(n)]
    )


def test_soft_kill_escalates_to_hard_when_the_grace_runs_out(
    coord: Coordinator,
    admin: tether.AdminClient,
    tenant: str,
    record_property: Callable[[str, object], None],
    siblings: Siblings,
) -> None:
    uri = f"agent://{tenant}/a"
    effect = _long_effect(
        coord,
        uri,
        lambda: admin.kill(
            tether.selector(agent=uri), "soft stop", soft=True, grace=1.0, force=True
        ),
        siblings,
    )
    record_property("soft_to_hard_seconds", round(effect.seconds, 3))
    print(
        f"soft kill: in-flight effect cancelled {effect.seconds:.2f} s after the kill (grace 1 s)"
    )
    assert effect.ran_on  # it was allowed to run on during the grace
    assert effect.outcome == "cancelled"  # and did not get its full 10 s
    assert _statuses(admin, tenant, 1) == {"k-long": "cancelled"}
    escalation = audited(admin, tenant, "escalate")
    assert escalation.reason == (
        "grace of 1s timed out: 1 instance(s) escalated to a hard kill "
        "and cancelled 1 effect(s) in flight"
    )
    assert escalation.actor == "tether"
    assert [e.action for e in admin.audit(tenant=tenant)] == ["kill", "escalate"]  # no plain ack


def test_soft_kill_lets_short_work_finish_and_refuses_new_work(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, siblings: Siblings
) -> None:
    uri = f"agent://{tenant}/a"

    async def scenario() -> None:
        async with (
            siblings.around_async(coord.addr),
            tether.AsyncAgent(uri, run_id="r", target=coord.addr) as agent,
        ):
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
    ack = audited(admin, tenant, "ack")
    assert ack.reason == "1 instance(s) stopped; 0 effect(s) were in flight"


@pytest.mark.parametrize("drain", [False, True], ids=["discard", "drain"])
def test_queued_work_is_drained_or_discarded_as_the_kill_says(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, drain: bool, siblings: Siblings
) -> None:
    uri = f"agent://{tenant}/q"
    sent: list[int] = []
    with siblings.around(coord.addr), tether.Agent(uri, run_id="r", target=coord.addr) as agent:

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
    coord: Coordinator, admin: tether.AdminClient, tenant: str, siblings: Siblings
) -> None:
    uri = f"agent://{tenant}/t"
    fired = threading.Event()
    attempts: list[int] = []
    with siblings.around(coord.addr), tether.Agent(uri, run_id="r", target=coord.addr) as agent:
        early = agent.call_later(0.05, lambda: None)
        timer = agent.call_later(1.0, fired.set)
        eventually(lambda: early.fired)

        def flaky() -> None:
            attempts.append(len(attempts) + 1)
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
        tried = len(attempts)
        retrier.join(5)
        assert not retrier.is_alive()
        assert isinstance(outcome[0], tether.Killed)
        assert len(attempts) == tried  # no retry after the stop
        # The timer falls due during this wait; cancelled by the kill, it stays silent.
        assert not fired.wait(1.0)
        assert not timer.fired
        with pytest.raises(tether.Killed):
            agent.call_later(0.1, fired.set)  # nothing new is scheduled while halted


def _raises(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as err:
        return err
    raise AssertionError("expected an exception")
