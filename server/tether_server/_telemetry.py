"""OpenTelemetry set-up from the standard ``OTEL_*`` variables. Nothing is exported by default.

``OTEL_TRACES_EXPORTER`` and ``OTEL_METRICS_EXPORTER`` take ``console`` or ``otlp``
(the latter needs ``opentelemetry-exporter-otlp``); ``none`` or unset exports nothing.
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SDK_DISABLED`` work as usual.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

_OTLP = {
    "traces": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "OTLPSpanExporter"),
    "metrics": ("opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "OTLPMetricExporter"),
}


class TelemetryError(ValueError):
    """An ``OTEL_*`` variable asks for something that cannot be set up."""


def _exporter(kind: str, environ: Mapping[str, str]) -> Any | None:
    name = environ.get(f"OTEL_{kind.upper()}_EXPORTER", "none").strip().lower()
    if name in ("", "none"):
        return None
    if name == "console":
        return ConsoleSpanExporter() if kind == "traces" else ConsoleMetricExporter()
    if name == "otlp":
        module, cls = _OTLP[kind]
        try:
            return getattr(importlib.import_module(module), cls)()
        except ImportError:
            raise TelemetryError(
                f"OTEL_{kind.upper()}_EXPORTER=otlp needs: pip install opentelemetry-exporter-otlp"
            ) from None
    raise TelemetryError(f"OTEL_{kind.upper()}_EXPORTER={name!r}: use console, otlp or none")


def configure(environ: Mapping[str, str]) -> None:
    """Install tracer and meter providers as the ``OTEL_*`` variables ask."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "tether")})
    if (spans := _exporter("traces", environ)) is not None:
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(spans))
        trace.set_tracer_provider(provider)
    if (exporter := _exporter("metrics", environ)) is not None:
        reader = PeriodicExportingMetricReader(exporter)
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))


class Metrics:
    """The coordinator's instruments. With no provider configured they cost a no-op call."""

    def __init__(self) -> None:
        meter = metrics.get_meter("tether_server")
        self.sessions = meter.create_up_down_counter(
            "tether.sessions", description="Agent instances with an open heartbeat stream"
        )
        self.kills_pushed = meter.create_counter(
            "tether.kills_pushed", description="Kill orders pushed onto open streams"
        )
        self.kill_push_latency = meter.create_histogram(
            "tether.kill_push_latency",
            unit="ms",
            description="From the halt's watch event to the order written on the stream",
        )
        self.stale_declared = meter.create_counter(
            "tether.stale_declared", description="Instances declared STALE by this coordinator"
        )


tracer = trace.get_tracer("tether_server")
