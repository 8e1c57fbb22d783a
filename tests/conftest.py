"""Shared fixtures: one Ray session and one tiny world for the whole test run (CI has 2 cores)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Data's V2 parquet reader provisions dozens of footer-reader actors on every read (~5-8 s each time
# Ray Train starts an epoch here); the V1 reader reads the tests' few-thousand-row folders in under a
# second. Subprocesses (`rankray run`, job drivers) inherit it. Demo and production keep Ray's default.
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")

TINY_MEMBERS = 150


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray cluster shared by every test that needs one; started lazily, stopped at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a fresh cluster, never one some other process started on this host
            num_cpus=4,  # logical CPUs: Serve's proxy + ingress + replicas need slots on a 2-core box
            object_store_memory=512 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
            # Ray Data's shuffle tasks run in their own runtime env; with the default pool (one idle
            # worker per CPU) each repartition restarted worker processes (~15 s per run here).
            _system_config={"num_workers_soft_limit": 8},
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred members' world, generated once per test run (deterministic seed)."""
    from workloads.data.synth import WorldConfig, generate

    out = tmp_path_factory.mktemp("world")
    generate(WorldConfig(members=TINY_MEMBERS, seed=7), out)
    return out


@pytest.fixture(scope="session")
def tiny_examples(tiny_world: Path, ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world's training examples (workloads.data.preprocess, histories up to 32), built once."""
    from workloads.data.preprocess import PreprocessConfig, run

    out = tmp_path_factory.mktemp("tiny_examples") / "examples"
    run(PreprocessConfig(world_dir=tiny_world, out_dir=out, max_history=32, num_partitions=2))
    return out


class Telemetry:
    """What this process's instrumented code exported: spans and metric points, held in memory."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter, self.reader = InMemorySpanExporter(), InMemoryMetricReader()

    def spans(self, name: str) -> list[Any]:
        from opentelemetry import trace

        trace.get_tracer_provider().force_flush()  # type: ignore[attr-defined]
        return [span for span in self.exporter.get_finished_spans() if span.name == name]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        return [
            point
            for resource in (data.resource_metrics if data else [])
            for scope in resource.scope_metrics
            for found in scope.metrics
            if found.name == metric
            for point in found.data.data_points
        ]


@pytest.fixture(scope="session")
def telemetry() -> Telemetry:
    """The OpenTelemetry SDK installed once for the whole run, exporting to memory (never over OTLP)."""
    from workloads import telemetry as setup

    held = Telemetry()
    assert setup.configure("rankray-tests", held.exporter, held.reader), "telemetry was configured before"
    return held
