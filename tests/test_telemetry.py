"""OpenTelemetry from the standard OTEL_* variables, read off a real coordinator's console
exporters: SERVER spans by the RPC conventions, trace context from clients, metrics with
units, audit entries as log records."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tether
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from tests.conftest import Coordinator, Etcd, eventually
from tests.test_failure import agent_process

TENANT = "t-telemetry"
CLI_TRACE, CLI_PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
SHELL_TRACE, SHELL_PARENT = "5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8"
SDK_TRACE, SDK_PARENT = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
FAILED_PRECONDITION = 9

OTEL = {
    "OTEL_TRACES_EXPORTER": "console",
    "OTEL_METRICS_EXPORTER": "console",
    "OTEL_LOGS_EXPORTER": "console",
    "OTEL_METRIC_EXPORT_INTERVAL": "300",
    "OTEL_BSP_SCHEDULE_DELAY": "100",
    "OTEL_BLRP_SCHEDULE_DELAY": "100",
    "OTEL_SERVICE_NAME": "tether-under-test",
}


def json_objects(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects the console exporters printed, among the coordinator's log lines."""
    decoder, at = json.JSONDecoder(), 0
    while (at := text.find("\n{", at)) >= 0:
        try:
            found, end = decoder.raw_decode(text, at + 1)
        except json.JSONDecodeError:
            at += 2
            continue
        if isinstance(found, dict):
            yield found
        at = end


@dataclass
class Exported:
    spans: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""

    @classmethod
    def read(cls, log: Path) -> Exported:
        out = cls(text=log.read_text())
        for obj in json_objects(out.text):
            if "span_id" in obj.get("context", {}):
                out.spans.append(obj)
            elif "resource_metrics" in obj:
                out.metrics.update(_metrics(obj))
            elif "body" in obj:
                out.logs.append(obj)
        return out

    def span(self, name: str, **attributes: Any) -> dict[str, Any]:
        found = [
            s
            for s in self.spans
            if s["name"] == name and attributes.items() <= s["attributes"].items()
        ]
        assert found, f"no span {name} with {attributes} among {[s['name'] for s in self.spans]}"
        return found[-1]


def _metrics(batch: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for resource in batch["resource_metrics"]:
        for scope in resource["scope_metrics"]:
            for metric in scope["metrics"]:
                yield metric["name"], metric


def _sum(metric: dict[str, Any]) -> float:
    return float(sum(point["value"] for point in metric["data"]["data_points"]))


@pytest.fixture(scope="module")
def exported(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    """One coordinator with every console exporter on, through a refused kill (with the
    CLI's TRACEPARENT), a kill under an active span (the SDK's path), and a SIGKILLed agent."""
    etcd.wipe()
    coordinator = Coordinator(etcd).start(tmp_path_factory.mktemp("otel"), env=OTEL)
    try:
        _scenario(coordinator)
        assert coordinator.log is not None
        log = coordinator.log

        def complete() -> Exported:
            found = Exported.read(log)
            assert "tether.stale_declared" in found.metrics and found.logs
            names = {s["name"] for s in found.spans}
            assert {"Kill", "WatchAgents", "ListHalts"} <= {n.rsplit("/")[-1] for n in names}
            return found

        yield eventually(complete)
    finally:
        coordinator.stop()


def _scenario(coordinator: Coordinator) -> None:
    env = {"TRACEPARENT": f"00-{CLI_TRACE}-{CLI_PARENT}-01"}
    with (
        tether.AdminClient(coordinator.addr, environ=env) as cli,
        pytest.raises(tether.TetherError, match="ever registered"),
    ):
        cli.kill(tether.selector(agent=f"agent://{TENANT}/nobody"), "typo")  # refused
    shell = {"TRACEPARENT": f"00-{SHELL_TRACE}-{SHELL_PARENT}-01", "TETHER_ADDR": coordinator.addr}
    argv = [sys.executable, "-m", "tether._cli", "halts"]
    subprocess.run(argv, env={**os.environ, **shell}, check=True, capture_output=True, timeout=60)
    with (
        agent_process(f"agent://{TENANT}/w", "r-otel", coordinator.addr),
        agent_process(f"agent://{TENANT}/s", "r-stale", coordinator.addr) as doomed,
    ):
        parent = SpanContext(SDK_TRACE, SDK_PARENT, is_remote=False, trace_flags=TraceFlags(1))
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
        try:
            with tether.AdminClient(coordinator.addr, environ={}) as admin:
                admin.kill(tether.selector(agent=f"agent://{TENANT}/w"), "telemetry")
            with tether.AdminClient(coordinator.addr, environ={}) as admin:
                events = admin.watch(tenant=TENANT)
                assert next(events).snapshot  # a streaming call, then cancelled
                # leaving the client closes its channel, which cancels the call
            asyncio.run(_an_async_agent(coordinator.addr))  # its stream joins the trace too
        finally:
            otel_context.detach(token)
        doomed.send_signal(signal.SIGKILL)  # no goodbye: the coordinator declares it STALE
        doomed.wait()
        time.sleep(1.0)  # a metric export or three


async def _an_async_agent(addr: str) -> None:
    async with tether.AsyncAgent(f"agent://{TENANT}/traced", target=addr):
        pass


def test_a_refused_kill_is_a_server_span_with_its_real_status(exported: Exported) -> None:
    span = exported.span("tether.v1.AdminService/Kill", **{"rpc.grpc.status_code": 9})
    assert span["kind"] == "SpanKind.SERVER"
    assert span["attributes"] == {
        "rpc.system": "grpc",
        "rpc.service": "tether.v1.AdminService",
        "rpc.method": "Kill",
        "rpc.grpc.status_code": FAILED_PRECONDITION,
    }
    assert span["status"]["status_code"] == "UNSET"  # a refusal is the server working
    assert not span["events"]  # no "AbortError: Locally aborted." recorded as an exception
    assert span["resource"]["attributes"]["service.name"] == "tether-under-test"


def test_traceparent_from_the_cli_environment_makes_the_server_span_a_child(
    exported: Exported,
) -> None:
    span = exported.span("tether.v1.AdminService/Kill", **{"rpc.grpc.status_code": 9})
    assert span["context"]["trace_id"] == f"0x{CLI_TRACE}"
    assert span["parent_id"] == f"0x{CLI_PARENT}"


def test_traceparent_in_the_tether_cli_environment_reaches_the_server(exported: Exported) -> None:
    span = exported.span("tether.v1.AdminService/ListHalts")
    assert span["context"]["trace_id"] == f"0x{SHELL_TRACE}"
    assert span["parent_id"] == f"0x{SHELL_PARENT}"


def test_an_active_span_in_the_client_process_makes_the_server_span_a_child(
    exported: Exported,
) -> None:
    span = exported.span("tether.v1.AdminService/Kill", **{"rpc.grpc.status_code": 0})
    assert span["context"]["trace_id"] == f"0x{SDK_TRACE:032x}"
    assert span["parent_id"] == f"0x{SDK_PARENT:016x}"


def test_an_sdk_agent_under_a_span_opens_its_stream_as_a_child(exported: Exported) -> None:
    children = [
        s
        for s in exported.spans
        if s["name"] == "tether.v1.AgentService/Multiplex"  # the SDK's stream
        and s["parent_id"] == f"0x{SDK_PARENT:016x}"
    ]
    assert len(children) == 1
    assert children[0]["attributes"]["rpc.grpc.status_code"] == 0  # it said goodbye


def test_the_agent_stream_is_a_server_span_too(exported: Exported) -> None:
    # The stream of an agent process SIGKILLed under no trace. (On Heartbeat its status was
    # CANCELLED; the coordinator's Multiplex ends a vanished client's stream with OK.)
    (span, *_) = [
        s
        for s in exported.spans
        if s["name"] == "tether.v1.AgentService/Multiplex" and s["parent_id"] is None
    ]
    assert span["kind"] == "SpanKind.SERVER"
    assert span["attributes"]["rpc.service"] == "tether.v1.AgentService"


def test_a_cancelled_watch_is_a_server_span_that_ends_cleanly(exported: Exported) -> None:
    span = exported.span("tether.v1.AdminService/WatchAgents")
    assert span["kind"] == "SpanKind.SERVER"
    assert span["attributes"]["rpc.grpc.status_code"] in (0, 1)  # OK or CANCELLED
    assert span["parent_id"] == f"0x{SDK_PARENT:016x}"
    assert "Failed to detach context" not in exported.text


def test_metrics_carry_units(exported: Exported) -> None:
    units = {name: metric["unit"] for name, metric in exported.metrics.items()}
    assert units == {
        "tether.sessions": "{session}",
        "tether.kill.pushes": "{order}",
        "tether.kill.push.duration": "s",
        "tether.stale_declared": "{instance}",
        "rpc.server.call.duration": "s",
    }
    assert _sum(exported.metrics["tether.kill.pushes"]) == 1


def test_a_sigkilled_agent_counts_as_stale_declared(exported: Exported) -> None:
    assert _sum(exported.metrics["tether.stale_declared"]) >= 1


def test_audit_entries_are_log_records(exported: Exported) -> None:
    audit = [r for r in exported.logs if r.get("event_name") == "tether.audit"]
    (record,) = [r for r in audit if r["attributes"]["tether.audit.action"] == "AUDIT_ACTION_KILL"]
    attributes = record["attributes"]
    assert attributes["tether.audit.reason"] == "telemetry"
    assert attributes["tether.audit.selector.tenant"] == TENANT
    assert attributes["tether.audit.actor"]  # the principal the coordinator authenticated
    assert len(attributes["tether.audit.hash"]) == 64  # the chain's hash, to match the store
    assert record["severity_text"] == "INFO"


def test_nothing_is_exported_by_default(etcd: Etcd, tmp_path: Path, tenant: str) -> None:
    coordinator = Coordinator(etcd).start(tmp_path)
    try:
        with (
            tether.Agent(f"agent://{tenant}/a", target=coordinator.addr),  # counts a session
            tether.AdminClient(coordinator.addr) as admin,  # and makes a span
        ):
            admin.kill(tether.selector(tenant=tenant), "audited")  # and an audit record
    finally:
        coordinator.stop()  # a clean exit flushes whatever exporter had been set up
    assert coordinator.log is not None
    text = coordinator.log.read_text()
    for exported in ('"trace_id"', '"resource_metrics"', "tether.v1.AdminService", "tether.audit"):
        assert exported not in text  # no span, metric batch or log record was written anywhere


def test_the_sdk_does_not_import_opentelemetry() -> None:
    probe = "import sys, tether; assert 'opentelemetry' not in sys.modules, sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True, env={**os.environ})
