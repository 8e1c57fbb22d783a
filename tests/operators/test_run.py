"""`rankray run`: the manifest checks, the state file's generations, and the whole loop end to end.

The end-to-end test runs the real command twice on the tiny world: the first run is killed once its first
job is submitted (a crash), the second reattaches to the Ray head the first one left and finishes the
pipeline, deploys the ranking graph and ranks a sample request, without starting any job twice.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from ray.job_submission import JobSubmissionClient

from operators.api.v1alpha1 import RankingModel
from operators.backends.local import JobRecord, LocalStorage, StateFile
from operators.embedded_ray import EmbeddedRay
from operators.pipeline import Stage, job_name
from operators.reconcile import JobState
from operators.run import (
    CLUSTER_FILE,
    STATE_FILE,
    ManifestError,
    check_local_paths,
    describe_answer,
    load_manifest,
    open_state,
    readable_lines,
    sample_requests,
)

ROOT = Path(__file__).resolve().parents[2]
RANKRAY = str(Path(sys.executable).parent / "rankray")


def manifest_for(world: Path, repo: Path, artifacts: Path, name: str = "tiny-feed") -> dict[str, Any]:
    return {
        "apiVersion": "rankray.io/v1alpha1",
        "kind": "RankingModel",
        "metadata": {"name": name},
        "spec": {
            "featureRepo": {"path": str(repo)},
            "data": {"source": str(world)},
            "model": {"kind": "ligr", "size": "tiny", "historyLength": 16},
            "training": {"workers": 1, "epochs": 1},
            "evaluation": {"minLift": -1.0, "against": "baseline"},  # the run's outcome, not the model's
            "serving": {"replicas": 1, "setwiseTopK": 4, "candidatesLimit": 200},
            "artifactRoot": str(artifacts),
        },
    }


def write(path: Path, manifest: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.fixture
def manifest(tiny_world: Path, tmp_path: Path) -> dict[str, Any]:
    return manifest_for(tiny_world, ROOT / "feature_repo", tmp_path / "artifacts")


def test_a_bad_manifest_is_refused_naming_each_field(manifest: dict[str, Any], tmp_path: Path) -> None:
    manifest["spec"]["training"]["workers"] = -1
    manifest["spec"]["serving"]["setwiseTopK"] = 500
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path / "bad.yaml", manifest))
    assert "spec.training.workers" in str(err.value) and "setwiseTopK" in str(err.value)


def test_missing_local_data_is_refused_before_anything_runs(manifest: dict[str, Any], tmp_path: Path) -> None:
    manifest["spec"]["data"]["source"] = str(tmp_path / "nowhere")
    model = load_manifest(write(tmp_path / "m.yaml", manifest))
    with pytest.raises(ManifestError, match=r"spec.data.source: .* no impressions.parquet"):
        check_local_paths(model, LocalStorage())
    manifest["spec"]["data"]["source"] = "pvc://rankray-data/world"
    model = load_manifest(write(tmp_path / "m.yaml", manifest))
    with pytest.raises(ManifestError, match="--mount pvc://rankray-data=DIR"):
        check_local_paths(model, LocalStorage())


def test_a_changed_spec_is_a_new_generation_and_retry_forgets_failed_jobs(
    manifest: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "state.json"
    model = load_manifest(write(tmp_path / "m.yaml", manifest))
    assert open_state(model, path, retry=False).state.generation == 1
    state = open_state(model, path, retry=False)
    assert state.state.generation == 1, "the same spec again is the same generation"
    failed = job_name("tiny-feed", 1, Stage.PREPROCESS)
    state.state.jobs[failed] = JobRecord(
        name=failed, stage=Stage.PREPROCESS, version="v1", state=JobState.FAILED
    )
    state.save()
    changed = copy.deepcopy(manifest)
    changed["spec"]["serving"]["replicas"] = 2
    state = open_state(load_manifest(write(tmp_path / "m.yaml", changed)), path, retry=False)
    assert state.state.generation == 2 and failed in state.state.jobs
    assert open_state(model, path, retry=True).state.jobs == {}, "--retry drops failed jobs"
    assert StateFile.load(path) is not None and StateFile.load(path).generation == 3  # type: ignore[union-attr]


def test_sample_requests_rank_a_logged_session(tiny_world: Path) -> None:
    """The most and the least active feed member, each with the distinct items of their last session."""
    log = pq.read_table(tiny_world / "impressions.parquet").to_pandas()
    feed = log[log["surface"] == "feed"]
    per_member = feed.groupby("member_id").size()
    active, cold = sample_requests(tiny_world)
    assert active["member_id"] == per_member.idxmax() and per_member[cold["member_id"]] == per_member.min()
    for body in (active, cold):
        rows = feed[feed["member_id"] == body["member_id"]]
        last = rows[rows["session_id"] == rows["session_id"].max()]
        assert body["surface"] == "feed"
        assert body["candidates"] == list(dict.fromkeys(last["item_id"].tolist()))
        assert body["k"] == min(5, len(body["candidates"]))


# --- End to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feast_world(
    tiny_world: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, dict[str, str]]:
    """The tiny world with its own Feast repo, built, applied and materialized as `make demo` does."""
    root = tmp_path_factory.mktemp("run-e2e")
    world = root / "data" / "world"
    shutil.copytree(tiny_world, world, ignore=shutil.ignore_patterns("features"))
    repo = root / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__", "data"))
    env = {**os.environ, "RANKRAY_DATA_DIR": str(root / "data"), "RAY_AUTH_MODE": "disabled"}
    for command in (["features", "build", "--world", str(world)], ["features", "apply", "--repo", str(repo)]):
        subprocess.run([RANKRAY, *command], check=True, env=env, cwd=ROOT, capture_output=True)
    subprocess.run(
        [RANKRAY, "features", "materialize", "--repo", str(repo)],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    return world, repo, env


def _submitted(cluster: Path, job: str) -> bool:
    """Whether the Ray head recorded in `cluster` has the job."""
    try:
        dashboard = json.loads(cluster.read_text())["dashboard_url"]
        return any(j.submission_id == job for j in JobSubmissionClient(dashboard).list_jobs())
    except (FileNotFoundError, json.JSONDecodeError, KeyError, ConnectionError, RuntimeError):
        return False


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_an_answer_is_described_one_line_per_ranked_item() -> None:
    body = {"member_id": 7, "candidates": [{"item_id": 1}, {"item_id": 2}]}
    item = {"rank": 1, "item_id": 2, "score": 0.5, "probabilities": {"click": 0.25}}
    answer = {
        "history_len": 1,
        "model": "ligr",
        "model_version": "v3",
        "items": [item],
        "timings": {"total_ms": 5},
    }
    header, *items = describe_answer(body, answer)
    assert header == "member 7 (1 history event), 2 candidates -> top 1 by ligr v3 in 5.0 ms:"
    assert len(items) == 1 and "click 0.250" in items[0]
    cold = describe_answer(body, {**answer, "history_len": 0, "cold_start": True, "items": []})
    assert cold[0].startswith("member 7 (0 history events, cold start)")


def test_run_reaches_serving_after_a_crash_without_running_a_job_twice(
    feast_world: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    world, repo, env = feast_world
    artifacts = tmp_path / "artifacts"
    path = write(tmp_path / "tiny-feed.yaml", manifest_for(world, repo, artifacts))
    folder = artifacts / "tiny-feed"
    command = [RANKRAY, "run", "-f", str(path), "--timeout", "900", "--serve-port", "0"]
    preprocess = job_name("tiny-feed", 1, Stage.PREPROCESS)
    try:
        first = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 400
        while not _submitted(folder / CLUSTER_FILE, preprocess):
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "the first run never submitted its first job"
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)  # a crash: no cleanup, the Ray head lives on
        first_output = first.communicate()[0]
        assert (folder / CLUSTER_FILE).exists(), "the crashed run left its Ray head behind, recorded"

        second = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1000)
        output = second.stdout + second.stderr
        assert second.returncode == 0, f"first run:\n{first_output}\nsecond run:\n{output}"
    finally:
        left = EmbeddedRay.reattach(folder / CLUSTER_FILE)
        if left is not None:
            left.stop(folder / CLUSTER_FILE)

    assert "reattached to the Ray head" in output
    assert f"created RayJob {preprocess}" not in output, "the crashed run's job was found, not resubmitted"
    assert "Serving" in output and "serves v1 at http://127.0.0.1:" in output
    assert " 1. item " in output, "the endpoint ranked the sample request"
    assert not (folder / CLUSTER_FILE).exists(), "the second run stopped the Ray head"
    state = StateFile.load(folder / STATE_FILE)
    assert state is not None and state.status.phase == "Serving"
    assert state.status.current_version is not None and state.status.current_version.name == "v1"
    assert [record.stage for record in state.jobs.values()] == [Stage.PREPROCESS, Stage.TRAIN, Stage.EVALUATE]
    assert all(record.state is JobState.SUCCEEDED for record in state.jobs.values())
    assert (artifacts / "tiny-feed" / "v1" / "config.json").is_file(), "training published the version"
    assert isinstance(load_manifest(path), RankingModel)


def test_job_logs_are_shown_without_colours_and_with_each_progress_bar_once() -> None:
    lines = [
        "\x1b[32mConnected to Ray cluster.\x1b[0m",
        "Reading: 10%|#         | 1/10 [00:01<00:09, 1.0 file/s]",
        "",
        "Writing: 0%|          | 0/4 [00:00<?, ? file/s]",
        "Reading: 90%|######### | 9/10 [00:09<00:01, 1.0 file/s]",
        'half drawn\r{"rows": 3}',
    ]
    assert readable_lines(lines) == [
        "Connected to Ray cluster.",
        "Writing: 0%|          | 0/4 [00:00<?, ? file/s]",
        "Reading: 90%|######### | 9/10 [00:09<00:01, 1.0 file/s]",
        '{"rows": 3}',
    ]
