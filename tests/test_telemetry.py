"""OpenTelemetry comes from the standard OTEL_* variables: spans for admin calls, fleet metrics."""

from __future__ import annotations

from pathlib import Path

import tether

from tests.conftest import Coordinator, Etcd, eventually


def test_console_exporters_show_admin_spans_and_kill_metrics(
    etcd: Etcd, tmp_path: Path, tenant: str
) -> None:
    otel = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "console",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "tether-under-test",
    }
    coordinator = Coordinator(etcd).start(tmp_path, env=otel)
    try:
        with tether.Agent(f"agent://{tenant}/a", target=coordinator.addr) as agent:
            with tether.AdminClient(coordinator.addr) as admin:
                admin.kill(tether.selector(tenant=tenant), "telemetry")
            eventually(lambda: agent.killed)
        assert coordinator.log is not None
        log = coordinator.log
        eventually(lambda: '"name": "tether.v1.AdminService/Kill"' in log.read_text())
        eventually(lambda: '"name": "tether.kills_pushed"' in log.read_text())
        text = log.read_text()
        assert '"service.name": "tether-under-test"' in text
        for metric in ("tether.sessions", "tether.kill_push_latency"):
            assert f'"name": "{metric}"' in text
    finally:
        coordinator.stop()


def test_nothing_is_exported_by_default(etcd: Etcd, tmp_path: Path, tenant: str) -> None:
    coordinator = Coordinator(etcd).start(tmp_path)
    try:
        with (
            tether.Agent(f"agent://{tenant}/a", target=coordinator.addr),  # counts a session
            tether.AdminClient(coordinator.addr) as admin,  # and makes a span
        ):
            admin.halts()
    finally:
        coordinator.stop()  # a clean exit flushes whatever exporter had been set up
    assert coordinator.log is not None
    text = coordinator.log.read_text()
    for exported in ('"trace_id"', '"resource_metrics"', "tether.v1.AdminService"):
        assert exported not in text  # no span and no metric batch was written anywhere
