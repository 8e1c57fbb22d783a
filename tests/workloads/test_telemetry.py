"""OpenTelemetry export: nothing without an endpoint, real OTLP/gRPC with one (a receiver on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from workloads.telemetry import export_requested, resource_attributes

ROOT = Path(__file__).resolve().parents[2]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """The two OTLP services a collector offers on 4317, keeping every request."""

    def __init__(self) -> None:
        self.traces: list[Any] = []
        self.metrics: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.traces.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[str, Receiver]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", receiver
    server.stop(grace=None)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RANKRAY_"))}
    return {**env, **extra}


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: kv.value.string_value or kv.value.int_value for kv in pairs}


def test_only_an_endpoint_variable_turns_export_on() -> None:
    assert not export_requested({})
    assert not export_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    assert export_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})
    script = (
        "from workloads import telemetry; raise SystemExit(0 if telemetry.configure('x') is False else 1)"
    )
    subprocess.run([sys.executable, "-c", script], env=_clean_env(), cwd=ROOT, check=True)


def test_resource_attributes_carry_the_identity_the_operator_passes() -> None:
    environ = {"RANKRAY_MODEL": "feed", "RANKRAY_MODEL_VERSION": "v3", "RANKRAY_STAGE": "train"}
    assert resource_attributes("rankray-stage", environ) == {
        "service.name": "rankray-stage",
        "rankray.model": "feed",
        "rankray.model_version": "v3",
        "rankray.stage": "train",
    }
    assert resource_attributes("rankray-stage", {"OTEL_SERVICE_NAME": "mine"})["service.name"] == "mine"


def test_a_stage_sends_its_span_and_duration_to_the_collector(
    collector: tuple[str, Receiver], tmp_path: Path
) -> None:
    endpoint, receiver = collector
    env = _clean_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        RANKRAY_MODEL="feed",
        RANKRAY_MODEL_VERSION="v7",
        RANKRAY_STAGE="preprocess",
    )
    argv = ["-m", "workloads.data.synth", "--set", "members=20", "--set", f"out={tmp_path / 'world'}"]
    done = subprocess.run(
        [sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    spans = [
        (_attributes(resource.resource.attributes), span)
        for request in receiver.traces
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert [span.name for _, span in spans] == ["stage SynthStageConfig"]
    resource, span = spans[0]
    assert resource["service.name"] == "rankray-stage"
    assert (resource["rankray.model"], resource["rankray.model_version"]) == ("feed", "v7")
    assert span.end_time_unix_nano > span.start_time_unix_nano
    durations = [
        point
        for request in receiver.metrics
        for resource_metrics in request.resource_metrics
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
        if metric.name == "rankray.stage.duration"
        for point in metric.histogram.data_points
    ]
    assert durations and durations[-1].count == 1
    assert _attributes(durations[-1].attributes) == {"rankray.config": "SynthStageConfig", "outcome": "ok"}
