"""OpenTelemetry set-up from the standard ``OTEL_*`` variables. Nothing is exported by default.

``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER`` and ``OTEL_LOGS_EXPORTER`` take
``console`` or ``otlp`` (the latter needs ``opentelemetry-exporter-otlp``); ``none`` or unset
exports nothing. ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SDK_DISABLED``,
``OTEL_METRIC_EXPORT_INTERVAL`` and ``OTEL_PROPAGATORS`` work as usual.

Spans follow the RPC semantic conventions (v1.37, what ``opentelemetry-instrumentation-grpc``
emits): one SERVER span per call, named ``tether.v1.AdminService/Kill``, with ``rpc.system``,
``rpc.service``, ``rpc.method`` and ``rpc.grpc.status_code``, a child of the caller's W3C
``traceparent``. Audit entries also go out as log records, for a SIEM.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry import _logs, metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, ConsoleLogRecordExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from tether.v1 import admin_pb2

T = TypeVar("T")

_OTLP = "opentelemetry.exporter.otlp.proto.grpc."
_EXPORTERS: dict[str, tuple[type[Any], str, str]] = {
    "traces": (ConsoleSpanExporter, _OTLP + "trace_exporter", "OTLPSpanExporter"),
    "metrics": (ConsoleMetricExporter, _OTLP + "metric_exporter", "OTLPMetricExporter"),
    "logs": (ConsoleLogRecordExporter, _OTLP + "_log_exporter", "OTLPLogExporter"),
}

# Seconds, for latencies from a millisecond to ten seconds (the SDK's defaults suit ms).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Server-side, only these codes make a span an error (RPC conventions, "gRPC status").
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class TelemetryError(ValueError):
    """An ``OTEL_*`` variable asks for something that cannot be set up."""


def _exporter(kind: str, environ: Mapping[str, str]) -> Any | None:
    var = f"OTEL_{kind.upper()}_EXPORTER"
    name = environ.get(var, "none").strip().lower()
    console, module, cls = _EXPORTERS[kind]
    if name in ("", "none"):
        return None
    if name == "console":
        return console()
    if name == "otlp":
        try:
            return getattr(importlib.import_module(module), cls)()
        except ImportError:
            raise TelemetryError(
                f"{var}=otlp needs: pip install opentelemetry-exporter-otlp"
            ) from None
    raise TelemetryError(f"{var}={name!r}: use console, otlp or none")


def configure(environ: Mapping[str, str], instance: str = "") -> None:
    """Install tracer, meter and logger providers as the ``OTEL_*`` variables ask.

    ``instance``: this process's ``service.instance.id`` (the coordinator id), so that the
    workers of one ``tether serve --workers N`` export series of their own.
    """
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    attributes = {"service.name": environ.get("OTEL_SERVICE_NAME", "tether")}
    if instance:
        attributes["service.instance.id"] = instance
    resource = Resource.create(attributes)
    if (spans := _exporter("traces", environ)) is not None:
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(spans))
        trace.set_tracer_provider(provider)
    if (exporter := _exporter("metrics", environ)) is not None:
        reader = PeriodicExportingMetricReader(exporter)  # OTEL_METRIC_EXPORT_INTERVAL, ms
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    if (records := _exporter("logs", environ)) is not None:
        logs = LoggerProvider(resource=resource)
        logs.add_log_record_processor(BatchLogRecordProcessor(records))
        _logs.set_logger_provider(logs)


class Metrics:
    """The coordinator's instruments. With no provider configured they cost a no-op call."""

    def __init__(self) -> None:
        meter = metrics.get_meter("tether_server")
        self.sessions = meter.create_up_down_counter(
            "tether.sessions",
            unit="{session}",
            description="Agent instances with an open heartbeat stream on this coordinator",
        )
        self.kills_pushed = meter.create_counter(
            "tether.kill.pushes", unit="{order}", description="Kill orders pushed onto streams"
        )
        self.kill_push_duration = meter.create_histogram(
            "tether.kill.push.duration",
            unit="s",
            description="From the halt's watch event to the order written on the stream",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.stale_declared = meter.create_counter(
            "tether.stale_declared",
            unit="{instance}",
            description="Instances declared STALE by this coordinator (stream lost, no goodbye)",
        )


tracer = trace.get_tracer("tether_server")
_calls = metrics.get_meter("tether_server").create_histogram(
    "rpc.server.call.duration",
    unit="s",
    description="Duration of each AdminService and AgentService call, by method and status",
    explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
)


class _MetadataGetter(Getter[Sequence[Any]]):
    """Reads W3C trace context out of gRPC invocation metadata (key, value pairs)."""

    def get(self, carrier: Sequence[Any], key: str) -> list[str] | None:
        return [str(value) for name, value in carrier if name == key] or None

    def keys(self, carrier: Sequence[Any]) -> list[str]:
        return [str(name) for name, _ in carrier]


_GETTER = _MetadataGetter()


@functools.cache  # one entry a method of the coordinator's services
def _naming(method: str) -> tuple[str, Mapping[str, str]]:
    """A call's span name and metric labels, from ``method``."""
    service, _, name = method.lstrip("/").partition("/")
    return f"{service}/{name}", {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _parent(context: grpc.aio.ServicerContext[Any, Any]) -> Context:
    """The caller's trace context, from its ``traceparent`` metadata."""
    carrier: Sequence[Any] = tuple(context.invocation_metadata() or ())
    return propagate.extract(carrier, getter=_GETTER)


@contextlib.contextmanager
def server_span(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[Span]:
    """A SERVER span around one call of ``method`` (``/tether.v1.Service/Method``), not
    made current: see :func:`current` and :func:`replies_within`.

    Its parent is the caller's ``traceparent``; its status code is the one the call ends
    with, read from ``context`` (so a refusal records its code, not the abort's exception).
    """
    # What this frame keeps is held for as long as a stream is open: the span, its start
    # and the method's labels (shared); not the metadata or the parent's context.
    span_name, labels = _naming(method)
    started = time.monotonic()
    span = tracer.start_span(
        span_name, context=_parent(context), kind=SpanKind.SERVER, attributes=labels
    )
    failure: BaseException | None = None
    try:
        yield span
    except BaseException as err:
        failure = err
        raise
    finally:
        code = _code(context, failure)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code.name))
            if failure is not None and not isinstance(failure, grpc.aio.AbortError):
                span.record_exception(failure)
        span.end()
        _calls.record(time.monotonic() - started, {**labels, "rpc.grpc.status_code": code.value[0]})


def current(span: Span) -> contextlib.AbstractContextManager[Span]:
    """``span`` as the current span, for code that does not yield meanwhile."""
    return trace.use_span(span, record_exception=False, set_status_on_exception=False)


async def replies_within(span: Span, replies: AsyncIterator[T]) -> AsyncIterator[T]:
    """``replies``, each made with ``span`` current but never across a ``yield``: a
    streaming call may be closed from another context, where the span cannot be detached."""
    it = aiter(replies)
    while True:
        with current(span):
            try:
                reply = await anext(it)
            except StopAsyncIteration:
                return
        yield reply


def _code(context: grpc.aio.ServicerContext[Any, Any], failure: BaseException | None) -> Any:
    """The status the call ends with: set by abort or set_code, else by how it ended."""
    if (code := context.code()) is not None:
        return code if isinstance(code, grpc.StatusCode) else _by_value(int(code))
    if context.cancelled() or isinstance(failure, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if failure is None or isinstance(failure, GeneratorExit):
        return grpc.StatusCode.OK
    return grpc.StatusCode.UNKNOWN  # what grpc answers for an exception a handler let out


def _by_value(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)


_audit = _logs.get_logger("tether_server.audit")


def emit_audit(entry: admin_pb2.AuditEntry) -> None:
    """Send one committed audit entry as a log record (``OTEL_LOGS_EXPORTER``)."""
    fields = MessageToDict(entry, preserving_proto_field_name=True)
    selector = fields.pop("selector", {})
    attributes = {f"tether.audit.{k}": _scalar(v) for k, v in fields.items()}
    attributes.update({f"tether.audit.selector.{k}": _scalar(v) for k, v in selector.items()})
    _audit.emit(
        timestamp=entry.at.ToNanoseconds(),
        severity_number=_logs.SeverityNumber.INFO,
        severity_text="INFO",
        body=f"{fields.get('action', '')} by {entry.actor}: {entry.reason}",
        attributes=attributes,
        event_name="tether.audit",
    )


def _scalar(value: Any) -> Any:
    """An attribute value: strings, numbers and bools as they are, the rest as text."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return str(value)
