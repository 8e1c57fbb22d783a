"""OpenTelemetry traces and metrics, exported over OTLP when the standard ``OTEL_*`` variables say where.

Code that is instrumented asks the OpenTelemetry API for tracers and meters at import time; until
``configure`` installs SDK providers those are no-ops, so tests, notebooks and a laptop pay nothing.
``configure`` exports only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or a per-signal endpoint) is set,
which is how the operator's chart and the Ray pods it creates point at ``platform/otel-collector``;
``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`` picks the HTTP exporters, anything else gRPC.
The rankray identity the operator puts in every stage's environment (``RANKRAY_MODEL``,
``RANKRAY_MODEL_VERSION``, ``RANKRAY_STAGE``) becomes resource attributes, so one model's traces group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)
IDENTITY_VARIABLES = {
    "RANKRAY_MODEL": "rankray.model",
    "RANKRAY_MODEL_VERSION": "rankray.model_version",
    "RANKRAY_STAGE": "rankray.stage",
}
_configured: str | None = None


def export_requested(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in ENDPOINT_VARIABLES)


def resource_attributes(service_name: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """service.name and the rankray identity in the environment (OTEL_RESOURCE_ATTRIBUTES adds more)."""
    environ = os.environ if environ is None else environ
    attributes = {"service.name": environ.get("OTEL_SERVICE_NAME", service_name)}
    attributes |= {key: environ[var] for var, key in IDENTITY_VARIABLES.items() if environ.get(var)}
    return attributes


def _otlp_exporters() -> tuple[SpanExporter, object]:
    if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter(), OTLPMetricExporter()


def configure(
    service_name: str,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> bool:
    """Install SDK providers once per process; True when this process exports telemetry.

    Without explicit exporters (tests pass in-memory ones) it exports over OTLP only when an endpoint
    variable is set, and otherwise leaves the no-op providers in place.
    """
    global _configured
    if _configured is not None:
        return True
    if span_exporter is None or metric_reader is None:
        if not export_requested():
            return False
        otlp_spans, otlp_metrics = _otlp_exporters()
        span_exporter = span_exporter or otlp_spans
        metric_reader = metric_reader or PeriodicExportingMetricReader(otlp_metrics)  # type: ignore[arg-type]
    resource = Resource.create(resource_attributes(service_name))
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[metric_reader]))
    _configured = service_name
    return True


def flush() -> None:
    """Export what is buffered now (a stage's process is about to print its summary and exit)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush()
    meter_provider = metrics.get_meter_provider()
    if isinstance(meter_provider, MeterProvider):
        meter_provider.force_flush()
