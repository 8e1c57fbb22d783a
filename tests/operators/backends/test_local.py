"""The local backend against a real Ray head (dashboard, Job Submission API, Serve REST API).

The reconciler drives it exactly as `rankray run` does: observe, reconcile, apply. Jobs are real stage
workloads on the tiny world (a preprocess that succeeds, one that fails on a missing log); serving deploys
the real ranking graph's serve config.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from ray.job_submission import JobSubmissionClient

from operators.api.v1alpha1 import ObjectMeta, Phase, RankingModel, RankingModelStatus
from operators.backends.local import (
    ChildConflictError,
    JobRecord,
    LocalBackend,
    LocalStorage,
    StateFile,
    StorageError,
    failure_message,
)
from operators.embedded_ray import EmbeddedRay, free_port
from operators.pipeline import Stage, job_name, new_version
from operators.reconcile import JobState, Observed, Plan, ServingApp, StageJob, reconcile
from operators.validate import admit

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRay]:
    """A Ray head with its dashboard (job submission and Serve REST need it; `ray.init` has none)."""
    data = tmp_path_factory.mktemp("local-backend-data")
    cluster = EmbeddedRay.start(
        num_cpus=4, object_store_bytes=512 * 1024**2, cwd=ROOT, env={"RANKRAY_DATA_DIR": str(data)}
    )
    yield cluster
    cluster.stop()


def manifest_for(world: Path, artifacts: Path, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "rankray.io/v1alpha1",
        "kind": "RankingModel",
        "metadata": {"name": name},
        "spec": {
            "featureRepo": {"path": str(ROOT / "feature_repo")},
            "data": {"source": str(world)},
            "model": {"kind": "ligr", "size": "tiny", "historyLength": 16},
            "training": {"workers": 1, "epochs": 1},
            "evaluation": {"minLift": -1.0, "against": "baseline"},
            "serving": {"replicas": 1, "setwiseTopK": 4, "candidatesLimit": 200},
            "artifactRoot": str(artifacts),
        },
    }


def as_model(manifest: dict[str, Any], status: RankingModelStatus, generation: int = 1) -> RankingModel:
    body = copy.deepcopy(manifest)
    body["metadata"]["generation"] = generation
    model = admit(body)
    assert isinstance(model, RankingModel), model
    return RankingModel(
        metadata=ObjectMeta(name=model.metadata.name, generation=generation), spec=model.spec, status=status
    )


def backend_for(head: EmbeddedRay, state: Path) -> LocalBackend:
    return LocalBackend(head.dashboard_url, StateFile(state), LocalStorage(), serve_port=free_port())


async def reconcile_until(
    backend: LocalBackend,
    manifest: dict[str, Any],
    done: Callable[[Observed], bool],
    timeout: float = 300.0,
) -> Observed:
    """Run the operator's loop (observe, reconcile, apply) until `done` holds for an observation."""
    deadline = time.monotonic() + timeout
    while True:
        model = as_model(manifest, backend.state.status)
        observed = await backend.observe(model)
        if done(observed):
            return observed
        assert time.monotonic() < deadline, f"not done after {timeout} s: {observed}"
        await backend.apply(model, reconcile(model, observed))
        await asyncio.sleep(1.0)


def finished(name: str) -> Callable[[Observed], bool]:
    return lambda observed: name in observed.jobs and observed.jobs[name].state.finished


@dataclass
class Preprocessed:
    manifest: dict[str, Any]
    state: Path
    job: str
    observed: Observed


@pytest.fixture(scope="module")
def preprocessed(
    head: EmbeddedRay, tiny_world: Path, tmp_path_factory: pytest.TempPathFactory
) -> Preprocessed:
    """The reconciler's first stage, run for real: the preprocess job on the tiny world."""
    root = tmp_path_factory.mktemp("preprocessed")
    manifest = manifest_for(tiny_world, root / "artifacts", "tiny-feed")
    backend = backend_for(head, root / "state.json")
    job = job_name("tiny-feed", 1, Stage.PREPROCESS)

    async def run() -> Observed:
        try:
            return await reconcile_until(backend, manifest, finished(job))
        finally:
            await backend.close()

    return Preprocessed(manifest, root / "state.json", job, asyncio.run(run()))


def test_a_stage_job_runs_through_job_submission_and_reports_its_summary(
    head: EmbeddedRay, preprocessed: Preprocessed
) -> None:
    seen = preprocessed.observed.jobs[preprocessed.job]
    assert seen.state is JobState.SUCCEEDED, seen
    assert seen.summary is not None and seen.summary_error == ""
    examples = Path(preprocessed.manifest["spec"]["artifactRoot"]) / "tiny-feed" / "work" / "v1" / "examples"
    assert seen.summary["out_dir"] == str(examples), "the summary is the workload's last stdout line"
    train_rows = seen.summary["splits"]["train"]["rows"]
    assert train_rows > 0 and pq.read_table(examples / "train").num_rows == train_rows
    client = JobSubmissionClient(head.dashboard_url)
    details = client.get_job_info(preprocessed.job)
    assert details.entrypoint.startswith("python -m workloads.data.preprocess --config-json ")
    assert details.driver_info is not None, "the stage joined this cluster instead of starting its own"
    assert (details.runtime_env or {}).get("env_vars") == {
        "RANKRAY_MODEL": "tiny-feed",
        "RANKRAY_MODEL_VERSION": "v1",
        "RANKRAY_STAGE": "preprocess",
    }
    state = StateFile.load(preprocessed.state)
    assert state is not None and state.status.phase is Phase.PREPROCESSING, "apply recorded the status"
    record = state.jobs[preprocessed.job]
    assert record.state is JobState.SUCCEEDED and record.started_at and record.ended_at


def test_a_restarted_backend_finds_the_job_by_name_and_does_not_submit_it_again(
    head: EmbeddedRay, preprocessed: Preprocessed, tmp_path: Path
) -> None:
    client = JobSubmissionClient(head.dashboard_url)
    first = client.get_job_info(preprocessed.job)
    fresh = backend_for(head, tmp_path / "lost-state.json")  # the state file is gone, the cluster is not
    model = as_model(preprocessed.manifest, RankingModelStatus())

    async def restart() -> tuple[Observed, Plan]:
        try:
            observed = await fresh.observe(model)
            plan = reconcile(model, observed)
            job = StageJob(
                preprocessed.job, Stage.PREPROCESS, new_version(model.spec, "tiny-feed", 1), None, False
            )
            # a create that finds its job already submitted (the status write was lost) is not an error
            await fresh.apply(model, Plan(status=plan.status, create=(job,)))
            return observed, plan
        finally:
            await fresh.close()

    observed, plan = asyncio.run(restart())
    assert observed.jobs[preprocessed.job].state is JobState.SUCCEEDED
    assert observed.jobs[preprocessed.job].summary == preprocessed.observed.jobs[preprocessed.job].summary
    assert [child.name for child in plan.create] == [job_name("tiny-feed", 1, Stage.TRAIN)]
    same = [j for j in client.list_jobs() if j.submission_id == preprocessed.job]
    assert len(same) == 1 and same[0].start_time == first.start_time


def test_finished_jobs_outlive_their_cluster_and_unfinished_ones_are_submitted_again(
    head: EmbeddedRay, preprocessed: Preprocessed, tmp_path: Path
) -> None:
    """A state file from a cluster that is gone: the finished stage counts, the running one reruns."""
    saved = StateFile.load(preprocessed.state)
    assert saved is not None
    gone = {
        name: JobRecord(name=name, stage=stage, version="v1", state=state)
        for name, stage, state in [
            ("old-v1-preprocess", Stage.PREPROCESS, JobState.SUCCEEDED),
            ("old-v1-train", Stage.TRAIN, JobState.RUNNING),
        ]
    }
    state = StateFile(tmp_path / "state.json", saved.model_copy(update={"jobs": gone}))
    backend = LocalBackend(head.dashboard_url, state, LocalStorage(), serve_port=free_port())
    manifest = copy.deepcopy(preprocessed.manifest)
    manifest["metadata"]["name"] = "old"

    async def observe() -> Observed:
        try:
            return await backend.observe(as_model(manifest, RankingModelStatus()))
        finally:
            await backend.close()

    observed = asyncio.run(observe())
    assert observed.jobs["old-v1-preprocess"].state is JobState.SUCCEEDED
    assert "old-v1-train" not in observed.jobs, "a job its cluster lost is absent, so it is submitted again"
    saved_again = StateFile.load(tmp_path / "state.json")
    assert saved_again is not None and set(saved_again.jobs) == {"old-v1-preprocess"}


def test_a_failing_stage_surfaces_as_failed_with_its_message(head: EmbeddedRay, tmp_path: Path) -> None:
    empty_world = tmp_path / "world"
    empty_world.mkdir()
    manifest = manifest_for(empty_world, tmp_path / "artifacts", "broken-feed")
    backend = backend_for(head, tmp_path / "state.json")
    job = job_name("broken-feed", 1, Stage.PREPROCESS)

    async def run() -> tuple[Observed, Plan]:
        try:
            observed = await reconcile_until(backend, manifest, finished(job))
            model = as_model(manifest, backend.state.status)
            return observed, reconcile(model, observed)
        finally:
            await backend.close()

    observed, plan = asyncio.run(run())
    failed = observed.jobs[job]
    assert failed.state is JobState.FAILED and failed.reason == "JOB_ENTRYPOINT_COMMAND_ERROR"
    assert "impressions.parquet" in failed.message, failed.message
    assert len(failed.message) <= 1003, "a condition quotes the end of the log, not all of it"
    assert plan.status.phase is Phase.FAILED
    condition = next(c for c in plan.status.conditions if c.type == "Failed")
    assert condition.reason == "PreprocessFailed" and "impressions.parquet" in condition.message


def test_failure_messages_keep_the_headline_and_the_error_from_the_log() -> None:
    headline = (
        "Job entrypoint command failed with exit code {}, last available logs (truncated to 20,000 chars):\n"
    )
    noise = "".join(f"noise {i}\n" for i in range(500))
    traceback = (
        'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: column member_id is missing\n'
    )
    assert failure_message(headline.format(1) + noise + traceback) == (
        "Job entrypoint command failed with exit code 1: ValueError: column member_id is missing"
    )
    pydantic = (
        "invalid EvalConfig:\n2 validation errors for EvalConfig\n"
        "artifacts\n  Field required [type=missing]\n"
        "    For further information visit https://errors.pydantic.dev/2/v/missing\n"
        "kind\n  Extra inputs are not permitted [type=extra_forbidden]\n"
    )
    assert failure_message(headline.format(2) + noise + pydantic) == (
        "Job entrypoint command failed with exit code 2: 2 validation errors for EvalConfig | artifacts | "
        "Field required [type=missing] | kind | Extra inputs are not permitted [type=extra_forbidden]"
    )
    assert len(failure_message(headline.format(1) + "Error: " + "x" * 5000)) <= 1003


def test_storage_uris_resolve_through_mounts_and_unmounted_claims_are_refused(tmp_path: Path) -> None:
    storage = LocalStorage(
        {"pvc://rankray-data": tmp_path / "data", "pvc://rankray-data/world": tmp_path / "w"}
    )
    assert storage.resolve("pvc://rankray-data/models/x") == str(tmp_path / "data" / "models" / "x")
    assert storage.resolve("pvc://rankray-data/world") == str(tmp_path / "w"), "the longest prefix wins"
    assert storage.resolve(f"file://{tmp_path}/a") == f"{tmp_path}/a"
    assert storage.resolve("/abs/path") == "/abs/path"
    with pytest.raises(StorageError, match="--mount pvc://other=DIR"):
        storage.resolve("pvc://other/x")


def test_serving_reports_a_failed_deploy_with_the_reason(head: EmbeddedRay, tmp_path: Path) -> None:
    """The real ranking graph, pointed at an artifact that does not exist, fails to deploy: DEPLOY_FAILED."""
    pytest.importorskip("workloads.serve.graph")
    manifest = manifest_for(tmp_path / "world", tmp_path / "artifacts", "unserved")
    backend = backend_for(head, tmp_path / "state.json")
    model = as_model(manifest, RankingModelStatus())
    app = ServingApp("unserved", new_version(model.spec, "unserved", 1), model.spec.serving)

    async def deploy() -> Observed:
        try:
            await backend.apply(model, Plan(status=model.status, create=(app,)))
            deadline = time.monotonic() + 240
            while True:
                observed = await backend.observe(model)
                assert observed.service is not None
                if observed.service.failed or observed.service.ready or time.monotonic() > deadline:
                    return observed
                await asyncio.sleep(2.0)
        finally:
            await backend.close()

    service = asyncio.run(deploy()).service
    assert service is not None and service.failed and not service.ready, service
    assert service.digest == app.digest, "the deployed config is recognised as the one applied"
    assert "artifact_uri" in service.message, service.message

    other = backend_for(head, tmp_path / "other.json")
    intruder = as_model(
        manifest_for(tmp_path / "world", tmp_path / "artifacts", "someone-else"), RankingModelStatus()
    )

    async def observe_as_another_model() -> None:
        try:
            await other.observe(intruder)
        finally:
            await other.close()

    with pytest.raises(ChildConflictError, match="serves unserved"):
        asyncio.run(observe_as_another_model())

    async def delete() -> tuple[Plan, Observed]:
        again = backend_for(head, tmp_path / "state.json")  # the state the deploy recorded
        try:
            deleting = as_model(manifest, again.state.status)
            deleting.metadata.deletion_timestamp = "2026-01-01T00:00:00Z"
            plan = reconcile(deleting, await again.observe(deleting))
            await again.apply(deleting, plan)
            deadline = time.monotonic() + 60
            while (observed := await again.observe(deleting)).service is not None:
                assert time.monotonic() < deadline, observed
                await asyncio.sleep(1.0)
            return plan, observed
        finally:
            await again.close()

    plan, gone = asyncio.run(delete())
    assert [(ref.kind, ref.name) for ref in plan.delete] == [("RayService", "unserved")]
    assert gone.service is None and gone.child_count == 0, "deletion removed the Serve application"
