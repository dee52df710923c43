"""The audit chain stays one chain when appends try the head they last saw first.

Each ``Store`` here stands for one coordinator: its appends share the head it last saw, and
the other store's appends make that guess stale. Real etcd, no coordinator process.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

from tether.v1 import admin_pb2, types_pb2
from tether_server._audit import AuditLog
from tether_server._etcd import Store
from tether_server._halt_store import HaltStore
from tether_server._selectors import halt_id

from tests.conftest import Etcd


def _run(etcd: Etcd, test: Callable[[list[Store]], Awaitable[None]]) -> None:
    async def main() -> None:
        stores = [Store([etcd.endpoint]), Store([etcd.endpoint])]
        try:
            await test(stores)
        finally:
            for store in stores:
                await store.close()

    asyncio.run(main())


def _halt(tenant: str, run: str, actor: str) -> types_pb2.Halt:
    sel = types_pb2.Selector(scope=types_pb2.SCOPE_RUN, tenant=tenant, run_id=run)
    return types_pb2.Halt(id=halt_id(sel), selector=sel, reason=f"by {actor}", actor=actor)


async def _verified(store: Store, count: int) -> None:
    out = await AuditLog(store).verify()
    assert (out.intact, out.entries, out.first_bad_id, out.problem) == (True, count, "", "")


def test_two_coordinators_appending_at_once_make_one_chain(etcd: Etcd, tenant: str) -> None:
    async def test(stores: list[Store]) -> None:
        a, b = (HaltStore(s, AuditLog(s)) for s in stores)

        async def flip(halts: HaltStore, n: int, actor: str) -> tuple[bool, bool]:
            # Every run is killed from both sides at once: one kill changes it, one does not.
            kill = await halts.kill(_halt(tenant, f"run-{n}", actor), force=True)
            resume = await halts.resume(kill.halt.selector, actor, f"resume {n}")
            return kill.already_halted, resume.was_halted

        jobs = [flip(h, n, actor) for n in range(12) for h, actor in ((a, "a"), (b, "b"))]
        outcomes = await asyncio.gather(*jobs)
        await _verified(stores[0], 48)
        entries = await AuditLog(stores[1]).entries()
        kills = [e for e in entries if e.action == admin_pb2.AUDIT_ACTION_KILL]
        resumes = [e for e in entries if e.action == admin_pb2.AUDIT_ACTION_RESUME]
        assert len(kills) == len(resumes) == 24
        # Each entry says truly whether it changed anything: one halt put per kill that was
        # not already halted, one removed per resume that found it.
        assert sum(e.changed for e in kills) == sum(not k for k, _ in outcomes)
        assert sum(e.changed for e in resumes) == sum(r for _, r in outcomes)
        assert sum(e.changed for e in kills) == sum(e.changed for e in resumes)

    _run(etcd, test)


def test_an_append_after_the_other_coordinators_chains_onto_theirs(etcd: Etcd, tenant: str) -> None:
    async def test(stores: list[Store]) -> None:
        a, b = (HaltStore(s, AuditLog(s)) for s in stores)
        await a.kill(_halt(tenant, "one", "a"), force=True)  # a's guess: its own entry
        await b.kill(_halt(tenant, "two", "b"), force=True)  # now a's guess is stale
        await b.kill(_halt(tenant, "one", "b"), force=True)  # already halted: audited too
        out = await a.kill(_halt(tenant, "three", "a"), force=True)
        assert not out.already_halted
        await _verified(stores[0], 4)
        entries = await AuditLog(stores[0]).entries()
        assert [(e.actor, e.changed) for e in entries] == [
            ("a", True), ("b", True), ("b", False), ("a", True),
        ]  # fmt: skip
        for before, after in itertools.pairwise(entries):
            assert after.prev_hash == before.hash

    _run(etcd, test)


def test_a_wiped_audit_starts_a_new_chain(etcd: Etcd, tenant: str) -> None:
    async def test(stores: list[Store]) -> None:
        halts = HaltStore(stores[0], AuditLog(stores[0]))
        await halts.kill(_halt(tenant, "one", "a"), force=True)
        etcd.wipe()  # the head this process saw is gone with the rest
        await halts.kill(_halt(tenant, "two", "a"), force=True)
        entries = await AuditLog(stores[0]).entries()
        assert [e.prev_hash for e in entries] == [""]
        await _verified(stores[0], 1)

    _run(etcd, test)
