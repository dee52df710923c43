"""The ledger's buffered records, flushed to a real etcd."""

from __future__ import annotations

import asyncio

from tether.v1 import types_pb2
from tether_server._etcd import Store
from tether_server._ledger import LedgerReader, LedgerWriter
from tether_server._store import RunKey

from tests.conftest import Etcd


def test_a_runs_final_flush_waits_for_the_flush_that_holds_its_records(
    etcd: Etcd, tenant: str
) -> None:
    """A periodic flush has taken a run's records and waits out a kill's pushes; the run's
    session ends meanwhile and flushes that run. Its flush must not return before the
    records are in etcd: another coordinator would read a ledger without them (and lose
    the landed keys the agent's next registration is given)."""
    asyncio.run(_held(etcd, tenant))


async def _held(etcd: Etcd, tenant: str) -> None:
    store = Store([etcd.endpoint])
    writer = LedgerWriter(store, "c-test", 60)
    writer.quiet = asyncio.Event()  # a kill is being pushed: conversions wait
    runs = [RunKey(tenant, "mailer", f"r{n}") for n in range(300)]  # past one slice of 128
    for n, run in enumerate(runs):
        effect = types_pb2.Effect(
            effect_id=f"e{n}", capability="send", key=f"k{n}", status=types_pb2.EFFECT_STATUS_LANDED
        )
        writer.add(run, [effect])
    periodic = asyncio.create_task(writer.flush())
    await asyncio.sleep(0.05)  # it took the first 128 runs' records and waits for quiet
    assert not periodic.done()
    final = asyncio.create_task(writer.flush([runs[0]]))
    await asyncio.sleep(0.05)
    assert not final.done()  # it waits for the flush holding r0's records
    writer.quiet.set()
    await asyncio.wait_for(final, 10)
    (row,) = await LedgerReader(store).read(tenant, "mailer", "r0")
    assert row.key == "k0" and row.status == types_pb2.EFFECT_STATUS_LANDED
    await asyncio.wait_for(periodic, 10)
    assert len(await LedgerReader(store).read(tenant)) == 300
