"""The operator's evaluate stage: the verdict, the counter baseline, and a real run on the tiny world."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workloads.eval.evaluate import read_examples
from workloads.eval.gate import (
    GateSpec,
    GateStageConfig,
    counter_baseline_scores,
    gate_value,
    run,
    verdict,
)
from workloads.eval.metrics import auc
from workloads.models.config import LiGRConfig
from workloads.models.registry import build_model
from workloads.train.artifact import feature_spec, save_artifact


def test_the_lift_is_relative_and_a_reduction_for_normalized_entropy() -> None:
    passed = verdict(0.72, 0.70, GateSpec(metric="auc", min_lift=0.02))
    assert passed["passed"] and passed["lift"] == pytest.approx(0.02 / 0.70) and "+2.86%" in passed["reason"]
    assert not verdict(0.71, 0.70, GateSpec(metric="auc", min_lift=0.02))["passed"]
    assert verdict(0.90, 0.95, GateSpec(metric="normalized_entropy"))["passed"]
    assert not verdict(0.97, 0.95, GateSpec(metric="normalized_entropy"))["passed"]
    assert verdict(0.69, 0.70, GateSpec(min_lift=-0.02))["passed"]  # a tolerated regression
    undefined = verdict(None, 0.7, GateSpec())
    assert not undefined["passed"] and "undefined" in undefined["reason"]


def test_the_gate_reads_one_task_or_the_mean_and_names_an_unknown_task() -> None:
    per_task = {"click": 0.6, "contribution": 0.7, "long_dwell": None}
    assert gate_value(per_task, GateSpec(task="contribution")) == 0.7
    assert gate_value(per_task, GateSpec()) == pytest.approx(0.65)
    with pytest.raises(ValueError, match=r"gate\.task 'apply'.*expected one of"):
        gate_value(per_task, GateSpec(task="apply"))


def test_the_counter_baseline_learns_from_the_counters(tiny_examples: Path) -> None:
    train = read_examples(tiny_examples, "train", ["feed"])
    evaluation = read_examples(tiny_examples, "eval", ["feed"])
    scored = counter_baseline_scores(train, evaluation)
    n_candidates = sum(len(ids) for ids in evaluation.column("cand_item_id").to_pylist())
    assert scored.probs.shape == scored.labels.shape == (n_candidates, 3)
    assert len(scored.history_len) == n_candidates and scored.rows == evaluation.num_rows
    # the planted member/actor affinities show in the counters: better than chance on every task
    assert all(auc(scored.labels[:, t], scored.probs[:, t]) > 0.55 for t in range(3))


def _publish(root: Path, world: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = LiGRConfig(d_model=16, n_heads=2, n_layers=1, id_dim=8)
    spec = {**feature_spec(cfg, str(world / "items.parquet"), None), "surfaces": ["feed"]}
    return save_artifact(
        root / f"v{seed}", build_model(cfg).state_dict(), cfg, name="m", version=seed, feature_spec=spec
    )


def test_a_stage_run_prints_the_summary_the_operator_reads(
    tmp_path: Path, tiny_world: Path, tiny_examples: Path
) -> None:
    from operators.pipeline import EvaluationSummary, last_json_line

    candidate = _publish(tmp_path, tiny_world, 1)
    config = {
        "kind": "ligr",
        "artifact_dir": str(candidate),
        "world_dir": str(tiny_world),
        "out_dir": str(tmp_path / "eval"),
        "examples_dir": str(tiny_examples),
        "surfaces": ["feed"],
        "gate": {"metric": "auc", "task": "long_dwell", "min_lift": 0.0, "reference_name": "baseline"},
    }
    process = subprocess.run(
        [sys.executable, "-m", "workloads.eval.gate", "--config-json", json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    summary = EvaluationSummary.model_validate(last_json_line(process.stdout))
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    baseline_auc = report["reference"]["overall"]["long_dwell_auc"]
    assert summary.gate.reference == pytest.approx(baseline_auc) and summary.gate.reference_name == "baseline"
    assert summary.gate.value == pytest.approx(summary.task_auc["long_dwell"])
    # an untrained model ranks at chance; the trained counter baseline beats it, so the gate says no
    assert summary.gate.passed is False and summary.gate.lift is not None and summary.gate.lift < 0
    assert summary.auc == pytest.approx(np.mean(list(summary.task_auc.values())))
    assert summary.normalized_entropy is not None and math.isfinite(summary.normalized_entropy)
    low, high = report["summary"]["gate"]["lift_ci95"]  # the lift's 95% interval, sessions resampled
    assert low <= summary.gate.lift <= high and summary.gate.lift_ci95 == [low, high]
    assert "95% interval of the lift" in report["summary"]["gate"]["reason"]
    assert set(report["paired"]) == {"long_dwell"}  # only the gate's task pays for resampling
    paired = report["paired"]["long_dwell"]
    assert paired["difference"] == pytest.approx(summary.gate.value - summary.gate.reference)

    # against the serving version instead: the same model scores the same, so the lift is exactly zero
    served = GateSpec(metric="normalized_entropy", reference_artifact_dir=candidate, reference_name="v1")
    again = run(GateStageConfig.model_validate({**config, "gate": served.model_dump()}))
    assert (
        again["gate"]["lift"] == 0.0 and again["gate"]["passed"] and again["gate"]["reference_name"] == "v1"
    )
    assert "lift_ci95" not in again["gate"]  # an interval for AUC gates only


def test_a_wrong_config_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="examples_dir"):
        run(GateStageConfig(kind="ligr", artifact_dir=tmp_path, world_dir=tmp_path, out_dir=tmp_path / "e"))
    with pytest.raises(ValueError, match="metric"):
        GateSpec.model_validate({"metric": "accuracy"})
