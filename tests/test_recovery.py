"""Recovery, on real etcd and two real coordinators: undo data and traces in the ledger, the
compensation list by window and trace, ``compensate``, and a resume that waits for a release."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tether
from opentelemetry.sdk.trace import TracerProvider
from tether.v1 import admin_pb2, types_pb2
from tether_server._errors import PermissionDenied
from tether_server._identity import Kind, Principal
from tether_server._rbac import Authorizer
from tether_server._selectors import exempt, halts_instance
from tether_server._store import InstanceKey

from tests.conftest import Coordinator, eventually, ok, settled_effects, tether_cli
from tests.test_cli import grpcurl
from tests.test_unit_rbac import GRANTS

TRACER = TracerProvider().get_tracer("tests.recovery")


def _stamp() -> datetime:
    """A boundary between effects: the clock moves on on both sides of it."""
    time.sleep(0.05)
    now = datetime.now(UTC)
    time.sleep(0.05)
    return now


# -- rollback state on the effect -----------------------------------------------------------


def test_undo_trace_and_release_round_trip_through_the_ledger(
    coordinators: tuple[Coordinator, Coordinator], tenant: str
) -> None:
    first, second = coordinators
    uri = f"agent://{tenant}/billing"
    with tether.Agent(uri, run_id="r1", target=first.addr, release="1.4.2") as agent:
        with (
            TRACER.start_as_current_span("charge") as span,
            agent.effect("charge", key="c-1") as fx,
        ):
            fx.undo({"charge_id": "ch_1", "amount": 12.5, "lines": [1, 2]})
        with agent.effect("set_price", key="p-1", undo={"previous": {"sku": "a", "price": 3}}):
            pass
        with agent.effect("read_crm"):
            pass
    with tether.AdminClient(second.addr) as other:  # written via one, read from the other
        rows = settled_effects(other, tenant, 3)
    charge, price, read = rows
    context = span.get_span_context()
    assert charge.undo == {"charge_id": "ch_1", "amount": 12.5, "lines": [1, 2]}
    assert (charge.trace_id, charge.span_id) == (
        format(context.trace_id, "032x"),
        format(context.span_id, "016x"),
    )
    assert price.undo == {"previous": {"sku": "a", "price": 3}}
    assert price.trace_id == "" and read.undo is None
    assert {r.release for r in rows} == {"1.4.2"}


def test_undo_in_asyncio_code_with_a_strict_permit(coord: Coordinator, tenant: str) -> None:
    uri = f"agent://{tenant}/async"

    async def refund() -> None:
        agent = tether.AsyncAgent(uri, run_id="r", target=coord.addr, release="2.0.0")
        async with agent, agent.effect("refund", key="k-1", strict=True) as fx:
            assert fx.permit
            fx.undo({"refund_id": "re_1"})

    asyncio.run(refund())
    with tether.AdminClient(coord.addr) as admin:
        [row] = settled_effects(admin, tenant, 1)
    assert (row.undo, row.release, row.strict) == ({"refund_id": "re_1"}, "2.0.0", True)


def test_release_argument_and_version_label_must_agree(coord: Coordinator, tenant: str) -> None:
    with pytest.raises(tether.InvalidArgument, match="disagree"):
        tether.Agent(f"agent://{tenant}/a", target=coord.addr, release="2", labels={"version": "1"})


def test_oversized_undo_is_refused_and_the_effect_does_not_run(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    ran = []
    big = {"blob": "x" * (tether.MAX_UNDO_BYTES + 1)}
    with tether.Agent(f"agent://{tenant}/mailer", run_id="r1", target=coord.addr) as agent:
        with pytest.raises(tether.InvalidArgument, match="over the 16384-byte limit"):
            agent.effect("send_email", key="m-1", undo=big)  # refused before any pass
        with pytest.raises(tether.InvalidArgument, match="must be JSON"):
            agent.effect("send_email", key="m-2", undo={"when": datetime.now(UTC)})
        with agent.effect("send_email", key="m-3") as fx:
            with pytest.raises(tether.InvalidArgument, match="16384-byte"):
                fx.undo(big)
            ran.append("m-3")  # the caller may still send, without undo data
        with agent.effect("send_email", key="m-1", undo={"message_id": "ok"}):
            ran.append("m-1 again")  # the refused one never claimed the key
    assert ran == ["m-3", "m-1 again"]
    rows = settled_effects(admin, tenant, 2)
    assert [(r.key, r.status.value, r.undo) for r in rows] == [
        ("m-3", "landed", None),
        ("m-1", "landed", {"message_id": "ok"}),
    ]


# -- the compensation list ------------------------------------------------------------------


def test_window_trace_capability_and_status_filters_across_two_coordinators(
    coordinators: tuple[Coordinator, Coordinator], tenant: str
) -> None:
    first, second = coordinators
    with (
        tether.Agent(f"agent://{tenant}/mailer", run_id="m-run", target=first.addr) as mailer,
        tether.Agent(f"agent://{tenant}/biller", run_id="b-run", target=second.addr) as biller,
    ):
        with mailer.effect("send_email", key="before", undo={"id": 0}):
            pass
        start = _stamp()
        with TRACER.start_as_current_span("incident") as span:
            with mailer.effect("send_email", key="in-1", undo={"id": 1}):
                pass
            with biller.effect("charge", key="in-2", undo={"id": 2}):
                pass
        with pytest.raises(RuntimeError), biller.effect("charge", key="in-3"):
            raise RuntimeError("declined")
        end = _stamp()
        with mailer.effect("send_email", key="after"):
            pass
    trace = format(span.get_span_context().trace_id, "032x")
    with tether.AdminClient(first.addr) as a, tether.AdminClient(second.addr) as b:
        settled_effects(a, tenant, 5)
        for client in (a, b):

            def keys(client: tether.AdminClient = client, **filters: object) -> list[str]:
                return [r.key for r in client.effects(tenant, **filters)]  # type: ignore[arg-type]

            assert keys(since=start, until=end) == ["in-1", "in-2", "in-3"]
            assert keys(trace_id=trace) == ["in-1", "in-2"]
            assert keys(since=start, capability="charge") == ["in-2", "in-3"]
            assert keys(since=start, status=tether.EffectStatus.LANDED) == ["in-1", "in-2", "after"]
            assert keys(agent="mailer", until=end) == ["before", "in-1"]
            assert keys(run_id="b-run") == ["in-2", "in-3"]  # a run without its agent
            with pytest.raises(tether.InvalidArgument, match="until must be later"):
                client.effects(tenant, since=end, until=start)


def test_cli_effects_filters_and_prints_undo_whole(coord: Coordinator, tenant: str) -> None:
    with tether.Agent(f"agent://{tenant}/mailer", run_id="r1", target=coord.addr) as agent:
        with (
            TRACER.start_as_current_span("send") as span,
            agent.effect("send_email", key="m-1") as fx,
        ):
            fx.undo({"message_id": "<m1@x>", "to": ["a@x", "b@x"]})
        with agent.effect("send_email", key="m-2"):
            pass
    with tether.AdminClient(coord.addr) as admin:
        settled_effects(admin, tenant, 2)
    trace = format(span.get_span_context().trace_id, "032x")
    out = ok(tether_cli("effects", "--run", "r1", "--trace", trace, "-o", "json", addr=coord.addr))
    [row] = json.loads(out)
    assert row["undo"] == {"message_id": "<m1@x>", "to": ["a@x", "b@x"]}
    assert row["trace_id"] == trace
    table = ok(tether_cli("effects", "--tenant", tenant, "--since", "10m", addr=coord.addr))
    assert '"message_id":"<m1@x>"' in table and "UNDO" in table
    bad = tether_cli("effects", "--tenant", tenant, "--until", "yesterday", addr=coord.addr)
    assert bad.returncode == 2 and "--until 'yesterday'" in bad.stderr


def test_grpcurl_lists_the_incident_with_the_same_filters(coord: Coordinator, tenant: str) -> None:
    with tether.Agent(f"agent://{tenant}/mailer", run_id="r1", target=coord.addr) as agent:
        with agent.effect("send_email", key="before"):
            pass
        start = _stamp()
        with TRACER.start_as_current_span("send") as span, agent.effect("send_email", key="in"):
            pass
        with agent.effect("read_crm", key="lookup"):
            pass
    with tether.AdminClient(coord.addr) as admin:
        settled_effects(admin, tenant, 3)
    trace = format(span.get_span_context().trace_id, "032x")
    request = {
        "tenant": tenant, "since": start.isoformat().replace("+00:00", "Z"),
        "capability": "send_email", "status": "EFFECT_STATUS_LANDED",
    }  # fmt: skip
    listed = json.loads(grpcurl(coord.addr, "tether.v1.AdminService/ListEffects", data=request))
    assert [(e["key"], e["trace_id"]) for e in listed["effects"]] == [("in", trace)]
    by_trace = {"tenant": tenant, "trace_id": trace}
    listed = json.loads(grpcurl(coord.addr, "tether.v1.AdminService/ListEffects", data=by_trace))
    assert [e["key"] for e in listed["effects"]] == ["in"]


# -- compensation ---------------------------------------------------------------------------


def _fail(fx: tether.Effect) -> None:
    fx.undo({"batch": 9})
    raise RuntimeError("smtp down")


def _campaign(coord: Coordinator, tenant: str) -> None:
    """Four batches with undo data (batch 2's handler will fail), one without, one failed."""
    with tether.Agent(f"agent://{tenant}/email-campaign", run_id="c-42", target=coord.addr) as a:
        for batch in range(4):
            with a.effect("send_email", key=f"batch-{batch}") as fx:
                fx.undo({"batch": batch, "emails": 100})
        with a.effect("send_email", key="no-undo"):
            pass
        with pytest.raises(RuntimeError, match="smtp"), a.effect("send_email", key="failed") as fx:
            _fail(fx)


def test_compensate_applies_once_records_failures_and_goes_on(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    _campaign(coord, tenant)
    settled_effects(admin, tenant, 6)
    calls: list[str] = []
    relay_down = [True]

    def handler(effect: tether.EffectRecord) -> None:
        calls.append(effect.key)
        if effect.key == "batch-2" and relay_down[0]:
            raise ConnectionError("mail relay down")

    dry = tether.compensate(admin, tenant, handler=handler)
    assert calls == [] and [e.key for e in dry.todo] == [f"batch-{n}" for n in (3, 2, 1, 0)]
    lines: list[str] = []
    report = tether.compensate(admin, tenant, handler=handler, apply=True, progress=lines.append)
    assert calls == ["batch-3", "batch-2", "batch-1", "batch-0"]  # newest first, once each
    assert [e.key for e in report.compensated] == ["batch-3", "batch-1", "batch-0"]
    assert [(e.key, err) for e, err in report.failed] == [
        ("batch-2", "ConnectionError: mail relay down")
    ]
    assert [e.key for e in report.skipped] == ["no-undo"] and len(lines) == 4
    rows = {r.key: r for r in admin.effects(tenant)}
    assert rows["batch-3"].compensation == "compensated"
    assert rows["batch-3"].compensated_by.startswith("anonymous@")  # the principal
    assert rows["batch-2"].compensation == "failed"
    assert rows["batch-2"].compensation_error == "ConnectionError: mail relay down"
    assert rows["failed"].compensation == ""  # it never landed: nothing to reverse
    calls.clear()
    relay_down[0] = False
    again = tether.compensate(admin, tenant, handler=handler, apply=True)
    assert calls == ["batch-2"]  # only the failed one is tried again
    assert len(again.compensated) == 1 and len(again.already) == 3
    calls.clear()
    tether.compensate(admin, tenant, handler=handler, apply=True)
    assert calls == []  # a compensated effect is never compensated twice
    audit = [e for e in admin.audit(tenant=tenant) if e.action == "compensate"]
    assert len(audit) == 5 and all(e.actor.startswith("anonymous@") for e in audit)
    assert "failed: ConnectionError" in audit[1].reason


def test_two_runs_at_once_never_both_reverse_one_effect(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    _campaign(coord, tenant)
    rows = {r.key: r for r in settled_effects(admin, tenant, 6)}
    claimed, _ = admin.record_compensation(rows["batch-3"], claim=True)  # another run, now
    assert claimed.compensation == "claimed"
    with pytest.raises(tether.FailedPrecondition, match="is being compensated by anonymous@"):
        admin.record_compensation(rows["batch-3"], claim=True)
    calls: list[str] = []
    report = tether.compensate(admin, tenant, handler=lambda e: calls.append(e.key), apply=True)
    assert calls == ["batch-2", "batch-1", "batch-0"]
    assert [e.key for e in report.busy] == ["batch-3"]
    assert "1 busy (another run is at them)" in report.counts()
    done, already = admin.record_compensation(rows["batch-3"])  # the other run finishes
    assert (done.compensation, already) == ("compensated", False)
    assert {r.key: r.compensation for r in admin.effects(tenant)}["batch-3"] == "compensated"
    calls.clear()
    tether.compensate(admin, tenant, handler=lambda e: calls.append(e.key), apply=True)
    assert calls == []


def test_record_compensation_is_refused_for_an_effect_that_did_not_land(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    _campaign(coord, tenant)
    failed = next(r for r in settled_effects(admin, tenant, 6) if r.key == "failed")
    with pytest.raises(tether.FailedPrecondition, match="is failed, not landed"):
        admin.record_compensation(failed)
    ghost = dataclasses.replace(failed, effect_id="nope")
    with pytest.raises(tether.NotFound, match="no effect nope"):
        admin.record_compensation(ghost)


def test_cli_compensate_with_the_example_handler(
    coord: Coordinator, tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "retractions.log"
    monkeypatch.setenv("RETRACTIONS", str(out))
    _campaign(coord, tenant)
    with tether.AdminClient(coord.addr) as admin:
        settled_effects(admin, tenant, 6)
    handler = "examples.compensate_email:retract"
    args = ("compensate", "--agent", f"agent://{tenant}/email-campaign", "--since", "10m")
    dry = tether_cli(*args, "--handler", handler, addr=coord.addr)
    assert dry.returncode == 0, dry.stderr
    assert "batch-3" in dry.stdout and "4 to compensate (dry run" in dry.stderr
    assert not out.exists()
    applied = tether_cli(*args, "--handler", handler, "--apply", addr=coord.addr)
    assert applied.returncode == 0, applied.stderr
    assert "[1/4] send_email 'batch-3': compensated" in applied.stderr
    assert "4 compensated, 0 failed, 1 skipped (no undo data)" in applied.stderr
    retracted = [json.loads(line)["retract_batch"] for line in out.read_text().splitlines()]
    assert retracted == [3, 2, 1, 0]
    second = tether_cli(*args, "--handler", handler, "--apply", addr=coord.addr)
    assert "0 compensated, 0 failed, 1 skipped (no undo data), 4 already" in second.stderr
    assert len(out.read_text().splitlines()) == 4
    bad = tether_cli(*args, "--handler", "examples.nothing_here:f", addr=coord.addr)
    assert bad.returncode == 2 and "cannot import" in bad.stderr


# -- a resume that waits for a good release --------------------------------------------------


def test_release_gate_is_one_pure_decision() -> None:
    key = InstanceKey("acme", "email", "r1", "i1")
    halt = types_pb2.Halt(selector=types_pb2.Selector(scope=types_pb2.SCOPE_AGENT, tenant="acme"))
    assert halts_instance(halt, key, {"version": "1.4.2"})
    halt.release_gate["version"] = "1.4.3"
    assert halts_instance(halt, key, {"version": "1.4.2"})
    assert halts_instance(halt, key, {})
    assert not halts_instance(halt, key, {"version": "1.4.3", "zone": "eu"})
    assert not exempt({}, {"version": "1.4.3"})  # no gate exempts nobody


def test_release_gated_resume_runs_the_new_release_only(
    coordinators: tuple[Coordinator, Coordinator], admin: tether.AdminClient, tenant: str
) -> None:
    first, second = coordinators
    uri = f"agent://{tenant}/email-campaign"
    old = tether.Agent(uri, run_id="old", target=first.addr, release="1.4.2")
    new = tether.Agent(uri, run_id="new", target=second.addr, release="1.4.3")
    with old, new:
        halt, _ = admin.kill(tether.selector(agent=uri), "bad rollout 1.4.2")
        eventually(lambda: old.killed and new.killed)
        resumed = ok(
            tether_cli(
                "resume", "--agent", uri, "--require-label", "version=1.4.3",
                "--reason", "1.4.3 fixes the template", addr=first.addr,
            )
        )  # fmt: skip
        assert "only for version=1.4.3" in resumed
        eventually(lambda: not new.killed)
        new.check()
        time.sleep(0.3)
        with pytest.raises(tether.Killed, match=r"resumed only for version=1\.4\.3"):
            old.check()
    [gated] = admin.halts(tenant=tenant)
    assert gated.id == halt.id and gated.release_gate == {"version": "1.4.3"}
    assert "[resumed only for version=1.4.3]" in ok(tether_cli("halts", addr=first.addr))
    late = tether.Agent(uri, run_id="old", target=second.addr, release="1.4.2")
    with late, pytest.raises(tether.Killed):  # the old release reconnects later, anywhere
        late.check()
    with tether.Agent(uri, run_id="newer", target=first.addr, release="1.4.3") as fixed:
        fixed.check()
    [entry] = [e for e in admin.audit(tenant=tenant) if e.action == "resume"]
    assert entry.require_labels == {"version": "1.4.3"} and entry.changed
    audit = ok(tether_cli("audit", "--tenant", tenant, addr=second.addr))
    assert "1.4.3 fixes the template [only for version=1.4.3]" in audit
    cache = tether.HaltCache(first.addr, max_age=0)  # a permit names no release: not its call
    claims = tether.PermitClaims(
        tenant, "email-campaign", "new", "i", "send_email", "k", 0, 0, 0, "key"
    )
    assert cache(claims) is None
    assert admin.resume(tether.selector(agent=uri)) is not None  # a plain resume lifts it all
    assert admin.halts(tenant=tenant) == []


@pytest.mark.parametrize(
    ("who", "tenant", "allowed"),
    [("carol", "acme", False), ("bob", "acme", True), ("bob", "globex", False)],
)
def test_recording_a_compensation_takes_an_operator_of_the_tenant(
    who: str, tenant: str, allowed: bool
) -> None:
    authorizer = Authorizer(GRANTS, open_=False)
    request = admin_pb2.RecordCompensationRequest(tenant=tenant, agent="a", run_id="r")
    principal = Principal(f"operator:{who}", Kind.OPERATOR, operator=who)
    if allowed:
        authorizer.check(principal, "RecordCompensation", request)
    else:
        with pytest.raises(PermissionDenied, match="may not record a compensation"):
            authorizer.check(principal, "RecordCompensation", request)
